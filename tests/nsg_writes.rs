//! How the operator writes and reads an NSG. A round with several
//! changes goes to Azure as one conditional write of the whole NSG (`If-Match` on the etag just
//! read), re-planned from a fresh read on 412, so that a rule someone else wrote in between
//! survives.

mod support;

use std::sync::Arc;
use std::time::Duration;

use portcullis::api::{AccessGrant, GrantPhase};
use portcullis::azure::BucketSpec;
use portcullis::controller::Settings;
use portcullis::controller::telemetry::Telemetry;
use serde_json::json;
use support::operator::{Env, grant_spec, lists_nsgs, nsg_id, reads_nsg, standard_policy};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn several_changes_go_in_one_conditional_write_that_keeps_a_rule_written_in_between() {
    let mut env = Env::new("onewrite").await;
    env.settings.one_write_per_nsg = true;
    // Someone else writes a rule into nsg-vm1 between the operator's read and its write.
    let foreign = format!("{}/securityRules/someone-elses-rule", nsg_id("nsg-vm1"));
    env.admin
        .interleave_rule(
            &foreign,
            &json!({"properties": {
                "protocol": "Tcp", "sourcePortRange": "*", "destinationPortRange": "8443",
                "sourceAddressPrefix": "192.0.2.0/24", "destinationAddressPrefix": "*",
                "access": "Allow", "priority": 600, "direction": "Inbound"
            }}),
        )
        .await
        .expect("interleave a write");
    env.admin.clear_requests().await.expect("clear requests");
    env.start_operator();
    // vm1 lists three ports: two Deny rules (TCP 22 and 3389, UDP 53) for nsg-vm1 in one round.
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;

    let rules = env.rules("nsg-vm1").await;
    let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    assert!(
        names.contains(&"someone-elses-rule"),
        "the rule written in between survives: {names:?}"
    );
    let denies: Vec<_> = env
        .owned_rules("nsg-vm1")
        .await
        .into_iter()
        .filter(|r| r["properties"]["access"] == "Deny")
        .collect();
    assert_eq!(
        denies.len(),
        2,
        "one Deny rule per protocol of vm1: {names:?}"
    );

    let requests = env.admin.requests().await.expect("requests");
    let nsg_puts: Vec<u16> = requests
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/networkSecurityGroups/nsg-vm1?"))
        .map(|r| r.status)
        .collect();
    assert_eq!(
        nsg_puts.first(),
        Some(&412),
        "the first write met the interleaved one: {nsg_puts:?}"
    );
    assert!(
        nsg_puts.iter().any(|s| (200..300).contains(s)),
        "then one write, planned from a fresh read, went through: {nsg_puts:?}"
    );
    let rule_writes = requests
        .iter()
        .filter(|r| {
            r.method != "GET"
                && r.path
                    .contains("/networkSecurityGroups/nsg-vm1/securityRules/")
        })
        .count();
    assert_eq!(
        rule_writes, 0,
        "no per-rule write for a round of several changes"
    );
}

