//! Issue 8's defects, each pinned against the real API server and the Azure emulator: what a
//! hostile requester, an admin's slip or an odd object can do must never hold a port open or
//! stop the operator.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use portcullis::api::condition::{self, READY};
use portcullis::api::{AccessGrant, GrantPhase};
use portcullis::azure::nsg_json;
use portcullis::controller::telemetry::Telemetry;
use portcullis_azure_emulator::{EmulatorConfig, FixtureIpConfig, LockLevel, NsgFault};
use serde_json::{Value, json};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use support::kube::{PrivateApiServer, install_these_crds};
use support::operator::{
    Env, demo_fixture, grant_spec, nsg_id, prop, rule_name, standard_policy, vm_id,
};
use support::wait_for;

const T: Duration = Duration::from_secs(30);

async fn ready_env(prefix: &str) -> (Env, Arc<Telemetry>) {
    let mut env = Env::new(prefix).await;
    let telemetry = env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    (env, telemetry)
}

/// Successful reconciles of `controller` so far, from the operator's own metrics.
fn reconciles(telemetry: &Telemetry, controller: &str) -> f64 {
    let body = telemetry.encode().expect("metrics");
    let key = format!("portcullis_reconciles_total{{controller=\"{controller}\",result=\"ok\"}}");
    body.lines()
        .find(|l| l.starts_with(&key))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `controller` has finished `n` more successful reconciles: the resync (2 s in
/// these tests) guarantees they come, and a decision the operator would make differently has
/// had its chance by then.
async fn wait_more_reconciles(telemetry: &Telemetry, controller: &str, n: f64) {
    let start = reconciles(telemetry, controller);
    wait_for(&format!("{n} more {controller} reconciles"), T, || async {
        (reconciles(telemetry, controller) >= start + n).then_some(())
    })
    .await;
}

/// Every Portcullis rule of both NSGs, without the etag (which moves with any write to the NSG).
async fn owned_rules_without_etags(env: &Env) -> Vec<Value> {
    let mut out = Vec::new();
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        for mut rule in env.owned_rules(nsg).await {
            if let Some(obj) = rule.as_object_mut() {
                obj.remove("etag");
            }
            out.push(rule);
        }
    }
    out
}

// Defect 3: an edit of an active grant must not widen (or move) what it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_an_active_grant_changes_nothing_in_azure_and_says_so() {
    let (env, telemetry) = ready_env("frozen").await;
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT1H"))
        .await;
    let before = env
        .wait_grant_condition("alice", "Ready", "Opened", T)
        .await
        .status
        .expect("status");
    let rules_before = owned_rules_without_etags(&env).await;
    let writes_before = env.writes().await;

    // Another port (with a shorter maximum), a wider source, another VM, another policy name.
    env.patch_grant_spec(
        "alice",
        json!({"ports": [22, 3389], "sourceAddressPrefix": "203.0.113.0/24",
               "virtualMachine": "vm2", "policyRef": {"name": "other"}}),
    )
    .await;
    let edited = env
        .wait_grant_condition("alice", "SpecFrozen", "EditIgnored", T)
        .await;
    env.wait_event("alice", "SpecIgnored", T).await;
    wait_more_reconciles(&telemetry, "accessgrant", 2.0).await;

    assert_eq!(owned_rules_without_etags(&env).await, rules_before);
    assert_eq!(
        env.writes().await,
        writes_before,
        "an edit writes nothing to Azure"
    );
    let status = edited.status.expect("status");
    assert_eq!(status.phase, Some(GrantPhase::Active));
    assert_eq!(status.expires_at, before.expires_at, "expiry never moves");
    assert_eq!(status.granted, before.granted, "the record never moves");
    let granted = status.granted.expect("granted");
    assert_eq!(granted.virtual_machine, vm_id("vm1"));
    assert_eq!(granted.source_address_prefix, "203.0.113.7/32");
    assert_eq!(granted.ports.len(), 1);
    env.assert_user_rules_untouched().await;
}

