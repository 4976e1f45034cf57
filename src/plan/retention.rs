//! When a finished grant may be deleted: the finished-grant TTL (`--finished-grant-ttl`), like
//! a Job's `ttlSecondsAfterFinished`. Pure: the controller reads the answer and acts.
//!
//! A grant is finished when it is Expired, Revoked or Denied (the phases it never leaves) with
//! nothing left open: no rule in `status.rules` and its close confirmed (`status.finishedAt`,
//! written only once every NSG gave its rules up). `Failed` is not finished: the operator never
//! writes it, and a grant in it may hold rules nobody has confirmed closed. A Denied grant whose
//! spec was edited since it was judged is judged again, so it is not finished either.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::api::condition::{READY, find};
use crate::api::{AccessGrant, GrantPhase};

/// The Ready reason of a close that left rules standing.
pub const CLOSE_FAILED: &str = "CloseFailed";

/// What the finished-grant TTL says about a grant now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Not finished, its close not confirmed, being deleted already, or no TTL: leave it.
    Keep,
    /// Finished with nothing open, but the moment was not recorded (it finished under a
    /// version without `finishedAt`): record now, so the TTL never runs from a guess.
    Unrecorded,
    /// Finished; delete it at this moment.
    DeleteAt(Timestamp),
    /// Finished at this moment, and the TTL has passed: delete it now.
    Due { finished_at: Timestamp },
}

/// Whether the grant is finished with nothing left open (see the module's doc); its
/// `finishedAt` need not be recorded.
pub fn is_finished(grant: &AccessGrant) -> bool {
    let Some(status) = grant.status.as_ref() else {
        return false;
    };
    let phase_final = match status.phase {
        Some(GrantPhase::Expired | GrantPhase::Revoked) => true,
        Some(GrantPhase::Denied) => status.observed_generation == grant.metadata.generation,
        Some(GrantPhase::Pending | GrantPhase::Active | GrantPhase::Failed) | None => false,
    };
    // Ready must say False, and not that a close failed: anything else is not a settled end.
    let settled = find(&status.conditions, READY)
        .is_some_and(|c| c.status == "False" && c.reason != CLOSE_FAILED);
    phase_final && settled && status.rules.is_empty()
}