/// In a quiet steady state the NSGs are read by one list of their resource group's NSGs per
/// resync period (the sweep), however many grants and policies touch them, and never one by
/// one: a sync asked for the same rules as the last one, which found the NSG in line, answers
/// without reading Azure.
#[tokio::test]
async fn a_quiet_steady_state_reads_the_nsgs_by_one_list_per_resync_whatever_the_number_of_grants()
{
    let mut env = Env::new("steady").await;
    let resync = env.settings.resync;
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let mut names = Vec::new();
    for i in 1..=4 {
        let vm1 = format!("ssh-vm1-{i}");
        env.create_grant(
            &vm1,
            grant_spec("vm1", &[22], &format!("203.0.113.{i}"), "PT1H"),
        )
        .await;
        let vm2 = format!("ssh-vm2-{i}");
        env.create_grant(
            &vm2,
            grant_spec("vm2", &[22], &format!("198.51.100.{i}"), "PT1H"),
        )
        .await;
        names.extend([vm1, vm2]);
    }
    for name in &names {
        env.wait_grant_phase(name, GrantPhase::Active, T).await;
        env.wait_grant_condition(name, "Ready", "Opened", T).await;
    }
    // Nine objects touch the two NSGs. Watch until the resource group's NSGs were listed three
    // times: at least two resync periods.
    env.admin.clear_requests().await.expect("clear requests");
    let since = std::time::Instant::now();
    let deadline = since + T;
    let requests = loop {
        let requests = env.admin.requests().await.expect("requests");
        if requests.iter().filter(|r| lists_nsgs(r)).count() >= 3 {
            break requests;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the NSGs listed three times within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let periods = since.elapsed().as_secs_f64() / resync.as_secs_f64();
    let lists = requests.iter().filter(|r| lists_nsgs(r)).count() as f64;
    assert!(
        lists <= periods + 2.0,
        "{lists} lists in {periods:.1} resync periods"
    );
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let own: Vec<_> = requests
            .iter()
            .filter(|r| reads_nsg(r, nsg))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert!(own.is_empty(), "{nsg} read on its own: {own:?}");
    }
    let writes: Vec<_> = requests
        .iter()
        .filter(|r| r.method != "GET" && r.path.contains("/networkSecurityGroups/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(writes.is_empty(), "no writes in a steady state: {writes:?}");
}

/// Grants expiring at the same instant in one NSG close together: one write of each NSG that
/// holds their rules, not one delete per rule one after another (Azure serialises writes to an
/// NSG, each a long-running operation).
#[tokio::test]
async fn expiries_due_at_the_same_instant_close_in_one_write_per_nsg() {
    let mut env = Env::new("closeone").await;
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let not_after = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(10))
        .round(jiff::Unit::Second)
        .expect("round")
        .to_string();
    let names: Vec<String> = (1..=4).map(|i| format!("ssh-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let mut spec = grant_spec("vm1", &[22], &format!("203.0.113.{}", i + 1), "PT1H");
        let o = spec.as_object_mut().expect("object");
        o.remove("duration");
        o.insert("notAfter".into(), json!(not_after));
        env.create_grant(name, spec).await;
    }
    for name in &names {
        env.wait_grant_condition(name, "Ready", "Opened", T).await;
    }
    env.admin.clear_requests().await.expect("clear requests");
    for name in &names {
        env.wait_grant_phase(name, GrantPhase::Expired, T).await;
    }
    let requests = env.admin.requests().await.expect("requests");
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let writes: Vec<String> = requests
            .iter()
            .filter(|r| support::is_write_to_nsg(r, nsg))
            .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
            .collect();
        assert_eq!(
            writes.len(),
            1,
            "the four rules in {nsg} close in one write: {writes:#?}"
        );
        assert!(
            writes[0].starts_with("PUT ")
                && (writes[0].ends_with("-> 200") || writes[0].ends_with("-> 201")),
            "one accepted PUT of the NSG: {writes:?}"
        );
    }
    for name in &names {
        let g = env.grants().get(name).await.expect("grant");
        assert!(
            g.status.map(|s| s.rules.is_empty()).unwrap_or(false),
            "{name} lists no standing rule"
        );
    }
}

/// The demo world plus four VMs, each behind an NSG of its own (`nsg-a` .. `nsg-d`), in the
/// demo subnet.
fn four_more_nsgs() -> portcullis_azure_emulator::Fixture {
    let mut world = serde_json::to_value(support::operator::demo_fixture()).expect("fixture");
    let rg = &mut world["subscriptions"][0]["resourceGroups"][0];
    for (i, v) in ["a", "b", "c", "d"].iter().enumerate() {
        let nsgs = rg["networkSecurityGroups"].as_array_mut().expect("NSGs");
        nsgs.push(json!({"name": format!("nsg-{v}")}));
        let nics = rg["networkInterfaces"].as_array_mut().expect("NICs");
        nics.push(
            json!({"name": format!("vm-{v}-nic"), "virtualMachine": format!("vm-{v}"),
            "networkSecurityGroup": format!("nsg-{v}"),
            "ipConfigurations": [{"name": "ipconfig1",
                "privateIPAddress": format!("10.0.1.{}", 10 + i), "subnet": "vnet-demo/app"}]}),
        );
    }
    serde_json::from_value(world).expect("fixture")
}

/// Waiting on Azure's long-running operations holds no reconcile slot: with a single slot and
/// writes that each take 5 s, grants on four VMs behind four NSGs are written together, not one
/// after another.
#[tokio::test]
async fn a_reconcile_slot_is_not_held_while_azure_writes() {
    const OPERATION: Duration = Duration::from_secs(5);
    let emulator = portcullis_azure_emulator::EmulatorConfig {
        fixture: four_more_nsgs(),
        ..Default::default()
    };
    let settings = portcullis::controller::Settings {
        concurrency: 1,
        resync: Duration::from_secs(2),
        ..Default::default()
    };
    let mut env = Env::with("oneslot", emulator, settings).await;
    env.start_operator();
    let vms = ["a", "b", "c", "d"];
    let ports = json!([{"number": 22, "protocol": "TCP",
        "allowedSourceAddressPrefixes": ["203.0.113.0/24"], "maxRequestAccessDuration": "PT1H"}]);
    let policy: Vec<_> = vms
        .iter()
        .map(|v| json!({"id": support::operator::vm_id(&format!("vm-{v}")), "ports": ports}))
        .collect();
    env.create_policy("prod", json!({ "virtualMachines": policy }))
        .await;
    env.wait_policy_ready("prod", T).await;
    env.admin
        .set_config(&portcullis_azure_emulator::ConfigUpdate {
            async_delay_ms: Some(OPERATION.as_millis() as u64),
            ..Default::default()
        })
        .await
        .expect("slow operations");
    env.admin.clear_requests().await.expect("clear requests");
    for v in vms {
        let spec = grant_spec(&format!("vm-{v}"), &[22], "203.0.113.9", "PT1H");
        env.create_grant(&format!("ssh-{v}"), spec).await;
    }
    for v in vms {
        env.wait_grant_condition(&format!("ssh-{v}"), "Ready", "Opened", T * 2)
            .await;
    }
    let requests = env.admin.requests().await.expect("requests");
    let first_writes: Vec<i64> = vms
        .iter()
        .map(|v| {
            requests
                .iter()
                .filter(|r| support::is_write_to_nsg(r, &format!("nsg-{v}")))
                .map(|r| r.at_unix_ms)
                .min()
                .unwrap_or_else(|| panic!("no write to nsg-{v}: {requests:#?}"))
        })
        .collect();
    let (first, last) = (
        first_writes.iter().min().copied().unwrap_or_default(),
        first_writes.iter().max().copied().unwrap_or_default(),
    );
    // One slot held across each 5 s operation would space them 5 s apart at least.
    assert!(
        last - first < OPERATION.as_millis() as i64,
        "the four NSGs' first writes began within one operation of each other: {first_writes:?}"
    );
}

/// The operator running against a write bucket of `burst` that barely refills (as the
/// operator's pacing knows it, without a reserve), with the standard policy enforced and a
/// first grant opened in vm1's two NSGs.
async fn first_grant_open_with_write_burst(
    name: &str,
    burst: u32,
) -> (Env, Arc<Telemetry>, AccessGrant) {
    let bucket = BucketSpec {
        burst,
        refill_per_sec: 0.05,
    };
    let emulator = portcullis_azure_emulator::EmulatorConfig {
        fixture: support::operator::demo_fixture(),
        write_burst: bucket.burst,
        write_refill_per_sec: bucket.refill_per_sec,
        ..Default::default()
    };
    let settings = Settings {
        resync: Duration::from_secs(30),
        ..Default::default()
    };
    let mut env = Env::with(name, emulator, settings).await;
    env.pacing.write = bucket;
    env.pacing.reserve = 0.0;
    let telemetry = env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let first = env
        .create_grant("first", grant_spec("vm1", &[22], "203.0.113.7/32", "PT5M"))
        .await;
    env.wait_grant_condition("first", "Ready", "Opened", T)
        .await;
    (env, telemetry, first)
}

/// In a burst, an NSG's opens go out less often the lower the write budget runs: a grant's open
/// waits until the NSG's last write is 1 s x (burst / tokens left) old, or until requests have
/// stopped coming for a quarter of that, and then carries every grant that arrived meanwhile.
#[tokio::test]
async fn opens_arriving_while_the_write_budget_runs_low_go_together_once_they_stop_coming() {
    // The policy and the first grant leave 2 of 6 writes: a spacing of 3 s, quiet after 0.75 s.
    let (env, _, _) = first_grant_open_with_write_burst("spacing", 6).await;
    let writes_to_vm1 = |requests: &[portcullis_azure_emulator::RequestRecord]| -> Vec<i64> {
        requests
            .iter()
            .filter(|r| support::is_write_to_nsg(r, "nsg-vm1") && (200..300).contains(&r.status))
            .map(|r| r.at_unix_ms)
            .collect()
    };
    let before = writes_to_vm1(&env.admin.requests().await.expect("requests"));
    let first_open = *before
        .last()
        .expect("the first grant was written to nsg-vm1");

    let more = ["second", "third", "fourth", "fifth"];
    for (i, name) in more.iter().enumerate() {
        let source = format!("203.0.113.{}/32", 10 + i);
        env.create_grant(name, grant_spec("vm1", &[22], &source, "PT5M"))
            .await;
    }
    for name in more {
        env.wait_grant_condition(name, "Ready", "Opened", T).await;
    }
    let after = writes_to_vm1(&env.admin.requests().await.expect("requests"));
    let later = &after[before.len()..];
    // Without the spacing the second grant's open goes at once (a token is there) and the
    // others follow in a write of their own.
    assert_eq!(
        later.len(),
        1,
        "the four opens went in one write to nsg-vm1: {later:?}"
    );
    // Without the quiet wake the write waits for the whole spacing (3.07 s after the first,
    // measured); with it, 0.9 s.
    let spaced = later[0] - first_open;
    assert!(
        spaced < 2_000,
        "the write went once the requests stopped, {spaced} ms after the first"
    );
}

/// A close is never held back behind the spacing of opens: a grant deleted while a later
/// grant's open to the same NSGs is being spaced out ends the wait, and its rules go at once
/// (with the later grant's, in the same writes), not when the spacing would have ended.
#[tokio::test]
async fn a_close_asked_while_opens_are_spaced_out_ends_the_wait() {
    // The policy and the first grant leave 2 of 6 writes: a spacing of 3 s, and a write for
    // each of the two NSGs when the close comes.
    let (env, telemetry, first) = first_grant_open_with_write_burst("spacing-close", 6).await;

    env.create_grant("second", grant_spec("vm1", &[22], "203.0.113.8/32", "PT5M"))
        .await;
    support::wait_for("the second grant's open spaced out", T, || async {
        (telemetry.nsgs_spacing_out() > 0).then_some(())
    })
    .await;
    let deleted = std::time::Instant::now();
    env.delete_grant("first").await;
    env.wait_rules_gone(&first, T).await;
    let closed_after = deleted.elapsed();
    // Without the wake the close waits for the spacing to end: 3 s after the first grant's
    // write, or 0.75 s after the last request (751 ms after the delete, measured); with it the
    // close went in 68 ms.
    assert!(
        closed_after < Duration::from_millis(400),
        "the close went {closed_after:?} after the delete"
    );
    env.wait_grant_condition("second", "Ready", "Opened", T)
        .await;
    let metrics = telemetry.encode().expect("metrics");
    let spaced: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_nsg_spacing_seconds_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no spacing counter in:\n{metrics}"));
    assert!(spaced > 0.0, "the spacing's wait is counted: {spaced}");
    assert_eq!(
        telemetry.nsgs_spacing_out(),
        0,
        "no sync is spacing out now"
    );
}
