//! The JitPolicy reconciler: resolve each VM to its private IPs and governing NSGs, keep a Deny
//! rule per VM/port in each of them, and on deletion remove those and close every grant under it.

use std::sync::Arc;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use tracing::{info, warn};

use super::Error;
use super::context::Ctx;
use super::grant::closed_status;
use super::nsg::NsgOutcome;
use super::status::apply_status;
use crate::api::condition::{READY, set_condition};
use crate::api::{AccessGrant, GrantPhase, JitPolicy, JitPolicyStatus, ResolvedTarget};
use crate::azure::AzureError;
use crate::plan::{nsgs_of_policy, validate_policy};

pub const FINALIZER: &str = "portcullis.dev/remove-rules";

pub async fn reconcile(policy: Arc<JitPolicy>, ctx: Ctx) -> Result<Action, Error> {
    super::reconcile_with_finalizer(
        "policy",
        FINALIZER,
        policy,
        ctx,
        |event, api, ctx| async move {
            match event {
                Finalizer::Apply(p) => apply(&p, &api, &ctx).await,
                Finalizer::Cleanup(p) => cleanup(&p, &ctx).await,
            }
        },
    )
    .await
}

/// Past the instant a resolution goes stale, so the requeued reconcile reads Azure again.
const STALE_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

/// How soon an object judged by its scope is looked at again while the JitScopes are not listed.
pub const SCOPES_NOT_LISTED_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

async fn apply(policy: &JitPolicy, api: &Api<JitPolicy>, ctx: &Ctx) -> Result<Action, Error> {
    let now = Timestamp::now();
    let generation = policy.metadata.generation;
    let mut status = policy.status.clone().unwrap_or_default();
    status.observed_generation = generation;

    if let Err(denial) = validate_policy(&policy.spec) {
        return keep_last_valid(policy, api, ctx, status, "InvalidPolicy", denial.message).await;
    }
    // Before any Azure call, reads included: a VM outside the namespace's JitScopes is never
    // resolved (its addresses would show in status) nor given a rule.
    // The message names the refused VMs only, never what the scopes allow.
    let ns = policy.namespace().unwrap_or_default();
    let world = ctx.world.snapshot_without_grants();
    if !world.scopes_listed {
        // Not refused, not enforced anew: judged once the JitScopes are known.
        return Ok(Action::requeue(SCOPES_NOT_LISTED_RETRY));
    }
    let scopes = world.scopes();
    let out = scopes.out_of_scope(&ns, &policy.spec).join(", ");
    if !out.is_empty() {
        let why = if scopes.is_scoped(&ns) {
            format!("names VMs outside the Azure scopes (JitScopes) of namespace {ns}: {out}")
        } else {
            format!(
                "no JitScope names namespace {ns}, so its policies may name no VM (closed by default): {out}"
            )
        };
        return keep_last_valid(policy, api, ctx, status, "OutOfScope", why).await;
    }
    status.enforced_spec = Some(policy.spec.clone());

    // Resolve every VM (reads only; each resolution is used for one resync period, and the
    // policy comes back when the first of them goes stale).
    let mut targets = Vec::new();
    let mut missing = Vec::new();
    let mut without_nsg = Vec::new();
    let mut requeue = ctx.resync;
    for vm in &policy.spec.virtual_machines {
        match ctx
            .resolutions
            .resolve(ctx.nsgs.azure().as_ref(), &vm.id)
            .await
        {
            Ok((t, stale_at)) => {
                let left = stale_at.saturating_duration_since(tokio::time::Instant::now());
                requeue = requeue.min(left + STALE_MARGIN);
                if t.nsg_ids.is_empty() {
                    without_nsg.push(vm.id.clone());
                }
                targets.push(ResolvedTarget {
                    virtual_machine: vm.id.clone(),
                    private_ip_addresses: t.private_ips,
                    network_security_groups: t.nsg_ids,
                });
            }
            Err(AzureError::NotFound { .. }) => missing.push(vm.id.clone()),
            Err(e) => return Err(e.into()),
        }
    }
    let previous_nsgs = nsgs_of_policy(policy);
    status.virtual_machine_count = Some(targets.len() as i64);
    status.targets = targets;
    let mut policy = policy.clone();
    if policy.status.as_ref() != Some(&status) {
        policy = write_status(&policy, api, ctx, &status).await?;
    }

    let uid = policy.uid().unwrap_or_default();
    let mut nsgs = nsgs_of_policy(&policy);
    for old in previous_nsgs {
        if !nsgs.iter().any(|n| n.eq_ignore_ascii_case(&old)) {
            nsgs.push(old);
        }
    }
    let mut deny_rules = 0usize;
    let mut band_full = Vec::new();
    let mut drift = Vec::new();
    for outcome in sync_all(&nsgs, ctx, now).await? {
        deny_rules += outcome
            .placed
            .iter()
            .filter(|r| ctx.nsgs.naming().is_policy_rule_of(&r.name, &uid))
            .count();
        band_full.extend(
            outcome
                .unplaced
                .iter()
                .filter(|i| ctx.nsgs.naming().is_policy_rule_of(&i.name, &uid))
                .map(|i| i.name.clone()),
        );
        drift.extend(outcome.corrected.iter().cloned());
    }

    let (ready, reason, message) = if !missing.is_empty() {
        (
            false,
            "VirtualMachineNotFound",
            format!(
                "not found in Azure, or without a network interface: {}",
                missing.join(", ")
            ),
        )
    } else if !without_nsg.is_empty() {
        (
            false,
            "NoNetworkSecurityGroup",
            format!("no NSG governs {}", without_nsg.join(", ")),
        )
    } else if !band_full.is_empty() {
        (
            false,
            "PriorityBandFull",
            format!(
                "no room in the NSG (no free priority in the deny band, or over Azure's 4,000 addresses per NSG) for {}",
                band_full.join(", ")
            ),
        )
    } else {
        (
            true,
            "Enforced",
            format!("{deny_rules} deny rule(s) in {} NSG(s)", nsgs.len()),
        )
    };
    set_condition(
        &mut status.conditions,
        READY,
        ready,
        reason,
        &message,
        generation,
        now,
    );
    if policy.status.as_ref() != Some(&status) {
        write_status(&policy, api, ctx, &status).await?;
        info!(ready, reason, %message, "policy status");
    }
    if !drift.is_empty() {
        ctx.event(
            &policy,
            false,
            "DriftCorrected",
            "Heal",
            format!("put back: {}", drift.join(", ")),
        )
        .await;
    }
    Ok(Action::requeue(requeue))
}

