//! `JitPolicy`: which VMs may be opened, on which ports, from where, for how long. The per-VM,
//! per-port shape follows Defender for Cloud's `jitNetworkAccessPolicies` (api-version
//! 2020-01-01), so a Defender policy maps onto it one to one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::identity::{ApprovalPolicy, Subjects};
use super::schema;

// kube-derive takes one `printcolumn(..)` per column; clippy reads their repeated keys as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "JitPolicy",
    plural = "jitpolicies",
    shortname = "jitpol",
    namespaced,
    status = "JitPolicyStatus",
    doc = "Which Azure VMs may be opened just in time, on which ports, from which sources, for how long.",
    printcolumn(
        name = "VMs",
        type_ = "integer",
        json_path = ".status.virtualMachineCount",
        description = "VMs resolved in Azure"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
/// Which VMs may be opened, on which ports, from where, for how long, for whom, and with whose
/// approval. Every listed port is closed by a Deny rule while no grant opens it.
pub struct JitPolicySpec {
    /// The VMs this policy governs, as Defender's `virtualMachines` (at most 1,000: the
    /// policy's Deny rules are aggregated per NSG, so its size is bounded by Azure's 4,000
    /// addresses per NSG, not by the number of rules).
    #[schemars(length(min = 1, max = 1000))]
    pub virtual_machines: Vec<PolicyVirtualMachine>,
    /// Who may request access under this policy. Absent: anyone whom RBAC lets create grants
    /// in the namespace. A grant from anyone else is denied (`RequesterNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requesters: Option<Subjects>,
    /// Approval needed before a grant activates. Absent or `required: 0`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalPolicy>,
    /// Outgoing webhooks told about the grants under this policy (waiting for approval,
    /// approved, rejected, activated, expired, revoked, close overdue), besides those of the
    /// whole namespace. Each names a Secret in this namespace that describes the target
    /// (`data.url`, `data.format`, `data.signingKey`, `data.events`) and carries the label
    /// `portcullis.dev/notification-target: policy` (the operator reads only Secrets with that
    /// label). Sent only when the operator runs with `--notifications`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub notifications: Option<Vec<NotificationRef>>,
}

/// A notification target: a Secret in the policy's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRef {
    /// The Secret's name. It must carry the label `portcullis.dev/notification-target`
    /// (`policy`, or `true` to apply to every grant of the namespace).
    #[schemars(regex(pattern = schema::OBJECT_NAME), length(min = 1, max = 253))]
    pub secret_name: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVirtualMachine {
    /// Full resource ID: /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<name>.
    #[schemars(regex(pattern = schema::VM_RESOURCE_ID), length(max = 512))]
    pub id: String,
    /// The ports that may be opened on this VM.
    #[schemars(length(min = 1, max = 32))]
    pub ports: Vec<PolicyPort>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "*")]
    Any,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPort {
    /// The port number, 1-65535.
    #[schemars(range(min = 1, max = 65535))]
    pub number: u16,
    /// `TCP`, `UDP`, or `*` (both).
    pub protocol: Protocol,
    /// One source prefix (Defender's singular form); mutually exclusive with
    /// `allowedSourceAddressPrefixes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("pattern" = schema::address_prefix_pattern()))]
    pub allowed_source_address_prefix: Option<String>,
    /// IPv4/IPv6 addresses or CIDRs a grant's source must lie inside. `*` and `Internet` are
    /// allowed only when listed here explicitly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = { "type": "string", "pattern": schema::address_prefix_pattern() }))]
    pub allowed_source_address_prefixes: Vec<String>,
    /// ISO 8601 (as Defender), e.g. PT3H; at most P1D.
    #[schemars(regex(pattern = schema::ISO8601_DURATION), length(max = schema::MAX_DURATION_LEN))]
    pub max_request_access_duration: String,
    /// Approval for this port, in place of the policy's. A grant asking for several ports needs
    /// what each of them needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalPolicy>,
}

impl PolicyPort {
    /// Defender's singular and plural forms, as one list.
    pub fn allowed_sources(&self) -> Vec<&str> {
        self.allowed_source_address_prefix
            .iter()
            .chain(self.allowed_source_address_prefixes.iter())
            .map(String::as_str)
            .collect()
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
/// What the operator found and enforces; written by the operator only.
pub struct JitPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
    /// How many of the policy's VMs were resolved in Azure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_count: Option<i64>,
    /// What each VM resolved to in Azure: its private IPs and the NSGs that govern it.
    #[serde(default)]
    pub targets: Vec<ResolvedTarget>,
    /// The last spec the controller found valid. While the current spec is invalid, its Deny
    /// rules (and the grants active under it) stay as this spec says: an invalid edit never opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforced_spec: Option<JitPolicySpec>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedTarget {
    /// The VM's full resource ID.
    pub virtual_machine: String,
    /// The private IP addresses of its network interfaces: the destinations of its rules.
    #[serde(default)]
    pub private_ip_addresses: Vec<String>,
    /// The NSGs on its network interfaces and their subnets: where its rules are written.
    #[serde(default)]
    pub network_security_groups: Vec<String>,
}
