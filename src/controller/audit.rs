//! The audit trail: one JSON record per step of a grant's life (requested, approved, rejected,
//! denied, activated, drift corrected, expired, closed late, revoked, deleted), for a SIEM.
//! Each record names the requester and approvers, the VM, ports, source, window, justification
//! and the NSG rules. Records go to their own file when `--audit-log` names one (e.g. `/dev/stderr`, apart
//! from the operator's logs on stdout), else to the log under the target `portcullis::audit`.
//! Delivery is at least once: a step may be recorded again after a crash mid-reconcile.
//! With notifications on, every record is also offered to the notification queue (a second
//! sink fed the same records; see `crate::notify`), which never blocks the caller.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;
use tracing::{info, warn};

use crate::api::{AccessGrant, GrantedPort, GrantedRule, RecordedDecision, Subjects, UserRef};
use crate::locks::lock;

/// The log target of audit records when they share the operator's log.
pub const TARGET: &str = "portcullis::audit";
/// The `schema` field of every record; bumped on an incompatible change.
pub const SCHEMA: &str = "portcullis.dev/audit/v1";

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Step {
    Requested,
    /// The grant waits for approvals (recorded when it starts waiting); `approvers` says from whom.
    AwaitingApproval,
    Approved,
    Rejected,
    Denied,
    Activated,
    DriftCorrected,
    Expired,
    ClosedLate,
    /// Past `expiresAt` with a rule still standing for longer than the grace period (see
    /// `grant::CLOSE_OVERDUE_AFTER`): recorded once per grant while it stays overdue.
    CloseOverdue,
    Revoked,
    /// The operator deleted the finished grant (reason `FinishedTtl`: `--finished-grant-ttl`
    /// passed since it finished); this record outlives the object.
    Deleted,
}

impl Step {
    /// The name in records (`awaitingApproval`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Requested => "requested",
            Step::AwaitingApproval => "awaitingApproval",
            Step::Approved => "approved",
            Step::Rejected => "rejected",
            Step::Denied => "denied",
            Step::Activated => "activated",
            Step::DriftCorrected => "driftCorrected",
            Step::Expired => "expired",
            Step::ClosedLate => "closedLate",
            Step::CloseOverdue => "closeOverdue",
            Step::Revoked => "revoked",
            Step::Deleted => "deleted",
        }
    }
}

/// One step. Field names are documented in the README's "Audit trail".
#[derive(Serialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub schema: &'static str,
    pub time: Timestamp,
    pub step: Step,
    pub namespace: String,
    pub grant: String,
    pub uid: String,
    pub generation: Option<i64>,
    pub policy: String,
    pub requested_by: Option<UserRef>,
    pub approvals: Vec<RecordedDecision>,
    /// Who may still decide (on `awaitingApproval`); `null` on other steps.
    pub approvers: Option<Subjects>,
    pub virtual_machine: String,
    pub ports: Vec<GrantedPort>,
    pub source_address_prefix: String,
    pub justification: String,
    pub activated_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub rules: Vec<GrantedRule>,
    pub reason: String,
    pub message: String,
}

impl Record {
    /// The record of `step` for the grant as it stands: what was activated if it was, else
    /// what it asks for.
    pub fn of(grant: &AccessGrant, step: Step, reason: &str, message: &str) -> Record {
        let status = grant.status.clone().unwrap_or_default();
        let (virtual_machine, ports, source, justification) = match &status.granted {
            Some(g) => (
                g.virtual_machine.clone(),
                g.ports.clone(),
                g.source_address_prefix.clone(),
                g.justification.clone(),
            ),
            // Not activated: the request as made. Its protocol is not decided yet; `*` stands
            // for "as the policy lists the port".
            None => (
                grant.spec.virtual_machine.clone(),
                grant
                    .spec
                    .ports
                    .iter()
                    .map(|&number| GrantedPort {
                        number,
                        protocol: crate::api::Protocol::Any,
                    })
                    .collect(),
                grant.spec.source_address_prefix.clone(),
                grant.spec.justification.clone(),
            ),
        };
        Record {
            schema: SCHEMA,
            time: Timestamp::now(),
            step,
            namespace: grant.namespace().unwrap_or_default(),
            grant: grant.name_any(),
            uid: grant.uid().unwrap_or_default(),
            generation: grant.metadata.generation,
            policy: grant.policy_name().to_string(),
            requested_by: status.requested_by.clone(),
            approvals: status.approvals.clone(),
            approvers: None,
            virtual_machine,
            ports,
            source_address_prefix: source,
            justification,
            activated_at: status.activated_at.as_ref().map(|t| t.0),
            expires_at: status.expires_at.as_ref().map(|t| t.0),
            rules: status.rules.clone(),
            reason: reason.to_string(),
            message: message.to_string(),
        }
    }
}

/// Where records go.
pub struct AuditLog {
    file: Option<Mutex<std::fs::File>>,
    /// The second sink: the notification queue, when notifications are on.
    notify: Option<crate::notify::Queue>,
}

impl AuditLog {
    /// Records into the log (target [`TARGET`]).
    pub fn to_log() -> AuditLog {
        AuditLog {
            file: None,
            notify: None,
        }
    }

    /// Records appended to `path`, one JSON object per line.
    pub fn to_file(path: &Path) -> std::io::Result<AuditLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(AuditLog {
            file: Some(Mutex::new(file)),
            notify: None,
        })
    }

    /// Also offers every record to the notification queue.
    pub fn with_notifications(mut self, queue: crate::notify::Queue) -> AuditLog {
        self.notify = Some(queue);
        self
    }

    pub fn record(&self, grant: &AccessGrant, step: Step, reason: &str, message: &str) {
        self.emit(Record::of(grant, step, reason, message));
    }

    /// Records a record built by the caller (one with `approvers`, say).
    pub fn emit(&self, record: Record) {
        self.write(&record);
        if let Some(queue) = &self.notify {
            queue.offer(&record);
        }
    }

    fn write(&self, record: &Record) {
        let line = match serde_json::to_string(record) {
            Ok(line) => line,
            Err(e) => {
                warn!(error = %e, "could not serialise an audit record");
                return;
            }
        };
        match &self.file {
            None => info!(target: TARGET, record = %line, "audit"),
            Some(file) => {
                let mut file = lock(file);
                if let Err(e) = writeln!(file, "{line}").and_then(|()| file.flush()) {
                    // The record is not lost: it goes to the log instead.
                    warn!(error = %e, record = %line, "could not write the audit log");
                }
            }
        }
    }
}
