//! The bodies sent for one step. Generic: the audit record itself (the same JSON as the audit
//! trail, `schema: portcullis.dev/audit/v1`, the event in `step`), so receivers and SIEMs share
//! one format. Slack: `{"text": ...}`. Teams: an Adaptive Card message, which both Teams
//! incoming webhooks (connectors) and Workflows webhooks accept. Pure.

use serde_json::{Value, json};

use super::{Event, Format};
use crate::api::{Decision, Protocol};
use crate::controller::audit::Record;
use crate::plan::validate::vm_name;

/// The body for `format`: the exact bytes that are sent (and signed).
pub fn body(format: Format, event: Event, record: &Record) -> Result<Vec<u8>, serde_json::Error> {
    match format {
        Format::Generic => serde_json::to_vec(record),
        Format::Slack => serde_json::to_vec(&slack(event, record)),
        Format::Teams => serde_json::to_vec(&teams(event, record)),
    }
}

/// The headline: what happened to which grant.
pub fn title(event: Event, record: &Record) -> String {
    let grant = format!("{}/{}", record.namespace, record.grant);
    match event {
        Event::AwaitingApproval => format!("AccessGrant {grant} waits for approval"),
        Event::Approved => format!("AccessGrant {grant} approved"),
        Event::Rejected => format!("AccessGrant {grant} rejected"),
        Event::Denied => format!("AccessGrant {grant} denied"),
        Event::Activated => format!("AccessGrant {grant} is active"),
        Event::Expired => format!("AccessGrant {grant} expired"),
        Event::Revoked => format!("AccessGrant {grant} revoked"),
        Event::CloseOverdue => format!("AccessGrant {grant} is open past its expiry"),
    }
}

/// Who may approve, as text: `users carol, dave; groups ops`. Chat formats mention people by
/// name only: the operator knows Kubernetes usernames, not chat user ids.
pub fn approvers(record: &Record) -> Option<String> {
    record
        .approvers
        .as_ref()
        .filter(|s| !s.is_empty())
        .map(|s| s.describe())
}

fn ports(record: &Record) -> String {
    record
        .ports
        .iter()
        .map(|p| match p.protocol {
            Protocol::Any => p.number.to_string(),
            Protocol::Tcp => format!("{}/TCP", p.number),
            Protocol::Udp => format!("{}/UDP", p.number),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The facts of the grant, as (name, value) pairs, in the order shown.
pub fn facts(event: Event, record: &Record) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("Policy", record.policy.clone()),
        (
            "Requested by",
            record
                .requested_by
                .as_ref()
                .map_or_else(|| "(not verified)".to_string(), |r| r.username.clone()),
        ),
        ("VM", vm_name(&record.virtual_machine).to_string()),
        ("Ports", ports(record)),
        ("Source", record.source_address_prefix.clone()),
    ];
    if let Some(who) = approvers(record) {
        out.push(("Approvers", who));
    }
    let approved: Vec<&str> = record
        .approvals
        .iter()
        .filter(|d| d.decision == Decision::Approve)
        .map(|d| d.approver.as_str())
        .collect();
    if !approved.is_empty() && event != Event::AwaitingApproval {
        out.push(("Approved by", approved.join(", ")));
    }
    if let Some(at) = record.expires_at {
        out.push(("Expires at", at.to_string()));
    }
    out.push(("Justification", record.justification.clone()));
    if !record.message.is_empty() {
        out.push(("Status", record.message.clone()));
    }
    out
}

/// Slack's control characters in text (`<!channel>`, `<@U..>` links) come from `<`, `>` and
/// `&`: a justification must not ping a channel.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn slack(event: Event, record: &Record) -> Value {
    let mut text = format!("*{}*", slack_escape(&title(event, record)));
    if event == Event::AwaitingApproval
        && let Some(who) = approvers(record)
    {
        text.push_str(&format!("\nApprovers: {}", slack_escape(&who)));
    }
    for (name, value) in facts(event, record) {
        if name == "Approvers" {
            continue;
        }
        text.push_str(&format!("\n{name}: {}", slack_escape(&value)));
    }
    json!({ "text": text })
}

