//! Shared emulator state: the world, in-flight operations, throttling buckets, stats, the
//! request log, faults, issued tokens, and persistence to a state file.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::EmulatorError;
use crate::faults::{Faults, NsgFault};
use crate::fixture::Fixture;
use crate::locks::Lock;
use crate::model::{
    self, IpConfig, Nic, Nsg, ResourceGroup, Rule, RuleProps, SUCCEEDED, Subnet, Subscription,
    Vnet, World,
};
use crate::throttle::{BucketKind, TokenBucket};
use crate::validate;

/// How many request records and finished operations are kept.
const MAX_REQUEST_RECORDS: usize = 20_000;
const MAX_FINISHED_OPS: usize = 20_000;

/// Knobs that can change at runtime (`POST /_emulator/config`).
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    pub async_delay: Duration,
    pub retry_after_secs: u64,
    pub page_size: usize,
    pub write_burst: u32,
    pub write_refill_per_sec: f64,
    pub delete_burst: u32,
    pub delete_refill_per_sec: f64,
    pub read_burst: u32,
    pub read_refill_per_sec: f64,
}

/// The admin API's JSON view of [`RuntimeConfig`]; every field optional on `POST`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_refill_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_refill_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_refill_per_sec: Option<f64>,
}

impl RuntimeConfig {
    pub fn view(&self) -> ConfigUpdate {
        ConfigUpdate {
            async_delay_ms: Some(u64::try_from(self.async_delay.as_millis()).unwrap_or(u64::MAX)),
            retry_after_secs: Some(self.retry_after_secs),
            page_size: Some(self.page_size),
            write_burst: Some(self.write_burst),
            write_refill_per_sec: Some(self.write_refill_per_sec),
            delete_burst: Some(self.delete_burst),
            delete_refill_per_sec: Some(self.delete_refill_per_sec),
            read_burst: Some(self.read_burst),
            read_refill_per_sec: Some(self.read_refill_per_sec),
        }
    }
}

/// Counters exposed by `GET /_emulator/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// ARM writes (PUT/DELETE/PATCH) that were accepted (2xx).
    pub writes: u64,
    /// Every ARM write that reached the emulator's resource provider (after auth and faults).
    pub write_attempts: u64,
    /// Writes and deletes refused by subscription throttling (429 SubscriptionRequestsThrottled).
    pub throttled: u64,
    /// Reads (GETs, operation polls included) refused by subscription throttling (429
    /// SubscriptionRequestsThrottled).
    pub reads_throttled: u64,
    /// Writes refused because another write on the same NSG was in flight (429).
    pub conflicts: u64,
    /// Writes refused with a 4xx other than 429 (validation, not found, ...).
    pub rejected: u64,
    /// ARM reads (GET) that reached the resource provider, including operation polls and reads
    /// refused by throttling.
    pub reads: u64,
    /// Polls of async operation / operation result URLs.
    pub operation_polls: u64,
    /// Reads of where VMs are (GETs and lists of VMs, NICs and subnets), of `reads`: the rest
    /// are reads of NSGs and their rules, and operation polls.
    pub topology_reads: u64,
    /// ARM requests refused for lack of a valid bearer token.
    pub auth_failures: u64,
    /// Requests answered by an injected fault (error, 429 or dropped connection).
    pub faults_injected: u64,
    /// Access tokens issued, total and per grant kind (`client_secret`, `client_assertion`, `managed_identity`).
    pub tokens_issued: u64,
    pub tokens_by_grant: std::collections::BTreeMap<String, u64>,
    /// Tokens issued per federated client assertion value.
    pub tokens_by_assertion: std::collections::BTreeMap<String, u64>,
    /// The last client assertion presented to the token endpoint.
    pub last_client_assertion: Option<String>,
    /// The last client id presented to the token endpoint.
    pub last_client_id: Option<String>,
    /// Token requests refused (bad credentials, malformed requests).
    pub token_failures: u64,
}

