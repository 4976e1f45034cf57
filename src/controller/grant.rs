//! The AccessGrant reconciler. A grant's life is a set of small phases over one record:
//! validate -> activate (decide the window once, freeze what it opens) -> open and heal -> close
//! (at expiry, on revocation, on deletion). Decisions are made by the pure planner; this module
//! only reads the world, calls it, writes Azure through the NSG syncer and reports.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::Event as Finalizer;
use tracing::{debug, info, warn};

use super::Error;
use super::audit::Step;
use super::context::Ctx;
use super::nsg::NsgOutcome;
use super::policy::SCOPES_NOT_LISTED_RETRY;
use super::rounds::{Answer, Intent};
use super::status::{apply_status, apply_status_if_unchanged};
use crate::admission::verify;
use crate::api::condition::{READY, set_condition};
use crate::api::{
    AccessGrant, AccessGrantStatus, Decision, GRANT_FINALIZER, GrantPhase, GrantedRule, JitPolicy,
    RecordedDecision,
};
use crate::azure::AzureError;
use crate::plan::approval::{self, ApprovalState};
use crate::plan::retention::{CLOSE_FAILED, Retention, retention};
use crate::plan::scope::marked_out_of_scope;
use crate::plan::{
    DenialReason, Naming, check_address_family, granted_access, live_grant_checked, nsgs_of_grant,
    validate_grant_checked,
};

/// The condition that says a spec edit after activation was not applied.
pub const SPEC_FROZEN: &str = "SpecFrozen";

