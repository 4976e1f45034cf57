//! The Azure edge: what the reconcile loop needs from Azure, behind a small object-safe trait,
//! with the real implementation on `azure_mgmt_network`/`azure_identity`.
//!
//! - [`NetworkApi`]: resolve a VM (through Compute) to its NSGs and private IPs, one by one or
//!   from lists of a resource group's VMs and NICs and a VNet's subnets; list, put and delete rules; read
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
pub mod nsg_json;
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
pub use transport::{AzureStats, Paced, with_reserved};

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

impl VmTargets {
    /// What `vm_id` resolves to through `nics` (the VM's NICs, in the order given: callers sort
    /// them by id, case-insensitively), with `subnet_nsg` giving each subnet's NSG (`None`: the
    /// subnet is unknown, so the VM cannot be resolved this way). One assembly for every way of
    /// reading, so that a VM resolves to the same targets whichever reads found its NICs.
    pub fn assemble<'n>(
        vm_id: &str,
        nics: impl IntoIterator<Item = &'n NicView>,
        mut subnet_nsg: impl FnMut(&str) -> Option<Option<String>>,
    ) -> Option<VmTargets> {
        let mut targets = VmTargets {
            vm_id: vm_id.to_string(),
            ..VmTargets::default()
        };
        for nic in nics {
            if let Some(id) = &nic.nsg_id {
                push_unique(&mut targets.nsg_ids, id.clone());
            }
            for ipc in &nic.ip_configurations {
                if let Some(ip) = &ipc.private_ip {
                    push_unique(&mut targets.private_ips, ip.clone());
                }
                let Some(subnet_id) = &ipc.subnet_id else {
                    continue;
                };
                if let Some(id) = subnet_nsg(subnet_id)? {
                    push_unique(&mut targets.nsg_ids, id);
                }
            }
        }
        Some(targets)
    }
}

/// A VM as its resource group's list gives it: its id and the NICs its
/// `networkProfile.networkInterfaces` names (they may live in another resource group).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmNics {
    pub vm_id: String,
    pub nic_ids: Vec<String>,
}

/// What resolution needs of a NIC: its own NSG and its ipConfigurations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicView {
    pub id: String,
    /// `properties.networkSecurityGroup.id`.
    pub nsg_id: Option<String>,
    /// In the NIC's order.
    pub ip_configurations: Vec<IpConfigView>,
}

/// One ipConfiguration of a NIC: its private IP (either family) and its subnet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpConfigView {
    pub private_ip: Option<String>,
    pub subnet_id: Option<String>,
}

/// A subnet as its virtual network's list gives it: its id and its NSG.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubnetView {
    pub id: String,
    /// `properties.networkSecurityGroup.id`.
    pub nsg_id: Option<String>,
}

/// Appends `value` unless the list holds it already (compared case-insensitively).
pub(crate) fn push_unique(list: &mut Vec<String>, value: String) {
    if !list.iter().any(|v| v.eq_ignore_ascii_case(&value)) {
        list.push(value);
    }
}

/// An NSG as read for a conditional whole-NSG write: its user rules, its etag, and its JSON.
#[derive(Clone, Debug)]
pub struct NsgSnapshot {
    /// The NSG id, as given to [`NetworkApi::read_nsg`].
    pub nsg_id: String,
    /// The NSG's etag when read (body `etag`, else the `ETag` header); `None` if Azure gave none.
    pub etag: Option<String>,
    /// The user (non-default) security rules, parsed as [`NetworkApi::list_rules`] does.
    pub rules: Vec<NsgRule>,
    /// The NSG exactly as Azure returned it, unknown fields included, kept encoded (see
    /// [`nsg_json`]).
    pub raw: Box<serde_json::value::RawValue>,
}

/// One page of the NSGs of a resource group, kept as the text Azure sent: its NSGs are read
/// one by one on demand ([`NsgPage::nsgs`]), each as [`NetworkApi::read_nsg`] reads one.
#[derive(Debug)]
pub struct NsgPage {
    body: bytes::Bytes,
    /// Where the next page is (`nextLink`); `None` on the last.
    pub next: Option<String>,
}

