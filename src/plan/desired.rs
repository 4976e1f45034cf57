//! The rules that SHOULD exist in one NSG, computed from the whole cluster's policies and grants:
//! guarantees 1 (a Deny rule for every policy port), 2 (Allow rules only for live, valid grants)
//! and 3/4 (a lapsed, deleted or revoked grant, or a deleted policy, simply produces no rule, so
//! the diff removes it). Pure: the clock is a parameter, the objects come from the caller's cache.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use jiff::Timestamp;
use kube::ResourceExt;

use super::naming::{self, Family, Naming};
use super::rule::{Access, Direction, NsgRule, RuleProtocol};
use super::validate::{self, AddressPrefix, Denial, ValidatedGrant, protocol_rank};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    AccessGrant, AccessGrantSpec, GrantPhase, GrantedAccess, GrantedPort, JitPolicy, JitPolicySpec,
    PolicyRef, Protocol, ResolvedTarget,
};

/// The Kubernetes object a rule exists for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Grant {
        uid: String,
        namespace: String,
        name: String,
    },
    Policy {
        uid: String,
        namespace: String,
        name: String,
    },
}

/// A rule that should exist in an NSG, without its priority (the diff picks that).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleIntent {
    pub owner: Owner,
    pub name: String,
    pub description: String,
    pub access: Access,
    /// Always `Inbound`.
    pub direction: Direction,
    pub protocol: RuleProtocol,
    pub source_address_prefixes: Vec<String>,
    /// Always `["*"]`.
    pub source_port_ranges: Vec<String>,
    /// The VM's private IPs, sorted.
    pub destination_address_prefixes: Vec<String>,
    /// Sorted numerically, as strings.
    pub destination_port_ranges: Vec<String>,
}

impl RuleIntent {
    /// The NSG rule this intent becomes at `priority`.
    pub fn with_priority(&self, priority: u16) -> NsgRule {
        NsgRule {
            name: self.name.clone(),
            description: self.description.clone(),
            priority,
            direction: self.direction,
            access: self.access,
            protocol: self.protocol.clone(),
            source_address_prefixes: self.source_address_prefixes.clone(),
            source_port_ranges: self.source_port_ranges.clone(),
            destination_address_prefixes: self.destination_address_prefixes.clone(),
            destination_port_ranges: self.destination_port_ranges.clone(),
            provisioning_failed: false,
        }
    }
}

/// A grant that should have its ports open right now.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveGrant {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Validated against the policy at `activated_at`.
    pub validated: ValidatedGrant,
    /// The policy's resolved target for the grant's VM.
    pub target: ResolvedTarget,
    pub activated_at: Timestamp,
    pub expires_at: Timestamp,
}

fn rule_protocol(p: Protocol) -> RuleProtocol {
    match p {
        Protocol::Tcp => RuleProtocol::Tcp,
        Protocol::Udp => RuleProtocol::Udp,
        Protocol::Any => RuleProtocol::Any,
    }
}

fn contains_ci(list: &[String], id: &str) -> bool {
    list.iter().any(|x| x.eq_ignore_ascii_case(id))
}

fn push_unique_ci(out: &mut Vec<String>, id: &str) {
    if !contains_ci(out, id) {
        out.push(id.to_string());
    }
}

fn target_of<'a>(policy: &'a JitPolicy, vm_id: &str) -> Option<&'a ResolvedTarget> {
    policy
        .status
        .as_ref()?
        .targets
        .iter()
        .find(|t| t.virtual_machine.eq_ignore_ascii_case(vm_id))
}

fn sorted_ips<'a>(ips: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut v: Vec<String> = ips.cloned().collect();
    v.sort();
    v.dedup();
    v
}

/// The spec whose Deny rules stand and against which active grants are checked: the current
/// spec when it is valid, else the last valid one the controller recorded in status. An invalid
/// edit therefore never removes a Deny rule (fails closed).
pub fn effective_spec(policy: &JitPolicy) -> Option<&JitPolicySpec> {
    PolicyCheck::of(policy).effective_spec(policy)
}

/// A policy's validation, made once and kept with the policy's version by the caller: its spec's
/// result, and whether its last enforced spec is valid (asked only when the spec is not).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyCheck {
    pub spec: Result<(), Denial>,
    pub enforced_valid: bool,
}

impl PolicyCheck {
    pub fn of(policy: &JitPolicy) -> PolicyCheck {
        let spec = validate::validate_policy(&policy.spec);
        let enforced_valid = spec.is_err()
            && policy
                .status
                .as_ref()
                .and_then(|s| s.enforced_spec.as_ref())
                .is_some_and(|s| validate::validate_policy(s).is_ok());
        PolicyCheck {
            spec,
            enforced_valid,
        }
    }

    /// The spec to enforce (see [`effective_spec`]), as this check found it.
    pub fn effective_spec<'p>(&self, policy: &'p JitPolicy) -> Option<&'p JitPolicySpec> {
        if self.spec.is_ok() {
            return Some(&policy.spec);
        }
        self.enforced_valid
            .then(|| policy.status.as_ref()?.enforced_spec.as_ref())
            .flatten()
    }
}

/// A policy made ready to plan NSGs, once per version (kept by the caller beside the policy):
/// its check, and which of its resolved targets stand behind each NSG. Planning an NSG then
/// walks the targets behind it, not every target of the policy with a search for each VM (a
/// policy over 500 VMs planned for each of its 625 NSGs).
#[derive(Debug)]
pub struct PolicyIndex {
    /// The policy's uid and resourceVersion: the version it was made for.
    made_for: (Option<String>, Option<String>),
    pub check: PolicyCheck,
    /// Lower-cased NSG id -> the targets behind it (indices into `status.targets`).
    behind: HashMap<String, Vec<usize>>,
    /// Per target: the VM of the effective spec it resolves, when it is that VM's first target.
    spec_vm: Vec<Option<usize>>,
}

/// A policy with its index, as the planner takes it.
pub type Indexed<'a> = (&'a JitPolicy, &'a PolicyIndex);

impl PolicyIndex {
    pub fn of(policy: &JitPolicy) -> PolicyIndex {
        PolicyIndex::checked(policy, PolicyCheck::of(policy))
    }

    pub fn checked(policy: &JitPolicy, check: PolicyCheck) -> PolicyIndex {
        let targets = targets(policy);
        let mut behind: HashMap<String, Vec<usize>> = HashMap::new();
        let mut first_of_vm: HashMap<String, usize> = HashMap::new();
        for (i, target) in targets.iter().enumerate() {
            first_of_vm
                .entry(target.virtual_machine.to_ascii_lowercase())
                .or_insert(i);
            for nsg in &target.network_security_groups {
                let listed = behind.entry(nsg.to_ascii_lowercase()).or_default();
                if listed.last() != Some(&i) {
                    listed.push(i);
                }
            }
        }
        let mut spec_vm = vec![None; targets.len()];
        for (j, vm) in check
            .effective_spec(policy)
            .into_iter()
            .flat_map(|spec| spec.virtual_machines.iter().enumerate())
        {
            if let Some(slot) = first_of_vm
                .get(&vm.id.to_ascii_lowercase())
                .and_then(|&i| spec_vm.get_mut(i))
            {
                slot.get_or_insert(j);
            }
        }
        PolicyIndex {
            made_for: version_of(policy),
            check,
            behind,
            spec_vm,
        }
    }

    fn made_for(&self, policy: &JitPolicy) -> bool {
        self.made_for == version_of(policy)
    }