// Defect 3: a status hand-edited to ask for more than the policy allowed is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_edited_to_ask_for_more_than_the_policy_allows_is_closed() {
    let (env, _telemetry) = ready_env("handedit").await;
    env.create_grant(
        "longer",
        grant_spec("vm1", &[22], "203.0.113.7/32", "PT30M"),
    )
    .await;
    env.create_grant("wider", grant_spec("vm1", &[22], "203.0.113.8/32", "PT30M"))
        .await;
    let longer = env
        .wait_grant_condition("longer", "Ready", "Opened", T)
        .await;
    let wider = env
        .wait_grant_condition("wider", "Ready", "Opened", T)
        .await;

    // 3 hours where the policy allows one; and the world as the source.
    let activated = longer
        .status
        .as_ref()
        .and_then(|s| s.activated_at.clone())
        .expect("activatedAt");
    let three_hours = activated
        .0
        .checked_add(jiff::SignedDuration::from_hours(3))
        .expect("time");
    let mut record = wider
        .status
        .as_ref()
        .and_then(|s| s.granted.clone())
        .expect("granted");
    record.source_address_prefix = "0.0.0.0/0".into();
    let pp = PatchParams::default();
    env.grants()
        .patch_status(
            "longer",
            &pp,
            &Patch::Merge(json!({"status": {"expiresAt": three_hours.to_string()}})),
        )
        .await
        .expect("patch status");
    env.grants()
        .patch_status(
            "wider",
            &pp,
            &Patch::Merge(json!({"status": {"granted": record}})),
        )
        .await
        .expect("patch status");

    for (name, grant) in [("longer", &longer), ("wider", &wider)] {
        let closed = env.wait_grant_phase(name, GrantPhase::Revoked, T).await;
        let ready = closed
            .status
            .as_ref()
            .and_then(|s| condition::find(&s.conditions, READY))
            .expect("Ready");
        assert_eq!(ready.reason, "NoLongerAllowed", "{name}");
        env.wait_rules_gone(grant, T).await;
    }
    env.assert_user_rules_untouched().await;
}

/// The standard policy with port 22 of vm1 listed twice: the API server admits it, the
/// controller refuses it.
fn policy_with_duplicate_port() -> Value {
    let mut spec = standard_policy();
    let ports = spec["virtualMachines"][0]["ports"]
        .as_array_mut()
        .expect("ports");
    let first = ports[0].clone();
    ports.push(first);
    spec
}

// Defect 4: an invalid policy edit fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_edit_keeps_its_deny_rules_and_activates_nothing() {
    let (mut env, telemetry) = ready_env("badpolicy").await;
    let deny_before = owned_rules_without_etags(&env).await;
    assert_eq!(
        deny_before.len(),
        5,
        "2 Deny rules in nsg-vm1 (vm1's TCP 22 and 3389, its UDP 53), 3 in nsg-subnet (those, and vm2's TCP 22)"
    );
    let writes_before = env.writes().await;

    env.patch_policy_spec("prod", policy_with_duplicate_port())
        .await;
    let policy = env.wait_policy_condition("prod", "InvalidPolicy", T).await;
    let status = policy.status.expect("status");
    assert!(
        status.enforced_spec.is_some(),
        "the last valid spec is kept"
    );
    env.create_grant("bob", grant_spec("vm1", &[22], "203.0.113.9/32", "PT10M"))
        .await;
    env.wait_grant_condition("bob", "Ready", "PolicyInvalid", T)
        .await;
    wait_more_reconciles(&telemetry, "jitpolicy", 2.0).await;
    assert_eq!(owned_rules_without_etags(&env).await, deny_before);
    assert_eq!(env.writes().await, writes_before, "nothing written");

    // Across a restart too: the last valid spec lives in status, not in memory.
    env.stop_operator().await;
    let telemetry = env.start_operator();
    wait_more_reconciles(&telemetry, "jitpolicy", 2.0).await;
    assert_eq!(owned_rules_without_etags(&env).await, deny_before);
    let bob = env.grants().get("bob").await.expect("bob");
    assert_eq!(
        bob.status.and_then(|s| s.phase),
        Some(GrantPhase::Pending),
        "nothing activates under an invalid policy"
    );
    assert_eq!(env.writes().await, writes_before, "nothing written");

    // Fixed: the waiting grant activates.
    env.patch_policy_spec("prod", standard_policy()).await;
    env.wait_grant_condition("bob", "Ready", "Opened", T).await;
    env.assert_user_rules_untouched().await;
}

