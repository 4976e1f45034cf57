//! The Azure edge: what the reconcile loop needs from Azure, behind a small object-safe trait,
//! with the real implementation on `azure_mgmt_network`/`azure_identity`.
//!
//! - [`NetworkApi`]: resolve a VM (through Compute) to its NSGs and private IPs; list, put and delete rules; read
//!   an NSG whole and write it back whole under `If-Match` ([`NsgSnapshot`]).
//! - [`AzureNetworkClient`]: the implementation. Writes hold a per-NSG lock, drive the
//!   long-running operation themselves (`Azure-AsyncOperation` / `Location`), and retry 429s,
//!   5xx and transport errors within a per-operation deadline.
//! - [`pacing`]: ARM's subscription budget (token buckets per operation type), tracked from the
//!   `x-ms-ratelimit-remaining-*` headers; requests wait for the refill before Azure throttles.
//! - [`credential`]: configuration to a token credential (client secret, workload identity with
//!   a token file that is re-read on every refresh, managed identity).

pub mod client;
pub mod convert;
pub mod credential;
pub mod error;
pub mod pacing;
pub mod transport;

use async_trait::async_trait;

use crate::plan::rule::NsgRule;

pub use client::{AzureClientOptions, AzureNetworkClient, DEFAULT_ENDPOINT, MANAGEMENT_SCOPE};
pub use credential::{
    CredentialConfig, DEFAULT_AUTHORITY_HOST, FederatedTokenFileCredential, IMDS_ENDPOINT,
    ImdsCredential, authority_host_from_env, build_credential,
};
pub use error::AzureError;
pub use pacing::{BucketSpec, BudgetKind, PacingOptions};
pub use transport::{AzureStats, Paced};

/// What a VM resolves to: where its traffic is filtered and which addresses it has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmTargets {
    /// The VM id, as given.
    pub vm_id: String,
    /// Private IPs of all ipConfigurations of all NICs attached to the VM (deduplicated).
    pub private_ips: Vec<String>,
    /// NIC NSGs and subnet NSGs, deduplicated case-insensitively, in a stable order (NICs sorted
    /// by id; for each NIC its own NSG first, then its subnets' NSGs).
    pub nsg_ids: Vec<String>,
}

/// An NSG as read for a conditional whole-NSG write: its user rules, its etag, and the raw JSON.
#[derive(Clone, Debug)]
pub struct NsgSnapshot {
    /// The NSG id, as given to [`NetworkApi::read_nsg`].
    pub nsg_id: String,
    /// The NSG's etag when read (body `etag`, else the `ETag` header); `None` if Azure gave none.
    pub etag: Option<String>,
    /// The user (non-default) security rules, parsed as [`NetworkApi::list_rules`] does.
    pub rules: Vec<NsgRule>,
    /// The NSG exactly as Azure returned it, unknown fields included.
    pub raw: serde_json::Value,
}

/// What the controller needs from Azure. Object-safe: use it as `Arc<dyn NetworkApi>`.
#[async_trait]
pub trait NetworkApi: Send + Sync {
    /// Reads the VM (`Microsoft.Compute/virtualMachines`), then each NIC its
    /// `networkProfile.networkInterfaces` lists (in any resource group or subscription), their
    /// private IPs, their NSGs and their subnets' NSGs. A VM that does not exist, or lists no
    /// NIC -> [`AzureError::NotFound`]; a NIC it lists that does not exist is another error
    /// (retried, never taken for a missing VM).
    async fn resolve_vm(&self, vm_id: &str) -> Result<VmTargets, AzureError>;

    /// All user (non-default) security rules of an NSG, following `nextLink` paging.
    async fn list_rules(&self, nsg_id: &str) -> Result<Vec<NsgRule>, AzureError>;

    /// Creates or replaces one rule, and returns only when Azure reports the operation
    /// `Succeeded` (or with an error).
    async fn put_rule(&self, nsg_id: &str, rule: &NsgRule) -> Result<(), AzureError>;

    /// Deletes one rule and waits until it is gone. A rule that is already gone is `Ok`.
    async fn delete_rule(&self, nsg_id: &str, rule_name: &str) -> Result<(), AzureError>;