pub async fn reconcile(grant: Arc<AccessGrant>, ctx: Ctx) -> Result<Action, Error> {
    super::reconcile_with_finalizer(
        "grant",
        GRANT_FINALIZER,
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

/// How long until `t`, counted from the moment this is called: kube-runtime starts a requeue's
/// timer when the reconcile returns, so the delay must be taken after the reconcile's writes.
fn until(t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO)
}

/// The rule names of this grant in an NSG outcome.
fn rules_of(grant: &AccessGrant, outcome: &NsgOutcome, naming: &Naming) -> Vec<GrantedRule> {
    let uid = grant.uid().unwrap_or_default();
    outcome
        .placed
        .iter()
        .filter(|r| naming.is_grant_rule_of(&r.name, &uid))
        .map(|r| GrantedRule {
            network_security_group: outcome.nsg_id.clone(),
            name: r.name.clone(),
            priority: r.priority,
        })
        .collect()
}

/// One NSG that could not be brought in line, and why.
struct NsgFailure {
    nsg_id: String,
    error: Arc<Error>,
}

/// What the grant's NSGs answered, each on its own: one failing NSG never keeps the others from
/// being written. An NSG that no longer exists holds nothing, so it counts as in line.
type NsgAnswers = (Vec<NsgOutcome>, Vec<NsgFailure>);

/// How a reconcile waits for its NSGs' rounds.
#[derive(Clone, Copy)]
enum Wait {
    /// Returns at once; the rounds wake the grant (its slot is free meanwhile).
    Woken,
    /// Waits in place: a finalizer must not be removed before the close is confirmed.
    InPlace,
}

/// Whether a step is done, or waits for its NSGs' rounds.
enum Progress {
    Done,
    Waiting,
}

/// How soon a reconcile that met a newer version of its grant looks again (the watch brings the
/// newer copy first, as a rule).
const STALE_COPY_RETRY: Duration = Duration::from_secs(2);

/// How long a grant waiting for its NSGs' rounds waits at most before it looks again, should a
/// wake be lost.
const WAITING_BACKSTOP: Duration = Duration::from_secs(10);

impl Progress {
    /// The action after a close: a closed grant waits for a change (its own status write).
    fn after_close(self) -> Action {
        match self {
            Progress::Done => Action::await_change(),
            Progress::Waiting => Action::requeue(WAITING_BACKSTOP),
        }
    }
}

/// Asks for every NSG the grant has or had rules in to be brought in line with the world (see
/// `rounds`). With the grant no longer live in the world, this closes it. `None`: not every NSG
/// has answered yet, and the grant is woken when they have.
async fn ask_grant_nsgs(
    grant: &AccessGrant,
    policy: Option<&JitPolicy>,
    ctx: &Ctx,
    intent: Intent,
    wait: Wait,
) -> Option<NsgAnswers> {
    let nsgs = nsgs_of_grant(grant, policy);
    // A resync of a grant whose NSGs are in line with an unchanged world needs no round.
    let in_line: Option<Vec<NsgOutcome>> = nsgs.iter().map(|n| ctx.nsgs.in_line_now(n)).collect();
    if let Some(outcomes) = in_line.filter(|o| !o.is_empty()) {
        ctx.rounds.withdraw(grant, &nsgs, intent);
        return Some((outcomes, Vec::new()));
    }
    if intent == Intent::Close {
        nsgs.iter().for_each(|n| ctx.nsgs.close_asked(n));
    }
    let answers = match wait {
        Wait::Woken => ctx.rounds.ask(grant, &nsgs, intent),
        Wait::InPlace => Answer::Ready(ctx.rounds.ask_and_wait(grant, &nsgs, intent).await),
    };
    let answers = match answers {
        Answer::Ready(answers) => answers,
        Answer::Pending { new } => {
            // New requests still coming hold back a spaced-out open (see `NsgSyncer::asked`);
            // a grant woken by one NSG's round while it waits for another's asks nothing new.
            new.iter().for_each(|n| ctx.nsgs.asked(n));
            return None;
        }
    };
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for (nsg_id, result) in answers {
        match result {
            // Status names the NSG as the grant's policy does, whoever's casing the sync had
            // (a status that flips between casings is rewritten at every resync).
            Ok(outcome) => outcomes.push(NsgOutcome { nsg_id, ..outcome }),
            Err(e) if matches!(e.as_ref(), Error::Azure(AzureError::NotFound { .. })) => outcomes
                .push(NsgOutcome {
                    nsg_id,
                    ..Default::default()
                }),
            Err(error) => failures.push(NsgFailure { nsg_id, error }),
        }
    }
    Some((outcomes, failures))
}

/// The recorded rules in the NSGs that failed: as far as we know they still stand.
fn standing_in(rules: &[GrantedRule], failures: &[NsgFailure]) -> Vec<GrantedRule> {
    rules
        .iter()
        .filter(|r| {
            failures
                .iter()
                .any(|f| f.nsg_id.eq_ignore_ascii_case(&r.network_security_group))
        })
        .cloned()
        .collect()
}

fn describe(failures: &[NsgFailure]) -> String {
    failures
        .iter()
        .map(|f| format!("{}: {}", f.nsg_id, f.error))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The error a reconcile returns for failed NSGs, so it is retried (with backoff): it carries
/// the first failure's Azure error, which decides the delay; status already names them all.
fn first_error(failures: Vec<NsgFailure>) -> Result<(), Error> {
    let summary = describe(&failures);
    match failures.into_iter().next() {
        Some(f) => Err(Error::NsgsFailed {
            summary,
            first: f.error,
        }),
        None => Ok(()),
    }
}

/// The status of a grant whose rules are gone: its final phase, no rules, and why.
pub fn closed_status(
    grant: &AccessGrant,
    phase: GrantPhase,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> AccessGrantStatus {
    let mut status = status_in_phase(grant, phase, reason, message, now);
    status.rules.clear();
    status
}

/// The grant's status in `phase`, its spec seen, and `Ready=False` saying why. A final phase
/// records when it was reached (kept while the grant stays in it); any other clears that.
fn status_in_phase(
    grant: &AccessGrant,
    phase: GrantPhase,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> AccessGrantStatus {
    let mut status = grant.status.clone().unwrap_or_default();
    let unchanged =
        status.phase == Some(phase) && status.observed_generation == grant.metadata.generation;
    status.finished_at = match (phase.is_final(), unchanged) {
        (false, _) => None,
        (true, true) => status.finished_at.or(Some(Time(now))),
        (true, false) => Some(Time(now)),
    };
    status.phase = Some(phase);
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

/// Closes the grant: removes its Allow rules from every NSG (each on its own), then records the
/// final phase. Rules an NSG refused to give up stay listed in status with the NSG and the
/// error, a Warning Event says so, and the reconcile fails so that it is retried with backoff.
async fn close(
    grant: &AccessGrant,
    api: &Api<AccessGrant>,
    ctx: &Ctx,
    phase: GrantPhase,
    reason: &str,
    message: String,
    wait: Wait,
) -> Result<Progress, Error> {
    ctx.world.record_grant(grant);
    let world = ctx.world.snapshot_without_grants();
    let policy = world.policy(&grant.namespace().unwrap_or_default(), grant.policy_name());
    let before = grant.status.clone().unwrap_or_default();
    // A grant that never opened anything (denied, pending) has nothing to close in Azure.
    let failures = if before.activated_at.is_some() || !before.rules.is_empty() {
        match ask_grant_nsgs(grant, policy, ctx, Intent::Close, wait).await {
            Some((_, failures)) => failures,
            None => return Ok(Progress::Waiting),
        }
    } else {
        Vec::new()
    };
    let now = Timestamp::now();
    let mut status = closed_status(grant, phase, reason, &message, now);
    if !failures.is_empty() {
        status.rules = standing_in(&before.rules, &failures);
        // Not finished until Azure confirms the close: the finished-grant TTL waits for it.
        status.finished_at = None;
        let msg = format!(
            "{message}; rules still standing, retrying: {}",
            describe(&failures)
        );
        let g = grant.metadata.generation;
        set_condition(
            &mut status.conditions,
            READY,
            false,
            CLOSE_FAILED,
            &msg,
            g,
            now,
        );
    }
    let mut current = grant.clone();
    if grant.status.as_ref() != Some(&status) {
        if failures.is_empty() && goes_with_our_finalizer(grant) {
            // Nobody would read it: the Event and the audit record say how it closed.
            current.status = Some(status.clone());
        } else {
            current = apply_status(api, grant, &status).await?;
            ctx.world.record_grant(&current);
        }
    }
    if !failures.is_empty() {
        warn!(failed = %describe(&failures), "grant not fully closed");
        if before.rules != status.rules || before.phase != Some(phase) {
            let note = format!("could not close in {}", describe(&failures));
            ctx.event(grant, true, "CloseFailed", "Close", note).await;
        }
        return first_error(failures).map(|()| Progress::Done);
    }
    if before.phase != Some(phase) || !before.rules.is_empty() {
        let lag = ts(&status.expires_at).map(|e| Timestamp::now().duration_since(e).as_secs_f64());
        if let (GrantPhase::Expired, Some(lag)) = (phase, lag) {
            ctx.telemetry.grant_closed_at_expiry(lag);
        }
        audit_close(&current, &before, phase, reason, &message, lag, ctx);
        info!(
            phase = phase.as_str(),
            reason,
            expiry_lag_seconds = lag,
            "grant closed"
        );
        ctx.event(grant, false, phase.as_str(), "Close", message)
            .await;
    }
    Ok(Progress::Done)
}

/// A grant being deleted that only our finalizer holds: it is gone once the close returns.
fn goes_with_our_finalizer(grant: &AccessGrant) -> bool {
    grant.metadata.deletion_timestamp.is_some()
        && grant.finalizers().iter().all(|f| f == GRANT_FINALIZER)
}

/// How long past `expiresAt` a close may come before the audit trail calls it late.
const CLOSED_LATE_AFTER_SECONDS: f64 = 2.0;

/// Audit records of a close: expired or revoked (with the rules that were closed), and closed
/// late when the last rule went more than [`CLOSED_LATE_AFTER_SECONDS`] past expiry.
fn audit_close(
    closed: &AccessGrant,
    before: &AccessGrantStatus,
    phase: GrantPhase,
    reason: &str,
    message: &str,
    lag: Option<f64>,
    ctx: &Ctx,
) {
    // The record lists the rules that were closed.
    let mut record = closed.clone();
    if let Some(status) = record.status.as_mut() {
        status.rules = before.rules.clone();
    }
    let step = match phase {
        GrantPhase::Expired => Step::Expired,
        _ => Step::Revoked,
    };
    // A denied or pending grant that is deleted never opened anything: nothing to audit here.
    if before.activated_at.is_none() && before.rules.is_empty() {
        return;
    }
    ctx.audit.record(&record, step, reason, message);
    if let (Step::Expired, Some(lag)) = (step, lag)
        && lag > CLOSED_LATE_AFTER_SECONDS
    {
        let late = format!("the last rule closed {lag:.1} s after expiresAt");
        ctx.audit
            .record(&record, Step::ClosedLate, "ClosedLate", &late);
    }
}

/// What activation decided: go on with the activated grant, or stop here with this action.
enum Activation {
    Activated(Box<AccessGrant>),
    Stop(Action),
}

async fn apply(grant: &AccessGrant, api: &Api<AccessGrant>, ctx: &Ctx) -> Result<Action, Error> {
    // The watch may not have shown our own last write yet (a reconcile woken by its NSGs'
    // rounds soon after activating): decide from that write, not from the older copy.
    let newer = ctx.world.newer_write_of(grant);
    let grant = newer.as_deref().unwrap_or(grant);
    let status = grant.status.clone().unwrap_or_default();
    match status.phase {
        Some(phase @ (GrantPhase::Expired | GrantPhase::Revoked)) => {
            if !status.rules.is_empty() {
                let msg = "closing rules left behind".to_string();
                // The status write wakes the grant again, for its finished-grant TTL.
                return close(grant, api, ctx, phase, phase.as_str(), msg, Wait::Woken)
                    .await
                    .map(Progress::after_close);
            }
            return retire(grant, api, ctx).await;
        }
        Some(GrantPhase::Denied) if status.observed_generation == grant.metadata.generation => {
            return retire(grant, api, ctx).await;
        }
        _ => {}
    }
    let grant = match status.expires_at {
        Some(_) => grant.clone(),
        None => match activate(grant, api, ctx).await? {
            Activation::Activated(g) => *g,
            Activation::Stop(action) => return Ok(action),
        },
    };
    let grant = record_legacy_activation(grant, api, ctx).await?;
    let Some(expires_at) = grant.status.as_ref().and_then(|s| ts(&s.expires_at)) else {
        return Err(Error::MissingField("status.expiresAt"));
    };
    let now = Timestamp::now();
    if expires_at <= now {
        let message = format!("access ended at {expires_at}");
        let phase = GrantPhase::Expired;
        return close(&grant, api, ctx, phase, "Expired", message, Wait::Woken)
            .await
            .map(Progress::after_close);
    }
    let world = ctx.world.snapshot_without_grants();
    let ns = grant.namespace().unwrap_or_default();
    let policy = world
        .policy(&ns, grant.policy_name())
        .filter(|p| p.metadata.deletion_timestamp.is_none());
    if let Some(vm) = out_of_scope_now(&grant, &world) {
        let message =
            format!("{vm} is no longer inside the Azure scopes (JitScopes) of namespace {ns}");
        let phase = GrantPhase::Revoked;
        return close(&grant, api, ctx, phase, "OutOfScope", message, Wait::Woken)
            .await
            .map(Progress::after_close);
    }
    let live = policy.and_then(|p| live_grant_checked(&grant, p, &ctx.world.policy_check(p), now));
    if live.is_none() {
        let message = match policy {
            None => format!("JitPolicy {ns}/{} was deleted", grant.policy_name()),
            Some(_) => "the policy no longer allows what this grant opened (or its status was \
                        edited to ask for more)"
                .to_string(),
        };
        let reason = "NoLongerAllowed";
        let phase = GrantPhase::Revoked;
        return close(&grant, api, ctx, phase, reason, message, Wait::Woken)
            .await
            .map(Progress::after_close);
    }
    let next_look = match open_and_heal(&grant, policy, api, ctx, expires_at).await? {
        Progress::Done => ctx.resync,
        Progress::Waiting => WAITING_BACKSTOP,
    };
    Ok(Action::requeue(until(expires_at).min(next_look)))
}

/// The longest a finished grant's reconcile waits for its TTL before it looks again.
const MAX_RETENTION_WAIT: Duration = Duration::from_secs(3600);

/// The finished-grant TTL: a finished grant (see [`crate::plan::retention`]) is deleted once
/// `--finished-grant-ttl` has passed since it finished; until then its reconcile is requeued
/// for that moment, so the deletion comes on time rather than at a resync.
async fn retire(grant: &AccessGrant, api: &Api<AccessGrant>, ctx: &Ctx) -> Result<Action, Error> {
    let ttl = ctx.finished_grant_ttl;
    match retention(grant, ttl, Timestamp::now()) {
        Retention::Keep => Ok(Action::await_change()),
        Retention::Unrecorded => {
            // Finished under a version that kept no `finishedAt`: the TTL counts from now.
            let mut status = grant.status.clone().unwrap_or_default();
            status.finished_at = Some(Time(Timestamp::now()));
            let updated = apply_status(api, grant, &status).await?;
            ctx.world.record_grant(&updated);
            let wait = ttl.unwrap_or(MAX_RETENTION_WAIT).min(MAX_RETENTION_WAIT);
            Ok(Action::requeue(wait))
        }
        Retention::DeleteAt(due) => Ok(Action::requeue(until(due).min(MAX_RETENTION_WAIT))),
        Retention::Due { .. } => delete_finished(grant, api, ctx).await,
    }
}

/// Deletes a finished grant whose TTL has passed, judged again on the object as the API server
/// has it now and deleted only in that version (uid and resourceVersion preconditions): a
/// change since (a failed close, an edit) keeps it. An Event and an audit record (`deleted`,
/// reason `FinishedTtl`) say so; the finalizer then runs as for any deletion, finding nothing
/// open.
async fn delete_finished(
    grant: &AccessGrant,
    api: &Api<AccessGrant>,
    ctx: &Ctx,
) -> Result<Action, Error> {
    let name = grant.name_any();
    let Some(latest) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let ttl = ctx.finished_grant_ttl;
    let Retention::Due { finished_at } = retention(&latest, ttl, Timestamp::now()) else {
        // Changed since the cache saw it: the watch brings the new version to be judged.
        return Ok(Action::await_change());
    };
    let phase = latest
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .map_or("finished", GrantPhase::as_str);
    let ttl = crate::api::duration::format_iso8601(ttl.unwrap_or_default());
    let message =
        format!("{phase} since {finished_at}; deleted after the finished-grant TTL {ttl}");
    ctx.event(&latest, false, "FinishedTtl", "Delete", message.clone())
        .await;
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: latest.uid(),
            resource_version: latest.resource_version(),
        }),
        ..Default::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Action::await_change()),
        // Changed between the read and the delete: judged again on the new version.
        Err(kube::Error::Api(e)) if e.code == 409 => return Ok(Action::await_change()),
        Err(e) => return Err(e.into()),
    }
    ctx.audit
        .record(&latest, Step::Deleted, "FinishedTtl", &message);
    info!(%finished_at, "finished grant deleted after its TTL");
    Ok(Action::await_change())
}

/// The VM of an active grant, if a JitScope change took it out of the namespace's scopes (never
/// judged before the scopes are listed).
fn out_of_scope_now(grant: &AccessGrant, world: &super::world::World) -> Option<String> {
    let vm = &grant.granted()?.virtual_machine;
    let ns = grant.namespace().unwrap_or_default();
    (world.scopes_listed && !world.scopes().allows(&ns, vm)).then(|| vm.clone())
}

/// Validates a grant that has not activated yet against its policy, and activates it: the
/// window is decided once, and what it opens is frozen in `status.granted`.
async fn activate(
    grant: &AccessGrant,
    api: &Api<AccessGrant>,
    ctx: &Ctx,
) -> Result<Activation, Error> {
    // Whole seconds, as status stores them: the expiry users read is the one the close is
    // scheduled for, never up to a second before it.
    let now = Timestamp::now();
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let ns = grant.namespace().unwrap_or_default();
    let policy_name = &grant.spec.policy_ref.name;
    let world = ctx.world.snapshot_without_grants();
    let Some(policy) = world
        .policy(&ns, policy_name)
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    else {
        let msg = format!("JitPolicy {ns}/{policy_name} does not exist (yet)");
        return pending(grant, api, ctx, "PolicyNotFound", msg).await;
    };
    if !world.scopes_listed {
        return Ok(Activation::Stop(Action::requeue(SCOPES_NOT_LISTED_RETRY)));
    }
    let out_of_scope = marked_out_of_scope(&policy.spec);
    if !out_of_scope.is_empty() {
        let msg = format!(
            "JitPolicy {ns}/{policy_name} names VMs outside the namespace's Azure scopes ({}); \
             nothing under it activates until a cluster admin's JitScope covers them",
            out_of_scope.join(", ")
        );
        return pending(grant, api, ctx, "OutOfScope", msg).await;
    }
    let check = ctx.world.policy_check(policy);
    let valid =
        match validate_grant_checked(policy_name, &policy.spec, &check.spec, &grant.spec, now) {
            // Not the grant's fault: it waits until the policy is fixed.
            Err(d) if d.reason == DenialReason::PolicyInvalid => {
                return pending(grant, api, ctx, "PolicyInvalid", d.message).await;
            }
            Err(denial) => return deny(grant, api, ctx, denial).await,
            Ok(v) => v,
        };
    let (attributed, approval) = attribute(grant, policy, &world, ctx, now);
    audit_request_and_decisions(grant, &attributed, ctx);
    let grant = &attributed;
    match approval {
        ApprovalState::Approved => {}
        ApprovalState::Denied(denial) => return deny(grant, api, ctx, denial).await,
        ApprovalState::Waiting { deadline, message } => {
            audit_awaiting_approval(grant, policy, &message, ctx);
            pending(grant, api, ctx, "AwaitingApproval", message).await?;
            return Ok(Activation::Stop(Action::requeue(
                until(deadline).min(ctx.resync),
            )));
        }
    }
    let target = policy.status.as_ref().and_then(|s| {
        s.targets.iter().find(|t| {
            t.virtual_machine.eq_ignore_ascii_case(&valid.vm_id)
                && !t.network_security_groups.is_empty()
        })
    });
    let Some(target) = target else {
        let msg = format!(
            "JitPolicy {ns}/{policy_name} has not resolved {} to its NSGs yet",
            valid.vm_id
        );
        return pending(grant, api, ctx, "WaitingForPolicy", msg).await;
    };
    if let Err(denial) = check_address_family(&valid, target) {
        return deny(grant, api, ctx, denial).await;
    }
    let generation = grant.metadata.generation;
    let expires_at = valid.expires_at(now);
    let mut status = grant.status.clone().unwrap_or_default();
    status.phase = Some(GrantPhase::Active);
    status.finished_at = None;
    status.activated_at = Some(Time(now));
    status.expires_at = Some(Time(expires_at));
    status.granted = Some(granted_access(
        policy_name,
        &valid,
        &grant.spec,
        generation.unwrap_or_default(),
    ));
    status.observed_generation = generation;
    let msg = "writing the Allow rules";
    set_condition(
        &mut status.conditions,
        READY,
        false,
        "Opening",
        msg,
        generation,
        now,
    );
    // Once only: from a copy older than our own last write (the watch behind it), this grant
    // may already be active, and a second activation would move its expiry later.
    let Some(activated) = apply_status_if_unchanged(api, grant, &status).await? else {
        debug!("the grant changed since this copy: activating from the newer one");
        return Ok(Activation::Stop(Action::requeue(STALE_COPY_RETRY)));
    };
    ctx.world.record_grant(&activated);
    info!(expires_at = %expires_at, "grant activated");
    Ok(Activation::Activated(Box::new(activated)))
}

/// Who asked and who decided, as far as the webhook's stamps vouch for them, written into the
/// grant's status; and whether the grant may go on to activate. Nothing unverified is trusted:
/// a policy that restricts requesters or needs approval denies a grant without a verified
/// requester, and a decision counts only if its stamp verifies for this grant as it is now.
fn attribute(
    grant: &AccessGrant,
    policy: &JitPolicy,
    world: &super::world::World,
    ctx: &Ctx,
    now: Timestamp,
) -> (AccessGrant, ApprovalState) {
    let ns = grant.namespace().unwrap_or_default();
    let requester = ctx
        .stamp_key
        .as_ref()
        .and_then(|key| verify::requester(key, grant).ok())
        .map(|who| who.user_ref());
    let decisions = ctx
        .stamp_key
        .as_ref()
        .map(|key| verify::decisions(key, &world.approvals_for(&ns, &grant.name_any()), grant))
        .unwrap_or_default();
    let mut attributed = grant.clone();
    let status = attributed.status.get_or_insert_with(Default::default);
    status.requested_by = requester.clone();
    status.approvals = decisions
        .iter()
        .map(|d| RecordedDecision {
            approver: d.approver.username.clone(),
            decision: d.decision,
            at: Time(d.at),
            comment: d.comment.clone(),
        })
        .collect();
    let needed = approval::requirements(&policy.spec, &grant.spec);
    let state = match approval::check_requester(
        grant.policy_name(),
        &policy.spec,
        requester.as_ref(),
        !needed.is_empty(),
    ) {
        Err(denial) => ApprovalState::Denied(denial),
        Ok(()) => {
            let since = grant
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(now, |t| t.0);
            let username = requester.as_ref().map(|r| r.username.as_str());
            approval::approval_state(
                &needed,
                username.unwrap_or_default(),
                &decisions,
                since,
                now,
            )
        }
    };
    (attributed, state)
}

/// The audit record (and notification) of a grant that starts waiting for approval, naming
/// who may approve; once per wait, not again while it keeps waiting.
fn audit_awaiting_approval(grant: &AccessGrant, policy: &JitPolicy, message: &str, ctx: &Ctx) {
    let waiting = grant
        .status
        .as_ref()
        .and_then(|s| crate::api::condition::find(&s.conditions, READY))
        .is_some_and(|c| c.reason == "AwaitingApproval");
    if waiting {
        return;
    }
    let mut approvers = crate::api::Subjects::default();
    for r in approval::requirements(&policy.spec, &grant.spec) {
        for user in r.approvers.users {
            if !approvers.users.contains(&user) {
                approvers.users.push(user);
            }
        }
        for group in r.approvers.groups {
            if !approvers.groups.contains(&group) {
                approvers.groups.push(group);
            }
        }
    }
    let mut record =
        super::audit::Record::of(grant, Step::AwaitingApproval, "AwaitingApproval", message);
    record.approvers = Some(approvers);
    ctx.audit.emit(record);
}

/// How long a grant may stay open past `expiresAt` before its close is reported overdue (audit
/// step `closeOverdue`, and a notification). Closes normally land within 2 s.
pub const CLOSE_OVERDUE_AFTER: Duration = Duration::from_secs(10);

/// Whether the grant is past `expiresAt` by more than `grace` with a rule still standing (or
/// not closed yet): the overdue gauge's test, after a grace period.
pub fn overdue(grant: &AccessGrant, now: Timestamp, grace: Duration) -> bool {
    let Some(status) = grant.status.as_ref() else {
        return false;
    };
    let late = ts(&status.expires_at).is_some_and(|e| past_expiry(e, now) > grace);
    status.holds_access_open() && late
}

fn past_expiry(expires_at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(expires_at)).unwrap_or(Duration::ZERO)
}

