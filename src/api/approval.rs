//! `AccessApproval`: one person's decision on one waiting `AccessGrant` in the same namespace.
//! The admission webhook stamps who decided and refuses any later change.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema;

// kube-derive takes one `printcolumn(..)` per column; clippy reads their repeated keys as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "AccessApproval",
    shortname = "approval",
    namespaced,
    doc = "One approver's decision (Approve or Reject) on one AccessGrant waiting for approval.",
    printcolumn(name = "Grant", type_ = "string", json_path = ".spec.grantRef.name"),
    printcolumn(name = "Decision", type_ = "string", json_path = ".spec.decision"),
    printcolumn(
        name = "Approver",
        type_ = "string",
        json_path = ".metadata.annotations.portcullis\\.dev/decided-by-user"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
/// One approver's decision on one grant. The webhook records who made it; it cannot be edited.
pub struct AccessApprovalSpec {
    /// The AccessGrant (same namespace) decided on.
    pub grant_ref: GrantRef,
    /// Approve or Reject. One Reject denies the grant.
    pub decision: Decision,
    /// Why; recorded in the grant's status, Events and the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), regex(pattern = schema::DISPLAY_SAFE_TEXT))]
    pub comment: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct GrantRef {
    /// The AccessGrant's name.
    #[schemars(regex(pattern = schema::OBJECT_NAME), length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Decision {
    Approve,
    Reject,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "Approve",
            Decision::Reject => "Reject",
        }
    }
}