/// One entry of `GET /_emulator/requests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub method: String,
    /// Path with query string.
    pub path: String,
    /// Status sent; 0 when the connection was dropped by a fault.
    pub status: u16,
    /// RFC 3339 timestamp.
    pub at: String,
    pub at_unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OpKind {
    RulePut { rule: String },
    RuleDelete { rule: String },
    NsgPut,
    NsgDelete,
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub id: String,
    pub subscription: String,
    pub resource_group: String,
    pub nsg: String,
    pub location: String,
    pub kind: OpKind,
    pub completes_at: Instant,
    pub done: bool,
    /// Ends `Failed` instead of `Succeeded` (see `Inner::fail_next_ops`).
    pub failed: bool,
}

pub struct Inner {
    pub world: World,
    pub ops: HashMap<String, Operation>,
    pending_ops: Vec<String>,
    finished_order: VecDeque<String>,
    pub config: RuntimeConfig,
    pub credentials: Option<(String, String)>,
    /// Subscription throttling, per (lowercased subscription, operation type).
    pub buckets: HashMap<(String, BucketKind), TokenBucket>,
    pub stats: Stats,
    pub requests: VecDeque<RequestRecord>,
    pub faults: Faults,
    /// Persistent per-NSG faults, at most one per NSG.
    pub nsg_faults: Vec<NsgFault>,
    /// Someone else's writes, each made just before the next PUT of its NSG arrives (between
    /// the caller's read and its write): (rule id, rule properties).
    pub interleaved: Vec<(model::RuleId, RuleProps)>,
    /// Management locks (kept in memory only, like faults).
    pub locks: Vec<Lock>,
    pub tokens: HashSet<String>,
    pub state_file: Option<PathBuf>,
    /// The next N async operations end `Failed`: a rule PUT leaves the rule `Failed`, a
    /// DELETE leaves it in place (`POST /_emulator/operations`).
    pub fail_next_ops: u32,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    world: World,
}

impl Inner {
    pub fn new(
        world: World,
        config: RuntimeConfig,
        credentials: Option<(String, String)>,
        state_file: Option<PathBuf>,
    ) -> Self {
        Self {
            world,
            ops: HashMap::new(),
            pending_ops: Vec::new(),
            finished_order: VecDeque::new(),
            config,
            credentials,
            buckets: HashMap::new(),
            stats: Stats::default(),
            requests: VecDeque::new(),
            faults: Faults::default(),
            nsg_faults: Vec::new(),
            interleaved: Vec::new(),
            locks: Vec::new(),
            tokens: HashSet::new(),
            state_file,
            fail_next_ops: 0,
        }
    }

    /// Completes every operation whose time has come.
    pub fn settle(&mut self, now: Instant) {
        if self.pending_ops.is_empty() {
            return;
        }
        let mut still = Vec::new();
        for id in std::mem::take(&mut self.pending_ops) {
            let Some(op) = self.ops.get_mut(&id) else {
                continue;
            };
            if op.completes_at <= now {
                op.done = true;
                let op = op.clone();
                if op.failed {
                    fail_op(&mut self.world, &op);
                } else {
                    apply_op(&mut self.world, &op);
                }
                self.finished_order.push_back(id);
            } else {
                still.push(id);
            }
        }
        self.pending_ops = still;
        while self.finished_order.len() > MAX_FINISHED_OPS {
            if let Some(old) = self.finished_order.pop_front() {
                self.ops.remove(&old);
            }
        }
    }

    /// Registers an async operation on an NSG and marks the NSG busy until it completes.
    pub fn start_op(
        &mut self,
        now: Instant,
        subscription: &str,
        resource_group: &str,
        nsg: &str,
        location: &str,
        kind: OpKind,
    ) -> Operation {
        let completes_at = now + self.config.async_delay;
        let op = Operation {
            id: uuid::Uuid::new_v4().to_string(),
            subscription: subscription.to_string(),
            resource_group: resource_group.to_string(),
            nsg: nsg.to_string(),
            location: location.to_string(),
            kind,
            completes_at,
            done: false,
            failed: self.fail_next_ops > 0,
        };
        self.fail_next_ops = self.fail_next_ops.saturating_sub(1);
        if let Some(n) = self.world.nsg_mut(subscription, resource_group, nsg) {
            n.pending = Some((op.id.clone(), completes_at));
        }
        self.ops.insert(op.id.clone(), op.clone());
        self.pending_ops.push(op.id.clone());
        op
    }