/// Records `closeOverdue` once for each grant that turned overdue (see [`overdue`]), and
/// forgets the ones that no longer are, so a grant that turns overdue again is recorded again.
pub fn record_overdue(ctx: &Ctx, world: &super::world::World, now: Timestamp) {
    let late: Vec<&AccessGrant> = world
        .grants
        .iter()
        .map(Arc::as_ref)
        .filter(|g| overdue(g, now, CLOSE_OVERDUE_AFTER))
        .collect();
    let mut recorded = ctx.overdue_recorded();
    recorded.retain(|uid| {
        late.iter()
            .any(|g| g.uid().as_deref() == Some(uid.as_str()))
    });
    for grant in late {
        let Some(uid) = grant.uid() else { continue };
        if !recorded.insert(uid) {
            continue;
        }
        let status = grant.status.clone().unwrap_or_default();
        let expires_at = ts(&status.expires_at).unwrap_or(now);
        let why = crate::api::condition::find(&status.conditions, READY)
            .map(|c| format!(": {}", c.message))
            .unwrap_or_default();
        let message = format!(
            "still open {} s after expiresAt {expires_at}, {} rule(s) standing{why}",
            past_expiry(expires_at, now).as_secs(),
            status.rules.len()
        );
        warn!(grant = %format!("{}/{}", grant.namespace().unwrap_or_default(), grant.name_any()), %message, "close overdue");
        ctx.audit
            .record(grant, Step::CloseOverdue, "CloseOverdue", &message);
    }
}

