//! The AccessGrant reconciler: validate against the policy, decide the expiry once, open the
//! Allow rules, close them at expiry or on deletion.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use tracing::{info, warn};

use super::Error;
use super::context::Ctx;
use super::nsg::NsgOutcome;
use super::status::apply_status;
use crate::api::condition::{READY, set_condition};
use crate::api::{AccessGrant, AccessGrantStatus, GrantPhase, GrantedRule, JitPolicy};
use crate::plan::{live_grant, naming, nsgs_of_grant, validate_grant};

pub const FINALIZER: &str = "portcullis.dev/close-rules";

pub async fn reconcile(grant: Arc<AccessGrant>, ctx: Ctx) -> Result<Action, Error> {
    super::reconcile_with_finalizer(
        "grant",
        FINALIZER,
        grant,
        ctx,
        |event, api, ctx| async move {
            match event {
                Finalizer::Apply(g) => apply(&g, &api, &ctx).await,
                Finalizer::Cleanup(g) => cleanup(&g, &api, &ctx).await,
            }
        },
    )
    .await
}

fn ts(t: &Option<Time>) -> Option<Timestamp> {
    t.as_ref().map(|t| t.0)
}

fn until(t: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// The rule names of this grant in an NSG outcome.
fn rules_of(grant: &AccessGrant, outcome: &NsgOutcome) -> Vec<GrantedRule> {
    let uid = grant.uid().unwrap_or_default();
    outcome
        .placed
        .iter()
        .filter(|r| naming::is_grant_rule_of(&r.name, &uid))
        .map(|r| GrantedRule {
            network_security_group: outcome.nsg_id.clone(),
            name: r.name.clone(),
            priority: r.priority,
        })
        .collect()
}

/// Syncs every NSG the grant has or had rules in. With the grant no longer live in the world,
/// this closes it.
async fn sync_grant_nsgs(
    grant: &AccessGrant,
    policy: Option<&JitPolicy>,
    ctx: &Ctx,
    now: Timestamp,
) -> Result<Vec<NsgOutcome>, Error> {
    let mut outcomes = Vec::new();
    for nsg in nsgs_of_grant(grant, policy) {
        outcomes.push(ctx.nsgs.sync(&nsg, || ctx.world.snapshot(), now).await?);
    }
    Ok(outcomes)
}

/// The status of a grant whose rules are gone: its final phase, no rules, and why.
pub fn closed_status(
    grant: &AccessGrant,
    phase: GrantPhase,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> AccessGrantStatus {
    let mut status = grant.status.clone().unwrap_or_default();
    status.phase = Some(phase);
    status.rules.clear();
    status.observed_generation = grant.metadata.generation;
    set_condition(
        &mut status.conditions,
        READY,
        false,
        reason,
        message,
        grant.metadata.generation,
        now,
    );
    status
}

async fn close(
    grant: &AccessGrant,
    api: &Api<AccessGrant>,
    ctx: &Ctx,
    phase: GrantPhase,
    reason: &str,
    message: String,
) -> Result<(), Error> {
    let now = Timestamp::now();
    ctx.world.record_grant(grant);
    let world = ctx.world.snapshot();
    let policy = world.policy(
        &grant.namespace().unwrap_or_default(),
        &grant.spec.policy_ref.name,
    );
    let status = grant.status.clone().unwrap_or_default();
    // A grant that never opened anything (denied, pending) has nothing to close in Azure.
    if status.activated_at.is_some() || !status.rules.is_empty() {
        sync_grant_nsgs(grant, policy, ctx, now).await?;
    }
    let was = status.phase;
    let status = closed_status(grant, phase, reason, &message, now);
    if grant.status.as_ref() != Some(&status) {
        let updated = apply_status(api, grant, &status).await?;
        ctx.world.record_grant(&updated);
    }
    if was != Some(phase) {
        let lag = ts(&status.expires_at).map(|e| now.duration_since(e).as_secs_f64());
        if let (GrantPhase::Expired, Some(lag)) = (phase, lag) {
            ctx.telemetry.grant_closed_at_expiry(lag);
        }
        info!(
            phase = phase.as_str(),
            reason,
            expiry_lag_seconds = lag,
            "grant closed"
        );
        ctx.event(grant, false, phase.as_str(), "Close", message)
            .await;
    }
    Ok(())
}

async fn apply(grant: &AccessGrant, api: &Api<AccessGrant>, ctx: &Ctx) -> Result<Action, Error> {
    let now = Timestamp::now();
    let ns = grant.namespace().unwrap_or_default();
    let policy_name = &grant.spec.policy_ref.name;
    let mut status = grant.status.clone().unwrap_or_default();
    let generation = grant.metadata.generation;

    match status.phase {
        Some(GrantPhase::Expired | GrantPhase::Revoked) => {
            if !status.rules.is_empty() {
                let phase = status.phase.unwrap_or(GrantPhase::Expired);
                close(
                    grant,
                    api,
                    ctx,
                    phase,
                    phase.as_str(),
                    "closing rules left behind".into(),
                )
                .await?;
            }
            return Ok(Action::await_change());
        }
        Some(GrantPhase::Denied) if status.observed_generation == generation => {
            return Ok(Action::await_change());
        }
        _ => {}
    }

    let world = ctx.world.snapshot();
    let policy = world
        .policy(&ns, policy_name)
        .filter(|p| p.metadata.deletion_timestamp.is_none());

    let mut grant = grant.clone();
    let expires_at = match ts(&status.expires_at) {
        Some(expires_at) => expires_at,
        None => {
            // Not activated yet: validate, then decide the window once.
            let Some(policy) = policy else {
                return pending(
                    &grant,
                    api,
                    ctx,
                    &mut status,
                    "PolicyNotFound",
                    format!("JitPolicy {ns}/{policy_name} does not exist (yet)"),
                )
                .await;
            };
            let valid = match validate_grant(policy_name, &policy.spec, &grant.spec, now) {
                Ok(v) => v,
                Err(denial) => {
                    status.phase = Some(GrantPhase::Denied);
                    status.observed_generation = generation;
                    set_condition(
                        &mut status.conditions,
                        READY,
                        false,
                        denial.reason.as_str(),
                        &denial.message,
                        generation,
                        now,
                    );
                    let updated = apply_status(api, &grant, &status).await?;
                    ctx.world.record_grant(&updated);
                    warn!(reason = denial.reason.as_str(), message = %denial.message, "grant denied");
                    ctx.event(&grant, true, "Denied", "Validate", denial.message)
                        .await;
                    return Ok(Action::await_change());
                }
            };
            let resolved = policy.status.as_ref().is_some_and(|s| {
                s.targets.iter().any(|t| {
                    t.virtual_machine.eq_ignore_ascii_case(&valid.vm_id)
                        && !t.network_security_groups.is_empty()
                })
            });
            if !resolved {
                return pending(
                    &grant,
                    api,
                    ctx,
                    &mut status,
                    "WaitingForPolicy",
                    format!(
                        "JitPolicy {ns}/{policy_name} has not resolved {} to its NSGs yet",
                        valid.vm_id
                    ),
                )
                .await;
            }
            let expires_at = valid.expires_at(now);
            status.phase = Some(GrantPhase::Active);
            status.activated_at = Some(Time(now));
            status.expires_at = Some(Time(expires_at));
            status.observed_generation = generation;
            set_condition(
                &mut status.conditions,
                READY,
                false,
                "Opening",
                "writing the Allow rules",
                generation,
                now,
            );
            grant = apply_status(api, &grant, &status).await?;
            ctx.world.record_grant(&grant);
            info!(expires_at = %expires_at, "grant activated");
            expires_at
        }
    };

    if expires_at <= now {
        let message = format!("access ended at {expires_at}");
        close(&grant, api, ctx, GrantPhase::Expired, "Expired", message).await?;
        return Ok(Action::await_change());
    }
    if live_grant(&grant, policy, now).is_none() {
        let message = match policy {
            None => format!("JitPolicy {ns}/{policy_name} was deleted"),
            Some(p) => match validate_grant(
                policy_name,
                &p.spec,
                &grant.spec,
                ts(&status.activated_at).unwrap_or(now),
            ) {
                Err(denial) => {
                    format!("the policy no longer allows this grant: {}", denial.message)
                }
                Ok(_) => "the policy no longer resolves this VM".to_string(),
            },
        };
        close(
            &grant,
            api,
            ctx,
            GrantPhase::Revoked,
            "NoLongerAllowed",
            message,
        )
        .await?;
        return Ok(Action::await_change());
    }

    // Open, or keep open and heal.
    let recorded: Vec<String> = status
        .rules
        .iter()
        .map(|r| r.name.to_ascii_lowercase())
        .collect();
    let outcomes = sync_grant_nsgs(&grant, policy, ctx, now).await?;
    let uid = grant.uid().unwrap_or_default();
    let mut rules = Vec::new();
    let mut band_full = Vec::new();
    let mut drift = Vec::new();
    for outcome in &outcomes {
        rules.extend(rules_of(&grant, outcome));
        band_full.extend(
            outcome
                .unplaced
                .iter()
                .filter(|i| naming::is_grant_rule_of(&i.name, &uid))
                .map(|i| i.name.clone()),
        );
        drift.extend(outcome.corrected.iter().cloned());
        drift.extend(
            outcome
                .created
                .iter()
                .filter(|n| recorded.contains(&n.to_ascii_lowercase()))
                .cloned(),
        );
        drift.extend(
            outcome
                .deleted
                .iter()
                .filter(|n| !naming::is_grant_rule_of(n, &uid))
                .cloned(),
        );
    }
    let mut status = grant.status.clone().unwrap_or_default();
    let was_ready =
        crate::api::condition::find(&status.conditions, READY).is_some_and(|c| c.status == "True");
    status.rules = rules;
    status.observed_generation = generation;
    if band_full.is_empty() {
        let msg = format!("{} rule(s) open until {expires_at}", status.rules.len());
        set_condition(
            &mut status.conditions,
            READY,
            true,
            "Opened",
            &msg,
            generation,
            now,
        );
    } else {
        let msg = format!(
            "no free priority in the allow band for {}",
            band_full.join(", ")
        );
        set_condition(
            &mut status.conditions,
            READY,
            false,
            "PriorityBandFull",
            &msg,
            generation,
            now,
        );
    }
    if grant.status.as_ref() != Some(&status) {
        let updated = apply_status(api, &grant, &status).await?;
        ctx.world.record_grant(&updated);
    }
    if band_full.is_empty() && !was_ready {
        let ports: Vec<String> = grant.spec.ports.iter().map(u16::to_string).collect();
        let note = format!(
            "opened port(s) {} on {} from {} until {expires_at}: {}",
            ports.join(","),
            grant.spec.virtual_machine,
            grant.spec.source_address_prefix,
            grant.spec.justification
        );
        ctx.event(&grant, false, "Activated", "Open", note).await;
    }
    if !drift.is_empty() {
        ctx.event(
            &grant,
            false,
            "DriftCorrected",
            "Heal",
            format!("put back or removed: {}", drift.join(", ")),
        )
        .await;
    }
    Ok(Action::requeue(until(expires_at, now).min(ctx.resync)))
}

async fn pending(
    grant: &AccessGrant,
    api: &Api<AccessGrant>,
    ctx: &Ctx,
    status: &mut AccessGrantStatus,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let generation = grant.metadata.generation;
    status.phase = Some(GrantPhase::Pending);
    status.observed_generation = generation;
    set_condition(
        &mut status.conditions,
        READY,
        false,
        reason,
        &message,
        generation,
        Timestamp::now(),
    );
    if grant.status.as_ref() != Some(status) {
        let updated = apply_status(api, grant, status).await?;
        ctx.world.record_grant(&updated);
        info!(reason, %message, "grant pending");
    }
    // The policy watch wakes the grant when its policy appears or changes; this is the backstop.
    Ok(Action::requeue(ctx.resync))
}

async fn cleanup(grant: &AccessGrant, api: &Api<AccessGrant>, ctx: &Ctx) -> Result<Action, Error> {
    let phase = match grant.status.as_ref().and_then(|s| s.phase) {
        Some(p @ (GrantPhase::Expired | GrantPhase::Denied)) => p,
        _ => GrantPhase::Revoked,
    };
    close(
        grant,
        api,
        ctx,
        phase,
        "Deleted",
        "the grant was deleted; its rules are closed".into(),
    )
    .await?;
    if let Some(uid) = grant.uid() {
        ctx.world.forget(&uid);
    }
    Ok(Action::await_change())
}