/// The demo fixture with vm1 dual-stack: a second IP configuration with an IPv6 address.
fn dual_stack_fixture() -> portcullis_azure_emulator::Fixture {
    let mut fixture = demo_fixture();
    let nic = fixture.subscriptions[0].resource_groups[0]
        .network_interfaces
        .iter_mut()
        .find(|n| n.name == "vm1-nic")
        .expect("vm1-nic");
    nic.ip_configurations.push(FixtureIpConfig {
        name: "ipconfig-v6".into(),
        private_ip_address: "fd00:1::4".into(),
        private_ip_allocation_method: None,
        subnet: "vnet-demo/app".into(),
        primary: Some(false),
    });
    fixture
}

fn destinations(rule: &Value) -> Vec<String> {
    let p = &rule["properties"];
    match p["destinationAddressPrefix"].as_str() {
        Some(one) if !one.is_empty() => vec![one.to_string()],
        _ => p["destinationAddressPrefixes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
    }
}

// Defect 7: address families.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_families_are_never_mixed_and_a_source_that_cannot_reach_the_vm_is_denied() {
    let settings = portcullis::controller::Settings {
        resync: Duration::from_secs(2),
        ..Default::default()
    };
    let emulator = EmulatorConfig {
        fixture: dual_stack_fixture(),
        ..Default::default()
    };
    let mut env = Env::with("families", emulator, settings).await;
    env.start_operator();
    let policy = json!({"virtualMachines": [
        {"id": vm_id("vm1"), "ports": [
            {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefixes": ["203.0.113.0/24", "2001:db8::/32"], "maxRequestAccessDuration": "PT1H"}
        ]},
        {"id": vm_id("vm2"), "ports": [
            {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefixes": ["2001:db8::/32"], "maxRequestAccessDuration": "PT1H"}
        ]}
    ]});
    env.create_policy("prod", policy).await;
    env.wait_policy_ready("prod", T).await;

    // Dual-stack vm1: one Deny rule per family, each of one family only.
    let deny: Vec<Vec<String>> = env
        .owned_rules("nsg-vm1")
        .await
        .iter()
        .map(destinations)
        .collect();
    assert_eq!(deny.len(), 2, "{deny:?}");
    assert!(deny.contains(&vec!["10.0.1.4".to_string()]), "{deny:?}");
    assert!(deny.contains(&vec!["fd00:1::4".to_string()]), "{deny:?}");

    // An IPv6 source for IPv4-only vm2: denied, nothing written.
    let writes_before = env.writes().await;
    env.create_grant(
        "v6-to-v4",
        grant_spec("vm2", &[22], "2001:db8::7/128", "PT10M"),
    )
    .await;
    let denied = env
        .wait_grant_phase("v6-to-v4", GrantPhase::Denied, T)
        .await;
    let ready = denied
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, READY))
        .expect("Ready");
    assert_eq!(ready.reason, "AddressFamilyMismatch");
    assert!(ready.message.contains("IPv4 only"), "{}", ready.message);
    env.wait_event("v6-to-v4", "Denied", T).await;
    assert_eq!(env.writes().await, writes_before, "a denial writes nothing");

    // An IPv6 source for dual-stack vm1 opens to its IPv6 address only.
    let g = env
        .create_grant(
            "v6-to-dual",
            grant_spec("vm1", &[22], "2001:db8::7/128", "PT10M"),
        )
        .await;
    env.wait_grant_condition("v6-to-dual", "Ready", "Opened", T)
        .await;
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let allow = env.grant_names_in_nsg(nsg, &g).await;
        assert_eq!(allow.len(), 1, "{nsg}: {allow:#?}");
        assert_eq!(destinations(&allow[0]), ["fd00:1::4"], "{nsg}");
        assert_eq!(prop(&allow[0], "sourceAddressPrefix"), "2001:db8::7/128");
        assert!(
            rule_name(&allow[0]).ends_with("-v6"),
            "{}",
            rule_name(&allow[0])
        );
    }
    env.assert_user_rules_untouched().await;
}

fn ready_condition(grant: &portcullis::api::AccessGrant) -> (String, String) {
    grant
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, READY))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// How many ARM writes the emulator saw to rules of this NSG so far.
async fn writes_to(env: &Env, nsg: &str) -> usize {
    let id = nsg_id(nsg).to_ascii_lowercase();
    env.admin
        .requests()
        .await
        .expect("request log")
        .iter()
        .filter(|r| r.method != "GET" && r.path.to_ascii_lowercase().starts_with(&id))
        .count()
}