/// Audit records for a grant seen for the first time, and for each decision not seen before.
fn audit_request_and_decisions(before: &AccessGrant, attributed: &AccessGrant, ctx: &Ctx) {
    let seen = before.status.as_ref();
    if seen.and_then(|s| s.phase).is_none() {
        ctx.audit.record(
            attributed,
            Step::Requested,
            "Requested",
            "a grant was requested",
        );
    }
    let known = seen.map(|s| s.approvals.as_slice()).unwrap_or_default();
    let decisions = attributed
        .status
        .as_ref()
        .map(|s| s.approvals.as_slice())
        .unwrap_or_default();
    for d in decisions.iter().filter(|d| !known.contains(d)) {
        let (step, verb) = match d.decision {
            Decision::Approve => (Step::Approved, "approved"),
            Decision::Reject => (Step::Rejected, "rejected"),
        };
        let message = format!("{verb} by {}", d.approver);
        ctx.audit
            .record(attributed, step, d.decision.as_str(), &message);
    }
}

/// A grant activated by a version that kept no record of what it opened gets one, from its
/// spec as validated at its activation, so that later spec edits are frozen out from now on.
async fn record_legacy_activation(
    grant: AccessGrant,
    api: &Api<AccessGrant>,
    ctx: &Ctx,
) -> Result<AccessGrant, Error> {
    let Some(status) = grant.status.as_ref() else {
        return Ok(grant);
    };
    let (None, Some(activated_at), Some(GrantPhase::Active)) =
        (&status.granted, ts(&status.activated_at), status.phase)
    else {
        return Ok(grant);
    };
    let ns = grant.namespace().unwrap_or_default();
    let policy_name = grant.spec.policy_ref.name.clone();
    let world = ctx.world.snapshot_without_grants();
    let Some(policy) = world.policy(&ns, &policy_name) else {
        return Ok(grant);
    };
    let check = ctx.world.policy_check(policy);
    let Ok(valid) = validate_grant_checked(
        &policy_name,
        &policy.spec,
        &check.spec,
        &grant.spec,
        activated_at,
    ) else {
        // Not valid any more: the liveness check revokes it.
        return Ok(grant);
    };
    let mut status = status.clone();
    let generation = status.observed_generation.unwrap_or_default();
    status.granted = Some(granted_access(
        &policy_name,
        &valid,
        &grant.spec,
        generation,
    ));
    let updated = apply_status(api, &grant, &status).await?;
    ctx.world.record_grant(&updated);
    Ok(updated)
}

