//! The product's promise as checkable invariants, evaluated against the emulator's state dump
//! (`/_emulator/state`) and the API server (issue 8, "The proof"):
//!
//! - **I1** no Allow rule of a grant that is expired, denied, revoked or deleted stands (a rule
//!   of an `Active` grant is tolerated until `expiresAt + close_grace`);
//! - **I2** every `Active` grant's rules exist exactly as planned: one Allow rule per protocol in
//!   every NSG that governs the VM (its NICs' and their subnets' NSGs), source, ports and
//!   destination (the VM's private IPs of the source's family) as the grant and its policy say,
//!   priority inside the Allow band, and no rule of the grant anywhere else;
//! - **I3** no rule of anyone else is created, changed, renumbered or deleted (its content: a
//!   whole-NSG write gives every rule of the NSG a new etag, and shows it `Updating` while the
//!   write runs, which Azure does to any such write and which changes nothing else);
//! - **I4** no two rules share a priority and direction in an NSG, no NSG passes 1000 rules.
//!
//! Rules are mapped to grants through `portcullis::plan::naming`, never by re-implementing it.
//! Timing (how long after `expiresAt` a rule stood) is measured by the suites, which sample the
//! emulator continuously; this module judges one observation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use portcullis::api::{AccessGrant, GrantPhase, JitPolicy, Protocol};
use portcullis::plan::naming;
use portcullis_azure_emulator::AdminClient;
use serde_json::Value;

/// The operators under test run with the default installation id.
static NAMING: std::sync::LazyLock<naming::Naming> =
    std::sync::LazyLock::new(naming::Naming::default);

/// Azure's limit on security rules per NSG.
pub const MAX_RULES_PER_NSG: usize = 1000;

/// One NSG as the emulator holds it.
#[derive(Debug, Clone)]
pub struct NsgView {
    pub id: String,
    pub rules: Vec<Value>,
}

/// One look at the world: Azure (emulator) and the API server.
#[derive(Debug, Clone)]
pub struct Observed {
    /// When the emulator's state was read.
    pub at: Timestamp,
    /// By lowercase NSG id.
    pub nsgs: BTreeMap<String, NsgView>,
    pub nics: Vec<Value>,
    pub subnets: Vec<Value>,
    /// Grants read before the emulator's state, completed by those first seen just after (so a
    /// rule is never judged against a grant status older than the rule, nor one that was
    /// created after it was read).
    pub grants: Vec<AccessGrant>,
    pub policies: Vec<JitPolicy>,
}

impl Observed {
    pub fn nsg(&self, id: &str) -> Option<&NsgView> {
        self.nsgs.get(&id.to_ascii_lowercase())
    }
}

async fn list_namespaced<K>(client: &Client, namespaces: &[String]) -> Vec<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let mut out = Vec::new();
    for ns in namespaces {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        let list = api
            .list(&ListParams::default())
            .await
            .unwrap_or_else(|e| panic!("listing in {ns}: {e}"));
        out.extend(list.items);
    }
    out
}

/// Reads the emulator's whole state and the grants and policies of `namespaces`.
pub async fn observe(admin: &AdminClient, client: &Client, namespaces: &[String]) -> Observed {
    let mut grants: Vec<AccessGrant> = list_namespaced(client, namespaces).await;
    let policies: Vec<JitPolicy> = list_namespaced(client, namespaces).await;
    let mut obs = observe_azure(admin).await;
    let after: Vec<AccessGrant> = list_namespaced(client, namespaces).await;
    for g in after {
        if !grants.iter().any(|x| x.uid() == g.uid()) {
            grants.push(g);
        }
    }
    obs.grants = grants;
    obs.policies = policies;
    obs
}