fn teams(event: Event, record: &Record) -> Value {
    let facts: Vec<Value> = facts(event, record)
        .into_iter()
        .map(|(name, value)| json!({ "title": name, "value": value }))
        .collect();
    let mut body = vec![json!({
        "type": "TextBlock", "text": title(event, record),
        "weight": "Bolder", "size": "Medium", "wrap": true,
    })];
    if event == Event::AwaitingApproval
        && let Some(who) = approvers(record)
    {
        body.push(
            json!({ "type": "TextBlock", "text": format!("Approvers: {who}"), "wrap": true }),
        );
    }
    body.push(json!({ "type": "FactSet", "facts": facts }));
    json!({
        "type": "message",
        "summary": title(event, record),
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": body,
            },
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        AccessGrant, AccessGrantSpec, AccessGrantStatus, GrantedPort, PolicyRef, Subjects, UserRef,
    };
    use crate::controller::audit::Step;

    fn record(step: Step) -> Record {
        let mut grant = AccessGrant::new(
            "alice-ssh",
            AccessGrantSpec {
                policy_ref: PolicyRef {
                    name: "prod".into(),
                },
                virtual_machine: "vm1".into(),
                ports: vec![22],
                source_address_prefix: "203.0.113.7/32".into(),
                justification: "INC-1 <!channel> & more".into(),
                duration: Some("PT1H".into()),
                not_after: None,
            },
        );
        grant.metadata.namespace = Some("team-a".into());
        grant.status = Some(AccessGrantStatus {
            requested_by: Some(UserRef {
                username: "alice".into(),
                groups: vec![],
            }),
            ..Default::default()
        });
        let mut r = Record::of(&grant, step, "AwaitingApproval", "waiting for 1 more");
        r.approvers = Some(Subjects {
            users: vec!["carol".into()],
            groups: vec!["ops".into()],
        });
        r.ports = vec![GrantedPort {
            number: 22,
            protocol: Protocol::Tcp,
        }];
        r
    }

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("JSON")
    }

    #[test]
    fn the_generic_body_is_the_audit_record() {
        let r = record(Step::AwaitingApproval);
        let body = parse(&body(Format::Generic, Event::AwaitingApproval, &r).expect("body"));
        assert_eq!(body, serde_json::to_value(&r).expect("record"));
        assert_eq!(body["schema"], "portcullis.dev/audit/v1");
        assert_eq!(body["step"], "awaitingApproval");
        assert_eq!(body["approvers"]["users"][0], "carol");
        for field in ["time", "namespace", "grant", "uid", "policy", "requestedBy"] {
            assert!(body.get(field).is_some(), "{field}");
        }
    }

    #[test]
    fn slack_names_the_approvers_and_escapes_control_characters() {
        let r = record(Step::AwaitingApproval);
        let body = parse(&body(Format::Slack, Event::AwaitingApproval, &r).expect("body"));
        let text = body["text"].as_str().expect("text");
        assert!(
            text.starts_with("*AccessGrant team-a/alice-ssh waits for approval*"),
            "{text}"
        );
        assert!(
            text.contains("Approvers: users carol; groups ops"),
            "{text}"
        );
        assert!(text.contains("22/TCP") && text.contains("vm1"), "{text}");
        assert!(text.contains("INC-1 &lt;!channel&gt; &amp; more"), "{text}");
        assert!(!text.contains("<!channel>"), "{text}");
    }

    #[test]
    fn teams_is_an_adaptive_card_message() {
        let r = record(Step::Activated);
        let body = parse(&body(Format::Teams, Event::Activated, &r).expect("body"));
        assert_eq!(body["type"], "message");
        let att = &body["attachments"][0];
        assert_eq!(
            att["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(att["content"]["type"], "AdaptiveCard");
        let card = att["content"]["body"].as_array().expect("body");
        assert_eq!(card[0]["text"], "AccessGrant team-a/alice-ssh is active");
        let facts = card.last().expect("facts")["facts"]
            .as_array()
            .expect("facts");
        assert!(
            facts
                .iter()
                .any(|f| f["title"] == "Requested by" && f["value"] == "alice")
        );
    }
}