/// How many of a policy's NSGs are synced at once: each sync mostly waits on Azure's
/// long-running operation, and one at a time made a policy over 50 VMs take a minute.
const PARALLEL_NSG_SYNCS: usize = 32;

/// Syncs every NSG, several at once. Every NSG is tried even when one fails, so one broken NSG
/// never keeps the others' Deny rules from being placed; the first failure is then returned.
async fn sync_all(nsgs: &[String], ctx: &Ctx, now: Timestamp) -> Result<Vec<NsgOutcome>, Error> {
    let mut results = Vec::with_capacity(nsgs.len());
    for batch in nsgs.chunks(PARALLEL_NSG_SYNCS) {
        let syncs = batch
            .iter()
            .map(|nsg| async move { ctx.nsgs.sync(nsg, || ctx.world.for_nsg(nsg), now).await });
        results.extend(futures::future::join_all(syncs).await);
    }
    results.into_iter().collect()
}

/// The spec is invalid (`InvalidPolicy`) or names VMs outside its namespace's JitScopes
/// (`OutOfScope`): fail closed. The Deny rules of the last valid spec stay (and are healed), no
/// new grant activates under it (the world's view of it does not validate), and `Ready` says
/// why until the spec is fixed.
async fn keep_last_valid(
    policy: &JitPolicy,
    api: &Api<JitPolicy>,
    ctx: &Ctx,
    mut status: JitPolicyStatus,
    reason: &str,
    why: String,
) -> Result<Action, Error> {
    let now = Timestamp::now();
    let generation = policy.metadata.generation;
    let kept = if status.enforced_spec.is_some() {
        "the Deny rules of the last valid spec stay in force"
    } else {
        "no valid spec was ever enforced, so it has no Deny rules"
    };
    let message = format!("{why}; {kept}; no grant activates under it until it is fixed");
    set_condition(
        &mut status.conditions,
        READY,
        false,
        reason,
        &message,
        generation,
        now,
    );
    if policy.status.as_ref() != Some(&status) {
        write_status(policy, api, ctx, &status).await?;
        warn!(reason, %message, "policy refused");
        ctx.event(policy, true, reason, "Validate", message).await;
    }
    sync_all(&nsgs_of_policy(policy), ctx, now).await?;
    Ok(Action::requeue(ctx.resync))
}

async fn write_status(
    policy: &JitPolicy,
    api: &Api<JitPolicy>,
    ctx: &Ctx,
    status: &JitPolicyStatus,
) -> Result<JitPolicy, Error> {
    let updated = apply_status(api, policy, status).await?;
    ctx.world.record_policy(&updated);
    Ok(updated)
}

async fn cleanup(policy: &JitPolicy, ctx: &Ctx) -> Result<Action, Error> {
    let now = Timestamp::now();
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    // With the policy marked deleted in the world, its Deny rules and its grants' Allow rules
    // are no longer desired: syncing its NSGs removes them.
    ctx.world.record_policy(policy);
    sync_all(&nsgs_of_policy(policy), ctx, now).await?;
    let grants_api: Api<AccessGrant> = Api::namespaced(ctx.client.clone(), &ns);
    let world = ctx.world.snapshot();
    for grant in world.grants.iter().filter(|g| {
        g.namespace().as_deref() == Some(ns.as_str())
            && g.policy_name() == name
            && matches!(
                g.status.as_ref().and_then(|s| s.phase),
                Some(GrantPhase::Active | GrantPhase::Pending)
            )
    }) {
        let msg = format!("JitPolicy {ns}/{name} was deleted");
        let status = closed_status(grant, GrantPhase::Revoked, "PolicyDeleted", &msg, now);
        let updated = apply_status(&grants_api, grant, &status).await?;
        ctx.world.record_grant(&updated);
        ctx.event(grant.as_ref(), false, "Revoked", "Close", msg)
            .await;
    }
    if let Some(uid) = policy.uid() {
        ctx.world.forget(&uid);
    }
    info!("policy removed: its Deny rules and its grants' Allow rules are gone");
    Ok(Action::await_change())
}