    /// GETs the NSG itself (not the rules collection): user rules parsed as in `list_rules`,
    /// etag, raw body. A missing NSG is [`AzureError::NotFound`].
    async fn read_nsg(&self, nsg_id: &str) -> Result<NsgSnapshot, AzureError>;

    /// One PUT of the whole NSG built from `snapshot.raw`: drops the rules named in `deletes`
    /// (case-insensitive), adds or replaces `puts` (a replaced rule keeps its place), keeps every
    /// other property and rule exactly as read (unknown fields included), sends
    /// `If-Match: <snapshot.etag>` (`*` when the read gave no etag, so a deleted NSG is never
    /// recreated), and drives the long-running operation to `Succeeded`.
    /// A 412 returns [`AzureError::PreconditionFailed`] without retrying: re-read and re-plan.
    /// Under a `CanNotDelete` lock this still removes rules, where `delete_rule` cannot.
    async fn put_nsg(
        &self,
        snapshot: &NsgSnapshot,
        deletes: &[String],
        puts: &[NsgRule],
    ) -> Result<(), AzureError>;
}

/// A parsed ARM resource id:
/// `/subscriptions/{sub}/resourceGroups/{rg}/providers/{namespace}/{type}/{name}[/{type}/{name}]*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceId {
    pub subscription: String,
    pub resource_group: String,
    /// e.g. `Microsoft.Network`.
    pub provider: String,
    /// (type, name) pairs, outermost first: `[("networkSecurityGroups", "nsg1")]`, or
    /// `[("virtualNetworks", "vnet1"), ("subnets", "default")]`.
    pub segments: Vec<(String, String)>,
}