/// The emulator refuses every write to `nsg` (403) until the fault is cleared.
async fn refuse_writes(env: &Env, nsg: &str) {
    env.admin
        .set_nsg_fault(&NsgFault {
            nsg: nsg_id(nsg),
            status: 403,
            code: None,
            message: None,
            writes_only: true,
        })
        .await
        .expect("fault");
}

// Defect 2: each NSG is closed on its own; a permanent failure backs off, is named in status,
// fires an Event and shows in the overdue gauge; other grants keep opening and closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_nsg_never_keeps_the_other_from_closing_and_status_names_it() {
    let (env, telemetry) = ready_env("nsgfault").await;
    let alice = env
        .create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT4S"))
        .await;
    env.wait_grant_condition("alice", "Ready", "Opened", T)
        .await;
    refuse_writes(&env, "nsg-vm1").await;

    // The subnet NSG closes although the NIC's NSG refuses: access is cut there.
    let expired = env
        .wait_grant_condition("alice", "Ready", "CloseFailed", T)
        .await;
    assert_eq!(
        expired.status.as_ref().and_then(|s| s.phase),
        Some(GrantPhase::Expired)
    );
    wait_for("alice's subnet rule gone", T, || async {
        env.grant_names_in_nsg("nsg-subnet", &alice)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let (_, message) = ready_condition(&expired);
    assert!(message.contains("nsg-vm1"), "{message}");
    let standing = expired.status.as_ref().expect("status").rules.clone();
    assert_eq!(standing.len(), 1, "{standing:?}");
    assert!(standing[0].network_security_group.ends_with("nsg-vm1"));
    env.wait_event("alice", "CloseFailed", T).await;
    wait_for("the overdue gauge to count alice", T, || async {
        (telemetry.overdue_grants() == 1).then_some(())
    })
    .await;

    // Backoff: a permanent failure is not retried every 500 ms.
    let before = writes_to(&env, "nsg-vm1").await;
    let window = std::time::Instant::now();
    // Meanwhile another grant, on vm2 (subnet NSG only), opens and closes as usual.
    let bob = env
        .create_grant("bob", grant_spec("vm2", &[22], "198.51.100.7/32", "PT3S"))
        .await;
    env.wait_grant_phase("bob", GrantPhase::Expired, T).await;
    wait_for("bob's rule gone", T, || async {
        env.grant_names_in_nsg("nsg-subnet", &bob)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    wait_for("8 s of backoff observed", T, || async {
        (window.elapsed() >= Duration::from_secs(8)).then_some(())
    })
    .await;
    let retries = writes_to(&env, "nsg-vm1").await - before;
    // Two objects retry it (alice, and the policy whose sync of the NSG carries alice's close),
    // each backing off from 1 s and doubling: at most 2 + log2(t) attempts each in t seconds.
    // The window is at least 8 s, longer when bob takes longer (a loaded machine); retrying
    // every 500 ms would make 4 t.
    let elapsed = window.elapsed().as_secs_f64();
    let bound = (2.0 * (2.0 + elapsed.log2())).ceil() as usize;
    assert!(
        retries <= bound,
        "{retries} writes to the failing NSG in {elapsed:.1} s (at most {bound}): not backing off"
    );

    // Fixed: it closes within the backoff, and the gauge clears.
    env.admin
        .clear_nsg_fault(&nsg_id("nsg-vm1"))
        .await
        .expect("clear");
    wait_for(
        "alice closed everywhere",
        Duration::from_secs(40),
        || async {
            let g = env.grants().get("alice").await.ok()?;
            let s = g.status?;
            (s.rules.is_empty() && env.grant_names_in_nsg("nsg-vm1", &alice).await.is_empty())
                .then_some(())
        },
    )
    .await;
    wait_for("the overdue gauge to clear", T, || async {
        (telemetry.overdue_grants() == 0).then_some(())
    })
    .await;
    env.assert_user_rules_untouched().await;
}

// Defect 2, for a policy: a deleted policy's rules go from every NSG it has them in while one of
// them refuses every write; the policy keeps its finalizer until that one is clean too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_policys_rules_go_from_every_nsg_while_one_refuses() {
    let (env, _) = ready_env("policydel").await;
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        assert!(
            !env.owned_rules(nsg).await.is_empty(),
            "Deny rules in {nsg}"
        );
    }
    // The policy's NSGs are synced in its targets' order: vm1's NIC NSG first.
    refuse_writes(&env, "nsg-vm1").await;
    env.policies()
        .delete("prod", &kube::api::DeleteParams::default())
        .await
        .expect("delete policy");

    wait_for("the policy's rules gone from nsg-subnet", T, || async {
        env.owned_rules("nsg-subnet").await.is_empty().then_some(())
    })
    .await;
    assert!(
        !env.owned_rules("nsg-vm1").await.is_empty(),
        "nsg-vm1 refuses: its rule stays"
    );
    assert!(
        env.policies().get_opt("prod").await.expect("get").is_some(),
        "the policy waits for the NSG that refused"
    );

    env.admin
        .clear_nsg_fault(&nsg_id("nsg-vm1"))
        .await
        .expect("clear");
    wait_for(
        "the policy gone, and its rules",
        Duration::from_secs(60),
        || async {
            let gone = env.policies().get_opt("prod").await.ok()?.is_none();
            (gone && env.owned_rules("nsg-vm1").await.is_empty()).then_some(())
        },
    )
    .await;
    env.assert_user_rules_untouched().await;
}

// Defect 2: under a CanNotDelete lock a rule DELETE is refused, a PUT of the NSG without it is
// not: closing succeeds by the write Azure allows, and keeps every other rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_under_a_cannotdelete_lock_succeeds_by_the_write_azure_allows() {
    let (env, _telemetry) = ready_env("lock").await;
    let g = env
        .create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT3S"))
        .await;
    env.wait_grant_condition("alice", "Ready", "Opened", T)
        .await;
    let rg = format!(
        "/subscriptions/{}/resourceGroups/rg-demo",
        support::operator::SUB
    );
    env.admin
        .set_lock(&rg, LockLevel::CanNotDelete)
        .await
        .expect("lock");
    let closed = env.wait_grant_phase("alice", GrantPhase::Expired, T).await;
    env.wait_rules_gone(&g, T).await;
    let closed = env
        .wait_grant_condition("alice", "Ready", "Expired", T)
        .await
        .status
        .map(|s| s.rules)
        .unwrap_or_else(|| closed.status.map(|s| s.rules).unwrap_or_default());
    assert!(closed.is_empty(), "{closed:?}");
    // The policy's Deny rules and the users' rules are all still there.
    assert_eq!(env.owned_rules("nsg-vm1").await.len(), 2);
    assert_eq!(env.owned_rules("nsg-subnet").await.len(), 3);
    env.assert_user_rules_untouched().await;
}

