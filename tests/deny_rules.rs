//! Aggregated Deny rules (issue 10, item 3): one Deny rule per policy, NSG, protocol, family and
//! port set, the migration of the per-VM Deny rules older versions wrote, and a policy too large
//! for the Deny band when it took one rule per VM.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use portcullis::api::Protocol;
use portcullis::api::condition::{self, READY};
use portcullis::controller::Settings;
use portcullis::plan::naming::{self, RuleKind, RuleName};
use portcullis_azure_emulator::{EmulatorConfig, Fixture, RequestRecord};
use serde_json::{Value, json};
use support::operator::{Env, SUB, grant_spec, nsg_id, prop, rule_name, standard_policy, vm_id};
use support::wait_for;

const T: Duration = Duration::from_secs(60);

/// What a Deny rule covers: (address, port, protocol) triples.
fn coverage(rule: &Value) -> BTreeSet<(String, String, String)> {
    let list = |one: &str, many: &str| -> Vec<String> {
        let mut out: Vec<String> = prop(rule, many)
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(s) = prop(rule, one).as_str() {
            out.push(s.to_string());
        }
        out
    };
    let protocol = prop(rule, "protocol").as_str().unwrap_or("").to_string();
    let mut out = BTreeSet::new();
    for address in list("destinationAddressPrefix", "destinationAddressPrefixes") {
        for port in list("destinationPortRange", "destinationPortRanges") {
            out.insert((address.clone(), port, protocol.clone()));
        }
    }
    out
}

fn kind_of(env: &Env, rule: &Value) -> Option<RuleKind> {
    env.settings.naming.owned(rule_name(rule)).map(|n| n.kind)
}

/// The old-style rules of the standard policy: one Deny rule per VM, port and NSG, named as
/// versions before aggregated Deny rules named them, written straight into the emulator.
async fn write_per_vm_rules(env: &Env, policy_uid: &str) -> BTreeMap<String, Vec<Value>> {
    /// A VM of the standard policy: name, address, ports.
    type Vm<'a> = (&'a str, &'a str, &'a [(u16, Protocol)]);
    let ports: [Vm; 2] = [
        (
            "vm1",
            "10.0.1.4",
            &[
                (22, Protocol::Tcp),
                (3389, Protocol::Tcp),
                (53, Protocol::Udp),
            ],
        ),
        ("vm2", "10.0.1.5", &[(22, Protocol::Tcp)]),
    ];
    let mut by_nsg: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let mut priority = 4000;
        for (vm, ip, vm_ports) in ports {
            if vm == "vm2" && nsg == "nsg-vm1" {
                continue; // vm2's NIC has no NSG
            }
            for &(port, protocol) in vm_ports {
                let name =
                    env.settings
                        .naming
                        .policy_rule_name(policy_uid, &vm_id(vm), port, protocol);
                let rule = json!({"name": name, "properties": {
                    "description": naming::policy_description(&env.ns, "prod", vm, port, protocol),
                    "protocol": if protocol == Protocol::Tcp { "Tcp" } else { "Udp" },
                    "sourceAddressPrefix": "*", "sourcePortRange": "*",
                    "destinationAddressPrefixes": [ip], "destinationPortRanges": [port.to_string()],
                    "access": "Deny", "priority": priority, "direction": "Inbound"}});
                env.admin
                    .put_rule_directly(&format!("{}/securityRules/{name}", nsg_id(nsg)), &rule)
                    .await
                    .expect("write an old-style rule");
                priority += 1;
                by_nsg.entry(nsg.to_string()).or_default().push(rule);
            }
        }
    }
    by_nsg
}

