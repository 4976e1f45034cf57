//! `AccessGrant`: one request for access to one VM, under a `JitPolicy` in the same namespace.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::approval::Decision;
use super::identity::UserRef;
use super::schema;

/// Holds a grant until its rules are closed. The mutating webhook sets it at creation, which
/// spares the API server a patch per grant; the controller adds it where no webhook runs.
pub const GRANT_FINALIZER: &str = "portcullis.dev/close-rules";

// kube-derive takes one `printcolumn(..)` per column; clippy reads their repeated keys as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "AccessGrant",
    shortname = "grant",
    namespaced,
    status = "AccessGrantStatus",
    doc = "A request for just-in-time network access to one Azure VM.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Requester",
        type_ = "string",
        json_path = ".status.requestedBy.username"
    ),
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.virtualMachine"),
    printcolumn(name = "Ports", type_ = "string", json_path = ".spec.ports"),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".spec.sourceAddressPrefix"
    ),
    printcolumn(
        name = "Expires",
        type_ = "string",
        format = "date-time",
        json_path = ".status.expiresAt"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
/// What is asked for: a VM, ports, one source and a window, under a policy. Frozen once active.
pub struct AccessGrantSpec {
    /// The JitPolicy (same namespace) this grant is made under.
    pub policy_ref: PolicyRef,
    /// A VM the policy names: its name (`vm1`) or its full resource ID.
    #[schemars(regex(pattern = schema::VM_REFERENCE), length(max = 512))]
    pub virtual_machine: String,
    /// Ports to open; each must be in the policy for this VM.
    #[schemars(length(min = 1, max = 32), extend("items" = { "type": "integer", "minimum": 1, "maximum": 65535 }, "x-kubernetes-list-type" = "set"))]
    pub ports: Vec<u16>,
    /// The one address or CIDR allowed in; must lie inside the policy's allowed prefixes.
    #[schemars(extend("pattern" = schema::address_prefix_pattern()))]
    pub source_address_prefix: String,
    /// How long access lasts from activation (ISO 8601, e.g. PT1H). Exactly one of `duration` and
    /// `notAfter` must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = schema::ISO8601_DURATION), length(max = schema::MAX_DURATION_LEN))]
    pub duration: Option<String>,
    /// An absolute end of access (RFC 3339, e.g. 2030-01-01T12:00:00Z or with an offset such as
    /// +02:00).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = schema::RFC3339_DATE_TIME))]
    pub not_after: Option<Time>,
    /// Why access is needed; recorded in status, Events and logs.
    #[schemars(length(min = 3, max = 256), regex(pattern = schema::DISPLAY_SAFE_TEXT))]
    pub justification: String,
}

impl AccessGrant {
    /// The record of what was activated, if the grant is active or was.
    pub fn granted(&self) -> Option<&GrantedAccess> {
        self.status.as_ref()?.granted.as_ref()
    }

    /// The policy this grant is under: the one it was activated against, else the one its spec
    /// names. An edit of `spec.policyRef` after activation moves nothing.
    pub fn policy_name(&self) -> &str {
        self.granted()
            .map(|g| g.policy.as_str())
            .unwrap_or(&self.spec.policy_ref.name)
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct PolicyRef {
    /// The JitPolicy's name.
    #[schemars(regex(pattern = schema::OBJECT_NAME), length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum GrantPhase {
    Pending,
    Active,
    Expired,
    Revoked,
    Denied,
    Failed,
}

impl GrantPhase {
    /// A phase the grant never leaves: nothing of it may be open again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            GrantPhase::Expired | GrantPhase::Revoked | GrantPhase::Denied
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GrantPhase::Pending => "Pending",
            GrantPhase::Active => "Active",
            GrantPhase::Expired => "Expired",
            GrantPhase::Revoked => "Revoked",
            GrantPhase::Denied => "Denied",
            GrantPhase::Failed => "Failed",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
/// Where the grant stands; written by the operator only.
pub struct AccessGrantStatus {
    /// Pending (validating, awaiting approval or opening), Active (open), Expired, Revoked,
    /// Denied (refused, nothing opened) or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "GrantPhase")]
    pub phase: Option<GrantPhase>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the grant first became active. Set once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = schema::RFC3339_DATE_TIME))]
    pub activated_at: Option<Time>,
    /// When access ends. Decided once, at activation; never moved by a re-apply or an edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = schema::RFC3339_DATE_TIME))]
    pub expires_at: Option<Time>,
    /// What the grant opens, frozen when it activated. Rules are derived from this record alone:
    /// a later edit of the spec never widens (or moves) what is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<GrantedAccess>,
    /// Who asked, as the admission webhook recorded it when the grant was created. Absent when
    /// no verified record exists (the webhook was bypassed): such a grant is never attributed to
    /// anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<UserRef>,
    /// The decisions of approvers on this grant, in the order they were made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub approvals: Vec<RecordedDecision>,
    /// When the grant finished (Expired, Revoked or Denied) with nothing left open in Azure.
    /// The finished-grant TTL (`--finished-grant-ttl`) counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = schema::RFC3339_DATE_TIME))]
    pub finished_at: Option<Time>,
    /// The Allow rules this grant opened.
    #[serde(default)]
    pub rules: Vec<GrantedRule>,
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
}

impl AccessGrantStatus {
    /// Whether the grant may still hold a port open: it is Active, or rules of it are recorded
    /// as standing (a close not yet confirmed).
    pub fn holds_access_open(&self) -> bool {
        self.phase == Some(GrantPhase::Active) || !self.rules.is_empty()
    }
}

/// The validated request, as it stood at activation.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantedAccess {
    /// The generation of the spec that was validated and activated.
    pub generation: i64,
    /// The policy it was validated against (same namespace).
    pub policy: String,
    /// The policy's full resource ID of the VM.
    pub virtual_machine: String,
    /// The (port, protocol) pairs opened.
    pub ports: Vec<GrantedPort>,
    /// The source, in canonical form.
    pub source_address_prefix: String,
    /// Why access was asked for, as the requester wrote it.
    pub justification: String,
}

/// One approver's decision, as counted.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct RecordedDecision {
    /// Who decided, as the API server authenticated them.
    pub approver: String,
    /// Approve or Reject.
    pub decision: Decision,
    /// When the decision was made.
    #[schemars(extend("pattern" = schema::RFC3339_DATE_TIME))]
    pub at: Time,
    /// The approver's comment, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct GrantedPort {
    /// The port number.
    pub number: u16,
    /// `TCP`, `UDP`, or `*` (both), as the policy lists the port.
    pub protocol: crate::api::Protocol,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantedRule {
    /// The NSG's full resource ID.
    pub network_security_group: String,
    /// The security rule's name.
    pub name: String,
    /// The rule's priority, inside the installation's Allow band.
    pub priority: u16,
}
