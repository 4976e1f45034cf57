//! Defender for Cloud's `jitNetworkAccessPolicies` JSON, as the 2020-01-01 specification
//! (`Microsoft.Security/stable/2020-01-01/jitNetworkAccessPolicies.json`) writes it. Field names
//! and optionality follow the spec; every struct keeps the fields the spec does not name in
//! `extra`, so the import can report them instead of dropping them unseen.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The api-version whose PUT body [`JitNetworkAccessPolicy`] is.
pub const API_VERSION: &str = "2020-01-01";

/// The ARM resource type of a policy.
pub const RESOURCE_TYPE: &str = "Microsoft.Security/locations/jitNetworkAccessPolicies";

/// `JitNetworkAccessPolicy`: the resource (`Resource` + `Kind` + `Location` + `properties`).
/// `id`, `name`, `type` and `location` are read-only: a PUT body leaves them out.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JitNetworkAccessPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub properties: JitNetworkAccessPolicyProperties,
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JitNetworkAccessPolicyProperties {
    pub virtual_machines: Vec<JitNetworkAccessPolicyVirtualMachine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Vec<JitNetworkAccessRequest>>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_state: Option<String>,
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JitNetworkAccessPolicyVirtualMachine {
    pub id: String,
    pub ports: Vec<JitNetworkAccessPortRule>,
    /// "Public IP address of the Azure Firewall that is linked to this policy, if applicable".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip_address: Option<String>,
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JitNetworkAccessPortRule {
    /// The spec allows 0-65535.
    pub number: u16,
    /// `TCP`, `UDP` or `*` (an extensible enum: other strings may come).
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefixes: Option<Vec<String>>,
    /// ISO 8601, "minimum 5 minutes, maximum 1 day".
    pub max_request_access_duration: String,
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

/// `JitNetworkAccessRequest`: one past or current request, as the policy records it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JitNetworkAccessRequest {
    pub virtual_machines: Vec<JitNetworkAccessRequestVirtualMachine>,
    pub start_time_utc: String,
    pub requestor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JitNetworkAccessRequestVirtualMachine {
    pub id: String,
    pub ports: Vec<JitNetworkAccessRequestPort>,
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JitNetworkAccessRequestPort {
    pub number: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefixes: Option<Vec<String>>,
    pub end_time_utc: String,
    /// `Revoked` or `Initiated` (the service also answers `Initiating`).
    pub status: String,
    /// `Expired`, `UserRequested` or `NewerRequestInitiated`.
    pub status_reason: String,
    /// The Azure Firewall port mapped to `number`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_port: Option<i64>,
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

/// `JitNetworkAccessPoliciesList`: one page of a list.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JitNetworkAccessPoliciesList {
    pub value: Vec<JitNetworkAccessPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_link: Option<String>,
}

/// The parts of a policy resource id
/// (`/subscriptions/S/resourceGroups/RG/providers/Microsoft.Security/locations/L/jitNetworkAccessPolicies/N`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyId {
    pub subscription: String,
    pub resource_group: String,
    pub location: String,
    pub name: String,
}

impl PolicyId {
    /// Parses a policy id; ARM ids are case-insensitive in their fixed segments.
    pub fn parse(id: &str) -> Option<PolicyId> {
        let parts: Vec<&str> = id.strip_prefix('/')?.split('/').collect();
        let fixed = [
            (0, "subscriptions"),
            (2, "resourceGroups"),
            (4, "providers"),
            (5, "Microsoft.Security"),
            (6, "locations"),
            (8, "jitNetworkAccessPolicies"),
        ];
        if parts.len() != 10
            || parts.iter().any(|p| p.is_empty())
            || !fixed
                .iter()
                .all(|(i, want)| parts[*i].eq_ignore_ascii_case(want))
        {
            return None;
        }
        Some(PolicyId {
            subscription: parts[1].to_string(),
            resource_group: parts[3].to_string(),
            location: parts[7].to_string(),
            name: parts[9].to_string(),
        })
    }

    /// The id, also the path of the PUT.
    pub fn path(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Security/locations/{}/jitNetworkAccessPolicies/{}",
            self.subscription, self.resource_group, self.location, self.name
        )
    }
}

/// Subscription and resource group of a VM id (`/subscriptions/S/resourceGroups/RG/...`).
pub fn vm_subscription_and_group(vm_id: &str) -> Option<(&str, &str)> {
    let mut parts = vm_id.strip_prefix('/')?.split('/');
    let (s, sub, r, rg) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (s.eq_ignore_ascii_case("subscriptions")
        && r.eq_ignore_ascii_case("resourceGroups")
        && !sub.is_empty()
        && !rg.is_empty())
    .then_some((sub, rg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_ids_parse_case_insensitively_and_print_back() {
        let id = "/subscriptions/s1/resourcegroups/myRg1/providers/microsoft.security/locations/westeurope/jitNetworkAccessPolicies/default";
        let p = PolicyId::parse(id).expect("parses");
        assert_eq!(p.resource_group, "myRg1");
        assert_eq!(p.location, "westeurope");
        assert_eq!(p.name, "default");
        assert_eq!(
            PolicyId::parse(&p.path()).as_ref(),
            Some(&p),
            "path() parses back"
        );
        for bad in [
            "",
            "/subscriptions/s1/resourceGroups/rg",
            "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1",
            "/subscriptions/s1/resourceGroups//providers/Microsoft.Security/locations/l/jitNetworkAccessPolicies/n",
            "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Security/locations/l/jitNetworkAccessPolicies/n/x",
        ] {
            assert_eq!(PolicyId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn null_optional_fields_read_as_absent() {
        // `az ... -o json` writes absent optional fields as null.
        let port: JitNetworkAccessPortRule = serde_json::from_value(serde_json::json!({
            "number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": "*",
            "allowedSourceAddressPrefixes": null, "maxRequestAccessDuration": "PT3H"
        }))
        .expect("decodes");
        assert_eq!(port.allowed_source_address_prefixes, None);
        assert!(port.extra.is_empty(), "{:?}", port.extra);
    }
}
