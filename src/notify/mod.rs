//! Notifications: outgoing webhooks told about the steps of a grant's life (waiting for
//! approval, approved, rejected, denied, activated, expired, revoked, close overdue), as Slack
//! or Teams messages or a signed generic JSON document (the audit record itself).
//!
//! The audit trail feeds them: every record `AuditLog` writes is offered to a bounded queue
//! ([`sender::Queue`], never blocking the reconcile); a background task ([`sender::Dispatcher`])
//! picks the targets of the grant's namespace and policy from the Secrets that describe them
//! ([`target`]), builds the bodies ([`message`]), signs them ([`sign`]) and sends them with
//! retries. The pure parts (targets, bodies, signatures) are apart from the sending.

pub mod message;
pub mod sender;
pub mod sign;
pub mod target;

pub use sender::{Dispatcher, Queue, RetryPolicy};
pub use target::{Format, Target, TargetError};

use crate::controller::audit::{Record, Step};

/// What a notification is about: the audit steps that notify, under the same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    AwaitingApproval,
    Approved,
    Rejected,
    Denied,
    Activated,
    Expired,
    Revoked,
    CloseOverdue,
}

impl Event {
    pub const ALL: [Event; 8] = [
        Event::AwaitingApproval,
        Event::Approved,
        Event::Rejected,
        Event::Denied,
        Event::Activated,
        Event::Expired,
        Event::Revoked,
        Event::CloseOverdue,
    ];

    fn step(self) -> Step {
        match self {
            Event::AwaitingApproval => Step::AwaitingApproval,
            Event::Approved => Step::Approved,
            Event::Rejected => Step::Rejected,
            Event::Denied => Step::Denied,
            Event::Activated => Step::Activated,
            Event::Expired => Step::Expired,
            Event::Revoked => Step::Revoked,
            Event::CloseOverdue => Step::CloseOverdue,
        }
    }

    /// The name in `data.events` and in bodies: the audit step's (`awaitingApproval`, ...).
    pub fn as_str(self) -> &'static str {
        self.step().as_str()
    }

    pub fn parse(name: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.as_str() == name)
    }

    /// The event a record notifies, if any. `requested`, `driftCorrected` and `closedLate`
    /// do not; nor does the `denied` that follows a rejection (the `rejected` said it).
    pub fn of(record: &Record) -> Option<Event> {
        if record.step == Step::Denied && record.reason == "Rejected" {
            return None;
        }
        Event::ALL.into_iter().find(|e| e.step() == record.step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_the_audit_step_names_and_parse_back() {
        for e in Event::ALL {
            assert_eq!(Event::parse(e.as_str()), Some(e));
            let json = serde_json::to_value(e.step()).expect("step serialises");
            assert_eq!(json, e.as_str());
        }
        assert_eq!(Event::parse("requested"), None);
        assert_eq!(Event::parse("Activated"), None);
    }
}