/// Refuses the grant for good (until its spec changes): nothing was written to Azure.
async fn deny(
    grant: &AccessGrant,
    api: &Api<AccessGrant>,
    ctx: &Ctx,
    denial: crate::plan::Denial,
) -> Result<Activation, Error> {
    let reason = denial.reason.as_str();
    let status = status_in_phase(
        grant,
        GrantPhase::Denied,
        reason,
        &denial.message,
        Timestamp::now(),
    );
    let updated = apply_status(api, grant, &status).await?;
    ctx.world.record_grant(&updated);
    warn!(reason, message = %denial.message, "grant denied");
    ctx.audit
        .record(&updated, Step::Denied, reason, &denial.message);
    ctx.event(grant, true, "Denied", "Validate", denial.message)
        .await;
    Ok(Activation::Stop(Action::await_change()))
}

/// Opens the frozen grant's rules, or keeps them open and heals drift; reports in status what
/// stands, where the band is full, and a spec edit that was not applied.
async fn open_and_heal(
    grant: &AccessGrant,
    policy: Option<&JitPolicy>,
    api: &Api<AccessGrant>,
    ctx: &Ctx,
    expires_at: Timestamp,
) -> Result<Progress, Error> {
    let generation = grant.metadata.generation;
    let before = grant.status.clone().unwrap_or_default();
    let recorded: Vec<String> = before
        .rules
        .iter()
        .map(|r| r.name.to_ascii_lowercase())
        .collect();
    let Some((outcomes, failures)) =
        ask_grant_nsgs(grant, policy, ctx, Intent::Open, Wait::Woken).await
    else {
        return Ok(Progress::Waiting);
    };
    let now = Timestamp::now();
    let uid = grant.uid().unwrap_or_default();
    let mut rules = Vec::new();
    let mut band_full = Vec::new();
    let mut drift = Vec::new();
    for outcome in &outcomes {
        rules.extend(rules_of(grant, outcome, ctx.nsgs.naming()));
        band_full.extend(
            outcome
                .unplaced
                .iter()
                .filter(|i| ctx.nsgs.naming().is_grant_rule_of(&i.name, &uid))
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
                .filter(|n| !ctx.nsgs.naming().is_grant_rule_of(n, &uid))
                .cloned(),
        );
    }
    // Rules in NSGs that failed this time are still what they were.
    rules.extend(standing_in(&before.rules, &failures));
    let mut status = before.clone();
    let was_ready =
        crate::api::condition::find(&status.conditions, READY).is_some_and(|c| c.status == "True");
    status.rules = rules;
    status.observed_generation = generation;
    let (ready, reason, msg) = if !failures.is_empty() {
        let msg = format!("Azure failed, retrying: {}", describe(&failures));
        (false, "AzureError", msg)
    } else if !band_full.is_empty() {
        let msg = format!(
            "no room in the NSG (no free priority in the allow band, or over Azure's 4,000 \
             addresses per NSG) for {}",
            band_full.join(", ")
        );
        (false, "PriorityBandFull", msg)
    } else {
        let msg = format!("{} rule(s) open until {expires_at}", status.rules.len());
        (true, "Opened", msg)
    };
    set_condition(
        &mut status.conditions,
        READY,
        ready,
        reason,
        &msg,
        generation,
        now,
    );
    let edited = report_frozen_spec(grant, &mut status, now);
    let mut current = grant.clone();
    if grant.status.as_ref() != Some(&status) {
        current = apply_status(api, grant, &status).await?;
        ctx.world.record_grant(&current);
    }
    if ready && !was_ready {
        let note = activated_note(grant, expires_at);
        ctx.audit.record(&current, Step::Activated, "Opened", &note);
        ctx.event(grant, false, "Activated", "Open", note).await;
    }
    if let Some(note) = edited {
        ctx.event(grant, true, "SpecIgnored", "Validate", note)
            .await;
    }
    if !drift.is_empty() {
        let note = format!("put back or removed: {}", drift.join(", "));
        ctx.audit
            .record(&current, Step::DriftCorrected, "DriftCorrected", &note);
        ctx.event(grant, false, "DriftCorrected", "Heal", note)
            .await;
    }
    first_error(failures).map(|()| Progress::Done)
}

