//! Issue 8, defect 6: ownership is the exact name grammar with this installation's id. Two
//! installations sharing NSGs keep each other's rules, a person's look-alike rule survives, and
//! rules named the way they were before installation ids are migrated only where adopted.

mod support;

use std::sync::Arc;
use std::time::Duration;

use portcullis::api::GrantPhase;
use portcullis::controller::Settings;
use portcullis::controller::telemetry::Telemetry;
use portcullis::plan::naming::{self, Installation, Naming};
use serde_json::{Value, json};

use support::operator::{Env, grant_spec, nsg_id, prop, rule_name, standard_policy};
use support::wait_for;

const T: Duration = Duration::from_secs(30);
const NSGS: [&str; 2] = ["nsg-vm1", "nsg-subnet"];

fn naming_of(id: &str, adopt_legacy: bool) -> Naming {
    Naming::new(Installation::new(id).expect("valid id"), adopt_legacy)
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

/// Waits until every operator has finished `n` more successful reconciles of each of `kinds`:
/// the 2 s resync guarantees they come, and a rule an operator would delete has been deleted by
/// then.
async fn wait_more_reconciles(telemetries: &[&Arc<Telemetry>], kinds: &[&str], n: f64) {
    let count = |t: &Telemetry| -> Vec<f64> { kinds.iter().map(|k| reconciles(t, k)).collect() };
    let start: Vec<Vec<f64>> = telemetries.iter().map(|t| count(t)).collect();
    wait_for(&format!("{n} more reconciles of {kinds:?}"), T, || async {
        telemetries
            .iter()
            .zip(&start)
            .all(|(t, before)| count(t).iter().zip(before).all(|(now, b)| *now >= b + n))
            .then_some(())
    })
    .await;
}

const BOTH: &[&str] = &["jitpolicy", "accessgrant"];

/// Every rule of both NSGs whose name satisfies `keep`, without etags (they move with any write
/// to the NSG) and provisioning states (a fresh rule settles from `Updating`), sorted by name.
async fn rules_where(env: &Env, keep: impl Fn(&str) -> bool) -> Vec<Value> {
    let mut out = Vec::new();
    for nsg in NSGS {
        for mut rule in env.rules(nsg).await {
            if !keep(rule_name(&rule)) {
                continue;
            }
            if let Some(obj) = rule.as_object_mut() {
                obj.remove("etag");
            }
            if let Some(props) = rule["properties"].as_object_mut() {
                props.remove("provisioningState");
            }
            out.push(rule);
        }
    }
    out.sort_by(|a, b| rule_name(a).cmp(rule_name(b)));
    out
}

async fn put_rule(env: &Env, nsg: &str, rule: &Value) {
    env.admin
        .put_rule_directly(
            &format!("{}/securityRules/{}", nsg_id(nsg), rule_name(rule)),
            rule,
        )
        .await
        .unwrap_or_else(|e| panic!("put {}: {e}", rule_name(rule)));
}

fn user_rule(name: &str, priority: u16, port: &str) -> Value {
    json!({"name": name, "properties": {
        "protocol": "Tcp", "sourceAddressPrefix": "192.0.2.0/24", "sourcePortRange": "*",
        "destinationAddressPrefix": "*", "destinationPortRange": port, "access": "Allow",
        "priority": priority, "direction": "Inbound", "description": "a person's rule"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installations_sharing_nsgs_keep_each_others_rules() {
    let mut env = Env::new("inst-blue").await;
    // A person's rule that starts like ours, in the priority the allow band would pick first.
    put_rule(
        &env,
        "nsg-vm1",
        &user_rule("Portcullis-Bastion", 100, "2222"),
    )
    .await;
    put_rule(
        &env,
        "nsg-subnet",
        &user_rule("portcullis-foo", 4000, "2223"),
    )
    .await;
    let user_before = env.foreign_rules().await;
    assert!(
        user_before
            .iter()
            .any(|r| rule_name(r) == "Portcullis-Bastion")
    );

    // Blue watches the test's namespace, green a second one; no leader election.
    let blue_naming = naming_of("blue", false);
    let green_naming = naming_of("green", false);
    env.settings.naming = blue_naming.clone();
    let blue_ns = env.ns.clone();
    let green_ns = support::kube::fresh_namespace(&env.client, "inst-green").await;
    env.allow_namespace(&green_ns).await;
    let blue = env.spawn_replica(env.settings.clone());
    let green = env.spawn_replica(Settings {
        naming: green_naming.clone(),
        namespaces: vec![green_ns.clone()],
        ..env.settings.clone()
    });

    // One after the other, so the two never race for the same free priority (Azure refuses a
    // second rule at a taken priority).
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT1H"))
        .await;
    // Opened, not just Active: a grant is recorded Active before its rules are written.
    env.wait_grant_condition("alice", "Ready", "Opened", T)
        .await;
    // The Env helpers act on `env.ns`: point them at green's namespace for its objects.
    env.ns = green_ns.clone();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant("bob", grant_spec("vm1", &[22], "203.0.113.8/32", "PT1H"))
        .await;
    env.wait_grant_condition("bob", "Ready", "Opened", T).await;
    env.ns = blue_ns;

    let blue_rules = rules_where(&env, |n| blue_naming.is_owned(n)).await;
    let green_rules = rules_where(&env, |n| green_naming.is_owned(n)).await;
    // Per installation: vm1 (3 ports: a TCP and a UDP Deny rule) is governed by both NSGs, vm2
    // (1 port, its own Deny rule) by the subnet's; the grant's Allow rule stands in both of vm1's
    // NSGs.
    for (who, rules) in [("blue", &blue_rules), ("green", &green_rules)] {
        let allows = rules
            .iter()
            .filter(|r| prop(r, "access") == "Allow")
            .count();
        let denies = rules.iter().filter(|r| prop(r, "access") == "Deny").count();
        assert_eq!((allows, denies), (2, 5), "{who}: {rules:#?}");
    }
    let writes = (blue.writes(), green.writes());

    // Several resyncs of both: nobody deletes, moves or rewrites anybody else's rule.
    wait_more_reconciles(&[&blue.telemetry, &green.telemetry], BOTH, 3.0).await;
    assert_eq!(
        rules_where(&env, |n| blue_naming.is_owned(n)).await,
        blue_rules
    );
    assert_eq!(
        rules_where(&env, |n| green_naming.is_owned(n)).await,
        green_rules
    );
    assert_eq!(
        (blue.writes(), green.writes()),
        writes,
        "steady state: no installation writes"
    );
    env.assert_foreign_rules_as(&user_before).await;

    // Blue closes its grant: only blue's Allow rule goes.
    env.delete_grant("alice").await;
    env.wait_gone_grant("alice", T).await;
    // Blue has no grant left to reconcile; its policy still resyncs.
    wait_more_reconciles(&[&blue.telemetry], &["jitpolicy"], 2.0).await;
    wait_more_reconciles(&[&green.telemetry], BOTH, 2.0).await;
    let blue_after = rules_where(&env, |n| blue_naming.is_owned(n)).await;
    assert!(
        blue_after.iter().all(|r| prop(r, "access") == "Deny") && blue_after.len() == 5,
        "{blue_after:#?}"
    );
    assert_eq!(
        rules_where(&env, |n| green_naming.is_owned(n)).await,
        green_rules
    );
    env.assert_foreign_rules_as(&user_before).await;

    for replica in [blue, green] {
        let _ = replica.shutdown.send(());
        match tokio::time::timeout(T, replica.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("operator did not stop cleanly: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_named_rules_are_migrated_only_where_adopted() {
    let mut env = Env::new("inst-legacy").await;
    env.settings.naming = naming_of("default", false);
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT1H"))
        .await;
    let alice = env.wait_grant_phase("alice", GrantPhase::Active, T).await;
    let current = wait_for("alice's rule", T, || async {
        env.grant_names_in_nsg("nsg-vm1", &alice).await.pop()
    })
    .await;
    env.stop_operator().await;

    // The NSG as an operator from before installation ids left it: alice's Allow rule under
    // its legacy name, and a legacy orphan of a grant long gone.
    let uid = alice.metadata.uid.clone().expect("uid");
    let legacy_name = naming::legacy_grant_rule_name(&uid, portcullis::api::Protocol::Tcp);
    let mut legacy = current.clone();
    legacy["name"] = json!(legacy_name);
    if let Some(obj) = legacy.as_object_mut() {
        obj.remove("etag");
        obj.remove("id");
    }
    let orphan_name = "portcullis-a-0123456789-tcp";
    let mut orphan = legacy.clone();
    orphan["name"] = json!(orphan_name);
    orphan["properties"]["priority"] = json!(150);
    put_rule(&env, "nsg-vm1", &orphan).await;
    env.admin
        .delete_rule_directly(&format!(
            "{}/securityRules/{}",
            nsg_id("nsg-vm1"),
            rule_name(&current)
        ))
        .await
        .expect("delete the current rule");
    put_rule(&env, "nsg-vm1", &legacy).await;
    let has = |rules: &[Value], name: &str| rules.iter().any(|r| rule_name(r) == name);

    // Adoption off: legacy rules are someone else's, left exactly as they are; alice's rule
    // comes back under its own name beside them.
    let legacy_before = rules_where(&env, |n| n == legacy_name || n == orphan_name).await;
    assert_eq!(legacy_before.len(), 2);
    let telemetry = env.start_operator();
    wait_for("alice's current rule back", T, || async {
        has(&env.rules("nsg-vm1").await, rule_name(&current)).then_some(())
    })
    .await;
    wait_more_reconciles(&[&telemetry], BOTH, 3.0).await;
    assert_eq!(
        rules_where(&env, |n| n == legacy_name || n == orphan_name).await,
        legacy_before
    );
    env.stop_operator().await;

    // Adoption on: the legacy Allow rule of the live grant is replaced by the current one, the
    // legacy orphan goes; nothing else moves.
    let user_before = env.foreign_rules().await;
    env.settings.naming = naming_of("default", true);
    let telemetry = env.start_operator();
    wait_for("legacy rules gone", T, || async {
        let rules = env.rules("nsg-vm1").await;
        (!has(&rules, &legacy_name) && !has(&rules, orphan_name)).then_some(())
    })
    .await;
    wait_more_reconciles(&[&telemetry], BOTH, 2.0).await;
    let rules = env.rules("nsg-vm1").await;
    assert!(has(&rules, rule_name(&current)), "{rules:#?}");
    assert!(!has(&rules, &legacy_name) && !has(&rules, orphan_name));
    assert_eq!(
        env.grant_names_in_nsg("nsg-vm1", &alice).await.len(),
        1,
        "one Allow rule for alice"
    );
    env.assert_foreign_rules_as(&user_before).await;
    env.stop_operator().await;
}
