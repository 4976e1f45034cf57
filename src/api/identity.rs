//! Who asked and who decided: the subjects a policy lists, and the people recorded on grants.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema;

/// Users and groups, as the API server authenticates them (`userInfo.username`, `.groups`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Subjects {
    /// Usernames, exactly as the API server reports them (e.g. `alice@example.com`,
    /// `system:serviceaccount:ops:deployer`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("items" = { "type": "string", "minLength": 1, "maxLength": 256, "pattern": schema::DISPLAY_SAFE_TEXT }, "x-kubernetes-list-type" = "set"))]
    pub users: Vec<String>,
    /// Group names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("items" = { "type": "string", "minLength": 1, "maxLength": 256, "pattern": schema::DISPLAY_SAFE_TEXT }, "x-kubernetes-list-type" = "set"))]
    pub groups: Vec<String>,
}

impl Subjects {
    /// Whether `user` (with its groups) is one of these subjects.
    pub fn includes(&self, user: &UserRef) -> bool {
        self.users.contains(&user.username) || self.groups.iter().any(|g| user.groups.contains(g))
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }

    /// `users alice, bob; groups ops` for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.users.is_empty() {
            parts.push(format!("users {}", self.users.join(", ")));
        }
        if !self.groups.is_empty() {
            parts.push(format!("groups {}", self.groups.join(", ")));
        }
        if parts.is_empty() {
            "nobody".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// A person as the API server authenticated them, as recorded on grants (`status.requestedBy`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct UserRef {
    /// The user name.
    pub username: String,
    /// The groups the API server placed the user in at that request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// How many people must approve a grant, and who may.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ApprovalPolicy {
    /// Distinct approvers needed; 0 means no approval (a valid grant activates at once).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10))]
    pub required: u8,
    /// Who may approve or reject. Nobody approves their own grant.
    #[serde(default)]
    pub approvers: Subjects,
    /// How long a grant may wait for its approvals before it is denied (ISO 8601, default PT1H).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = schema::ISO8601_DURATION), length(max = schema::MAX_DURATION_LEN))]
    pub timeout: Option<String>,
}