fn activated_note(grant: &AccessGrant, expires_at: Timestamp) -> String {
    let Some(g) = grant.granted() else {
        return format!("opened until {expires_at}");
    };
    let ports: Vec<String> = g.ports.iter().map(|p| p.number.to_string()).collect();
    let mut note = format!(
        "opened port(s) {} on {} from {} until {expires_at}: {}",
        ports.join(","),
        crate::plan::validate::vm_name(&g.virtual_machine),
        g.source_address_prefix,
        g.justification
    );
    let status = grant.status.clone().unwrap_or_default();
    if let Some(who) = &status.requested_by {
        note.push_str(&format!("; requested by {}", who.username));
    }
    let approvers: Vec<&str> = status
        .approvals
        .iter()
        .filter(|d| d.decision == Decision::Approve)
        .map(|d| d.approver.as_str())
        .collect();
    if !approvers.is_empty() {
        note.push_str(&format!("; approved by {}", approvers.join(", ")));
    }
    note
}

/// An active grant's spec is frozen at activation: an edit changes nothing in Azure. Says so
/// in the `SpecFrozen` condition; returns the Event note the first time a generation is seen.
fn report_frozen_spec(
    grant: &AccessGrant,
    status: &mut AccessGrantStatus,
    now: Timestamp,
) -> Option<String> {
    let record = grant.granted()?;
    let generation = grant.metadata.generation;
    if generation.is_none_or(|g| g == record.generation) {
        return None;
    }
    let seen_before = crate::api::condition::find(&status.conditions, SPEC_FROZEN)
        .is_some_and(|c| c.observed_generation == generation);
    let msg = format!(
        "the spec was edited after activation (generation {} -> {}); what stays open is what was \
         activated, until its expiry. To change access, create a new grant.",
        record.generation,
        generation.unwrap_or_default()
    );
    set_condition(
        &mut status.conditions,
        SPEC_FROZEN,
        true,
        "EditIgnored",
        &msg,
        generation,
        now,
    );
    (!seen_before).then_some(msg)
}