    /// The policy's targets behind `nsg_id`, each with its index.
    fn targets_behind<'p>(
        &'p self,
        policy: &'p JitPolicy,
        nsg_id: &str,
    ) -> impl Iterator<Item = (usize, &'p ResolvedTarget)> + 'p {
        let targets = targets(policy);
        self.behind
            .get(&nsg_id.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter_map(move |&i| targets.get(i).map(|t| (i, t)))
    }
}

fn targets(policy: &JitPolicy) -> &[ResolvedTarget] {
    policy
        .status
        .as_ref()
        .map(|s| s.targets.as_slice())
        .unwrap_or_default()
}

fn version_of(policy: &JitPolicy) -> (Option<String>, Option<String>) {
    (policy.uid(), policy.resource_version())
}

/// Calls `f` with each policy and its index: the one at the same place in `kept` when it was
/// made for this version of the policy, else one made now.
pub fn with_indexes<P: Borrow<JitPolicy>, R>(
    policies: &[P],
    kept: &[Arc<PolicyIndex>],
    f: impl FnOnce(&[Indexed]) -> R,
) -> R {
    let made: Vec<Option<PolicyIndex>> = policies
        .iter()
        .map(Borrow::borrow)
        .enumerate()
        .map(|(i, policy)| match kept.get(i) {
            Some(index) if index.made_for(policy) => None,
            _ => Some(PolicyIndex::of(policy)),
        })
        .collect();
    let indexed: Vec<Indexed> = policies
        .iter()
        .zip(&made)
        .enumerate()
        .filter_map(|(i, (policy, made))| {
            let index = match made {
                Some(index) => index,
                None => kept.get(i)?.as_ref(),
            };
            Some((policy.borrow(), index))
        })
        .collect();
    f(&indexed)
}

/// The record of what a grant opens, made once at activation from the validated spec.
pub fn granted_access(
    policy_name: &str,
    validated: &ValidatedGrant,
    spec: &AccessGrantSpec,
    generation: i64,
) -> GrantedAccess {
    GrantedAccess {
        generation,
        policy: policy_name.to_string(),
        virtual_machine: validated.vm_id.clone(),
        ports: validated
            .ports
            .iter()
            .map(|&(number, protocol)| GrantedPort { number, protocol })
            .collect(),
        source_address_prefix: validated.source.clone(),
        justification: spec.justification.clone(),
    }
}

/// Checks a frozen record against `policy` (known to be valid) as the grant's window
/// `[activated_at, expires_at)`: the record must still be within the policy, for no longer than
/// the policy allows. A record edited by hand to ask for more is refused here like any other
/// request.
fn revalidate(
    policy_name: &str,
    policy: &JitPolicySpec,
    record: &GrantedAccess,
    activated_at: Timestamp,
    expires_at: Timestamp,
) -> Option<ValidatedGrant> {
    let mut ports: Vec<u16> = record.ports.iter().map(|p| p.number).collect();
    ports.sort_unstable();
    ports.dedup();
    let as_spec = AccessGrantSpec {
        policy_ref: PolicyRef {
            name: record.policy.clone(),
        },
        virtual_machine: record.virtual_machine.clone(),
        ports,
        source_address_prefix: record.source_address_prefix.clone(),
        duration: None,
        not_after: Some(Time(expires_at)),
        justification: record.justification.clone(),
    };
    let mut validated =
        validate::validate_grant_under(policy_name, policy, &as_spec, activated_at).ok()?;
    let recorded: Vec<(u16, Protocol)> = record
        .ports
        .iter()
        .map(|p| (p.number, p.protocol))
        .collect();
    if recorded.is_empty() || !recorded.iter().all(|p| validated.ports.contains(p)) {
        return None;
    }
    validated.ports.retain(|p| recorded.contains(p));
    Some(validated)
}

/// Whether `grant` should have its ports open at `now`. It must: not be deleting; be `Active`
/// with `expiresAt` after `now` and an `activatedAt`; have its policy (same namespace, the policy
/// it was activated under, not deleting, with an effective spec); and what it opens (its frozen
/// record, or for a grant activated before records existed its spec) must pass validation
/// against that policy over its window `[activatedAt, expiresAt)`, so that neither a spec edit nor
/// a hand-edited status opens more or for longer than the policy allows. Its VM must be among the
/// policy's resolved targets.
pub fn live_grant(
    grant: &AccessGrant,
    policy: Option<&JitPolicy>,
    now: Timestamp,
) -> Option<LiveGrant> {
    let policy = policy?;
    live_grant_checked(grant, policy, &PolicyCheck::of(policy), now)
}

/// [`live_grant`] with the policy's validation already done (`check`).
pub fn live_grant_checked(
    grant: &AccessGrant,
    policy: &JitPolicy,
    check: &PolicyCheck,
    now: Timestamp,
) -> Option<LiveGrant> {
    live_grant_under(grant, policy, check.effective_spec(policy)?, now)
}

/// [`live_grant`] with the policy's effective spec already found (it is the same for every
/// grant under the policy, and finding it validates the whole policy).
fn live_grant_under(
    grant: &AccessGrant,
    policy: &JitPolicy,
    spec: &JitPolicySpec,
    now: Timestamp,
) -> Option<LiveGrant> {
    if grant.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = grant.status.as_ref()?;
    if status.phase != Some(GrantPhase::Active) {
        return None;
    }
    let expires_at = status.expires_at.as_ref()?.0;
    if expires_at <= now {
        return None;
    }
    let activated_at = status.activated_at.as_ref()?.0;
    let namespace = grant.namespace()?;
    if policy.metadata.deletion_timestamp.is_some()
        || policy.namespace().as_deref() != Some(namespace.as_str())
        || policy.name_any() != grant.policy_name()
    {
        return None;
    }
    let uid = grant.uid()?;
    let policy_name = policy.name_any();
    let validated = match grant.granted() {
        Some(record) => revalidate(&policy_name, spec, record, activated_at, expires_at)?,
        None => {
            validate::validate_grant_under(&policy_name, spec, &grant.spec, activated_at).ok()?
        }
    };
    if expires_at > validated.expires_at(activated_at) {
        return None;
    }
    let target = target_of(policy, &validated.vm_id)?.clone();
    Some(LiveGrant {
        uid,
        namespace,
        name: grant.name_any(),
        validated,
        target,
        activated_at,
        expires_at,
    })
}

/// The addresses in `ips` split by address family, IPv4 first, each sorted and deduplicated;
/// an empty family is left out. Azure refuses a rule that mixes the two families
/// (`ResourceCannotContainAddressPrefixesFromDifferentAddressFamilies`), so every rule carries
/// one family only. Unparseable entries are dropped.
fn by_family<'a>(ips: impl Iterator<Item = &'a String>) -> Vec<(Family, Vec<String>)> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for ip in ips {
        match AddressPrefix::parse(ip).and_then(|a| a.is_ipv4()) {
            Some(true) => v4.push(ip),
            Some(false) => v6.push(ip),
            None => {}
        }
    }
    [(Family::V4, v4), (Family::V6, v6)]
        .into_iter()
        .filter(|(_, ips)| !ips.is_empty())
        .map(|(f, ips)| (f, sorted_ips(ips.into_iter())))
        .collect()
}

/// The most addresses one Deny rule carries; a larger group is split into chunks of at most
/// this many, named `-0`, `-1`, ... in the order of the VMs' ids. Azure documents no per-rule
/// limit, only 4,000 addresses per NSG over all its rules (see `diff::MAX_ADDRESSES_PER_NSG`);
/// 400 keeps each rule's write small, and an NSG full to Azure's limit with one policy's VMs
/// still takes only 10 of the Deny band's priorities.
pub const DENY_RULE_MAX_ADDRESSES: usize = 400;

/// The Deny intents of one non-deleting policy for `nsg_id`, from its effective spec. The VMs
/// this NSG governs are grouped, per protocol and address family, by the set of ports the policy
/// names for them under that protocol: one rule per group lists the group's ports and its VMs'
/// addresses. A VM is therefore never denied a port the policy does not name for it, and in the
/// common case (every VM with the same ports) a policy takes one rule per protocol and family in
/// each NSG, however many VMs it covers. A group over [`DENY_RULE_MAX_ADDRESSES`] addresses is
/// split into chunks.
fn policy_intents(
    nsg_id: &str,
    (policy, index): Indexed,
    names: &Naming,
    out: &mut Vec<RuleIntent>,
) {
    if policy.metadata.deletion_timestamp.is_some() {
        return;
    }
    let Some(spec) = index.check.effective_spec(policy) else {
        return;
    };
    let (Some(uid), Some(namespace)) = (policy.uid(), policy.namespace()) else {
        return;
    };
    let name = policy.name_any();
    // (protocol, ports, family) -> (VM id in lowercase, address), sorted.
    type Group = (u8, Vec<u16>, Family);
    let mut groups: BTreeMap<Group, (Protocol, Vec<(String, String)>)> = BTreeMap::new();
    for (i, target) in index.targets_behind(policy, nsg_id) {
        let Some(vm) = index
            .spec_vm
            .get(i)
            .copied()
            .flatten()
            .and_then(|j| spec.virtual_machines.get(j))
        else {
            continue;
        };
        let by_protocol = ports_by_protocol(vm.ports.iter().map(|p| (p.number, p.protocol)));
        let vm_key = vm.id.to_ascii_lowercase();
        for (family, ips) in by_family(target.private_ip_addresses.iter()) {
            for (rank, (protocol, ports)) in &by_protocol {
                groups
                    .entry((*rank, ports.clone(), family))
                    .or_insert((*protocol, Vec::new()))
                    .1
                    .extend(ips.iter().map(|ip| (vm_key.clone(), ip.clone())));
            }
        }
    }
    for ((_, ports, family), (protocol, mut members)) in groups {
        members.sort();
        // An address two VMs claim is listed once, under the first.
        let mut seen = std::collections::HashSet::new();
        members.retain(|(_, ip)| seen.insert(ip.clone()));
        let chunks: Vec<&[(String, String)]> = members.chunks(DENY_RULE_MAX_ADDRESSES).collect();
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut vms: Vec<&str> = chunk.iter().map(|(vm, _)| vm.as_str()).collect();
            vms.dedup();
            let mut ips: Vec<String> = chunk.iter().map(|(_, ip)| ip.clone()).collect();
            ips.sort();
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            out.push(RuleIntent {
                owner: Owner::Policy {
                    uid: uid.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                },
                name: names.policy_group_rule_name(&uid, protocol, family, &ports, index),
                description: naming::policy_group_description(
                    &namespace,
                    &name,
                    &ports,
                    protocol,
                    vms.len(),
                    (count > 1).then_some((i + 1, count)),
                ),
                access: Access::Deny,
                direction: Direction::Inbound,
                protocol: rule_protocol(protocol),
                source_address_prefixes: vec!["*".to_string()],
                source_port_ranges: vec!["*".to_string()],
                destination_address_prefixes: ips,
                destination_port_ranges: ports.iter().map(u16::to_string).collect(),
            });
        }
    }
}

