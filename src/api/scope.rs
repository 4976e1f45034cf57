//! `JitScope`: which Azure scopes the policies of some namespaces may name. Cluster-scoped, so
//! that by default only cluster administrators can write it (a namespace's own RBAC cannot grant
//! writes on cluster-scoped objects).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema;

// kube-derive takes one `printcolumn(..)` per column; clippy reads their repeated keys as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "JitScope",
    plural = "jitscopes",
    doc = "The Azure scopes (subscriptions, resource groups, VMs) that the JitPolicies of some namespaces may name. Several JitScopes naming one namespace add up.",
    printcolumn(
        name = "Namespaces",
        type_ = "string",
        json_path = ".spec.namespaces",
        description = "Namespaces whose policies this scope covers"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
/// Which VMs the policies of some namespaces may name. Set by the platform team.
pub struct JitScopeSpec {
    /// The namespaces this scope applies to, by exact name.
    #[schemars(length(min = 1, max = 256), extend("items" = { "type": "string", "pattern": schema::NAMESPACE_NAME, "maxLength": 63 }))]
    pub namespaces: Vec<String>,
    /// Subscription ids (e.g. `00000000-0000-0000-0000-000000000001`): every VM in them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("items" = { "type": "string", "pattern": schema::SUBSCRIPTION_ID, "maxLength": 64 }))]
    pub subscriptions: Vec<String>,
    /// Resource group ids, `/subscriptions/<id>/resourceGroups/<name>`: every VM in them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("items" = { "type": "string", "pattern": schema::RESOURCE_GROUP_ID, "maxLength": 256 }))]
    pub resource_groups: Vec<String>,
    /// Full VM resource ids, or patterns ending in `*` on the VM name only
    /// (`.../virtualMachines/web-*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), extend("items" = { "type": "string", "pattern": schema::VM_RESOURCE_ID_PATTERN, "maxLength": 512 }))]
    pub virtual_machines: Vec<String>,
}