impl ResourceId {
    /// Parses an ARM id. Segment keywords (`subscriptions`, `resourceGroups`, `providers`) are
    /// matched case-insensitively, as ARM does; names keep their case.
    pub fn parse(id: &str) -> Result<ResourceId, AzureError> {
        let bad = |why: &str| {
            AzureError::InvalidInput(format!("invalid Azure resource id {id:?}: {why}"))
        };
        let trimmed = id.trim();
        let rest = trimmed
            .strip_prefix('/')
            .ok_or_else(|| bad("must start with '/'"))?;
        let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("empty segment"));
        }
        if parts.len() < 6 {
            return Err(bad("too short"));
        }
        if !parts[0].eq_ignore_ascii_case("subscriptions") {
            return Err(bad("expected 'subscriptions'"));
        }
        if !parts[2].eq_ignore_ascii_case("resourceGroups") {
            return Err(bad("expected 'resourceGroups'"));
        }
        if !parts[4].eq_ignore_ascii_case("providers") {
            return Err(bad("expected 'providers'"));
        }
        let tail = &parts[6..];
        if tail.is_empty() || !tail.len().is_multiple_of(2) {
            return Err(bad("expected type/name pairs after the provider namespace"));
        }
        Ok(ResourceId {
            subscription: parts[1].to_string(),
            resource_group: parts[3].to_string(),
            provider: parts[5].to_string(),
            segments: tail
                .chunks(2)
                .map(|c| (c[0].to_string(), c[1].to_string()))
                .collect(),
        })
    }

    /// Parses and checks the provider and resource types (case-insensitively), e.g.
    /// `parse_typed(id, "Microsoft.Network", &["virtualNetworks", "subnets"])`.
    pub fn parse_typed(id: &str, provider: &str, types: &[&str]) -> Result<ResourceId, AzureError> {
        let rid = ResourceId::parse(id)?;
        let types_match = rid.segments.len() == types.len()
            && rid
                .segments
                .iter()
                .zip(types)
                .all(|((t, _), want)| t.eq_ignore_ascii_case(want));
        if !rid.provider.eq_ignore_ascii_case(provider) || !types_match {
            return Err(AzureError::InvalidInput(format!(
                "{id:?} is not a {provider}/{} id",
                types.join("/")
            )));
        }
        Ok(rid)
    }

    /// The name of the innermost resource.
    pub fn name(&self) -> &str {
        self.segments.last().map(|(_, n)| n.as_str()).unwrap_or("")
    }

    /// The name of the resource at `depth` (0 = outermost).
    pub fn name_at(&self, depth: usize) -> Option<&str> {
        self.segments.get(depth).map(|(_, n)| n.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nsg_id() {
        let id = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg1/providers/Microsoft.Network/networkSecurityGroups/nsg-1";
        let r = ResourceId::parse(id).unwrap();
        assert_eq!(r.subscription, "00000000-0000-0000-0000-000000000001");
        assert_eq!(r.resource_group, "rg1");
        assert_eq!(r.provider, "Microsoft.Network");
        assert_eq!(r.name(), "nsg-1");
        assert_eq!(
            r.segments,
            vec![("networkSecurityGroups".to_string(), "nsg-1".to_string())]
        );
        assert!(
            ResourceId::parse_typed(id, "microsoft.network", &["NETWORKSECURITYGROUPS"]).is_ok()
        );
        assert!(ResourceId::parse_typed(id, "Microsoft.Compute", &["virtualMachines"]).is_err());
    }

    #[test]
    fn parses_nested_and_case_insensitive_keywords() {
        let id = "/SUBSCRIPTIONS/s/resourcegroups/RG/PROVIDERS/Microsoft.Network/virtualNetworks/v/subnets/sn/";
        let r = ResourceId::parse_typed(id, "Microsoft.Network", &["virtualNetworks", "subnets"])
            .unwrap();
        assert_eq!(r.resource_group, "RG");
        assert_eq!(r.name_at(0), Some("v"));
        assert_eq!(r.name(), "sn");
        assert_eq!(r.name_at(2), None);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "subscriptions/s/resourceGroups/rg/providers/P/t/n",
            "/subscriptions/s/resourceGroups/rg",
            "/subscriptions/s/resourceGroups/rg/providers/P",
            "/subscriptions/s/resourceGroups/rg/providers/P/t",
            "/subscriptions/s/resourceGroups/rg/providers/P/t/n/extra",
            "/subscriptions//resourceGroups/rg/providers/P/t/n",
            "/subs/s/resourceGroups/rg/providers/P/t/n",
            "/subscriptions/s/groups/rg/providers/P/t/n",
        ] {
            assert!(
                ResourceId::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    mod props {
        use super::super::ResourceId;
        use proptest::prelude::*;

        proptest! {
            /// Arbitrary text never panics the parser; whatever parses names its parts back.
            #[test]
            fn arbitrary_input_never_panics(s in "\\PC{0,80}|(/[a-zA-Z.]{0,12}){0,12}/?") {
                if let Ok(r) = ResourceId::parse(&s) {
                    prop_assert!(!r.segments.is_empty());
                    prop_assert!(!r.name().is_empty());
                }
            }

            /// A well-formed id round-trips: the parts come back exactly, keywords in any case.
            #[test]
            fn well_formed_ids_round_trip(
                sub in "[0-9a-f-]{1,36}",
                rg in "[-A-Za-z0-9_.()]{1,20}",
                provider in "Microsoft\\.[A-Za-z]{1,10}",
                segments in proptest::collection::vec(("[A-Za-z]{1,12}", "[-A-Za-z0-9_.]{1,20}"), 1..4),
                upper in any::<bool>(),
            ) {
                let kw = |k: &str| if upper { k.to_uppercase() } else { k.to_string() };
                let mut id = format!("/{}/{sub}/{}/{rg}/{}/{provider}", kw("subscriptions"), kw("resourceGroups"), kw("providers"));
                for (t, n) in &segments {
                    id.push_str(&format!("/{t}/{n}"));
                }
                let r = ResourceId::parse(&id).expect("well formed");
                prop_assert_eq!(&r.subscription, &sub);
                prop_assert_eq!(&r.resource_group, &rg);
                prop_assert_eq!(&r.provider, &provider);
                prop_assert_eq!(&r.segments, &segments);
                let types: Vec<&str> = segments.iter().map(|(t, _)| t.as_str()).collect();
                prop_assert!(ResourceId::parse_typed(&id, &provider.to_lowercase(), &types).is_ok());
            }
        }
    }
}