/// Ports grouped by protocol (in protocol order), each group sorted numerically, without
/// duplicates: one rule per protocol lists them.
fn ports_by_protocol(
    ports: impl IntoIterator<Item = (u16, Protocol)>,
) -> BTreeMap<u8, (Protocol, Vec<u16>)> {
    let mut by_protocol: BTreeMap<u8, (Protocol, Vec<u16>)> = BTreeMap::new();
    for (port, protocol) in ports {
        by_protocol
            .entry(protocol_rank(protocol))
            .or_insert((protocol, Vec::new()))
            .1
            .push(port);
    }
    for (_, ports) in by_protocol.values_mut() {
        ports.sort_unstable();
        ports.dedup();
    }
    by_protocol
}

/// The Allow intents of one live grant for `nsg_id`: one per protocol and address family. A
/// specific source reaches the VM's addresses of its own family only; `*` and `Internet` reach
/// both, through one rule per family.
fn grant_intents(nsg_id: &str, live: &LiveGrant, names: &Naming, out: &mut Vec<RuleIntent>) {
    if !contains_ci(&live.target.network_security_groups, nsg_id) {
        return;
    }
    let source_family = AddressPrefix::parse(&live.validated.source).and_then(|s| s.is_ipv4());
    let by_protocol = ports_by_protocol(live.validated.ports.iter().copied());
    for (family, ips) in by_family(live.target.private_ip_addresses.iter()) {
        if source_family.is_some_and(|v4| v4 != (family == Family::V4)) {
            continue;
        }
        for (protocol, ports) in by_protocol.values() {
            out.push(RuleIntent {
                owner: Owner::Grant {
                    uid: live.uid.clone(),
                    namespace: live.namespace.clone(),
                    name: live.name.clone(),
                },
                name: naming::with_family(names.grant_rule_name(&live.uid, *protocol), family),
                description: naming::grant_description(
                    &live.namespace,
                    &live.name,
                    live.expires_at,
                ),
                access: Access::Allow,
                direction: Direction::Inbound,
                protocol: rule_protocol(*protocol),
                source_address_prefixes: vec![live.validated.source.clone()],
                source_port_ranges: vec!["*".to_string()],
                destination_address_prefixes: ips.clone(),
                destination_port_ranges: ports.iter().map(u16::to_string).collect(),
            });
        }
    }
}

/// Whether a validated grant can reach its VM at all: a specific source reaches only the VM's
/// addresses of its own family, so an IPv6 source for an IPv4-only VM (or the reverse) would
/// open nothing while looking active. Refused instead, before anything is written.
pub fn check_address_family(
    validated: &ValidatedGrant,
    target: &ResolvedTarget,
) -> Result<(), validate::Denial> {
    let families: Vec<Family> = by_family(target.private_ip_addresses.iter())
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    let source = AddressPrefix::parse(&validated.source).and_then(|s| s.is_ipv4());
    let reachable = match source {
        None => !families.is_empty(),
        Some(v4) => families.contains(if v4 { &Family::V4 } else { &Family::V6 }),
    };
    if reachable {
        return Ok(());
    }
    let has = |f: Family| families.contains(&f);
    let vm_has = match (has(Family::V4), has(Family::V6)) {
        (true, true) => "IPv4 and IPv6",
        (true, false) => "IPv4 only",
        (false, true) => "IPv6 only",
        (false, false) => "no private IP address",
    };
    Err(validate::Denial {
        reason: validate::DenialReason::AddressFamilyMismatch,
        message: format!(
            "source {} cannot reach {}: the VM has {vm_has}",
            validated.source,
            validated.vm_name()
        ),
    })
}

/// The policy a grant refers to, among `policies` (same namespace, `spec.policyRef.name`).
pub fn policy_of<'a, P: Borrow<JitPolicy>>(
    grant: &AccessGrant,
    policies: &'a [P],
) -> Option<&'a JitPolicy> {
    let ns = grant.namespace();
    policies
        .iter()
        .map(Borrow::borrow)
        .find(|p| p.namespace() == ns && p.name_any() == grant.policy_name())
}

/// A policy's namespace and name, as grants refer to it.
type PolicyKey = (Option<String>, String);

/// Every rule that should exist in NSG `nsg_id`, sorted by name: the aggregated Deny rules of
/// every valid policy for the VMs this NSG governs (one per protocol, address family and port
/// set, see `policy_intents`), and an Allow rule per
/// protocol of every live grant whose VM this NSG governs. VMs without a private IP get no rule
/// (an NSG rule needs a destination).
///
/// Rule names are hashes; if two intents ever share a name (a hash collision), two Deny rules
/// for the same port are merged into one covering both VMs' addresses (the same meaning), and
/// otherwise the first one (by sort order) wins. Names carry `names`'s installation id.
///
/// The cost is linear in the number of objects: each policy is validated once, and a grant is
/// validated only when its policy governs this NSG for the grant's VM (every NSG is planned from
/// the whole cluster, so anything more per grant would grow with the square of the grants).
pub fn desired_rules<P: Borrow<JitPolicy>, G: Borrow<AccessGrant>>(
    nsg_id: &str,
    policies: &[P],
    grants: &[G],
    now: Timestamp,
    names: &Naming,
) -> Vec<RuleIntent> {
    with_indexes(policies, &[], |policies| {
        desired_rules_indexed(nsg_id, policies, grants, now, names)
    })
}

/// [`desired_rules`] with each policy's index kept by the caller.
pub fn desired_rules_indexed<G: Borrow<AccessGrant>>(
    nsg_id: &str,
    policies: &[Indexed],
    grants: &[G],
    now: Timestamp,
    names: &Naming,
) -> Vec<RuleIntent> {
    let mut out = Vec::new();
    // By (namespace, name), the first one winning as in `policy_of`; `None`: it governs no VM
    // here, or has no effective spec, so no grant under it opens anything in this NSG.
    let mut governing: HashMap<PolicyKey, Option<(&JitPolicy, &JitPolicySpec, VmsBehind)>> =
        HashMap::new();
    for &(policy, index) in policies {
        policy_intents(nsg_id, (policy, index), names, &mut out);
        governing
            .entry((policy.namespace(), policy.name_any()))
            .or_insert_with(|| {
                let behind = VmsBehind::of((policy, index), nsg_id);
                let governs = !behind.is_empty();
                governs
                    .then(|| {
                        let spec = index.check.effective_spec(policy)?;
                        Some((policy, spec, behind))
                    })
                    .flatten()
            });
    }
    for grant in grants.iter().map(Borrow::borrow) {
        let key = (grant.namespace(), grant.policy_name().to_string());
        let Some(Some((policy, spec, behind))) = governing.get(&key) else {
            continue;
        };
        if !behind.holds(grant) {
            continue;
        }
        if let Some(live) = live_grant_under(grant, policy, spec, now) {
            grant_intents(nsg_id, &live, names, &mut out);
        }
    }
    out.sort_by(|a, b| {
        (
            a.name.to_ascii_lowercase(),
            &a.owner,
            &a.description,
            &a.destination_address_prefixes,
        )
            .cmp(&(
                b.name.to_ascii_lowercase(),
                &b.owner,
                &b.description,
                &b.destination_address_prefixes,
            ))
    });
    let mut merged: Vec<RuleIntent> = Vec::with_capacity(out.len());
    for intent in out {
        match merged.last_mut() {
            Some(prev) if prev.name.eq_ignore_ascii_case(&intent.name) => {
                if prev.access == Access::Deny
                    && intent.access == Access::Deny
                    && prev.protocol == intent.protocol
                    && prev.destination_port_ranges == intent.destination_port_ranges
                    && prev.source_address_prefixes == intent.source_address_prefixes
                {
                    prev.destination_address_prefixes
                        .extend(intent.destination_address_prefixes);
                    prev.destination_address_prefixes.sort();
                    prev.destination_address_prefixes.dedup();
                }
            }
            _ => merged.push(intent),
        }
    }
    merged
}

/// The NSGs a policy's Deny rules live in (from its resolved targets), deduplicated
/// case-insensitively.
pub fn nsgs_of_policy(policy: &JitPolicy) -> Vec<String> {
    let mut out = Vec::new();
    for t in policy.status.iter().flat_map(|s| s.targets.iter()) {
        for nsg in &t.network_security_groups {
            push_unique_ci(&mut out, nsg);
        }
    }
    out
}