impl NsgPage {
    /// The page's NSGs, each named by its id and otherwise still text.
    pub fn nsgs(&self) -> Result<Vec<nsg_json::ListedNsg<'_>>, AzureError> {
        nsg_json::nsgs_of_page(&self.body)
    }
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

    /// Every VM of a resource group with the NICs it lists (`VirtualMachines_List`, following
    /// `nextLink`): one read per page, where `resolve_vm` reads each VM. A missing resource group
    /// is [`AzureError::NotFound`].
    async fn list_vms(
        &self,
        subscription: &str,
        resource_group: &str,
    ) -> Result<Vec<VmNics>, AzureError>;

    /// Every NIC of a resource group (`NetworkInterfaces_List`, following `nextLink`). A
    /// missing resource group is [`AzureError::NotFound`].
    async fn list_nics(
        &self,
        subscription: &str,
        resource_group: &str,
    ) -> Result<Vec<NicView>, AzureError>;

    /// Every subnet of a virtual network (`Subnets_List`, following `nextLink`). A missing
    /// virtual network is [`AzureError::NotFound`].
    async fn list_subnets(
        &self,
        subscription: &str,
        resource_group: &str,
        virtual_network: &str,
    ) -> Result<Vec<SubnetView>, AzureError>;

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

    /// One page of the NSGs of a resource group (`NetworkSecurityGroups_List`): the first with
    /// `next` `None`, then each page's [`NsgPage::next`]. One read for many NSGs, where
    /// `read_nsg` reads one. A missing resource group is [`AzureError::NotFound`].
    async fn list_nsgs_page(
        &self,
        subscription: &str,
        resource_group: &str,
        next: Option<&str>,
    ) -> Result<NsgPage, AzureError>;

    /// One PUT of the whole NSG built from `snapshot.raw`: drops the rules named in `deletes`
    /// (case-insensitive), adds or replaces `puts` (a replaced rule keeps its place), keeps every
    /// other property and rule exactly as read (unknown fields included), sends
    /// `If-Match: <snapshot.etag>` (`*` when the read gave no etag, so a deleted NSG is never
    /// recreated), and drives the long-running operation to `Succeeded`.
    /// A 412 returns [`AzureError::PreconditionFailed`] without retrying: re-read and re-plan.
    /// Under a `CanNotDelete` lock this still removes rules, where `delete_rule` cannot.
    /// Takes the snapshot: its JSON becomes the body, and none of it is held while the
    /// long-running operation is awaited.
    async fn put_nsg(
        &self,
        snapshot: NsgSnapshot,
        deletes: &[String],
        puts: &[NsgRule],
    ) -> Result<(), AzureError>;

    /// Takes the next place in the subscription's budget for a request of `kind` to the NSG
    /// (before every waiting one that is not `urgent`, if it is) and waits for it (at most
    /// `bound`): a caller that makes up its write only then carries whatever arrived while it
    /// waited. Hand the place to the write with [`with_reserved`]. `None` for a client that
    /// does not pace.
    async fn reserve_budget(
        &self,
        _nsg_id: &str,
        _kind: BudgetKind,
        _urgent: bool,
        _bound: std::time::Duration,
    ) -> Option<Reserved> {
        None
    }

    /// What is left now of the subscription's `kind` budget for a request to the NSG, by this
    /// client's estimate. `None` for a client that does not pace, or knows nothing yet.
    fn budget_left(&self, _nsg_id: &str, _kind: BudgetKind) -> Option<pacing::BudgetLeft> {
        None
    }
}

/// A place in the budget's queue, and how long it took to reach it.
pub struct Reserved {
    pub admission: pacing::Admission,
    pub waited: std::time::Duration,
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
    fn unique_case_insensitive() {
        let mut v = vec![];
        push_unique(&mut v, "/A/b".into());
        push_unique(&mut v, "/a/B".into());
        push_unique(&mut v, "/c".into());
        assert_eq!(v, vec!["/A/b", "/c"]);
    }

    #[test]
    fn assembles_targets_in_nic_order_and_needs_every_subnet() {
        let nic = |id: &str, nsg: Option<&str>, ipcs: &[(&str, &str)]| NicView {
            id: id.to_string(),
            nsg_id: nsg.map(str::to_string),
            ip_configurations: ipcs
                .iter()
                .map(|(ip, subnet)| IpConfigView {
                    private_ip: Some(ip.to_string()),
                    subnet_id: Some(subnet.to_string()),
                })
                .collect(),
        };
        let nics = [
            nic(
                "/n/a",
                Some("/nsg/A"),
                &[("10.0.0.4", "/sn/1"), ("FD00::4", "/sn/2")],
            ),
            nic("/n/b", None, &[("fd00::4", "/SN/1"), ("10.0.0.5", "/sn/3")]),
        ];
        let subnets = |id: &str| match id.to_ascii_lowercase().as_str() {
            "/sn/1" => Some(Some("/nsg/s1".to_string())),
            "/sn/2" => Some(Some("/NSG/a".to_string())),
            "/sn/3" => Some(None),
            _ => None,
        };
        let t = VmTargets::assemble("/vm", &nics, subnets).unwrap();
        assert_eq!(t.vm_id, "/vm");
        assert_eq!(t.private_ips, ["10.0.0.4", "FD00::4", "10.0.0.5"]);
        assert_eq!(t.nsg_ids, ["/nsg/A", "/nsg/s1"]);
        // A subnet nobody read: not resolvable this way.
        let unknown = [nic("/n/c", None, &[("10.0.0.6", "/sn/9")])];
        assert_eq!(VmTargets::assemble("/vm", &unknown, subnets), None);
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