/// The rule a request writes or deletes, in `nsg`: (`PUT`|`DELETE`, rule name).
fn rule_write<'a>(r: &'a RequestRecord, nsg: &str) -> Option<(&'a str, &'a str)> {
    let marker = format!("/networkSecurityGroups/{nsg}/securityRules/");
    let at = r.path.find(&marker)?;
    let rest = &r.path[at + marker.len()..];
    let name = rest.split(['?', '/']).next()?;
    ((r.method == "PUT" || r.method == "DELETE") && (200..300).contains(&r.status))
        .then_some((r.method.as_str(), name))
}

/// Old-style per-VM Deny rules are replaced by aggregated ones; written rule by rule, every port
/// the old rules denied stays denied after every single write (replayed from the emulator's
/// request log, each PUT standing for the rule's final content).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_vm_deny_rules_migrate_rule_by_rule_without_leaving_a_port_open() {
    let mut env = Env::new("deny-migrate").await;
    env.settings.one_write_per_nsg = false;
    // The policy exists (it has a uid) while no operator runs: as after an upgrade.
    let policy = env.create_policy("prod", standard_policy()).await;
    let uid = policy.metadata.uid.clone().expect("uid");
    let old = write_per_vm_rules(&env, &uid).await;
    let mut state: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    let mut required: BTreeMap<String, BTreeSet<(String, String, String)>> = BTreeMap::new();
    for (nsg, rules) in &old {
        for rule in env.owned_rules(nsg).await {
            required
                .entry(nsg.clone())
                .or_default()
                .extend(coverage(&rule));
            state
                .entry(nsg.clone())
                .or_default()
                .insert(rule_name(&rule).to_string(), rule);
        }
        assert_eq!(state[nsg].len(), rules.len(), "{nsg}: the old rules stand");
    }
    env.admin.clear_requests().await.expect("clear requests");

    env.start_operator();
    env.wait_policy_ready("prod", T).await;
    let done = wait_for("old rules gone, aggregated rules standing", T, || async {
        let mut out = BTreeMap::new();
        for nsg in ["nsg-vm1", "nsg-subnet"] {
            let owned = env.owned_rules(nsg).await;
            let settled = owned
                .iter()
                .all(|r| prop(r, "provisioningState") == "Succeeded");
            let all_new = owned
                .iter()
                .all(|r| matches!(kind_of(&env, r), Some(RuleKind::DenyGroup { .. })));
            if !settled || !all_new {
                return None;
            }
            out.insert(nsg.to_string(), owned);
        }
        Some(out)
    })
    .await;
    // vm1: TCP 22+3389 and UDP 53 in both NSGs; vm2: TCP 22 in the subnet's.
    assert_eq!(done["nsg-vm1"].len(), 2, "{:#?}", done["nsg-vm1"]);
    assert_eq!(done["nsg-subnet"].len(), 3, "{:#?}", done["nsg-subnet"]);
    for (nsg, rules) in &done {
        let covered: BTreeSet<_> = rules.iter().flat_map(coverage).collect();
        assert_eq!(
            covered, required[nsg],
            "{nsg}: the same ports denied, no more"
        );
    }

    // Replay: every accepted write, in order, against the state before the operator started.
    let log = env.admin.requests().await.expect("request log");
    for (nsg, rules) in &done {
        let finals: BTreeMap<&str, &Value> = rules.iter().map(|r| (rule_name(r), r)).collect();
        let current = state.get_mut(nsg).expect("state");
        assert!(
            !log.iter()
                .any(|r| r.method == "PUT"
                    && r.path.contains(&format!("/networkSecurityGroups/{nsg}?"))),
            "rule by rule: no whole-NSG write of {nsg}"
        );
        let mut writes = 0;
        for r in &log {
            let Some((method, name)) = rule_write(r, nsg) else {
                continue;
            };
            writes += 1;
            if method == "PUT" {
                let rule = finals
                    .get(name)
                    .unwrap_or_else(|| panic!("{name} was written but does not stand in {nsg}"));
                current.insert(name.to_string(), (*rule).clone());
            } else {
                current.remove(name);
            }
            let covered: BTreeSet<_> = current
                .values()
                .filter(|r| prop(r, "access") == "Deny")
                .flat_map(coverage)
                .collect();
            let open: Vec<_> = required[nsg].difference(&covered).collect();
            assert!(
                open.is_empty(),
                "{nsg}: after {method} {name}, denied ports left open: {open:?}"
            );
        }
        assert!(writes > 0, "{nsg} was migrated");
    }
    env.assert_user_rules_untouched().await;
}