/// Where a grant may open rules, as an index finds it: its namespace, its policy's name and its
/// VM as the grant names it (the frozen record's, else the spec's), lower-cased: a full ID or a
/// bare name. Kept beside the grant stores, so an NSG is planned from the grants behind it
/// rather than from every grant in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GrantKey {
    pub namespace: String,
    pub policy: String,
    pub vm: String,
}

impl GrantKey {
    pub fn of(grant: &AccessGrant) -> GrantKey {
        GrantKey {
            namespace: grant.namespace().unwrap_or_default(),
            policy: grant.policy_name().to_string(),
            vm: vm_key(grant),
        }
    }
}

/// The grant's VM as [`VmsBehind`] matches it: lower-cased, a full ID or a bare name.
fn vm_key(grant: &AccessGrant) -> String {
    grant
        .granted()
        .map(|g| g.virtual_machine.as_str())
        .unwrap_or(&grant.spec.virtual_machine)
        .to_ascii_lowercase()
}

/// The keys of every grant that [`desired_rules`] may give a rule in `nsg_id`: for each policy,
/// each VM behind the NSG by full ID and by name. A grant whose key is not among them gets no
/// rule there, so planning the NSG from those grants alone plans it exactly.
pub fn grant_keys_behind<P: Borrow<JitPolicy>>(nsg_id: &str, policies: &[P]) -> HashSet<GrantKey> {
    with_indexes(policies, &[], |policies| {
        grant_keys_behind_indexed(nsg_id, policies)
    })
}

/// [`grant_keys_behind`] with each policy's index kept by the caller.
pub fn grant_keys_behind_indexed(nsg_id: &str, policies: &[Indexed]) -> HashSet<GrantKey> {
    let mut keys = HashSet::new();
    for &(policy, index) in policies {
        let namespace = policy.namespace().unwrap_or_default();
        let name = policy.name_any();
        let behind = VmsBehind::of((policy, index), nsg_id);
        for vm in behind.ids.into_iter().chain(behind.names) {
            keys.insert(GrantKey {
                namespace: namespace.clone(),
                policy: name.clone(),
                vm,
            });
        }
    }
    keys
}

/// The VMs of a policy whose resolved targets put them behind one NSG, by lower-cased full ID
/// and by name: one lookup per grant instead of a scan of the policy's targets (a policy over
/// 1,000 VMs planned for 10,000 grants).
struct VmsBehind {
    ids: HashSet<String>,
    names: HashSet<String>,
}

impl VmsBehind {
    fn of((policy, index): Indexed, nsg_id: &str) -> VmsBehind {
        let (mut ids, mut names) = (HashSet::new(), HashSet::new());
        for (_, target) in index.targets_behind(policy, nsg_id) {
            ids.insert(target.virtual_machine.to_ascii_lowercase());
            names.insert(validate::vm_name(&target.virtual_machine).to_ascii_lowercase());
        }
        VmsBehind { ids, names }
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether the grant's VM (as [`targets_of_grant_vm`] matches it) is behind the NSG.
    fn holds(&self, grant: &AccessGrant) -> bool {
        let wanted = vm_key(grant);
        match wanted.contains('/') {
            true => self.ids.contains(&wanted),
            false => self.names.contains(&wanted),
        }
    }
}

/// The policy's resolved targets for the grant's VM (its frozen record's, else its spec's),
/// matched by full ID or, for a VM named by name alone, by name.
fn targets_of_grant_vm<'a>(
    grant: &'a AccessGrant,
    policy: &'a JitPolicy,
) -> impl Iterator<Item = &'a ResolvedTarget> + 'a {
    let wanted = grant
        .granted()
        .map(|g| g.virtual_machine.as_str())
        .unwrap_or(&grant.spec.virtual_machine);
    let targets = policy
        .status
        .as_ref()
        .map(|s| s.targets.as_slice())
        .unwrap_or_default();
    targets.iter().filter(move |t| {
        if wanted.contains('/') {
            t.virtual_machine.eq_ignore_ascii_case(wanted)
        } else {
            validate::vm_name(&t.virtual_machine).eq_ignore_ascii_case(wanted)
        }
    })
}