/// When the finished grant is due for deletion under `ttl`, if there is a TTL.
pub fn retention(grant: &AccessGrant, ttl: Option<Duration>, now: Timestamp) -> Retention {
    let Some(ttl) = ttl else {
        return Retention::Keep;
    };
    if grant.metadata.deletion_timestamp.is_some() || !is_finished(grant) {
        return Retention::Keep;
    }
    let Some(finished_at) = grant
        .status
        .as_ref()
        .and_then(|s| s.finished_at.as_ref())
        .map(|t| t.0)
    else {
        return Retention::Unrecorded;
    };
    // A TTL too large to add never comes due.
    let Some(due) = SignedDuration::try_from(ttl)
        .ok()
        .and_then(|ttl| finished_at.checked_add(ttl).ok())
    else {
        return Retention::Keep;
    };
    if due <= now {
        Retention::Due { finished_at }
    } else {
        Retention::DeleteAt(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GrantedRule;
    use crate::api::condition::set_condition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).expect("valid")
    }

    fn grant(phase: GrantPhase, reason: &str, finished: Option<i64>) -> AccessGrant {
        let mut g: AccessGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": "g", "namespace": "ns", "generation": 1, "uid": "u"},
            "spec": {"policyRef": {"name": "p"}, "virtualMachine": "vm1", "ports": [22],
                     "sourceAddressPrefix": "203.0.113.7/32", "duration": "PT1H",
                     "justification": "INC-1"},
        }))
        .expect("grant");
        let mut status = crate::api::AccessGrantStatus {
            phase: Some(phase),
            observed_generation: Some(1),
            finished_at: finished.map(|s| Time(at(s))),
            ..Default::default()
        };
        let ready = phase == GrantPhase::Active;
        set_condition(
            &mut status.conditions,
            READY,
            ready,
            reason,
            "m",
            Some(1),
            at(0),
        );
        g.status = Some(status);
        g
    }

    const TTL: Option<Duration> = Some(Duration::from_secs(60));

    #[test]
    fn finished_grants_are_due_ttl_after_they_finished() {
        for phase in [GrantPhase::Expired, GrantPhase::Revoked, GrantPhase::Denied] {
            let g = grant(phase, phase.as_str(), Some(10));
            assert!(is_finished(&g), "{phase:?}");
            assert_eq!(retention(&g, TTL, at(11)), Retention::DeleteAt(at(70)));
            assert_eq!(retention(&g, TTL, at(69)), Retention::DeleteAt(at(70)));
            let due = Retention::Due {
                finished_at: at(10),
            };
            assert_eq!(retention(&g, TTL, at(70)), due);
            assert_eq!(retention(&g, TTL, at(10_000)), due);
        }
    }

    #[test]
    fn a_zero_ttl_is_due_at_once_and_no_ttl_never() {
        let g = grant(GrantPhase::Expired, "Expired", Some(10));
        assert_eq!(
            retention(&g, Some(Duration::ZERO), at(10)),
            Retention::Due {
                finished_at: at(10)
            }
        );
        assert_eq!(retention(&g, None, at(1_000_000)), Retention::Keep);
    }

    #[test]
    fn grants_that_are_not_finished_are_kept() {
        for phase in [GrantPhase::Pending, GrantPhase::Active, GrantPhase::Failed] {
            let g = grant(phase, "Whatever", Some(10));
            assert!(!is_finished(&g), "{phase:?}");
            assert_eq!(retention(&g, TTL, at(1_000)), Retention::Keep, "{phase:?}");
        }
        let mut no_status = grant(GrantPhase::Expired, "Expired", Some(10));
        no_status.status = None;
        assert_eq!(retention(&no_status, TTL, at(1_000)), Retention::Keep);
    }

    #[test]
    fn a_grant_with_rules_standing_or_a_failed_close_is_never_due() {
        let mut standing = grant(GrantPhase::Expired, "Expired", Some(10));
        if let Some(s) = standing.status.as_mut() {
            s.rules.push(GrantedRule {
                network_security_group: "nsg".into(),
                name: "r".into(),
                priority: 100,
            });
        }
        assert_eq!(retention(&standing, TTL, at(1_000)), Retention::Keep);
        let failed = grant(GrantPhase::Revoked, CLOSE_FAILED, Some(10));
        assert_eq!(retention(&failed, TTL, at(1_000)), Retention::Keep);
        // Ready saying True on a final phase is no settled end either.
        let mut ready = grant(GrantPhase::Expired, "Expired", Some(10));
        if let Some(s) = ready.status.as_mut() {
            s.conditions[0].status = "True".into();
        }
        assert_eq!(retention(&ready, TTL, at(1_000)), Retention::Keep);
        let mut no_condition = grant(GrantPhase::Expired, "Expired", Some(10));
        if let Some(s) = no_condition.status.as_mut() {
            s.conditions.clear();
        }
        assert_eq!(retention(&no_condition, TTL, at(1_000)), Retention::Keep);
    }

    #[test]
    fn a_denied_grant_edited_since_it_was_judged_is_not_finished() {
        let mut g = grant(GrantPhase::Denied, "PortNotAllowed", Some(10));
        g.metadata.generation = Some(2);
        assert_eq!(retention(&g, TTL, at(1_000)), Retention::Keep);
    }

    #[test]
    fn a_grant_being_deleted_is_left_to_its_finalizer() {
        let mut g = grant(GrantPhase::Expired, "Expired", Some(10));
        g.metadata.deletion_timestamp = Some(Time(at(20)));
        assert_eq!(retention(&g, TTL, at(1_000)), Retention::Keep);
    }

    #[test]
    fn an_unrecorded_finish_is_recorded_before_any_countdown() {
        let g = grant(GrantPhase::Expired, "Expired", None);
        assert_eq!(retention(&g, TTL, at(1_000)), Retention::Unrecorded);
        assert_eq!(retention(&g, None, at(1_000)), Retention::Keep);
    }

    #[test]
    fn a_ttl_too_large_to_add_never_comes_due() {
        let g = grant(GrantPhase::Expired, "Expired", Some(10));
        assert_eq!(
            retention(&g, Some(Duration::from_secs(u64::MAX)), at(1_000)),
            Retention::Keep
        );
    }
}
