//! `kubectl portcullis`: the requester's and approver's command line (a kubectl plugin). What
//! it prints is decided here, without I/O; `src/bin/kubectl-portcullis.rs` talks to the API.

use jiff::Timestamp;
use kube::ResourceExt;

use crate::api::condition::{READY, find};
use crate::api::{AccessGrant, Decision, GrantPhase};

/// One line of `list`/`pending`: NAME PHASE REASON REQUESTER VM PORTS EXPIRES.
pub fn table(grants: &[AccessGrant], now: Timestamp) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "PHASE".into(),
        "REASON".into(),
        "REQUESTER".into(),
        "VM".into(),
        "PORTS".into(),
        "EXPIRES".into(),
    ]];
    for g in grants {
        let status = g.status.clone().unwrap_or_default();
        let reason = find(&status.conditions, READY)
            .map(|c| c.reason.clone())
            .unwrap_or_default();
        let ports: Vec<String> = g.spec.ports.iter().map(u16::to_string).collect();
        let expires = match status.expires_at.as_ref().map(|t| t.0) {
            Some(t) if t > now => format!("in {}", short(t.duration_since(now))),
            Some(t) => format!("{} ago", short(now.duration_since(t))),
            None => "-".to_string(),
        };
        rows.push([
            g.name_any(),
            status
                .phase
                .map(|p| p.as_str())
                .unwrap_or("New")
                .to_string(),
            reason,
            status
                .requested_by
                .map(|r| r.username)
                .unwrap_or_else(|| "-".to_string()),
            g.spec.virtual_machine.clone(),
            ports.join(","),
            expires,
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            cells.join("   ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn short(d: jiff::SignedDuration) -> String {
    let s = d.as_secs().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// Grants waiting for a decision.
pub fn is_waiting(g: &AccessGrant) -> bool {
    let status = g.status.clone().unwrap_or_default();
    status.phase == Some(GrantPhase::Pending)
        && find(&status.conditions, READY).is_some_and(|c| c.reason == "AwaitingApproval")
}

/// `why`: the grant's phase explained from its status, conditions and Events (reason, note),
/// oldest Event first.
pub fn why(g: &AccessGrant, events: &[(String, String)], now: Timestamp) -> String {
    let status = g.status.clone().unwrap_or_default();
    let name = g.name_any();
    let mut out = Vec::new();
    let ready = find(&status.conditions, READY);
    let headline = match (status.phase, ready) {
        (None, _) => format!(
            "{name} has not been looked at by the operator yet (is it running and watching this namespace?)"
        ),
        (Some(GrantPhase::Pending), Some(c)) if c.reason == "AwaitingApproval" => {
            format!("{name} is waiting for approval: {}", c.message)
        }
        (Some(GrantPhase::Pending), Some(c)) => {
            format!("{name} is pending ({}): {}", c.reason, c.message)
        }
        (Some(GrantPhase::Active), Some(c)) if c.status == "True" => {
            format!("{name} is open: {}", c.message)
        }
        (Some(GrantPhase::Active), Some(c)) => format!(
            "{name} is active but its rules are not all in place ({}): {}",
            c.reason, c.message
        ),
        (Some(GrantPhase::Denied), Some(c)) => {
            format!("{name} was denied ({}): {}", c.reason, c.message)
        }
        (Some(phase), Some(c)) => {
            format!("{name} is {} ({}): {}", phase.as_str(), c.reason, c.message)
        }
        (Some(phase), None) => format!("{name} is {}", phase.as_str()),
    };
    out.push(headline);
    if let Some(who) = &status.requested_by {
        out.push(format!("requested by {}", who.username));
    } else {
        out.push("requester: not recorded (created without the admission webhook)".to_string());
    }
    for d in &status.approvals {
        let verb = match d.decision {
            Decision::Approve => "approved",
            Decision::Reject => "rejected",
        };
        let comment = d
            .comment
            .as_deref()
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        out.push(format!("{verb} by {} at {}{comment}", d.approver, d.at.0));
    }
    if let (Some(a), Some(e)) = (&status.activated_at, &status.expires_at) {
        let left = if e.0 > now {
            format!("{} left", short(e.0.duration_since(now)))
        } else {
            "ended".to_string()
        };
        out.push(format!("window: {} to {} ({left})", a.0, e.0));
    }
    for r in &status.rules {
        out.push(format!(
            "rule {} (priority {}) in {}",
            r.name,
            r.priority,
            crate::plan::validate::vm_name(&r.network_security_group)
        ));
    }
    for c in status.conditions.iter().filter(|c| c.type_ != READY) {
        out.push(format!(
            "{}={} ({}): {}",
            c.type_, c.status, c.reason, c.message
        ));
    }
    if !events.is_empty() {
        out.push("events:".to_string());
        for (reason, note) in events {
            out.push(format!("  {reason}: {note}"));
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::condition::set_condition;
    use crate::api::{AccessGrantStatus, RecordedDecision, UserRef};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn grant(phase: Option<GrantPhase>, reason: &str, message: &str) -> AccessGrant {
        let mut g: AccessGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": "alice-ssh", "namespace": "team-a"},
            "spec": {"policyRef": {"name": "prod"}, "virtualMachine": "vm1", "ports": [22],
                     "sourceAddressPrefix": "203.0.113.7/32", "duration": "PT1H",
                     "justification": "INC-1"},
        }))
        .unwrap();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let mut status = AccessGrantStatus {
            phase,
            requested_by: Some(UserRef {
                username: "alice".into(),
                groups: vec![],
            }),
            approvals: vec![RecordedDecision {
                approver: "carol".into(),
                decision: Decision::Approve,
                at: Time(now),
                comment: Some("ok".into()),
            }],
            ..Default::default()
        };
        set_condition(
            &mut status.conditions,
            READY,
            false,
            reason,
            message,
            None,
            now,
        );
        g.status = Some(status);
        g
    }

    #[test]
    fn why_explains_a_waiting_grant_with_its_people_and_events() {
        let g = grant(
            Some(GrantPhase::Pending),
            "AwaitingApproval",
            "waiting for approval until X: 1 more from users carol",
        );
        assert!(is_waiting(&g));
        let now = Timestamp::from_second(1_800_000_010).unwrap();
        let text = why(&g, &[("Denied".into(), "earlier".into())], now);
        assert!(
            text.starts_with("alice-ssh is waiting for approval: waiting for approval until X"),
            "{text}"
        );
        assert!(text.contains("requested by alice"));
        assert!(
            text.contains("approved by carol at 2027-01-15T08:00:00Z: ok"),
            "{text}"
        );
        assert!(text.contains("  Denied: earlier"));
    }

    #[test]
    fn why_explains_a_denial_and_the_table_lists_it() {
        let g = grant(
            Some(GrantPhase::Denied),
            "Rejected",
            "rejected by carol: no",
        );
        assert!(!is_waiting(&g));
        let now = Timestamp::from_second(1_800_000_010).unwrap();
        assert!(
            why(&g, &[], now).starts_with("alice-ssh was denied (Rejected): rejected by carol: no")
        );
        let t = table(&[g], now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAME"));
        assert!(
            lines[1].contains("Denied")
                && lines[1].contains("Rejected")
                && lines[1].contains("alice"),
            "{t}"
        );
    }
}