/// The NSGs a grant's Allow rules live in or lived in: the policy's targets for the grant's VM
/// (matched by full ID or by name), plus every NSG recorded in `status.rules`, so old rules are
/// found even after the policy changed. Deduplicated case-insensitively.
pub fn nsgs_of_grant(grant: &AccessGrant, policy: Option<&JitPolicy>) -> Vec<String> {
    let mut out = Vec::new();
    for t in policy
        .into_iter()
        .flat_map(|p| targets_of_grant_vm(grant, p))
    {
        for nsg in &t.network_security_groups {
            push_unique_ci(&mut out, nsg);
        }
    }
    for r in grant.status.iter().flat_map(|s| s.rules.iter()) {
        push_unique_ci(&mut out, &r.network_security_group);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::{
        AccessGrantSpec, AccessGrantStatus, GrantedRule, JitPolicySpec, JitPolicyStatus,
    };
    use crate::plan::validate::tests::{grant as grant_spec, now, policy as policy_spec, vm_id};
    use jiff::SignedDuration;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const NO_GRANTS: &[AccessGrant] = &[];
    pub(crate) const NSG_A: &str = "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.Network/networkSecurityGroups/nsg-a";
    pub(crate) const NSG_B: &str = "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.Network/networkSecurityGroups/nsg-b";

    pub(crate) fn mk_policy(
        ns: &str,
        name: &str,
        uid: &str,
        spec: JitPolicySpec,
        targets: Vec<ResolvedTarget>,
    ) -> JitPolicy {
        let mut p = JitPolicy::new(name, spec);
        p.metadata.namespace = Some(ns.to_string());
        p.metadata.uid = Some(uid.to_string());
        p.status = Some(JitPolicyStatus {
            targets,
            ..Default::default()
        });
        p
    }

    pub(crate) fn target(vm: &str, ips: &[&str], nsgs: &[&str]) -> ResolvedTarget {
        ResolvedTarget {
            virtual_machine: vm.to_string(),
            private_ip_addresses: ips.iter().map(|s| s.to_string()).collect(),
            network_security_groups: nsgs.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub(crate) fn mk_grant(
        ns: &str,
        name: &str,
        uid: &str,
        spec: AccessGrantSpec,
        active_for: Option<i64>,
    ) -> AccessGrant {
        let mut g = AccessGrant::new(name, spec);
        g.metadata.namespace = Some(ns.to_string());
        g.metadata.uid = Some(uid.to_string());
        if let Some(secs) = active_for {
            let activated = now()
                .checked_sub(SignedDuration::from_mins(10))
                .expect("ok");
            g.status = Some(AccessGrantStatus {
                phase: Some(GrantPhase::Active),
                activated_at: Some(Time(activated)),
                expires_at: Some(Time(
                    now()
                        .checked_add(SignedDuration::from_secs(secs))
                        .expect("ok"),
                )),
                ..Default::default()
            });
        }
        g
    }

    pub(crate) fn example_policy() -> JitPolicy {
        mk_policy(
            "team-a",
            "prod-ssh",
            "policy-uid-1",
            policy_spec(),
            vec![
                target(
                    &vm_id("rg1", "vm1"),
                    &["10.0.1.5", "10.0.1.4", "fd00::4"],
                    &[NSG_A, NSG_B],
                ),
                target(&vm_id("rg1", "vm2"), &["10.0.2.4"], &[NSG_B]),
            ],
        )
    }

    #[test]
    fn deny_rules_for_every_policy_port_in_the_nsg() {
        let p = example_policy();
        let names = Naming::default();
        let all = desired_rules(NSG_A, std::slice::from_ref(&p), NO_GRANTS, now(), &names);
        // vm1 (22, 53 and 443 over TCP, 53 over UDP): one rule per protocol and family.
        assert_eq!(all.len(), 4, "{all:#?}");
        assert!(all.iter().all(|i| i.access == Access::Deny
            && i.direction == Direction::Inbound
            && i.source_address_prefixes == ["*"]
            && i.source_port_ranges == ["*"]));
        let find = |protocol: Protocol, family: Family, ports: &[u16]| {
            let name = names.policy_group_rule_name("policy-uid-1", protocol, family, ports, 0);
            all.iter()
                .find(|i| i.name == name)
                .unwrap_or_else(|| panic!("{name} in {all:#?}"))
                .clone()
        };
        let tcp = find(Protocol::Tcp, Family::V4, &[22, 53, 443]);
        assert_eq!(tcp.destination_port_ranges, ["22", "53", "443"]);
        assert_eq!(tcp.destination_address_prefixes, ["10.0.1.4", "10.0.1.5"]);
        assert_eq!(tcp.protocol, RuleProtocol::Tcp);
        assert_eq!(
            tcp.description,
            "portcullis policy team-a/prod-ssh deny 22,53,443/tcp on 1 VM"
        );
        let tcp6 = find(Protocol::Tcp, Family::V6, &[22, 53, 443]);
        assert_eq!(tcp6.destination_address_prefixes, ["fd00::4"]);
        let udp = find(Protocol::Udp, Family::V4, &[53]);
        assert_eq!(udp.destination_port_ranges, ["53"]);
        assert_eq!(udp.protocol, RuleProtocol::Udp);
        find(Protocol::Udp, Family::V6, &[53]);
        let mut sorted: Vec<String> = all.iter().map(|i| i.name.clone()).collect();
        sorted.sort();
        assert_eq!(
            all.iter().map(|i| &i.name).collect::<Vec<_>>(),
            sorted.iter().collect::<Vec<_>>()
        );
        // Upper-case NSG id matches; vm2 (3389 only) gets a rule of its own in nsg-b: it is never
        // denied vm1's ports, nor vm1 its port.
        let b = desired_rules(
            &NSG_B.to_uppercase(),
            std::slice::from_ref(&p),
            NO_GRANTS,
            now(),
            &names,
        );
        assert_eq!(b.len(), 5, "vm1's four rules and vm2's one: {b:#?}");
        let vm2 =
            names.policy_group_rule_name("policy-uid-1", Protocol::Tcp, Family::V4, &[3389], 0);
        let vm2 = b.iter().find(|i| i.name == vm2).expect("vm2's rule");
        assert_eq!(vm2.destination_address_prefixes, ["10.0.2.4"]);
        assert_eq!(vm2.destination_port_ranges, ["3389"]);
    }

    #[test]
    fn the_index_finds_each_vms_first_target_behind_an_nsg_whatever_its_case() {
        let mut p = example_policy();
        let targets = &mut p.status.as_mut().expect("status").targets;
        // vm1 again, later and elsewhere: its first target is the one that counts.
        targets.push(target(&vm_id("rg1", "VM1"), &["10.9.9.9"], &[NSG_B]));
        // A VM the spec does not name, and an NSG listed twice in one target.
        targets.push(target(
            &vm_id("rg1", "stranger"),
            &["10.7.7.7"],
            &[NSG_A, NSG_A],
        ));
        targets[0].network_security_groups = vec![NSG_A.to_uppercase(), NSG_B.to_string()];
        let index = PolicyIndex::of(&p);
        let behind_a: Vec<usize> = index.targets_behind(&p, NSG_A).map(|(i, _)| i).collect();
        assert_eq!(behind_a, [0, 3], "each target once, found by any case");
        assert_eq!(index.spec_vm, [Some(0), Some(1), None, None]);

        let names = Naming::default();
        let a = desired_rules(NSG_A, std::slice::from_ref(&p), NO_GRANTS, now(), &names);
        let addresses: Vec<&String> = a
            .iter()
            .flat_map(|i| &i.destination_address_prefixes)
            .collect();
        assert!(
            !addresses.contains(&&"10.7.7.7".to_string()),
            "a VM the policy does not name is not denied: {a:#?}"
        );
        let b = desired_rules(NSG_B, std::slice::from_ref(&p), NO_GRANTS, now(), &names);
        let addresses: Vec<&String> = b
            .iter()
            .flat_map(|i| &i.destination_address_prefixes)
            .collect();
        assert!(addresses.contains(&&"10.0.1.4".to_string()), "{b:#?}");
        assert!(
            !addresses.contains(&&"10.9.9.9".to_string()),
            "only a VM's first target counts: {b:#?}"
        );
        // An NSG nothing is behind plans nothing.
        assert!(
            index
                .targets_behind(&p, "/subscriptions/s/x")
                .next()
                .is_none()
        );
    }

    #[test]
    fn a_kept_index_serves_only_the_version_it_was_made_for() {
        let mut p = example_policy();
        p.metadata.resource_version = Some("1".into());
        let kept = vec![Arc::new(PolicyIndex::of(&p))];
        with_indexes(std::slice::from_ref(&p), &kept, |indexed| {
            assert!(std::ptr::eq(indexed[0].1, kept[0].as_ref()), "kept");
        });
        // A new version whose VM moved out of nsg-a: an index of its own, which sees the move.
        p.metadata.resource_version = Some("2".into());
        p.status.as_mut().expect("status").targets[0].network_security_groups =
            vec![NSG_B.to_string()];
        with_indexes(std::slice::from_ref(&p), &kept, |indexed| {
            assert!(!std::ptr::eq(indexed[0].1, kept[0].as_ref()), "made anew");
            assert_eq!(indexed[0].1.targets_behind(&p, NSG_A).count(), 0);
        });
        assert!(
            desired_rules(
                NSG_A,
                std::slice::from_ref(&p),
                NO_GRANTS,
                now(),
                &Naming::default()
            )
            .is_empty()
        );
    }

    /// A policy over `n` VMs with the same port, `per_nsg` VMs behind each subnet NSG.
    pub(crate) fn wide_policy(n: usize, per_nsg: usize, ports: &[u16]) -> (JitPolicy, Vec<String>) {
        use crate::api::{PolicyPort, PolicyVirtualMachine};
        let nsg = |s: usize| {
            format!(
                "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.Network/networkSecurityGroups/nsg-subnet{s}"
            )
        };
        let mut vms = Vec::new();
        let mut targets = Vec::new();
        for i in 0..n {
            let id = vm_id("rg1", &format!("vm{i}"));
            vms.push(PolicyVirtualMachine {
                id: id.clone(),
                ports: ports
                    .iter()
                    .map(|&number| PolicyPort {
                        number,
                        protocol: Protocol::Tcp,
                        allowed_source_address_prefix: None,
                        allowed_source_address_prefixes: vec!["198.18.0.0/15".into()],
                        max_request_access_duration: "PT3H".into(),
                        approval: None,
                    })
                    .collect(),
            });
            let ip = format!(
                "10.{}.{}.{}",
                i / per_nsg,
                (i % per_nsg) / 250,
                (i % per_nsg) % 250 + 4
            );
            targets.push(target(&id, &[ip.as_str()], &[nsg(i / per_nsg).as_str()]));
        }
        let p = mk_policy(
            "team-a",
            "wide",
            "wide-uid",
            JitPolicySpec {
                virtual_machines: vms,
                ..Default::default()
            },
            targets,
        );
        (p, (0..n.div_ceil(per_nsg)).map(nsg).collect())
    }

    #[test]
    fn vms_with_the_same_ports_share_one_rule_and_others_get_their_own() {
        let (mut p, nsgs) = wide_policy(6, 6, &[22]);
        // vm4 also lists 80, vm5 only 443: three port sets, three rules.
        let extra = p.spec.virtual_machines[0].ports[0].clone();
        p.spec.virtual_machines[4]
            .ports
            .push(crate::api::PolicyPort {
                number: 80,
                ..extra
            });
        p.spec.virtual_machines[5].ports[0].number = 443;
        let names = Naming::default();
        let rules = desired_rules(&nsgs[0], std::slice::from_ref(&p), NO_GRANTS, now(), &names);
        let by_ports: Vec<(Vec<String>, Vec<String>)> = rules
            .iter()
            .map(|r| {
                (
                    r.destination_port_ranges.clone(),
                    r.destination_address_prefixes.clone(),
                )
            })
            .collect();
        assert_eq!(rules.len(), 3, "{by_ports:?}");
        let ports = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            by_ports.contains(&(
                ports(&["22"]),
                ports(&["10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7"])
            )),
            "{by_ports:?}"
        );
        assert!(
            by_ports.contains(&(ports(&["22", "80"]), ports(&["10.0.0.8"]))),
            "{by_ports:?}"
        );
        assert!(
            by_ports.contains(&(ports(&["443"]), ports(&["10.0.0.9"]))),
            "{by_ports:?}"
        );
        let shared = rules
            .iter()
            .find(|r| r.destination_port_ranges == ["22"])
            .expect("22");
        assert_eq!(
            shared.description,
            "portcullis policy team-a/wide deny 22/tcp on 4 VMs"
        );
        // Another NSG sees none of them.
        assert!(desired_rules(NSG_A, &[p], NO_GRANTS, now(), &names).is_empty());
    }

    #[test]
    fn a_group_over_the_per_rule_cap_is_split_into_named_chunks() {
        let n = 2 * DENY_RULE_MAX_ADDRESSES + 7;
        let (p, nsgs) = wide_policy(n, n, &[22, 3389]);
        let names = Naming::default();
        let rules = desired_rules(&nsgs[0], std::slice::from_ref(&p), NO_GRANTS, now(), &names);
        assert_eq!(rules.len(), 3);
        let mut covered = std::collections::BTreeSet::new();
        for (i, size) in [DENY_RULE_MAX_ADDRESSES, DENY_RULE_MAX_ADDRESSES, 7]
            .into_iter()
            .enumerate()
        {
            let name = names.policy_group_rule_name(
                "wide-uid",
                Protocol::Tcp,
                Family::V4,
                &[22, 3389],
                i as u16,
            );
            let r = rules
                .iter()
                .find(|r| r.name == name)
                .unwrap_or_else(|| panic!("chunk {i}"));
            assert_eq!(r.destination_address_prefixes.len(), size);
            assert_eq!(r.destination_port_ranges, ["22", "3389"]);
            assert!(
                r.description
                    .ends_with(&format!("on {size} VMs (part {} of 3)", i + 1)),
                "{}",
                r.description
            );
            covered.extend(r.destination_address_prefixes.iter().cloned());
        }
        assert_eq!(covered.len(), n, "every VM in exactly one chunk");
        // Deterministic: the same policy gives the same rules.
        assert_eq!(
            rules,
            desired_rules(&nsgs[0], &[p], NO_GRANTS, now(), &names)
        );
    }

    /// Issue 10's target: a policy over 1,000 VMs behind 10 subnet NSGs (100 VMs each, one port)
    /// takes one Deny rule per NSG, placed inside the default Deny band in one write per NSG,
    /// after which the NSG is in line.
    #[test]
    fn a_policy_over_1000_vms_behind_10_subnet_nsgs_fits_the_default_band_in_one_write_each() {
        use crate::plan::diff::{Bands, plan_nsg};
        let (p, nsgs) = wide_policy(1000, 100, &[22]);
        assert_eq!(nsgs.len(), 10);
        let names = Naming::default();
        let bands = Bands::default();
        for nsg in &nsgs {
            let desired = desired_rules(nsg, std::slice::from_ref(&p), NO_GRANTS, now(), &names);
            assert_eq!(desired.len(), 1, "{nsg}");
            assert_eq!(desired[0].destination_address_prefixes.len(), 100);
            let plan = plan_nsg(&[], &desired, &bands, &names);
            assert!(
                plan.unplaced.is_empty() && plan.deletes.is_empty(),
                "{nsg}: {plan:?}"
            );
            assert_eq!(plan.puts.len(), 1);
            assert!(bands.deny.contains(&plan.puts[0].priority));
            let after: Vec<NsgRule> = plan.placed.clone();
            assert!(
                plan_nsg(&after, &desired, &bands, &names).is_noop(),
                "{nsg} in line after one write"
            );
        }
    }

    #[test]
    fn invalid_or_deleting_policies_produce_nothing() {
        let mut p = example_policy();
        p.spec.virtual_machines[0].ports[0].max_request_access_duration = "P2D".to_string();
        assert!(desired_rules(NSG_A, &[p], NO_GRANTS, now(), &Naming::default()).is_empty());
        let mut p = example_policy();
        p.metadata.deletion_timestamp = Some(Time(now()));
        assert!(desired_rules(NSG_A, &[p], NO_GRANTS, now(), &Naming::default()).is_empty());
        let mut p = example_policy();
        p.status = None;
        assert!(
            desired_rules(NSG_A, &[p], NO_GRANTS, now(), &Naming::default()).is_empty(),
            "unresolved targets: nothing to place"
        );
    }

    #[test]
    fn allow_rule_for_a_live_grant() {
        let p = example_policy();
        let g = mk_grant(
            "team-a",
            "fix-disk",
            "grant-uid-1",
            grant_spec("vm1", &[53, 22, 443], "10.1.2.3/32", "PT1H"),
            Some(600),
        );
        // 22 and 443 do not allow 10.1.2.3: denied, nothing open.
        assert!(live_grant(&g, Some(&p), now()).is_none());
        let g = mk_grant(
            "team-a",
            "fix-disk",
            "grant-uid-1",
            grant_spec("vm1", &[53], "10.1.2.3/32", "PT1H"),
            Some(600),
        );
        let live = live_grant(&g, Some(&p), now()).expect("live");
        assert_eq!(live.target.virtual_machine, vm_id("rg1", "vm1"));
        let rules = desired_rules(
            NSG_A,
            std::slice::from_ref(&p),
            std::slice::from_ref(&g),
            now(),
            &Naming::default(),
        );
        let allows: Vec<_> = rules.iter().filter(|r| r.access == Access::Allow).collect();
        assert_eq!(allows.len(), 2, "one per protocol");
        for a in &allows {
            assert_eq!(a.source_address_prefixes, ["10.1.2.3/32"]);
            assert_eq!(
                a.destination_address_prefixes,
                ["10.0.1.4", "10.0.1.5"],
                "IPv4 only for an IPv4 source"
            );
            assert_eq!(a.destination_port_ranges, ["53"]);
            assert!(
                a.description
                    .starts_with("portcullis grant team-a/fix-disk until ")
            );
        }
        let tcp = allows
            .iter()
            .find(|a| a.protocol == RuleProtocol::Tcp)
            .expect("tcp");
        assert_eq!(
            tcp.name,
            Naming::default().grant_rule_name("grant-uid-1", Protocol::Tcp)
        );
        assert!(matches!(&tcp.owner, Owner::Grant { uid, .. } if uid == "grant-uid-1"));
        // Not in an NSG that does not govern the VM.
        let other = "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.Network/networkSecurityGroups/nsg-c";
        assert!(desired_rules(other, &[p], &[g], now(), &Naming::default()).is_empty());
    }

    #[test]
    fn ports_of_one_protocol_share_a_rule_sorted_numerically() {
        let mut spec = policy_spec();
        spec.virtual_machines[1]
            .ports
            .push(crate::plan::validate::tests::port(
                1000,
                Protocol::Tcp,
                &["198.51.100.0/24"],
                "PT1H",
            ));
        spec.virtual_machines[1]
            .ports
            .push(crate::plan::validate::tests::port(
                22,
                Protocol::Tcp,
                &["198.51.100.0/24"],
                "PT1H",
            ));
        let p = mk_policy(
            "team-a",
            "prod-ssh",
            "policy-uid-1",
            spec,
            vec![target(&vm_id("rg1", "vm2"), &["10.0.2.4"], &[NSG_B])],
        );
        let g = mk_grant(
            "team-a",
            "g",
            "grant-uid-2",
            grant_spec("vm2", &[3389, 1000, 22], "198.51.100.7", "PT1H"),
            Some(60),
        );
        let rules = desired_rules(NSG_B, &[p], &[g], now(), &Naming::default());
        let allows: Vec<_> = rules.iter().filter(|r| r.access == Access::Allow).collect();
        assert_eq!(allows.len(), 1);
        assert_eq!(allows[0].destination_port_ranges, ["22", "1000", "3389"]);
    }

    #[test]
    fn ipv6_grant_reaches_ipv6_addresses_only() {
        let p = example_policy();
        let g = mk_grant(
            "team-a",
            "v6",
            "grant-uid-3",
            grant_spec("vm1", &[443], "2001:db8::1", "PT1H"),
            Some(60),
        );
        let rules = desired_rules(
            NSG_A,
            std::slice::from_ref(&p),
            &[g],
            now(),
            &Naming::default(),
        );
        let allow = rules
            .iter()
            .find(|r| r.access == Access::Allow)
            .expect("allow");
        assert_eq!(allow.destination_address_prefixes, ["fd00::4"]);
        // A VM with no IPv6 address: nothing to open.
        let g = mk_grant(
            "team-a",
            "v6",
            "grant-uid-3",
            grant_spec("vm1", &[443], "2001:db8::1", "PT1H"),
            Some(60),
        );
        let mut p = example_policy();
        p.status.as_mut().expect("status").targets[0].private_ip_addresses =
            vec!["10.0.1.4".to_string()];
        assert!(
            desired_rules(NSG_A, &[p], &[g], now(), &Naming::default())
                .iter()
                .all(|r| r.access == Access::Deny)
        );
    }

    #[test]
    fn grants_that_are_not_live() {
        let p = example_policy();
        let spec = || grant_spec("vm1", &[22], "203.0.113.7", "PT1H");
        // Expired (expiresAt == now counts as expired).
        let g = mk_grant("team-a", "g", "u", spec(), Some(0));
        assert!(live_grant(&g, Some(&p), now()).is_none());
        // Never activated.
        let g = mk_grant("team-a", "g", "u", spec(), None);
        assert!(live_grant(&g, Some(&p), now()).is_none());
        // Other phases.
        for phase in [
            GrantPhase::Pending,
            GrantPhase::Expired,
            GrantPhase::Revoked,
            GrantPhase::Denied,
            GrantPhase::Failed,
        ] {
            let mut g = mk_grant("team-a", "g", "u", spec(), Some(60));
            g.status.as_mut().expect("status").phase = Some(phase);
            assert!(live_grant(&g, Some(&p), now()).is_none(), "{phase:?}");
        }
        // Deleting.
        let mut g = mk_grant("team-a", "g", "u", spec(), Some(60));
        g.metadata.deletion_timestamp = Some(Time(now()));
        assert!(live_grant(&g, Some(&p), now()).is_none());
        // No policy, policy deleting, policy in another namespace, another policy's name.
        let g = mk_grant("team-a", "g", "u", spec(), Some(60));
        assert!(live_grant(&g, None, now()).is_none());
        let mut deleting = example_policy();
        deleting.metadata.deletion_timestamp = Some(Time(now()));
        assert!(live_grant(&g, Some(&deleting), now()).is_none());
        let mut elsewhere = example_policy();
        elsewhere.metadata.namespace = Some("team-b".to_string());
        assert!(live_grant(&g, Some(&elsewhere), now()).is_none());
        assert!(
            desired_rules(
                NSG_A,
                &[elsewhere],
                std::slice::from_ref(&g),
                now(),
                &Naming::default()
            )
            .iter()
            .all(|r| r.access == Access::Deny)
        );
        let renamed = mk_policy(
            "team-a",
            "other",
            "policy-uid-1",
            policy_spec(),
            p.status.clone().expect("s").targets,
        );
        assert!(live_grant(&g, Some(&renamed), now()).is_none());
        // VM not among the resolved targets.
        let mut unresolved = example_policy();
        unresolved
            .status
            .as_mut()
            .expect("status")
            .targets
            .remove(0);
        assert!(live_grant(&g, Some(&unresolved), now()).is_none());
        // The baseline is live.
        assert!(live_grant(&g, Some(&p), now()).is_some());
    }

    #[test]
    fn validity_is_judged_at_activation() {
        let p = example_policy();
        let with_not_after = |mins_from_now: i64| {
            let mut spec = grant_spec("vm1", &[22], "203.0.113.7", "PT1H");
            spec.duration = None;
            spec.not_after = Some(Time(
                now()
                    .checked_add(SignedDuration::from_mins(mins_from_now))
                    .expect("ok"),
            ));
            let mut g = mk_grant("team-a", "g", "u", spec, Some(300));
            let activated = now()
                .checked_sub(SignedDuration::from_hours(2))
                .expect("ok");
            g.status.as_mut().expect("status").activated_at = Some(Time(activated));
            g
        };
        // notAfter - activatedAt = 2h05m <= PT3H: valid at activation, live now.
        assert!(live_grant(&with_not_after(5), Some(&p), now()).is_some());
        // notAfter - activatedAt = 4h > PT3H (notAfter moved later after activation): not live,
        // although notAfter - now = 2h would pass if judged now.
        assert!(live_grant(&with_not_after(120), Some(&p), now()).is_none());
        // A grant with a duration whose policy maximum was lowered afterwards is no longer live.
        let mut lowered = example_policy();
        lowered.spec.virtual_machines[0].ports[0].max_request_access_duration = "PT30M".to_string();
        let g = mk_grant(
            "team-a",
            "g",
            "u",
            grant_spec("vm1", &[22], "203.0.113.7", "PT1H"),
            Some(60),
        );
        assert!(live_grant(&g, Some(&lowered), now()).is_none());
    }

    #[test]
    fn nsgs_of_policy_and_grant() {
        let p = example_policy();
        assert_eq!(
            nsgs_of_policy(&p),
            vec![NSG_A.to_string(), NSG_B.to_string()]
        );
        let mut g = mk_grant(
            "team-a",
            "g",
            "u",
            grant_spec("VM2", &[3389], "198.51.100.1", "PT1H"),
            Some(60),
        );
        assert_eq!(nsgs_of_grant(&g, Some(&p)), vec![NSG_B.to_string()]);
        let old = "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.Network/networkSecurityGroups/old";
        g.status.as_mut().expect("status").rules = vec![
            GrantedRule {
                network_security_group: NSG_B.to_uppercase(),
                name: "x".into(),
                priority: 100,
            },
            GrantedRule {
                network_security_group: old.to_string(),
                name: "x".into(),
                priority: 100,
            },
        ];
        assert_eq!(
            nsgs_of_grant(&g, Some(&p)),
            vec![NSG_B.to_string(), old.to_string()]
        );
        assert_eq!(
            nsgs_of_grant(&g, None),
            vec![NSG_B.to_uppercase(), old.to_string()]
        );
        let g = mk_grant(
            "team-a",
            "g",
            "u",
            grant_spec(&vm_id("rg1", "vm1"), &[22], "203.0.113.7", "PT1H"),
            None,
        );
        assert_eq!(
            nsgs_of_grant(&g, Some(&p)),
            vec![NSG_A.to_string(), NSG_B.to_string()]
        );
    }

    #[test]
    fn colliding_deny_names_merge_destinations() {
        // A second policy with the same uid yields the same names (as a hash collision would),
        // for the same ports but another VM address: one rule each, covering both.
        let mut p2 = example_policy();
        p2.metadata.name = Some("prod-ssh-copy".to_string());
        p2.status.as_mut().expect("s").targets[0].private_ip_addresses =
            vec!["10.9.9.9".to_string()];
        let merged = desired_rules(
            NSG_A,
            &[example_policy(), p2],
            NO_GRANTS,
            now(),
            &Naming::default(),
        );
        assert_eq!(merged.len(), 4, "TCP and UDP, IPv4 and IPv6");
        assert!(merged.iter().filter(|r| !r.name.ends_with("-v6")).all(|r| {
            r.destination_address_prefixes
                .contains(&"10.9.9.9".to_string())
                && r.destination_address_prefixes
                    .contains(&"10.0.1.4".to_string())
        }));
    }

    // ---- property: desired Allow rules never exceed what the policy allows -------------

    mod props {
        use super::*;
        use crate::api::{PolicyPort, PolicyVirtualMachine};
        use proptest::prelude::*;

        const ALLOWED: &[&str] = &[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "203.0.113.0/24",
            "2001:db8::/32",
            "*",
            "0.0.0.0/0",
        ];
        const SOURCES: &[&str] = &[
            "10.1.2.3",
            "10.2.0.0/16",
            "10.0.0.0/7",
            "203.0.113.9/32",
            "2001:db8::7",
            "2001:db9::1",
            "*",
            "0.0.0.0/0",
            "192.0.2.1",
            "Internet",
        ];
        const PORTS: &[u16] = &[22, 53, 443, 3389];
        const IPS: &[&str] = &["10.0.1.4", "10.0.1.5", "fd00::4", "10.0.2.4"];
        const DURATIONS: &[&str] = &["PT30M", "PT1H", "PT3H", "P1D"];

        fn arb_port() -> impl Strategy<Value = PolicyPort> {
            (
                proptest::sample::select(PORTS),
                prop_oneof![
                    Just(Protocol::Tcp),
                    Just(Protocol::Udp),
                    Just(Protocol::Any)
                ],
                proptest::sample::subsequence(ALLOWED, 1..3),
                proptest::sample::select(DURATIONS),
            )
                .prop_map(|(number, protocol, allowed, max)| PolicyPort {
                    number,
                    protocol,
                    allowed_source_address_prefix: None,
                    allowed_source_address_prefixes: allowed
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    max_request_access_duration: max.to_string(),
                    approval: None,
                })
        }

        fn arb_policy() -> impl Strategy<Value = JitPolicy> {
            let vm = |i: usize| {
                (
                    proptest::collection::vec(arb_port(), 1..4),
                    proptest::sample::subsequence(IPS, 0..4),
                    proptest::sample::subsequence(vec![NSG_A, NSG_B], 1..3),
                )
                    .prop_map(move |(mut ports, ips, nsgs)| {
                        let mut seen = Vec::new();
                        ports.retain(|p| {
                            let k = (p.number, p.protocol);
                            let fresh = !seen.contains(&k);
                            seen.push(k);
                            fresh
                        });
                        let id = vm_id("rg1", &format!("vm{i}"));
                        (
                            PolicyVirtualMachine {
                                id: id.clone(),
                                ports,
                            },
                            target(&id, &ips, &nsgs),
                        )
                    })
            };
            (vm(1), vm(2)).prop_map(|(a, b)| {
                mk_policy(
                    "team-a",
                    "prod",
                    "policy-uid",
                    JitPolicySpec {
                        virtual_machines: vec![a.0, b.0],
                        ..Default::default()
                    },
                    vec![a.1, b.1],
                )
            })
        }

        /// A grant drawn with the policy in view, so that many are valid: the VM by index (2 is
        /// not in the policy), ports by bit mask over the VM's ports (or over all ports), the
        /// source either one of the first chosen port's allowed prefixes or a random one.
        #[derive(Clone, Debug)]
        struct GrantSeed {
            vm: usize,
            mask: u8,
            own_ports: bool,
            source_pick: Option<usize>,
            source: &'static str,
            duration: &'static str,
            left: i64,
        }

        fn arb_grant_seed() -> impl Strategy<Value = GrantSeed> {
            (
                prop_oneof![4 => 0usize..2, 1 => Just(2usize)],
                1u8..16,
                proptest::bool::weighted(0.8),
                proptest::option::weighted(0.6, 0usize..3),
                proptest::sample::select(SOURCES),
                proptest::sample::select(vec!["PT30M", "PT30M", "PT1H", "P1D"]),
                -100i64..10_000,
            )
                .prop_map(
                    |(vm, mask, own_ports, source_pick, source, duration, left)| GrantSeed {
                        vm,
                        mask,
                        own_ports,
                        source_pick,
                        source,
                        duration,
                        left,
                    },
                )
        }

        fn build_grant(i: usize, seed: &GrantSeed, policy: &JitPolicy) -> AccessGrant {
            let vm = policy.spec.virtual_machines.get(seed.vm);
            let candidates: Vec<u16> = match vm {
                Some(vm) if seed.own_ports => vm.ports.iter().map(|p| p.number).collect(),
                _ => PORTS.to_vec(),
            };
            let mut ports: Vec<u16> = candidates
                .iter()
                .enumerate()
                .filter(|(b, _)| seed.mask & (1 << (b % 4)) != 0)
                .map(|(_, p)| *p)
                .collect();
            if ports.is_empty() {
                ports.push(candidates[0]);
            }
            let source = match (seed.source_pick, vm) {
                (Some(k), Some(vm)) => vm
                    .ports
                    .iter()
                    .find(|p| p.number == ports[0])
                    .map(|p| {
                        p.allowed_source_address_prefixes
                            [k % p.allowed_source_address_prefixes.len()]
                        .clone()
                    })
                    .unwrap_or_else(|| seed.source.to_string()),
                _ => seed.source.to_string(),
            };
            let mut spec = grant_spec(
                &format!("vm{}", seed.vm + 1),
                &ports,
                &source,
                seed.duration,
            );
            spec.policy_ref.name = "prod".to_string();
            mk_grant(
                "team-a",
                &format!("g{i}"),
                &format!("grant-uid-{i}"),
                spec,
                Some(seed.left),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::default())] // PROPTEST_CASES sets the count (256)

            #[test]
            fn allow_rules_stay_inside_the_policy(
                policy in arb_policy(),
                seeds in proptest::collection::vec(arb_grant_seed(), 0..5),
            ) {
                let grants: Vec<AccessGrant> = seeds.iter().enumerate().map(|(i, s)| build_grant(i, s, &policy)).collect();
                let policies = [policy.clone()];
                for nsg in [NSG_A, NSG_B] {
                    let intents = desired_rules(nsg, &policies, &grants, now(), &Naming::default());
                    for intent in &intents {
                        prop_assert!(Naming::default().is_writable(&intent.name));
                        prop_assert!(naming::is_valid_rule_name(&intent.name));
                        prop_assert!(intent.description.chars().count() <= naming::MAX_DESCRIPTION_CHARS);
                        prop_assert_eq!(intent.direction, Direction::Inbound);
                        prop_assert!(!intent.destination_address_prefixes.is_empty());
                        // Azure refuses a rule that mixes address families.
                        let families: std::collections::BTreeSet<Option<bool>> = intent.destination_address_prefixes.iter()
                            .chain(intent.source_address_prefixes.iter())
                            .filter_map(|a| AddressPrefix::parse(a))
                            .map(|a| a.is_ipv4())
                            .filter(Option::is_some)
                            .collect();
                        prop_assert!(families.len() <= 1, "mixed families in {:?}", intent);
                        match &intent.owner {
                            Owner::Policy { .. } => {
                                prop_assert_eq!(intent.access, Access::Deny);
                                prop_assert_eq!(&intent.source_address_prefixes, &vec!["*".to_string()]);
                            }
                            Owner::Grant { uid, .. } => {
                                prop_assert_eq!(intent.access, Access::Allow);
                                let grant = grants.iter().find(|g| g.uid().as_deref() == Some(uid.as_str())).expect("owner");
                                prop_assert!(grant.status.as_ref().and_then(|s| s.expires_at.as_ref()).is_some_and(|t| t.0 > now()));
                                let vm = policy.spec.virtual_machines.iter()
                                    .find(|v| validate::vm_name(&v.id).eq_ignore_ascii_case(&grant.spec.virtual_machine))
                                    .expect("the grant's VM is in the policy");
                                let tgt = target_of(&policy, &vm.id).expect("resolved");
                                prop_assert!(contains_ci(&tgt.network_security_groups, nsg));
                                for ip in &intent.destination_address_prefixes {
                                    prop_assert!(tgt.private_ip_addresses.contains(ip), "{} not an IP of {}", ip, vm.id);
                                }
                                prop_assert_eq!(intent.source_address_prefixes.len(), 1);
                                let source = AddressPrefix::parse(&intent.source_address_prefixes[0]).expect("parses");
                                if let Some(v4) = source.is_ipv4() {
                                    for ip in &intent.destination_address_prefixes {
                                        prop_assert_eq!(AddressPrefix::parse(ip).and_then(|a| a.is_ipv4()), Some(v4));
                                    }
                                }
                                for port in &intent.destination_port_ranges {
                                    let n: u16 = port.parse().expect("a number");
                                    prop_assert!(grant.spec.ports.contains(&n));
                                    let entry = vm.ports.iter()
                                        .find(|p| p.number == n && rule_protocol(p.protocol) == intent.protocol);
                                    prop_assert!(entry.is_some(), "port {} {:?} not in the policy", n, intent.protocol);
                                    let allowed: Vec<AddressPrefix> = entry.expect("checked").allowed_sources()
                                        .into_iter().filter_map(AddressPrefix::parse).collect();
                                    if source.is_open_to_world() {
                                        prop_assert!(allowed.iter().any(|a| a.same_set(&source)));
                                    } else {
                                        prop_assert!(allowed.iter().any(|a| a.contains(&source)));
                                    }
                                }
                            }
                        }
                    }
                    // Every policy port of a VM in this NSG has a Deny rule covering each of the
                    // VM's addresses; and a Deny rule covers an address only for exactly the ports
                    // the policy names for that VM under that protocol.
                    for vm in &policy.spec.virtual_machines {
                        let tgt = target_of(&policy, &vm.id).expect("resolved");
                        if !contains_ci(&tgt.network_security_groups, nsg) {
                            continue;
                        }
                        for p in &vm.ports {
                            for ip in &tgt.private_ip_addresses {
                                prop_assert!(intents.iter().any(|i| i.access == Access::Deny
                                    && i.protocol == rule_protocol(p.protocol)
                                    && i.destination_port_ranges.contains(&p.number.to_string())
                                    && i.destination_address_prefixes.contains(ip)),
                                    "{}:{} {:?} not denied", ip, p.number, p.protocol);
                            }
                        }
                    }
                    for i in intents.iter().filter(|i| i.access == Access::Deny) {
                        for ip in &i.destination_address_prefixes {
                            let named = policy.spec.virtual_machines.iter().any(|vm| {
                                let tgt = target_of(&policy, &vm.id).expect("resolved");
                                let mut ports: Vec<String> = vm.ports.iter()
                                    .filter(|p| rule_protocol(p.protocol) == i.protocol)
                                    .map(|p| p.number)
                                    .collect::<std::collections::BTreeSet<u16>>()
                                    .into_iter().map(|n| n.to_string()).collect();
                                ports.sort_by_key(|p| p.parse::<u16>().unwrap_or(0));
                                contains_ci(&tgt.network_security_groups, nsg)
                                    && tgt.private_ip_addresses.contains(ip)
                                    && ports == i.destination_port_ranges
                            });
                            prop_assert!(named, "{} denied {:?} the policy does not name for it", ip, i.destination_port_ranges);
                        }
                    }
                }
            }

            /// Skipping grants whose VM this NSG does not govern, and validating each policy
            /// once, changes nothing: the Allow rules are those of every live grant, judged one
            /// by one against its policy. And the NSG planned from only the grants whose keys are
            /// behind it (what the grant index hands a round) is planned as from every grant.
            #[test]
            fn allow_rules_are_those_of_every_live_grant(
                policy in arb_policy(),
                seeds in proptest::collection::vec(arb_grant_seed(), 0..6),
            ) {
                let grants: Vec<AccessGrant> = seeds.iter().enumerate().map(|(i, s)| build_grant(i, s, &policy)).collect();
                let policies = [policy.clone()];
                let names = Naming::default();
                for nsg in [NSG_A, NSG_B] {
                    let mut expected = Vec::new();
                    for grant in &grants {
                        if let Some(live) = live_grant(grant, policy_of(grant, &policies), now()) {
                            grant_intents(nsg, &live, &names, &mut expected);
                        }
                    }
                    expected.sort_by(|a, b| a.name.cmp(&b.name));
                    let mut allows: Vec<RuleIntent> = desired_rules(nsg, &policies, &grants, now(), &names)
                        .into_iter()
                        .filter(|i| i.access == Access::Allow)
                        .collect();
                    allows.sort_by(|a, b| a.name.cmp(&b.name));
                    prop_assert_eq!(allows, expected);
                    let keys = grant_keys_behind(nsg, &policies);
                    let behind: Vec<&AccessGrant> = grants.iter().filter(|g| keys.contains(&GrantKey::of(g))).collect();
                    prop_assert_eq!(
                        desired_rules(nsg, &policies, &behind, now(), &names),
                        desired_rules(nsg, &policies, &grants, now(), &names)
                    );
                }
            }

        }
    }
}