/// Reads the emulator's whole state only (no grants or policies: enough for I3 and I4).
pub async fn observe_azure(admin: &AdminClient) -> Observed {
    let state = admin
        .state()
        .await
        .unwrap_or_else(|e| panic!("emulator state: {e}"));
    // The emulator's time of the dump, not when it was read (a large dump takes a while).
    let at = state["at"]
        .as_str()
        .and_then(|at| at.parse().ok())
        .unwrap_or_else(Timestamp::now);
    let mut nsgs = BTreeMap::new();
    let mut nics = Vec::new();
    let mut subnets = Vec::new();
    for sub in state["subscriptions"].as_array().into_iter().flatten() {
        for rg in sub["resourceGroups"].as_array().into_iter().flatten() {
            for nsg in rg["networkSecurityGroups"].as_array().into_iter().flatten() {
                let id = nsg["id"].as_str().unwrap_or_default().to_string();
                let rules = nsg["properties"]["securityRules"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                nsgs.insert(id.to_ascii_lowercase(), NsgView { id, rules });
            }
            nics.extend(
                rg["networkInterfaces"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
            subnets.extend(rg["subnets"].as_array().into_iter().flatten().cloned());
        }
    }
    Observed {
        at,
        nsgs,
        nics,
        subnets,
        grants: Vec::new(),
        policies: Vec::new(),
    }
}

/// A rule as its owner wrote it: without the etag and the provisioning state, which Azure
/// moves on every whole-NSG write whoever makes it.
pub fn content_of_rule(rule: &Value) -> Value {
    let mut rule = rule.clone();
    if let Some(o) = rule.as_object_mut() {
        o.remove("etag");
    }
    if let Some(p) = rule.get_mut("properties").and_then(Value::as_object_mut) {
        p.remove("provisioningState");
    }
    rule
}

/// [`content_of_rule`] of each rule, in order.
pub fn content_of_rules(rules: &[Value]) -> Vec<Value> {
    rules.iter().map(content_of_rule).collect()
}

/// Every rule that stood before the operator ran: I3's reference.
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    /// (lowercase NSG id, lowercase rule name) -> the rule's ARM JSON.
    rules: BTreeMap<(String, String), Value>,
}

impl Baseline {
    /// Takes every rule of `obs` as someone else's. Call it before the operator first runs.
    pub fn of(obs: &Observed) -> Baseline {
        let mut rules = BTreeMap::new();
        for (id, nsg) in &obs.nsgs {
            for r in &nsg.rules {
                rules.insert((id.clone(), name(r).to_ascii_lowercase()), r.clone());
            }
        }
        Baseline { rules }
    }

    /// The NSG was deleted on purpose by the test: its rules are no longer expected.
    pub fn forget_nsg(&mut self, nsg_id: &str) {
        let id = nsg_id.to_ascii_lowercase();
        self.rules.retain(|(n, _), _| *n != id);
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

pub fn format_violations(v: &[Violation]) -> String {
    v.iter()
        .map(|x| format!("  - {x}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Judges observations against I1-I4.
#[derive(Debug, Clone)]
pub struct Checker {
    pub baseline: Baseline,
    /// The operator's Allow band (`--allow-band`).
    pub allow_band: RangeInclusive<u16>,
    /// I1: how long past `expiresAt` a still-`Active` grant's rule may stand.
    pub close_grace: Duration,
    /// I2 skips grants this close to `expiresAt` (they may be closing right now).
    pub active_margin: Duration,
}

impl Checker {
    pub fn new(baseline: Baseline) -> Checker {
        Checker {
            baseline,
            allow_band: 100..=199,
            close_grace: Duration::from_secs(2),
            active_margin: Duration::from_secs(1),
        }
    }

    /// Every violation of I1-I4 in `obs`.
    pub fn check(&self, obs: &Observed) -> Vec<Violation> {
        let mut v = self.i1(obs);
        v.extend(self.i2(obs));
        v.extend(self.i3(obs));
        v.extend(self.i4(obs));
        v
    }

    /// The invariants that must hold at every instant, whatever the operator is doing: I3, I4.
    pub fn check_always(&self, obs: &Observed) -> Vec<Violation> {
        let mut v = self.i3(obs);
        v.extend(self.i4(obs));
        v
    }

    pub fn i1(&self, obs: &Observed) -> Vec<Violation> {
        let mut out = Vec::new();
        for nsg in obs.nsgs.values() {
            for r in nsg.rules.iter().filter(|r| is_operator_allow(r)) {
                let n = name(r);
                let owner = obs
                    .grants
                    .iter()
                    .find(|g| NAMING.is_grant_rule_of(n, &g.uid().unwrap_or_default()));
                let problem = match owner {
                    None => Some("its grant is deleted (or unknown)".to_string()),
                    Some(g) => match phase(g) {
                        Some(GrantPhase::Active) => match expires_at(g) {
                            Some(exp) if passed(obs.at, exp, self.close_grace) => Some(format!(
                                "grant {} is Active but expired at {exp}, {:.1} s before the observation",
                                g.name_any(),
                                secs_between(exp, obs.at)
                            )),
                            Some(_) => None,
                            None => Some(format!(
                                "grant {} is Active without expiresAt",
                                g.name_any()
                            )),
                        },
                        Some(p) if g.metadata.deletion_timestamp.is_some() => Some(format!(
                            "grant {} is being deleted (phase {})",
                            g.name_any(),
                            p.as_str()
                        )),
                        Some(p) => Some(format!("grant {} is {}", g.name_any(), p.as_str())),
                        None => Some(format!("grant {} has no phase", g.name_any())),
                    },
                };
                if let Some(p) = problem {
                    out.push(Violation {
                        invariant: "I1",
                        detail: format!("Allow rule {n} stands in {}: {p}", nsg.id),
                    });
                }
            }
        }
        out
    }

    pub fn i2(&self, obs: &Observed) -> Vec<Violation> {
        let mut out = Vec::new();
        let mut bad = |detail: String| {
            out.push(Violation {
                invariant: "I2",
                detail,
            })
        };
        for g in &obs.grants {
            if phase(g) != Some(GrantPhase::Active) || g.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let gname = g.name_any();
            let Some(exp) = expires_at(g) else {
                bad(format!("grant {gname} is Active without expiresAt"));
                continue;
            };
            // Closing (or about to): I1's business, not I2's.
            if passed(obs.at, exp, Duration::ZERO)
                || secs_between(obs.at, exp) < self.active_margin.as_secs_f64()
            {
                continue;
            }
            let uid = g.uid().unwrap_or_default();
            let plan = match planned(g, obs) {
                Ok(p) => p,
                Err(e) => {
                    bad(format!("grant {gname} is Active but {e}"));
                    continue;
                }
            };
            for (nsg_id, nsg) in &obs.nsgs {
                let mine: Vec<&Value> = nsg
                    .rules
                    .iter()
                    .filter(|r| NAMING.is_grant_rule_of(name(r), &uid))
                    .collect();
                if !plan.nsgs.contains(nsg_id) {
                    for r in mine {
                        bad(format!(
                            "rule {} of grant {gname} stands in {}, which does not govern its VM",
                            name(r),
                            nsg.id
                        ));
                    }
                    continue;
                }
                let expected: BTreeMap<String, &BTreeSet<String>> = plan
                    .ports
                    .values()
                    .map(|(p, ports)| {
                        (NAMING.grant_rule_name(&uid, *p).to_ascii_lowercase(), ports)
                    })
                    .collect();
                for r in &mine {
                    if !expected.contains_key(&name(r).to_ascii_lowercase()) {
                        bad(format!(
                            "unplanned rule {} of grant {gname} in {}",
                            name(r),
                            nsg.id
                        ));
                    }
                }
                for (proto, ports) in plan.ports.values() {
                    let want = NAMING.grant_rule_name(&uid, *proto);
                    let Some(r) = mine.iter().find(|r| name(r).eq_ignore_ascii_case(&want)) else {
                        bad(format!(
                            "Active grant {gname} has no rule {want} in {}",
                            nsg.id
                        ));
                        continue;
                    };
                    let p = &r["properties"];
                    let mut diffs = Vec::new();
                    if !str_eq(&p["access"], "Allow") {
                        diffs.push(format!("access {}", p["access"]));
                    }
                    if !str_eq(&p["direction"], "Inbound") {
                        diffs.push(format!("direction {}", p["direction"]));
                    }
                    let want_proto = match proto {
                        Protocol::Tcp => "Tcp",
                        Protocol::Udp => "Udp",
                        Protocol::Any => "*",
                    };
                    if !str_eq(&p["protocol"], want_proto) {
                        diffs.push(format!("protocol {} (want {want_proto})", p["protocol"]));
                    }
                    let src = prefixes(p, "sourceAddressPrefix");
                    if src != plan.source {
                        diffs.push(format!("source {src:?} (want {:?})", plan.source));
                    }
                    let dst = prefixes(p, "destinationAddressPrefix");
                    if dst != plan.destination {
                        diffs.push(format!("destination {dst:?} (want {:?})", plan.destination));
                    }
                    let dports = port_ranges(p, "destinationPortRange");
                    if dports != *ports {
                        diffs.push(format!("ports {dports:?} (want {ports:?})"));
                    }
                    if str_eq(&p["provisioningState"], "Failed") {
                        diffs.push("provisioningState Failed".into());
                    }
                    let prio = p["priority"].as_u64().unwrap_or(0);
                    if !u16::try_from(prio).is_ok_and(|x| self.allow_band.contains(&x)) {
                        diffs.push(format!("priority {prio} outside {:?}", self.allow_band));
                    }
                    if !diffs.is_empty() {
                        bad(format!(
                            "rule {want} of Active grant {gname} in {} differs from its plan: {}",
                            nsg.id,
                            diffs.join(", ")
                        ));
                    }
                }
            }
            for missing in plan.nsgs.iter().filter(|n| !obs.nsgs.contains_key(*n)) {
                bad(format!(
                    "Active grant {gname}: NSG {missing} governs its VM but does not exist"
                ));
            }
        }
        out
    }

    pub fn i3(&self, obs: &Observed) -> Vec<Violation> {
        let mut out = Vec::new();
        for ((nsg_id, rule), before) in &self.baseline.rules {
            let now = obs
                .nsgs
                .get(nsg_id)
                .and_then(|n| n.rules.iter().find(|r| name(r).eq_ignore_ascii_case(rule)));
            match now {
                None => out.push(Violation {
                    invariant: "I3",
                    detail: format!("someone else's rule {rule} was deleted from {nsg_id}"),
                }),
                Some(r) if content_of_rule(r) != content_of_rule(before) => out.push(Violation {
                    invariant: "I3",
                    detail: format!(
                        "someone else's rule {rule} in {nsg_id} changed: was {before}, is {r}"
                    ),
                }),
                Some(_) => {}
            }
        }
        for (nsg_id, nsg) in &obs.nsgs {
            for r in &nsg.rules {
                let key = (nsg_id.clone(), name(r).to_ascii_lowercase());
                if !self.baseline.rules.contains_key(&key) && !NAMING.is_owned(name(r)) {
                    out.push(Violation {
                        invariant: "I3",
                        detail: format!(
                            "a rule {} that is not the operator's appeared in {}",
                            name(r),
                            nsg.id
                        ),
                    });
                }
            }
        }
        out
    }

    pub fn i4(&self, obs: &Observed) -> Vec<Violation> {
        let mut out = Vec::new();
        for nsg in obs.nsgs.values() {
            let mut seen: BTreeMap<(u64, String), &str> = BTreeMap::new();
            for r in &nsg.rules {
                let p = &r["properties"];
                let key = (
                    p["priority"].as_u64().unwrap_or(0),
                    p["direction"]
                        .as_str()
                        .unwrap_or_default()
                        .to_ascii_lowercase(),
                );
                if let Some(other) = seen.insert(key.clone(), name(r)) {
                    out.push(Violation {
                        invariant: "I4",
                        detail: format!(
                            "rules {other} and {} share priority {} {} in {}",
                            name(r),
                            key.0,
                            key.1,
                            nsg.id
                        ),
                    });
                }
            }
            if nsg.rules.len() > MAX_RULES_PER_NSG {
                out.push(Violation {
                    invariant: "I4",
                    detail: format!("{} holds {} rules", nsg.id, nsg.rules.len()),
                });
            }
        }
        out
    }
}

/// What an Active grant must have standing, derived from its spec, its policy and the topology.
struct Plan {
    /// Lowercase ids of the NSGs that govern the VM.
    nsgs: BTreeSet<String>,
    /// By protocol token (`tcp`, `udp`, `any`): the protocol and its ports.
    ports: BTreeMap<&'static str, (Protocol, BTreeSet<String>)>,
    source: BTreeSet<String>,
    destination: BTreeSet<String>,
}

fn planned(g: &AccessGrant, obs: &Observed) -> Result<Plan, String> {
    let ns = g.namespace().unwrap_or_default();
    let policy = obs
        .policies
        .iter()
        .find(|p| p.namespace().as_deref() == Some(&ns) && p.name_any() == g.spec.policy_ref.name)
        .ok_or_else(|| format!("its policy {} does not exist", g.spec.policy_ref.name))?;
    let want = g.spec.virtual_machine.to_ascii_lowercase();
    let vm = policy
        .spec
        .virtual_machines
        .iter()
        .find(|v| {
            let id = v.id.to_ascii_lowercase();
            id == want || id.rsplit('/').next() == Some(want.as_str())
        })
        .ok_or_else(|| format!("its VM {} is not in its policy", g.spec.virtual_machine))?;
    let mut ports: BTreeMap<&'static str, (Protocol, BTreeSet<String>)> = BTreeMap::new();
    for port in &g.spec.ports {
        let pp = vm
            .ports
            .iter()
            .find(|p| p.number == *port)
            .ok_or_else(|| format!("port {port} is not in its policy"))?;
        ports
            .entry(naming::protocol_token(pp.protocol))
            .or_insert_with(|| (pp.protocol, BTreeSet::new()))
            .1
            .insert(port.to_string());
    }
    let source = normalize(&g.spec.source_address_prefix);
    let source_v4 = !source.contains(':');
    let mut nsgs = BTreeSet::new();
    let mut destination = BTreeSet::new();
    let vm_id = vm.id.to_ascii_lowercase();
    for nic in obs.nics.iter().filter(|n| {
        n["properties"]["virtualMachine"]["id"]
            .as_str()
            .is_some_and(|id| id.eq_ignore_ascii_case(&vm_id))
    }) {
        if let Some(id) = nic["properties"]["networkSecurityGroup"]["id"].as_str() {
            nsgs.insert(id.to_ascii_lowercase());
        }
        for ipc in nic["properties"]["ipConfigurations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(ip) = ipc["properties"]["privateIPAddress"].as_str() {
                let ip = normalize(ip);
                if ip.contains(':') != source_v4 {
                    destination.insert(ip);
                }
            }
            let subnet_id = ipc["properties"]["subnet"]["id"]
                .as_str()
                .unwrap_or_default();
            let subnet = obs.subnets.iter().find(|s| {
                s["id"]
                    .as_str()
                    .is_some_and(|x| x.eq_ignore_ascii_case(subnet_id))
            });
            if let Some(id) =
                subnet.and_then(|s| s["properties"]["networkSecurityGroup"]["id"].as_str())
            {
                nsgs.insert(id.to_ascii_lowercase());
            }
        }
    }
    if nsgs.is_empty() {
        return Err("no NSG governs its VM".into());
    }
    Ok(Plan {
        nsgs,
        ports,
        source: BTreeSet::from([source]),
        destination,
    })
}

pub fn name(rule: &Value) -> &str {
    rule["name"].as_str().unwrap_or_default()
}

/// An operator-owned Allow rule (a grant's).
pub fn is_operator_allow(rule: &Value) -> bool {
    NAMING.is_owned(name(rule)) && str_eq(&rule["properties"]["access"], "Allow")
}

pub fn phase(g: &AccessGrant) -> Option<GrantPhase> {
    g.status.as_ref()?.phase
}

pub fn expires_at(g: &AccessGrant) -> Option<Timestamp> {
    Some(g.status.as_ref()?.expires_at.as_ref()?.0)
}

/// Whether `at` is more than `grace` past `deadline`.
fn passed(at: Timestamp, deadline: Timestamp, grace: Duration) -> bool {
    secs_between(deadline, at) > grace.as_secs_f64()
}

/// `to - from` in seconds (negative when `to` is earlier).
pub fn secs_between(from: Timestamp, to: Timestamp) -> f64 {
    (to.as_millisecond() - from.as_millisecond()) as f64 / 1000.0
}

fn str_eq(v: &Value, s: &str) -> bool {
    v.as_str().is_some_and(|x| x.eq_ignore_ascii_case(s))
}

/// A prefix as a comparable string: a host prefix (/32, /128) as the bare address.
fn normalize(p: &str) -> String {
    let p = p.trim();
    if let Ok(net) = p.parse::<ipnet::IpNet>() {
        if net.prefix_len() == net.max_prefix_len() {
            return net.addr().to_string();
        }
        return net.trunc().to_string();
    }
    p.to_ascii_lowercase()
}

/// The singular field and its plural list folded into one set.
fn prefixes(props: &Value, singular: &str) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = props[format!("{singular}es")]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .map(normalize)
        .collect();
    if let Some(s) = props[singular].as_str().filter(|s| !s.is_empty()) {
        out.insert(normalize(s));
    }
    out
}

fn port_ranges(props: &Value, singular: &str) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = props[format!("{singular}s")]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .map(str::to_string)
        .collect();
    if let Some(s) = props[singular].as_str().filter(|s| !s.is_empty()) {
        out.insert(s.to_string());
    }
    out
}

/// Observes until `checker` finds nothing (`Ok`), or gives up after `timeout` with what is
/// still violated.
pub async fn converges(
    checker: &Checker,
    admin: &AdminClient,
    client: &Client,
    namespaces: &[String],
    timeout: Duration,
) -> Result<Observed, Vec<Violation>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let obs = observe(admin, client, namespaces).await;
        let v = checker.check(&obs);
        if v.is_empty() {
            return Ok(obs);
        }
        if std::time::Instant::now() > deadline {
            return Err(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`converges`], or panics listing what is still violated (which invariant, which rule, which
/// grant).
pub async fn assert_converges(
    checker: &Checker,
    admin: &AdminClient,
    client: &Client,
    namespaces: &[String],
    timeout: Duration,
) -> Observed {
    match converges(checker, admin, client, namespaces, timeout).await {
        Ok(obs) => obs,
        Err(v) => panic!(
            "invariants still violated {timeout:?} after the scenario:\n{}",
            format_violations(&v)
        ),
    }
}