    pub fn bucket(
        &mut self,
        subscription: &str,
        kind: BucketKind,
        now: Instant,
    ) -> &mut TokenBucket {
        let (burst, refill) = match kind {
            BucketKind::Read => (self.config.read_burst, self.config.read_refill_per_sec),
            BucketKind::Write => (self.config.write_burst, self.config.write_refill_per_sec),
            BucketKind::Delete => (self.config.delete_burst, self.config.delete_refill_per_sec),
        };
        self.buckets
            .entry((subscription.to_ascii_lowercase(), kind))
            .or_insert_with(|| TokenBucket::new(burst, refill, now))
    }

    pub fn record(&mut self, rec: RequestRecord) {
        self.requests.push_back(rec);
        while self.requests.len() > MAX_REQUEST_RECORDS {
            self.requests.pop_front();
        }
    }

    /// The world as it will be once every in-flight operation has completed.
    pub fn settled_world(&self) -> World {
        let mut w = self.world.clone();
        for id in &self.pending_ops {
            if let Some(op) = self.ops.get(id).filter(|op| !op.failed) {
                apply_op(&mut w, op);
            }
        }
        w
    }

    /// Saves the (settled) world to the state file, if one is configured: temp file + rename.
    pub fn save(&self) -> Result<(), EmulatorError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let file = StateFile {
            version: 1,
            world: self.settled_world(),
        };
        let bytes = serde_json::to_vec_pretty(&file)?;
        let tmp = tmp_path(path);
        let io = |source| EmulatorError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Saves and logs (rather than fails the request) when the state file cannot be written.
    pub fn save_logged(&self) {
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "cannot save the emulator state file");
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Loads a state file written by [`Inner::save`]; `Ok(None)` when it does not exist.
pub fn load_state_file(path: &Path) -> Result<Option<World>, EmulatorError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EmulatorError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let file: StateFile = serde_json::from_str(&text).map_err(|e| EmulatorError::StateFile {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    if file.version != 1 {
        return Err(EmulatorError::StateFile {
            path: path.display().to_string(),
            message: format!("unsupported version {}", file.version),
        });
    }
    let mut world = file.world;
    // State files written before VMs were modelled have none: derive them from the NICs.
    world.ensure_vms();
    Ok(Some(world))
}

/// Applies the completion effect of an operation.
pub fn apply_op(world: &mut World, op: &Operation) {
    let Some(sub) = world.sub_mut(&op.subscription) else {
        return;
    };
    let Some(rg) = sub.rg_mut(&op.resource_group) else {
        return;
    };
    match &op.kind {
        OpKind::NsgDelete => {
            rg.nsgs.retain(|n| !n.name.eq_ignore_ascii_case(&op.nsg));
            return;
        }
        OpKind::NsgPut | OpKind::RulePut { .. } | OpKind::RuleDelete { .. } => {}
    }
    let Some(nsg) = model::find_mut(&mut rg.nsgs, &op.nsg, |n| &n.name) else {
        return;
    };
    match &op.kind {
        OpKind::RulePut { rule } => {
            if let Some(r) = nsg.rule_mut(rule) {
                r.provisioning_state = SUCCEEDED.into();
            }
        }
        OpKind::RuleDelete { rule } => nsg.rules.retain(|r| !r.name.eq_ignore_ascii_case(rule)),
        OpKind::NsgPut => {
            for r in &mut nsg.rules {
                r.provisioning_state = SUCCEEDED.into();
            }
        }
        OpKind::NsgDelete => {}
    }
    nsg.provisioning_state = SUCCEEDED.into();
    if nsg.pending.as_ref().is_some_and(|(id, _)| *id == op.id) {
        nsg.pending = None;
    }
}

/// What an operation that ends `Failed` leaves behind: the rule of a failed PUT stays with
/// `provisioningState: Failed`, the rule of a failed DELETE stays as it was.
pub fn fail_op(world: &mut World, op: &Operation) {
    let Some(nsg) = world.nsg_mut(&op.subscription, &op.resource_group, &op.nsg) else {
        return;
    };
    match &op.kind {
        OpKind::RulePut { rule } => {
            if let Some(r) = nsg.rule_mut(rule) {
                r.provisioning_state = "Failed".into();
            }
        }
        OpKind::RuleDelete { rule } => {
            if let Some(r) = nsg.rule_mut(rule) {
                r.provisioning_state = SUCCEEDED.into();
            }
        }
        OpKind::NsgPut | OpKind::NsgDelete => {}
    }
    nsg.provisioning_state = SUCCEEDED.into();
    if nsg.pending.as_ref().is_some_and(|(id, _)| *id == op.id) {
        nsg.pending = None;
    }
}

/// Parses a rule given in ARM JSON (`{"name":..,"properties":{..}}`); `Err` with a message.
pub fn parse_rule_props(v: &serde_json::Value) -> Result<RuleProps, String> {
    let props = v.get("properties").unwrap_or(v);
    let mut parsed =
        serde_json::from_value::<RuleProps>(props.clone()).map_err(|e| e.to_string())?;
    // Read-only: echoed by clients that round-trip what they read, never stored from a request.
    parsed.extra.remove("provisioningState");
    Ok(parsed)
}

/// Builds the world from a fixture (validating its rules like a PUT would).
pub fn world_from_fixture(f: &Fixture) -> Result<World, EmulatorError> {
    f.check()?;
    let mut world = World::default();
    for fs in &f.subscriptions {
        let mut sub = Subscription {
            id: fs.id.clone(),
            resource_groups: Vec::new(),
        };
        for frg in &fs.resource_groups {
            let mut rg = ResourceGroup {
                name: frg.name.clone(),
                location: frg.location.clone(),
                ..ResourceGroup::default()
            };
            for fnsg in &frg.network_security_groups {
                let mut nsg = Nsg {
                    name: fnsg.name.clone(),
                    location: fnsg
                        .location
                        .clone()
                        .unwrap_or_else(|| frg.location.clone()),
                    resource_guid: model::new_guid(),
                    etag: model::new_etag(),
                    provisioning_state: SUCCEEDED.into(),
                    ..Nsg::default()
                };
                for rv in &fnsg.security_rules {
                    let name = rv.get("name").and_then(|n| n.as_str()).unwrap_or_default();
                    let rule_ctx = format!("{}/{}/{}", frg.name, fnsg.name, name);
                    validate::validate_rule_name(name).map_err(|v| {
                        EmulatorError::Fixture(format!("{rule_ctx}: {}", v.message))
                    })?;
                    let props = parse_rule_props(rv)
                        .map_err(|m| EmulatorError::Fixture(format!("{rule_ctx}: {m}")))?;
                    let props = validate::validate_rule(&rule_ctx, &props).map_err(|v| {
                        EmulatorError::Fixture(format!("{rule_ctx}: {}: {}", v.code, v.message))
                    })?;
                    validate::check_conflicts(
                        &rule_ctx,
                        name,
                        &props,
                        nsg.rules.iter().map(|r| (r.name.as_str(), &r.props)),
                    )
                    .map_err(|v| EmulatorError::Fixture(v.message))?;
                    if nsg.rule(name).is_some() {
                        return Err(EmulatorError::Fixture(format!(
                            "{rule_ctx}: duplicate rule name"
                        )));
                    }
                    nsg.rules.push(Rule {
                        name: name.to_string(),
                        etag: nsg.etag.clone(),
                        provisioning_state: SUCCEEDED.into(),
                        props,
                    });
                }
                rg.nsgs.push(nsg);
            }
            for fv in &frg.virtual_networks {
                let etag = model::new_etag();
                rg.vnets.push(Vnet {
                    name: fv.name.clone(),
                    etag: etag.clone(),
                    subnets: fv
                        .subnets
                        .iter()
                        .map(|s| Subnet {
                            name: s.name.clone(),
                            etag: etag.clone(),
                            address_prefix: s.address_prefix.clone(),
                            nsg: s.network_security_group.clone(),
                        })
                        .collect(),
                });
            }
            for fnic in &frg.network_interfaces {
                let etag = model::new_etag();
                let guid = model::new_guid();
                let mac = mac_from_guid(&guid);
                rg.nics.push(Nic {
                    name: fnic.name.clone(),
                    location: frg.location.clone(),
                    etag: etag.clone(),
                    resource_guid: guid,
                    mac_address: mac,
                    virtual_machine: fnic.virtual_machine.clone(),
                    nsg: fnic.network_security_group.clone(),
                    ip_configurations: fnic
                        .ip_configurations
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let (vnet, subnet) =
                                c.subnet.split_once('/').unwrap_or((&c.subnet, ""));
                            IpConfig {
                                name: c.name.clone(),
                                etag: etag.clone(),
                                private_ip_address: c.private_ip_address.clone(),
                                allocation_method: c
                                    .private_ip_allocation_method
                                    .clone()
                                    .unwrap_or_else(|| "Dynamic".into()),
                                vnet: vnet.to_string(),
                                subnet: subnet.to_string(),
                                primary: c.primary.unwrap_or(i == 0),
                            }
                        })
                        .collect(),
                });
            }
            for fvm in &frg.virtual_machines {
                rg.vms.push(model::Vm::new(
                    &fvm.name,
                    fvm.location.as_deref().unwrap_or(&frg.location),
                    fvm.vm_size.as_deref(),
                ));
            }
            sub.resource_groups.push(rg);
        }
        world.subscriptions.push(sub);
    }
    // The VMs the NICs name and the fixture does not declare. `check` refused references to
    // resource groups the fixture lacks.
    world.ensure_vms();
    Ok(world)
}

