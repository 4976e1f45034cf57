//! Who may ask and who must approve: the approval a grant needs under its policy, and where a
//! grant stands given the decisions made on it. Pure: the decisions arrive verified (the
//! controller checks their stamps), the clock is a parameter.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::validate::{Denial, DenialReason, deny};
use crate::api::duration::parse_iso8601;
use crate::api::{AccessGrantSpec, ApprovalPolicy, Decision, JitPolicySpec, Subjects, UserRef};

/// The most approvers a policy may require.
pub const MAX_REQUIRED: u8 = 10;
/// How long a grant waits for its approvals when the policy does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest wait a policy may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);

/// Checks one approval setting (the policy's or a port's).
pub fn validate_approval(what: &str, approval: &ApprovalPolicy) -> Result<(), Denial> {
    use DenialReason as R;
    if approval.required > MAX_REQUIRED {
        return deny(
            R::InvalidApproval,
            format!(
                "{what}: approval.required is {}, at most {MAX_REQUIRED}",
                approval.required
            ),
        );
    }
    if approval.required > 0 && approval.approvers.is_empty() {
        return deny(
            R::InvalidApproval,
            format!(
                "{what}: approval.required is {} but no approvers are listed",
                approval.required
            ),
        );
    }
    if let Some(t) = &approval.timeout {
        match parse_iso8601(t) {
            Err(e) => return deny(R::InvalidApproval, format!("{what}: approval.timeout {e}")),
            Ok(d) if d.is_zero() || d > MAX_TIMEOUT => {
                return deny(
                    R::InvalidApproval,
                    format!("{what}: approval.timeout must be more than zero and at most P7D"),
                );
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// May this person request access under the policy? `requester` is the verified one (`None`
/// when no stamp verified). A policy that lists requesters, or that needs approval (whose
/// rules depend on who asked), refuses a grant nobody can be held to. What a refused requester
/// is told does not list who else may ask.
pub fn check_requester(
    policy_name: &str,
    policy: &JitPolicySpec,
    requester: Option<&UserRef>,
    needs_approval: bool,
) -> Result<(), Denial> {
    use DenialReason as R;
    let Some(requester) = requester else {
        if policy.requesters.is_some() || needs_approval {
            return deny(
                R::RequesterUnverified,
                format!(
                    "policy {policy_name} needs to know who asked, and this grant carries no                      requester stamp from the admission webhook (was it bypassed?)"
                ),
            );
        }
        return Ok(());
    };
    match &policy.requesters {
        Some(allowed) if !allowed.includes(requester) => deny(
            R::RequesterNotAllowed,
            format!(
                "{} may not request access under policy {policy_name}",
                requester.username
            ),
        ),
        _ => Ok(()),
    }
}

/// One approval a grant needs: `required` distinct people among `approvers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub required: u8,
    pub approvers: Subjects,
    pub timeout: Duration,
}

/// The approvals a grant needs: for each requested port, the port's own setting or else the
/// policy's; identical ones counted once. Empty when none is needed. Ports the policy does not
/// list are ignored here (validation denies the grant for them).
pub fn requirements(policy: &JitPolicySpec, grant: &AccessGrantSpec) -> Vec<Requirement> {
    let vm = super::validate::vm_name;
    let reference = grant.virtual_machine.to_ascii_lowercase();
    let mut out: Vec<Requirement> = Vec::new();
    for pvm in &policy.virtual_machines {
        let id = pvm.id.to_ascii_lowercase();
        if id != reference && vm(&id) != reference {
            continue;
        }
        for port in pvm.ports.iter().filter(|p| grant.ports.contains(&p.number)) {
            let Some(setting) = port.approval.as_ref().or(policy.approval.as_ref()) else {
                continue;
            };
            if setting.required == 0 {
                continue;
            }
            let timeout = setting
                .timeout
                .as_deref()
                .and_then(|t| parse_iso8601(t).ok())
                .unwrap_or(DEFAULT_TIMEOUT);
            let requirement = Requirement {
                required: setting.required,
                approvers: setting.approvers.clone(),
                timeout,
            };
            if !out.contains(&requirement) {
                out.push(requirement);
            }
        }
    }
    out
}

/// A decision whose stamp verified: who made it (with their groups at the time), and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedDecision {
    pub approver: UserRef,
    pub decision: Decision,
    pub at: Timestamp,
    pub comment: Option<String>,
}

/// Where a grant stands with its approvals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApprovalState {
    /// Nothing to wait for: approved (or no approval needed).
    Approved,
    /// Waiting until `deadline`; `message` says how many more and from whom.
    Waiting {
        deadline: Timestamp,
        message: String,
    },
    /// Refused for good.
    Denied(Denial),
}

/// Counts the decisions on a grant requested by `requester` and waiting since `since`. A
/// decision counts only if its maker is listed among a requirement's approvers, is not the
/// requester, and decided before the deadline; each person counts once per requirement. Any
/// counted rejection denies the grant. Past the deadline, a grant still short of approvals is
/// denied.
pub fn approval_state(
    requirements: &[Requirement],
    requester: &str,
    decisions: &[VerifiedDecision],
    since: Timestamp,
    now: Timestamp,
) -> ApprovalState {
    if requirements.is_empty() {
        return ApprovalState::Approved;
    }
    let timeout = requirements
        .iter()
        .map(|r| r.timeout)
        .min()
        .unwrap_or(DEFAULT_TIMEOUT);
    let deadline = SignedDuration::try_from(timeout)
        .ok()
        .and_then(|t| since.checked_add(t).ok())
        .unwrap_or(since);
    let counted = |d: &&VerifiedDecision| {
        d.approver.username != requester
            && d.at <= deadline
            && requirements
                .iter()
                .any(|r| r.approvers.includes(&d.approver))
    };
    if let Some(reject) = decisions
        .iter()
        .filter(counted)
        .find(|d| d.decision == Decision::Reject)
    {
        let why = reject
            .comment
            .as_deref()
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        return ApprovalState::Denied(Denial {
            reason: DenialReason::Rejected,
            message: format!("rejected by {}{why}", reject.approver.username),
        });
    }
    let mut missing = Vec::new();
    for r in requirements {
        let mut approvers: Vec<&str> = decisions
            .iter()
            .filter(counted)
            .filter(|d| d.decision == Decision::Approve && r.approvers.includes(&d.approver))
            .map(|d| d.approver.username.as_str())
            .collect();
        approvers.sort_unstable();
        approvers.dedup();
        let have = approvers.len();
        if have < usize::from(r.required) {
            missing.push(format!(
                "{} more from {}",
                usize::from(r.required) - have,
                r.approvers.describe()
            ));
        }
    }
    if missing.is_empty() {
        return ApprovalState::Approved;
    }
    if now >= deadline {
        return ApprovalState::Denied(Denial {
            reason: DenialReason::ApprovalTimedOut,
            message: format!(
                "approval timed out at {deadline}: still needed {}",
                missing.join("; ")
            ),
        });
    }
    ApprovalState::Waiting {
        deadline,
        message: format!(
            "waiting for approval until {deadline}: {} (the requester cannot approve)",
            missing.join("; ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::validate::tests::{grant, policy};

    fn subjects(users: &[&str], groups: &[&str]) -> Subjects {
        Subjects {
            users: users.iter().map(|s| s.to_string()).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn two_of_ops() -> ApprovalPolicy {
        ApprovalPolicy {
            required: 2,
            approvers: subjects(&["carol"], &["ops"]),
            timeout: Some("PT30M".into()),
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn decided(user: &str, groups: &[&str], decision: Decision, at: i64) -> VerifiedDecision {
        VerifiedDecision {
            approver: UserRef {
                username: user.into(),
                groups: groups.iter().map(|s| s.to_string()).collect(),
            },
            decision,
            at: t(at),
            comment: Some("looked at the ticket".into()),
        }
    }

    fn reqs() -> Vec<Requirement> {
        let mut p = policy();
        p.approval = Some(two_of_ops());
        requirements(&p, &grant("vm1", &[22], "203.0.113.7", "PT1H"))
    }

    #[test]
    fn no_approval_setting_needs_nothing() {
        let r = requirements(&policy(), &grant("vm1", &[22], "203.0.113.7", "PT1H"));
        assert!(r.is_empty());
        assert_eq!(
            approval_state(&r, "alice", &[], t(0), t(0)),
            ApprovalState::Approved
        );
    }

    #[test]
    fn two_distinct_approvers_approve() {
        let r = reqs();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].timeout, Duration::from_secs(1800));
        let one = [decided("carol", &[], Decision::Approve, 10)];
        assert!(matches!(
            approval_state(&r, "alice", &one, t(0), t(20)),
            ApprovalState::Waiting { ref message, .. } if message.contains("1 more from users carol; groups ops")
        ));
        let same_twice = [
            decided("carol", &[], Decision::Approve, 10),
            decided("carol", &[], Decision::Approve, 11),
        ];
        assert!(matches!(
            approval_state(&r, "alice", &same_twice, t(0), t(20)),
            ApprovalState::Waiting { .. }
        ));
        let two = [
            decided("carol", &[], Decision::Approve, 10),
            decided("dave", &["ops"], Decision::Approve, 12),
        ];
        assert_eq!(
            approval_state(&r, "alice", &two, t(0), t(20)),
            ApprovalState::Approved
        );
    }

    #[test]
    fn the_requester_and_strangers_do_not_count() {
        let r = reqs();
        let decisions = [
            decided("alice", &["ops"], Decision::Approve, 10),
            decided("mallory", &["devs"], Decision::Approve, 10),
            decided("mallory", &["devs"], Decision::Reject, 10),
            decided("carol", &[], Decision::Approve, 10),
        ];
        assert!(matches!(
            approval_state(&r, "alice", &decisions, t(0), t(20)),
            ApprovalState::Waiting { .. }
        ));
    }

    #[test]
    fn one_rejection_denies() {
        let r = reqs();
        let decisions = [
            decided("carol", &[], Decision::Approve, 10),
            decided("dave", &["ops"], Decision::Reject, 11),
            decided("erin", &["ops"], Decision::Approve, 12),
        ];
        match approval_state(&r, "alice", &decisions, t(0), t(20)) {
            ApprovalState::Denied(d) => {
                assert_eq!(d.reason, DenialReason::Rejected);
                assert_eq!(d.message, "rejected by dave: looked at the ticket");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_timeout_denies_and_late_decisions_do_not_count() {
        let r = reqs();
        let late = [
            decided("carol", &[], Decision::Approve, 10),
            decided("dave", &["ops"], Decision::Approve, 1801),
        ];
        match approval_state(&r, "alice", &late, t(0), t(1801)) {
            ApprovalState::Denied(d) => assert_eq!(d.reason, DenialReason::ApprovalTimedOut),
            other => panic!("{other:?}"),
        }
        // Approved in time stays approved after the deadline.
        let in_time = [
            decided("carol", &[], Decision::Approve, 10),
            decided("dave", &["ops"], Decision::Approve, 20),
        ];
        assert_eq!(
            approval_state(&r, "alice", &in_time, t(0), t(5000)),
            ApprovalState::Approved
        );
    }

    #[test]
    fn a_port_override_adds_its_own_requirement() {
        let mut p = policy();
        p.approval = Some(two_of_ops());
        p.virtual_machines[0].ports[0].approval = Some(ApprovalPolicy {
            required: 1,
            approvers: subjects(&["sec-lead"], &[]),
            timeout: None,
        });
        // Port 22 has the override; 53 falls back to the policy's.
        let r = requirements(&p, &grant("vm1", &[22, 53], "10.1.2.3", "PT1H"));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].approvers.users, vec!["sec-lead"]);
        assert_eq!(r[0].timeout, DEFAULT_TIMEOUT);
        let both = [
            decided("sec-lead", &[], Decision::Approve, 1),
            decided("carol", &[], Decision::Approve, 2),
            decided("dave", &["ops"], Decision::Approve, 3),
        ];
        assert_eq!(
            approval_state(&r, "alice", &both, t(0), t(5)),
            ApprovalState::Approved
        );
        // The shortest timeout governs the grant.
        match approval_state(&r, "alice", &both[..1], t(0), t(1800)) {
            ApprovalState::Denied(d) => assert_eq!(d.reason, DenialReason::ApprovalTimedOut),
            other => panic!("{other:?}"),
        }
        // Only port 22: one approval suffices.
        let r22 = requirements(&p, &grant("vm1", &[22], "203.0.113.7", "PT1H"));
        assert_eq!(
            approval_state(&r22, "alice", &both[..1], t(0), t(5)),
            ApprovalState::Approved
        );
    }

    #[test]
    fn requesters_are_checked() {
        let alice = UserRef {
            username: "alice".into(),
            groups: vec!["devs".into()],
        };
        let bob = UserRef {
            username: "bob".into(),
            groups: vec![],
        };
        let open = policy();
        assert!(check_requester("p", &open, None, false).is_ok());
        assert!(check_requester("p", &open, Some(&bob), false).is_ok());
        let unverified = check_requester("p", &open, None, true).unwrap_err();
        assert_eq!(unverified.reason, DenialReason::RequesterUnverified);
        let mut listed = policy();
        listed.requesters = Some(subjects(&[], &["devs"]));
        assert!(check_requester("p", &listed, Some(&alice), false).is_ok());
        let refused = check_requester("p", &listed, Some(&bob), false).unwrap_err();
        assert_eq!(refused.reason, DenialReason::RequesterNotAllowed);
        assert!(!refused.message.contains("devs"), "{}", refused.message);
        let unknown = check_requester("p", &listed, None, false).unwrap_err();
        assert_eq!(unknown.reason, DenialReason::RequesterUnverified);
    }

    #[test]
    fn approval_settings_are_checked() {
        let bad = [
            ApprovalPolicy {
                required: 11,
                approvers: subjects(&["a"], &[]),
                timeout: None,
            },
            ApprovalPolicy {
                required: 1,
                approvers: Subjects::default(),
                timeout: None,
            },
            ApprovalPolicy {
                required: 1,
                approvers: subjects(&["a"], &[]),
                timeout: Some("P8D".into()),
            },
            ApprovalPolicy {
                required: 1,
                approvers: subjects(&["a"], &[]),
                timeout: Some("soon".into()),
            },
        ];
        for a in bad {
            let mut p = policy();
            p.approval = Some(a.clone());
            let d = crate::plan::validate_policy(&p).unwrap_err();
            assert_eq!(d.reason, DenialReason::InvalidApproval, "{a:?}");
        }
        let mut p = policy();
        p.approval = Some(two_of_ops());
        assert!(crate::plan::validate_policy(&p).is_ok());
    }
}