/// The same migration with one conditional write of the NSG per round (the default): the new
/// rules in one write, the old ones removed in the next, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_vm_deny_rules_migrate_in_at_most_two_writes_per_nsg() {
    let mut env = Env::new("deny-migrate-one").await;
    env.settings.one_write_per_nsg = true;
    let policy = env.create_policy("prod", standard_policy()).await;
    let uid = policy.metadata.uid.clone().expect("uid");
    write_per_vm_rules(&env, &uid).await;
    env.admin.clear_requests().await.expect("clear requests");
    env.start_operator();
    env.wait_policy_ready("prod", T).await;
    wait_for("old rules gone", T, || async {
        for nsg in ["nsg-vm1", "nsg-subnet"] {
            let owned = env.owned_rules(nsg).await;
            let only_new = owned.iter().all(|r| {
                matches!(kind_of(&env, r), Some(RuleKind::DenyGroup { .. }))
                    && prop(r, "provisioningState") == "Succeeded"
            });
            if !only_new || owned.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;
    let log = env.admin.requests().await.expect("request log");
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let writes: Vec<String> = log
            .iter()
            .filter(|r| support::is_write_to_nsg(r, nsg) && (200..300).contains(&r.status))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert!(
            (1..=2).contains(&writes.len()),
            "{nsg}: at most two writes: {writes:#?}"
        );
    }
    env.assert_user_rules_untouched().await;
}

/// `vms` VMs, `per_subnet` in each subnet, each subnet governed by its own NSG (the first one
/// `nsg-subnet`, then `nsg-subnet1`, ...). `nsg-vm1` holds a user rule and governs nothing (the
/// test environment compares users' rules in it and `nsg-subnet`).
fn subnets_fixture(vms: usize, per_subnet: usize) -> Fixture {
    serde_json::from_value(subnets_world(vms, per_subnet)).expect("fixture")
}

/// The fixture of [`subnets_fixture`], as JSON to adjust.
fn subnets_world(vms: usize, per_subnet: usize) -> Value {
    let subnets = vms.div_ceil(per_subnet);
    let nsg = |s: usize| {
        if s == 0 {
            "nsg-subnet".to_string()
        } else {
            format!("nsg-subnet{s}")
        }
    };
    let user_rule = |priority: u16| {
        json!({"name": "user-rule", "properties": {
            "protocol": "Tcp", "sourceAddressPrefix": "192.0.2.0/24", "sourcePortRange": "*",
            "destinationAddressPrefix": "*", "destinationPortRange": "8080",
            "access": "Allow", "priority": priority, "direction": "Inbound"}})
    };
    let mut nsgs = vec![json!({"name": "nsg-vm1", "securityRules": [user_rule(110)]})];
    nsgs.extend((0..subnets).map(|s| json!({"name": nsg(s), "securityRules": [user_rule(300)]})));
    json!({"subscriptions": [{"id": SUB, "resourceGroups": [{
        "name": "rg-demo", "location": "westeurope",
        "networkSecurityGroups": nsgs,
        "virtualNetworks": [{"name": "vnet-wide", "subnets": (0..subnets).map(|s| json!({
            "name": format!("s{s}"), "addressPrefix": format!("10.{s}.0.0/16"),
            "networkSecurityGroup": nsg(s)})).collect::<Vec<_>>()}],
        "networkInterfaces": (0..vms).map(|i| json!({
            "name": format!("w{i}-nic"), "virtualMachine": format!("w{i}"),
            "ipConfigurations": [{"name": "ipconfig1",
                "privateIPAddress": format!("10.{}.{}.{}", i / per_subnet, (i % per_subnet) / 250, (i % per_subnet) % 250 + 4),
                "subnet": format!("vnet-wide/s{}", i / per_subnet)}]})).collect::<Vec<_>>(),
    }]}]})
}

/// The requests the emulator refused with 400 (Azure's limits among them).
async fn refused_writes(env: &Env) -> Vec<RequestRecord> {
    let log = env.admin.requests().await.expect("request log");
    log.into_iter().filter(|r| r.status == 400).collect()
}

/// An operator over `fixture` (with `resync`), and the policy `wide` over the VMs `w0`.. of
/// [`subnets_world`] (port 22), the emulator's request log cleared before the operator starts.
async fn wide_policy_env(prefix: &str, fixture: Fixture, resync: Duration, vms: usize) -> Env {
    let mut env = Env::with(
        prefix,
        EmulatorConfig {
            fixture,
            ..Default::default()
        },
        Settings {
            resync,
            ..Default::default()
        },
    )
    .await;
    env.admin.clear_requests().await.expect("clear requests");
    env.start_operator();
    let spec = json!({"virtualMachines": (0..vms).map(|i| json!({"id": vm_id(&format!("w{i}")), "ports": [
        {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefixes": ["198.18.0.0/15"], "maxRequestAccessDuration": "PT3H"}
    ]})).collect::<Vec<_>>()});
    env.create_policy("wide", spec).await;
    env
}

/// Issue 10's target at a smaller size: a policy over 200 VMs behind 2 subnet NSGs (100 VMs
/// each, one port) would have needed 100 Deny rules per NSG, more than the default band's 97
/// priorities. Aggregated, it is Enforced with one Deny rule per NSG, inside the default band,
/// in at most two writes per NSG (counted from the emulator's request log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_over_200_vms_behind_2_subnet_nsgs_is_enforced_in_at_most_two_writes_per_nsg() {
    let (vms, per_subnet) = (200, 100);
    let env = wide_policy_env(
        "deny-wide",
        subnets_fixture(vms, per_subnet),
        Duration::from_secs(30),
        vms,
    )
    .await;
    let policy = env
        .wait_policy_ready("wide", Duration::from_secs(120))
        .await;
    let ready = policy
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, READY))
        .expect("Ready");
    assert_eq!(ready.reason, "Enforced", "{}", ready.message);
    assert_eq!(ready.message, "2 deny rule(s) in 2 NSG(s)");

    let log = env.admin.requests().await.expect("request log");
    for (s, nsg) in ["nsg-subnet", "nsg-subnet1"].into_iter().enumerate() {
        let owned = env.owned_rules(nsg).await;
        assert_eq!(owned.len(), 1, "{nsg}: {owned:#?}");
        let rule = &owned[0];
        let priority = prop(rule, "priority").as_u64().expect("priority");
        assert!((4000..=4096).contains(&priority), "{nsg}: {priority}");
        let covered = coverage(rule);
        assert_eq!(covered.len(), per_subnet, "{nsg}: every VM's port 22");
        assert!(
            covered
                .iter()
                .all(|(a, p, proto)| a.starts_with(&format!("10.{s}."))
                    && p == "22"
                    && proto == "Tcp")
        );
        assert!(
            RuleName::parse(rule_name(rule))
                .is_some_and(|n| matches!(n.kind, RuleKind::DenyGroup { .. })),
            "{}",
            rule_name(rule)
        );
        let writes = log
            .iter()
            .filter(|r| support::is_write_to_nsg(r, nsg) && (200..300).contains(&r.status))
            .count();
        assert!((1..=2).contains(&writes), "{nsg}: {writes} writes");
    }
    assert!(env.owned_rules("nsg-vm1").await.is_empty());
    env.assert_user_rules_untouched().await;
}