fn mac_from_guid(guid: &str) -> String {
    let hex: Vec<char> = guid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(10)
        .collect();
    let mut out = String::from("00");
    for pair in hex.chunks(2) {
        out.push('-');
        out.extend(pair.iter().map(|c| c.to_ascii_uppercase()));
    }
    out
}

impl Inner {
    /// Puts a rule into its NSG as someone else would (a new rule etag, a new NSG etag). False
    /// when the NSG does not exist.
    pub fn put_rule_directly(&mut self, id: &model::RuleId, props: RuleProps) -> bool {
        let Some(nsg) = self
            .world
            .nsg_mut(&id.subscription, &id.resource_group, &id.nsg)
        else {
            return false;
        };
        let etag = model::new_etag();
        match nsg.rule_mut(&id.rule) {
            Some(r) => {
                r.props = props;
                r.etag = etag;
                r.provisioning_state = model::SUCCEEDED.into();
            }
            None => nsg.rules.push(model::Rule {
                name: id.rule.clone(),
                etag,
                provisioning_state: model::SUCCEEDED.into(),
                props,
            }),
        }
        nsg.etag = model::new_etag();
        true
    }

    /// Makes the interleaved writes waiting for this NSG, just before a PUT of it is handled.
    pub fn interleave(&mut self, sub: &str, rg: &str, nsg: &str) {
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.interleaved)
            .into_iter()
            .partition(|(id, _)| {
                id.subscription.eq_ignore_ascii_case(sub)
                    && id.resource_group.eq_ignore_ascii_case(rg)
                    && id.nsg.eq_ignore_ascii_case(nsg)
            });
        self.interleaved = later;
        for (id, props) in now {
            tracing::info!(rule = %id.rule, "interleaved write: someone else put a rule before this NSG PUT");
            self.put_rule_directly(&id, props);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> World {
        let f = Fixture::from_yaml_str(include_str!("../fixtures/demo.yaml")).unwrap();
        world_from_fixture(&f).unwrap()
    }

    fn config(delay_ms: u64) -> RuntimeConfig {
        RuntimeConfig {
            async_delay: Duration::from_millis(delay_ms),
            retry_after_secs: 0,
            page_size: 100,
            write_burst: 200,
            write_refill_per_sec: 10.0,
            delete_burst: 200,
            delete_refill_per_sec: 10.0,
            read_burst: 250,
            read_refill_per_sec: 25.0,
        }
    }

    #[test]
    fn fixture_builds_world() {
        let w = demo();
        let sub = w.sub("00000000-0000-0000-0000-000000000001").unwrap();
        let rg = sub.rg("RG-DEMO").unwrap();
        assert_eq!(rg.nsg("nsg-vm1").unwrap().rules.len(), 2);
        assert_eq!(rg.nics.len(), 2);
        assert!(rg.nic("vm2-nic").unwrap().nsg.is_none());
        assert_eq!(rg.nic("vm1-nic").unwrap().mac_address.len(), 17);
    }

    #[test]
    fn fixture_with_invalid_rule_fails() {
        let text = r#"
subscriptions:
  - id: s
    resourceGroups:
      - name: rg
        location: westeurope
        networkSecurityGroups:
          - name: n
            securityRules:
              - name: r
                properties: { protocol: Tcp, sourceAddressPrefix: "*", sourcePortRange: "*", destinationAddressPrefix: "*", destinationPortRange: "99999", access: Allow, priority: 300, direction: Inbound }
"#;
        let f = Fixture::from_yaml_str(text).unwrap();
        let err = world_from_fixture(&f).unwrap_err().to_string();
        assert!(err.contains("SecurityRuleInvalidPortRange"), "{err}");
    }

    #[test]
    fn ops_settle_in_time() {
        let mut inner = Inner::new(demo(), config(100), None, None);
        let t0 = Instant::now();
        let sub = "00000000-0000-0000-0000-000000000001";
        let op = inner.start_op(
            t0,
            sub,
            "rg-demo",
            "nsg-vm1",
            "westeurope",
            OpKind::RuleDelete {
                rule: "allow-https".into(),
            },
        );
        inner.settle(t0 + Duration::from_millis(50));
        assert!(!inner.ops[&op.id].done);
        assert_eq!(
            inner
                .world
                .nsg_mut(sub, "rg-demo", "nsg-vm1")
                .unwrap()
                .rules
                .len(),
            2
        );
        assert_eq!(
            inner.settled_world().subscriptions[0].resource_groups[0].nsgs[0]
                .rules
                .len(),
            1
        );
        inner.settle(t0 + Duration::from_millis(100));
        assert!(inner.ops[&op.id].done);
        let nsg = inner.world.nsg_mut(sub, "rg-demo", "nsg-vm1").unwrap();
        assert_eq!(nsg.rules.len(), 1);
        assert!(nsg.pending.is_none());
    }

    #[test]
    fn state_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(load_state_file(&path).unwrap().is_none());
        let inner = Inner::new(demo(), config(0), None, Some(path.clone()));
        inner.save().unwrap();
        let loaded = load_state_file(&path).unwrap().unwrap();
        assert_eq!(loaded, inner.world);
        std::fs::write(&path, "{").unwrap();
        assert!(load_state_file(&path).is_err());
    }

    #[test]
    fn state_file_from_before_vms_gets_them_from_the_nics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut old = serde_json::to_value(StateFile {
            version: 1,
            world: demo(),
        })
        .unwrap();
        for rg in old["world"]["subscriptions"][0]["resource_groups"]
            .as_array_mut()
            .unwrap()
        {
            rg.as_object_mut().unwrap().remove("vms").unwrap();
        }
        std::fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();
        let loaded = load_state_file(&path).unwrap().unwrap();
        let rg = loaded.subscriptions[0].rg("rg-demo").unwrap();
        let names: Vec<&str> = rg.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["vm1", "vm2"]);
    }
}