// Defect 2: an NSG deleted under a grant holds nothing: the grant counts as closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nsg_deleted_under_a_grant_counts_as_closed() {
    let (env, _telemetry) = ready_env("nsggone").await;
    let g = env
        .create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT3S"))
        .await;
    env.wait_grant_condition("alice", "Ready", "Opened", T)
        .await;
    env.admin
        .delete_nsg_directly(&nsg_id("nsg-vm1"))
        .await
        .expect("delete NSG");
    let closed = env
        .wait_grant_condition("alice", "Ready", "Expired", T)
        .await;
    let status = closed.status.expect("status");
    assert_eq!(status.phase, Some(GrantPhase::Expired));
    assert!(status.rules.is_empty(), "{:?}", status.rules);
    assert!(env.grant_names_in_nsg("nsg-subnet", &g).await.is_empty());
}

// Defect 2: start-up closes what it can and starts the controllers regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_closes_what_it_can_and_starts_the_controllers_regardless() {
    let (mut env, _telemetry) = ready_env("startup").await;
    let alice = env
        .create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT4S"))
        .await;
    let opened = env
        .wait_grant_condition("alice", "Ready", "Opened", T)
        .await;
    env.stop_operator().await;
    env.admin
        .set_lock(&nsg_id("nsg-vm1"), LockLevel::ReadOnly)
        .await
        .expect("lock");
    let expires = opened
        .status
        .and_then(|s| s.expires_at)
        .expect("expiresAt")
        .0;
    wait_for("alice's expiry to pass", T, || async {
        (jiff::Timestamp::now() > expires).then_some(())
    })
    .await;
    env.start_operator();

    // The controllers run: a new grant on vm2 opens although nsg-vm1 refuses every write.
    env.create_grant("carol", grant_spec("vm2", &[22], "198.51.100.9/32", "PT1H"))
        .await;
    env.wait_grant_condition("carol", "Ready", "Opened", T)
        .await;
    wait_for("alice's subnet rule gone", T, || async {
        env.grant_names_in_nsg("nsg-subnet", &alice)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let failing = env
        .wait_grant_condition("alice", "Ready", "CloseFailed", T)
        .await;
    let (_, message) = ready_condition(&failing);
    assert!(message.contains("nsg-vm1"), "{message}");
    assert!(message.contains("locked"), "{message}");

    env.admin
        .clear_lock(&nsg_id("nsg-vm1"))
        .await
        .expect("unlock");
    wait_for(
        "alice closed in nsg-vm1",
        Duration::from_secs(40),
        || async {
            env.grant_names_in_nsg("nsg-vm1", &alice)
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    env.assert_user_rules_untouched().await;
}

/// The CRDs as an older release shipped them: `format: date-time` without the strict RFC 3339
/// pattern, so the API server admits date-times the operator's types cannot decode.
fn crds_without_date_time_patterns() -> Vec<CustomResourceDefinition> {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if map.get("format").and_then(Value::as_str) == Some("date-time") {
                    map.remove("pattern");
                }
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    [
        <portcullis::api::JitPolicy as kube::CustomResourceExt>::crd(),
        <portcullis::api::AccessGrant as kube::CustomResourceExt>::crd(),
    ]
    .into_iter()
    .map(|crd| {
        let mut v = serde_json::to_value(crd).expect("crd");
        strip(&mut v);
        serde_json::from_value(v).expect("crd")
    })
    .collect()
}

/// A date-time the API server's `date-time` format admits and RFC 3339 parsers refuse: ten
/// fraction digits.
const ODD_TIME: &str = "2030-01-01T00:00:00.1234567891Z";

// Defect 1: an object the API server admits but the operator cannot decode is reported and set
// aside; it never stops the operator, never hides the other objects, and fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_object_is_set_aside_and_everything_else_is_served() {
    let private = PrivateApiServer::start().await;
    let settings = portcullis::controller::Settings {
        resync: Duration::from_secs(2),
        ..Default::default()
    };
    let emulator = EmulatorConfig {
        fixture: demo_fixture(),
        ..Default::default()
    };
    let mut env = Env::with_client("odd", private.client.clone(), emulator, settings).await;
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let deny_before: Vec<String> = owned_rules_without_etags(&env)
        .await
        .iter()
        .map(|r| rule_name(r).to_string())
        .collect();
    let lapsing = env
        .create_grant(
            "lapsing",
            grant_spec("vm1", &[22], "203.0.113.7/32", "PT5S"),
        )
        .await;
    let vandalised = env
        .create_grant(
            "vandalised",
            grant_spec("vm1", &[22], "203.0.113.8/32", "PT1H"),
        )
        .await;
    let lapsing_status = env
        .wait_grant_condition("lapsing", "Ready", "Opened", T)
        .await
        .status
        .expect("status");
    env.wait_grant_condition("vandalised", "Ready", "Opened", T)
        .await;
    env.stop_operator().await;

    // Under the older schema: a grant with an odd notAfter, and the policy's status with an odd
    // condition time, as a user with status rights could write it.
    install_these_crds(&private.client, crds_without_date_time_patterns()).await;
    let mut odd = grant_spec("vm1", &[22], "203.0.113.9/32", "PT1H");
    odd["duration"] = Value::Null;
    odd["notAfter"] = json!(ODD_TIME);
    // Created raw: the typed model refuses it, which is the point.
    let raw: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": {"name": "odd", "namespace": env.ns}, "spec": odd
    }))
    .expect("raw grant");
    // Raw APIs: the typed model cannot read back what these calls return.
    let raw_policies = portcullis::controller::decode::raw_api::<portcullis::api::JitPolicy>(
        private.client.clone(),
        Some(&env.ns),
    );
    let raw_grants = portcullis::controller::decode::raw_api::<AccessGrant>(
        private.client.clone(),
        Some(&env.ns),
    );
    raw_grants
        .create(&kube::api::PostParams::default(), &raw)
        .await
        .expect("the older schema admits the odd notAfter");
    let odd_condition = json!({"status": {"conditions": [{
        "type": "Ready", "status": "True", "reason": "Enforced", "message": "vandalised",
        "lastTransitionTime": ODD_TIME}]}});
    raw_policies
        .patch_status(
            "prod",
            &PatchParams::default(),
            &Patch::Merge(&odd_condition),
        )
        .await
        .expect("odd policy status admitted");
    let expires = lapsing_status.expires_at.expect("expiresAt").0;
    wait_for("lapsing's expiry to pass", T, || async {
        (jiff::Timestamp::now() > expires).then_some(())
    })
    .await;

    // A restart with both present: the lapsed grant closes, new grants open, the policy's Deny
    // rules stay as they stand (it cannot be read, so nothing of it is removed).
    let telemetry = env.start_operator();
    env.wait_grant_phase("lapsing", GrantPhase::Expired, T)
        .await;
    env.wait_rules_gone(&lapsing, T).await;
    env.wait_event("odd", "Undecodable", T).await;
    env.wait_event("prod", "Undecodable", T).await;
    wait_for("the undecodable gauge", T, || async {
        let body = telemetry.encode().ok()?;
        (body.contains("portcullis_undecodable_objects{kind=\"AccessGrant\"} 1")
            && body.contains("portcullis_undecodable_objects{kind=\"JitPolicy\"} 1"))
        .then_some(())
    })
    .await;
    let deny_now: Vec<String> = owned_rules_without_etags(&env)
        .await
        .iter()
        .map(|r| rule_name(r).to_string())
        .filter(|n| deny_before.contains(n))
        .collect();
    assert_eq!(
        deny_now, deny_before,
        "an unreadable policy keeps its Deny rules"
    );
    let odd_grant = raw_grants.get("odd").await.expect("odd");
    assert!(
        odd_grant.data.get("status").is_none(),
        "nothing was done for the odd grant"
    );

    // A grant under a policy that cannot be read fails closed.
    env.wait_grant_phase("vandalised", GrantPhase::Revoked, T)
        .await;
    wait_for(
        "the rules of the grant under the unreadable policy closed",
        T,
        || async {
            let a = env.grant_names_in_nsg("nsg-vm1", &vandalised).await;
            let b = env.grant_names_in_nsg("nsg-subnet", &vandalised).await;
            (a.is_empty() && b.is_empty()).then_some(())
        },
    )
    .await;

    // The policy readable again: it is served again, and grants open under it.
    let fixed = json!({"status": {"conditions": [{
        "type": "Ready", "status": "False", "reason": "Fixed", "message": "readable",
        "lastTransitionTime": "2030-01-01T00:00:00Z"}]}});
    raw_policies
        .patch_status("prod", &PatchParams::default(), &Patch::Merge(&fixed))
        .await
        .expect("fixed");
    env.wait_policy_ready("prod", T).await;
    let later = env
        .create_grant("later", grant_spec("vm1", &[22], "203.0.113.10/32", "PT1H"))
        .await;
    env.wait_grant_condition("later", "Ready", "Opened", T)
        .await;

    // A running operator: a grant vandalised into an undecodable state fails closed.
    raw_grants
        .patch_status(
            "later",
            &PatchParams::default(),
            &Patch::Merge(&odd_condition),
        )
        .await
        .expect("odd grant status admitted");
    env.wait_rules_gone(&later, T).await;
    env.wait_event("later", "Undecodable", T).await;
    env.assert_user_rules_untouched().await;
}

// Defect 9: the flushConnection opt-in sets the property on every NSG written to, and nothing
// else of the NSG changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flush_connections_opt_in_sets_flush_connection_on_every_nsg_written_to() {
    use portcullis::azure::NetworkApi;
    let settings = portcullis::controller::Settings {
        resync: Duration::from_secs(2),
        flush_connections: true,
        ..Default::default()
    };
    let emulator = EmulatorConfig {
        fixture: demo_fixture(),
        ..Default::default()
    };
    let mut env = Env::with("flush", emulator, settings).await;
    let azure = env.azure_client();
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let before = azure.read_nsg(&nsg_id(nsg)).await.expect("read");
        assert_ne!(
            nsg_json::property(&before.raw, "flushConnection").expect("properties"),
            Some(json!(true)),
            "{nsg} starts without it"
        );
    }
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let after = azure.read_nsg(&nsg_id(nsg)).await.expect("read");
        assert_eq!(
            nsg_json::property(&after.raw, "flushConnection").expect("properties"),
            Some(json!(true)),
            "{nsg}"
        );
    }
    env.assert_user_rules_untouched().await;
}