/// Azure's 4,000 destination addresses per NSG, counted over everyone's rules: in an NSG where
/// someone else's rule already names 3,995, a policy's Deny rule for 10 more VMs is not written
/// (Azure would refuse the whole write): the policy says why, its other NSG is enforced, and no
/// write is refused. Once that rule names fewer, the Deny rule goes in, and a grant's Allow
/// rule that would name one address more is refused alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_rule_over_azures_4000_addresses_per_nsg_waits_and_says_why() {
    let (vms, per_subnet) = (20, 10);
    let many = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("172.16.{}.{}", i / 250, i % 250 + 1))
            .collect()
    };
    let mut world = subnets_world(vms, per_subnet);
    let crowded = &mut world["subscriptions"][0]["resourceGroups"][0]["networkSecurityGroups"][1];
    assert_eq!(crowded["name"], "nsg-subnet");
    let user_rule = &mut crowded["securityRules"][0]["properties"];
    user_rule
        .as_object_mut()
        .expect("rule")
        .remove("destinationAddressPrefix");
    user_rule["destinationAddressPrefixes"] = json!(many(3995));
    let env = wide_policy_env(
        "deny-limit",
        serde_json::from_value(world).expect("fixture"),
        Duration::from_secs(2),
        vms,
    )
    .await;
    let policy = env
        .wait_policy_condition("wide", "PriorityBandFull", T)
        .await;
    let ready = policy
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, READY))
        .expect("Ready");
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("4,000 addresses"),
        "{}",
        ready.message
    );
    wait_for("the Deny rule in nsg-subnet1", T, || async {
        (env.owned_rules("nsg-subnet1").await.len() == 1).then_some(())
    })
    .await;
    assert_eq!(
        coverage(&env.owned_rules("nsg-subnet1").await[0]).len(),
        per_subnet
    );
    assert!(env.owned_rules("nsg-subnet").await.is_empty());
    let refused = refused_writes(&env).await;
    assert!(refused.is_empty(), "writes Azure refused: {refused:#?}");

    // Someone narrows their rule: room for the policy's 10 addresses.
    let mut narrowed = env
        .admin
        .rules(&nsg_id("nsg-subnet"))
        .await
        .expect("rules")
        .into_iter()
        .find(|r| rule_name(r) == "user-rule")
        .expect("user-rule");
    narrowed["properties"]["destinationAddressPrefixes"] = json!(many(3990));
    env.admin
        .put_rule_directly(
            &format!("{}/securityRules/user-rule", nsg_id("nsg-subnet")),
            &narrowed,
        )
        .await
        .expect("narrow the user rule");
    let policy = env.wait_policy_ready("wide", T).await;
    let ready = policy
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, READY))
        .expect("Ready");
    assert_eq!(ready.reason, "Enforced", "{}", ready.message);
    let owned = env.owned_rules("nsg-subnet").await;
    assert_eq!(owned.len(), 1, "{owned:#?}");
    assert_eq!(coverage(&owned[0]).len(), per_subnet);

    // Full now (3,990 + 10): a grant's Allow rule there would name one destination more.
    let mut spec = grant_spec("w0", &[22], "198.18.0.9/32", "PT1H");
    spec["policyRef"]["name"] = json!("wide");
    spec["virtualMachine"] = json!(vm_id("w0"));
    env.create_grant("over", spec).await;
    let grant = env
        .wait_grant_condition("over", "Ready", "PriorityBandFull", T)
        .await;
    let ready = grant
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, READY))
        .expect("Ready");
    assert!(
        ready.message.contains("4,000 addresses"),
        "{}",
        ready.message
    );
    assert_eq!(
        env.owned_rules("nsg-subnet").await.len(),
        1,
        "only the Deny rule"
    );
    let refused = refused_writes(&env).await;
    assert!(refused.is_empty(), "writes Azure refused: {refused:#?}");
}