async fn pending(
    grant: &AccessGrant,
    api: &Api<AccessGrant>,
    ctx: &Ctx,
    reason: &str,
    message: String,
) -> Result<Activation, Error> {
    let now = Timestamp::now();
    let status = status_in_phase(grant, GrantPhase::Pending, reason, &message, now);
    if grant.status.as_ref() != Some(&status) {
        let updated = apply_status(api, grant, &status).await?;
        ctx.world.record_grant(&updated);
        info!(reason, %message, "grant pending");
    }
    // The policy watch wakes the grant when its policy appears or changes; this is the backstop.
    Ok(Activation::Stop(Action::requeue(ctx.resync)))
}

async fn cleanup(grant: &AccessGrant, api: &Api<AccessGrant>, ctx: &Ctx) -> Result<Action, Error> {
    let phase = match grant.status.as_ref().and_then(|s| s.phase) {
        Some(p @ (GrantPhase::Expired | GrantPhase::Denied)) => p,
        _ => GrantPhase::Revoked,
    };
    let msg = "the grant was deleted; its rules are closed".to_string();
    // In place: the finalizer goes once this returns, so the close must be confirmed first.
    close(grant, api, ctx, phase, "Deleted", msg, Wait::InPlace).await?;
    if let Some(uid) = grant.uid() {
        ctx.world.forget(&uid);
        ctx.rounds.forget(&uid);
    }
    Ok(Action::await_change())
}
