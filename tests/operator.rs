//! The operator end to end: the real API server, the Azure emulator over HTTP, the operator
//! in-process. Each test has its own namespace, emulator and operator.

mod support;

use std::time::Duration;

use jiff::Timestamp;
use kube::api::DeleteParams;
use portcullis::api::GrantPhase;
use portcullis::api::condition::{self, READY};
use portcullis_azure_emulator::{EmulatorConfig, Faults};
use serde_json::{Value, json};

use support::operator::{
    Env, demo_fixture, grant_spec, nsg_id, prop, reads_nsg_or_lists, rule_name, standard_policy,
    vm_id,
};
use support::wait_for;

const T: Duration = Duration::from_secs(30);

async fn ready_env(prefix: &str) -> Env {
    let mut env = Env::new(prefix).await;
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env
}

fn ports_of(rule: &Value) -> Vec<String> {
    let p = &rule["properties"];
    match p["destinationPortRange"].as_str() {
        Some(one) if !one.is_empty() => vec![one.to_string()],
        _ => p["destinationPortRanges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
    }
}

fn prefixes(rule: &Value, singular: &str, plural: &str) -> Vec<String> {
    let p = &rule["properties"];
    match p[singular].as_str() {
        Some(one) if !one.is_empty() => vec![one.to_string()],
        _ => p[plural]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
    }
}

/// Polls the emulator until the grant's rules are gone from both NSGs; returns when that was seen.
async fn wait_closed(
    env: &Env,
    grant: &portcullis::api::AccessGrant,
    timeout: Duration,
) -> Timestamp {
    wait_for(
        "the grant's rules to be deleted in Azure",
        timeout,
        || async {
            let a = env.grant_names_in_nsg("nsg-vm1", grant).await;
            let b = env.grant_names_in_nsg("nsg-subnet", grant).await;
            (a.is_empty() && b.is_empty()).then(Timestamp::now)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_writes_deny_rules_in_every_governing_nsg() {
    let env = ready_env("deny").await;
    let vm1 = env.owned_rules("nsg-vm1").await;
    let subnet = env.owned_rules("nsg-subnet").await;
    // vm1 has 3 ports and is governed by its NIC's NSG and the subnet's; vm2 (no NIC NSG) one
    // port. Deny rules are aggregated per protocol and port set: vm1's TCP 22 and 3389 in one
    // rule, its UDP 53 in another; vm2's TCP 22 (another port set) in a third.
    assert_eq!(vm1.len(), 2, "{vm1:#?}");
    assert_eq!(subnet.len(), 3, "{subnet:#?}");
    for rule in vm1.iter().chain(subnet.iter()) {
        assert_eq!(prop(rule, "access"), "Deny");
        assert_eq!(prop(rule, "direction"), "Inbound");
        let priority = prop(rule, "priority").as_u64().expect("priority");
        assert!(
            (4000..=4096).contains(&priority),
            "deny priority {priority}"
        );
        let dest = prefixes(
            rule,
            "destinationAddressPrefix",
            "destinationAddressPrefixes",
        );
        assert!(
            dest == ["10.0.1.4"] || dest == ["10.0.1.5"],
            "destination {dest:?}"
        );
    }
    let policy = env.policies().get("prod").await.expect("policy");
    let status = policy.status.expect("status");
    assert_eq!(status.virtual_machine_count, Some(2));
    let vm1_target = status
        .targets
        .iter()
        .find(|t| t.virtual_machine == vm_id("vm1"))
        .expect("vm1 target");
    assert_eq!(
        vm1_target.private_ip_addresses,
        vec!["10.0.1.4".to_string()]
    );
    assert_eq!(vm1_target.network_security_groups.len(), 2);
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_grant_opens_exactly_its_rules_and_closes_them_on_time() {
    let env = ready_env("open").await;
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT6S"))
        .await;
    env.wait_grant_phase("alice", GrantPhase::Active, T).await;
    let grant = wait_for("the grant's rules in status", T, || async {
        let g = env.grants().get("alice").await.ok()?;
        (g.status.as_ref()?.rules.len() == 2).then_some(g)
    })
    .await;
    let status = grant.status.clone().expect("status");
    let expires_at = status.expires_at.clone().expect("expiresAt").0;
    let activated_at = status.activated_at.clone().expect("activatedAt").0;
    assert_eq!(expires_at.duration_since(activated_at).as_secs(), 6);

    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let rules = env.grant_names_in_nsg(nsg, &grant).await;
        assert_eq!(rules.len(), 1, "{nsg}: {rules:#?}");
        let rule = &rules[0];
        assert_eq!(prop(rule, "access"), "Allow");
        assert_eq!(prop(rule, "direction"), "Inbound");
        assert_eq!(prop(rule, "protocol"), "Tcp");
        assert_eq!(
            prefixes(rule, "sourceAddressPrefix", "sourceAddressPrefixes"),
            ["203.0.113.7/32"]
        );
        assert_eq!(
            prefixes(
                rule,
                "destinationAddressPrefix",
                "destinationAddressPrefixes"
            ),
            ["10.0.1.4"]
        );
        assert_eq!(ports_of(rule), ["22"]);
        let priority = prop(rule, "priority").as_u64().expect("priority") as u16;
        assert!((100..=199).contains(&priority));
        // nsg-vm1 carries a user rule at 110; the lowest free priority is 100 in both NSGs.
        assert_eq!(priority, 100, "{nsg}");
        let description = prop(rule, "description").as_str().unwrap_or_default();
        assert!(
            description.contains(&format!("{}/alice", env.ns)),
            "{description}"
        );
        assert!(
            status
                .rules
                .iter()
                .any(|r| r.name == rule_name(rule) && r.priority == priority)
        );
    }

    let closed_at = wait_closed(&env, &grant, Duration::from_secs(20)).await;
    let lag = closed_at.duration_since(expires_at);
    assert!(lag.as_secs_f64() <= 2.0, "closed {lag:?} after expiresAt");
    env.wait_grant_phase("alice", GrantPhase::Expired, T).await;
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_policy_grants_are_denied_with_zero_writes() {
    let env = ready_env("denied").await;
    // Let the policy's writes settle: every NSG synced at least once more after Ready.
    let writes_before = env.writes().await;
    let past = (Timestamp::now() - jiff::SignedDuration::from_secs(60)).to_string();
    let soon = (Timestamp::now() + jiff::SignedDuration::from_secs(3 * 3600)).to_string();
    let mut cases: Vec<(&str, Value, &str)> = vec![
        (
            "port-not-in-policy",
            grant_spec("vm1", &[8080], "203.0.113.7/32", "PT1H"),
            "PortNotInPolicy",
        ),
        (
            "source-outside",
            grant_spec("vm1", &[22], "192.0.2.1/32", "PT1H"),
            "SourceNotAllowed",
        ),
        (
            "too-long",
            grant_spec("vm1", &[22], "203.0.113.7/32", "PT2H"),
            "DurationExceedsPolicy",
        ),
        (
            "too-long-for-one-port",
            grant_spec("vm1", &[22, 3389], "203.0.113.7/32", "PT30M"),
            "DurationExceedsPolicy",
        ),
        (
            "world-v4",
            grant_spec("vm1", &[22], "0.0.0.0/0", "PT1H"),
            "SourceOpenToTheWorld",
        ),
        (
            "world-star",
            grant_spec("vm1", &[22], "*", "PT1H"),
            "SourceOpenToTheWorld",
        ),
        (
            "world-internet",
            grant_spec("vm1", &[22], "Internet", "PT1H"),
            "SourceOpenToTheWorld",
        ),
        (
            "vm-not-in-policy",
            grant_spec("vm9", &[22], "203.0.113.7/32", "PT1H"),
            "VirtualMachineNotInPolicy",
        ),
        (
            "wrong-family",
            grant_spec("vm1", &[22], "2001:db8::1/128", "PT1H"),
            "SourceNotAllowed",
        ),
        (
            "wider-than-allowed",
            grant_spec("vm1", &[22], "203.0.0.0/16", "PT1H"),
            "SourceNotAllowed",
        ),
        (
            "port-of-other-vm",
            grant_spec("vm2", &[3389], "198.51.100.9/32", "PT1H"),
            "PortNotInPolicy",
        ),
    ];
    let mut not_after_past = grant_spec("vm1", &[22], "203.0.113.7/32", "PT1H");
    not_after_past
        .as_object_mut()
        .expect("object")
        .remove("duration");
    not_after_past["notAfter"] = json!(past);
    cases.push(("not-after-past", not_after_past, "NotAfterInPast"));
    let mut not_after_far = grant_spec("vm1", &[22], "203.0.113.7/32", "PT1H");
    not_after_far
        .as_object_mut()
        .expect("object")
        .remove("duration");
    not_after_far["notAfter"] = json!(soon);
    cases.push(("not-after-too-far", not_after_far, "DurationExceedsPolicy"));
    let mut both = grant_spec("vm1", &[22], "203.0.113.7/32", "PT1H");
    both["notAfter"] = json!(soon);
    cases.push(("duration-and-not-after", both, "DurationAndNotAfter"));
    let mut neither = grant_spec("vm1", &[22], "203.0.113.7/32", "PT1H");
    neither.as_object_mut().expect("object").remove("duration");
    cases.push(("no-duration", neither, "NoDuration"));
    assert!(cases.len() >= 10);

    for (name, spec, _) in &cases {
        env.create_grant(name, spec.clone()).await;
    }
    for (name, _, reason) in &cases {
        let g = env.wait_grant_phase(name, GrantPhase::Denied, T).await;
        let status = g.status.expect("status");
        let ready = condition::find(&status.conditions, READY).expect("Ready condition");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, *reason, "{name}: {}", ready.message);
        assert!(!ready.message.is_empty());
        assert_eq!(ready.observed_generation, g.metadata.generation);
        assert!(
            status.expires_at.is_none() && status.rules.is_empty(),
            "{name}"
        );
    }
    assert_eq!(
        env.writes().await,
        writes_before,
        "a denied grant must not write to Azure"
    );
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_grant_closes_it_and_deleting_the_policy_removes_everything() {
    let env = ready_env("revoke").await;
    env.create_grant("bob", grant_spec("vm1", &[22], "203.0.113.8/32", "PT1H"))
        .await;
    env.create_grant("carol", grant_spec("vm1", &[53], "198.51.100.7/32", "PT1H"))
        .await;
    let bob = env.wait_grant_phase("bob", GrantPhase::Active, T).await;
    let carol = env.wait_grant_phase("carol", GrantPhase::Active, T).await;
    wait_for("bob's and carol's rules", T, || async {
        let n = env.grant_names_in_nsg("nsg-vm1", &bob).await.len()
            + env.grant_names_in_nsg("nsg-vm1", &carol).await.len();
        (n == 2).then_some(())
    })
    .await;
    let carol_rule = env.grant_names_in_nsg("nsg-vm1", &carol).await.remove(0);
    assert_eq!(prop(&carol_rule, "protocol"), "Udp");

    env.delete_grant("bob").await;
    env.wait_gone_grant("bob", T).await;
    assert!(env.grant_names_in_nsg("nsg-vm1", &bob).await.is_empty());
    assert!(env.grant_names_in_nsg("nsg-subnet", &bob).await.is_empty());
    assert_eq!(
        env.grant_names_in_nsg("nsg-vm1", &carol).await.len(),
        1,
        "carol stays open"
    );

    env.policies()
        .delete("prod", &DeleteParams::default())
        .await
        .expect("delete policy");
    wait_for("the policy to be gone", T, || async {
        matches!(env.policies().get_opt("prod").await, Ok(None)).then_some(())
    })
    .await;
    assert!(
        env.owned_rules("nsg-vm1").await.is_empty(),
        "{:#?}",
        env.owned_rules("nsg-vm1").await
    );
    assert!(env.owned_rules("nsg-subnet").await.is_empty());
    env.wait_grant_phase("carol", GrantPhase::Revoked, T).await;
    env.assert_user_rules_untouched().await;
}

/// A grant deleted with only the operator's finalizer goes without a last status write: no one
/// could read it (its Event says how it closed). One that another finalizer still holds says in
/// its status that it was closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_grant_reports_its_close_only_while_someone_can_read_it() {
    use futures::{StreamExt, TryStreamExt};
    use kube::ResourceExt;
    use kube::api::{Patch, PatchParams, WatchEvent, WatchParams};
    use portcullis::api::GRANT_FINALIZER;

    const HOLD: &str = "example.com/hold";
    let env = ready_env("gone").await;
    env.create_grant("bob", grant_spec("vm1", &[22], "203.0.113.8/32", "PT1H"))
        .await;
    env.create_grant("carol", grant_spec("vm1", &[53], "198.51.100.7/32", "PT1H"))
        .await;
    let bob = env.wait_grant_phase("bob", GrantPhase::Active, T).await;
    env.wait_grant_phase("carol", GrantPhase::Active, T).await;
    let held = json!({"metadata": {"finalizers": [GRANT_FINALIZER, HOLD]}});
    env.grants()
        .patch("carol", &PatchParams::default(), &Patch::Merge(held))
        .await
        .expect("add a second finalizer to carol");

    let since = bob.resource_version().unwrap_or_default();
    let watch = WatchParams::default().fields("metadata.name=bob");
    let mut events = env
        .grants()
        .watch(&watch, &since)
        .await
        .expect("watch bob")
        .boxed();
    env.delete_grant("bob").await;
    let phases_until_gone = tokio::time::timeout(T, async {
        let mut phases = Vec::new();
        while let Some(event) = events.try_next().await.expect("bob's watch") {
            match event {
                WatchEvent::Modified(g) => phases.push(g.status.and_then(|s| s.phase)),
                WatchEvent::Deleted(_) => return phases,
                _ => {}
            }
        }
        panic!("bob's watch ended before bob was deleted: {phases:?}");
    })
    .await
    .expect("bob deleted in time");
    assert!(
        phases_until_gone
            .iter()
            .all(|p| *p == Some(GrantPhase::Active)),
        "bob was written after its deletion: {phases_until_gone:?}"
    );
    assert!(env.grant_names_in_nsg("nsg-vm1", &bob).await.is_empty());
    assert!(env.grant_names_in_nsg("nsg-subnet", &bob).await.is_empty());
    env.wait_event("bob", "Revoked", T).await;

    env.delete_grant("carol").await;
    let carol = wait_for(
        "carol closed, held by the other finalizer alone",
        T,
        || async {
            let g = env.grants().get_opt("carol").await.ok().flatten()?;
            (g.finalizers() == [HOLD]).then_some(g)
        },
    )
    .await;
    let status = carol.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(GrantPhase::Revoked), "{status:?}");
    assert!(status.rules.is_empty(), "{status:?}");
    assert!(env.grant_names_in_nsg("nsg-vm1", &carol).await.is_empty());
    env.grants()
        .patch(
            "carol",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("release carol");
    env.wait_gone_grant("carol", T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_lapsed_while_the_operator_was_down_is_closed_at_start_up() {
    let mut env = ready_env("lapsed").await;
    env.create_grant("dave", grant_spec("vm1", &[22], "203.0.113.9/32", "PT4S"))
        .await;
    let dave = env.wait_grant_phase("dave", GrantPhase::Active, T).await;
    wait_for("dave's rules", T, || async {
        (env.grant_names_in_nsg("nsg-vm1", &dave).await.len() == 1).then_some(())
    })
    .await;
    env.stop_operator().await;
    let expires_at = dave
        .status
        .as_ref()
        .and_then(|s| s.expires_at.clone())
        .expect("expiresAt")
        .0;
    // Wait (on the clock, the condition under test) until the grant has lapsed with nobody running.
    wait_for("the grant to lapse", T, || async {
        (Timestamp::now() > expires_at).then_some(())
    })
    .await;
    assert_eq!(
        env.grant_names_in_nsg("nsg-vm1", &dave).await.len(),
        1,
        "nothing closed it while down"
    );
    env.start_operator();
    wait_closed(&env, &dave, T).await;
    env.wait_grant_phase("dave", GrantPhase::Expired, T).await;
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_healed_and_foreign_rules_are_respected() {
    let mut env = Env::new("drift").await;
    // A foreign rule at the priority the loop would pick first.
    let squatter = json!({"name": "user-squatter", "properties": {
        "protocol": "Tcp", "sourceAddressPrefix": "192.0.2.0/24", "sourcePortRange": "*",
        "destinationAddressPrefix": "*", "destinationPortRange": "9000", "access": "Allow",
        "priority": 100, "direction": "Inbound"}});
    env.admin
        .put_rule_directly(
            &format!("{}/securityRules/user-squatter", nsg_id("nsg-vm1")),
            &squatter,
        )
        .await
        .expect("squatter");
    // An orphan with our prefix that no object explains (left by a crash).
    let orphan = json!({"name": "portcullis-a-0123456789-tcp", "properties": {
        "protocol": "Tcp", "sourceAddressPrefix": "203.0.113.99/32", "sourcePortRange": "*",
        "destinationAddressPrefix": "10.0.1.4", "destinationPortRange": "22", "access": "Allow",
        "priority": 150, "direction": "Inbound", "description": "portcullis grant gone/gone"}});
    env.admin
        .put_rule_directly(
            &format!(
                "{}/securityRules/portcullis-a-0123456789-tcp",
                nsg_id("nsg-vm1")
            ),
            &orphan,
        )
        .await
        .expect("orphan");
    let foreign_before = env.foreign_rules().await;
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant("erin", grant_spec("vm1", &[22], "203.0.113.10/32", "PT1H"))
        .await;
    let erin = env.wait_grant_phase("erin", GrantPhase::Active, T).await;
    let rule = wait_for("erin's rule in nsg-vm1", T, || async {
        env.grant_names_in_nsg("nsg-vm1", &erin).await.pop()
    })
    .await;
    assert_eq!(
        prop(&rule, "priority"),
        101,
        "100 is taken by a foreign rule, 110 too"
    );
    wait_for("the orphan to be removed", T, || async {
        (!env
            .rules("nsg-vm1")
            .await
            .iter()
            .any(|r| rule_name(r) == "portcullis-a-0123456789-tcp"))
        .then_some(())
    })
    .await;

    // Deleted by hand: comes back (within the 2 s resync).
    let name = rule_name(&rule).to_string();
    let rule_id = format!("{}/securityRules/{name}", nsg_id("nsg-vm1"));
    env.admin
        .delete_rule_directly(&rule_id)
        .await
        .expect("delete by hand");
    wait_for("the deleted rule to come back", T, || async {
        env.rules("nsg-vm1")
            .await
            .into_iter()
            .find(|r| rule_name(r) == name && prop(r, "provisioningState") == "Succeeded")
    })
    .await;
    // Changed by hand (source widened): put back as it was.
    let mut tampered = rule.clone();
    tampered["properties"]["sourceAddressPrefix"] = json!("0.0.0.0/0");
    tampered["properties"]["sourceAddressPrefixes"] = json!([]);
    env.admin
        .put_rule_directly(&rule_id, &tampered)
        .await
        .expect("tamper");
    wait_for("the tampered rule to be restored", T, || async {
        let r = env
            .rules("nsg-vm1")
            .await
            .into_iter()
            .find(|r| rule_name(r) == name)?;
        (prefixes(&r, "sourceAddressPrefix", "sourceAddressPrefixes") == ["203.0.113.10/32"])
            .then_some(())
    })
    .await;
    env.assert_foreign_rules_as(&foreign_before).await;
    env.stop_operator().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_server_errors_delay_but_never_leave_a_grant_open() {
    let env = ready_env("faults").await;
    env.create_grant("frank", grant_spec("vm1", &[22], "203.0.113.11/32", "PT5S"))
        .await;
    // Azure misbehaves while the grant activates and while it expires.
    env.admin
        .set_faults(&Faults {
            throttle_count: 6,
            throttle_retry_after_secs: 1,
            error_count: 6,
            writes_only: true,
            ..Default::default()
        })
        .await
        .expect("faults");
    let frank = env.wait_grant_phase("frank", GrantPhase::Active, T).await;
    wait_for("frank's rules despite faults", T, || async {
        (env.grant_names_in_nsg("nsg-vm1", &frank).await.len() == 1).then_some(())
    })
    .await;
    let expires_at = env
        .grants()
        .get("frank")
        .await
        .expect("grant")
        .status
        .and_then(|s| s.expires_at)
        .expect("expiresAt")
        .0;
    // A burst of 500s and 429s around the expiry; once it has passed, Azure answers again.
    env.admin
        .set_faults(&Faults {
            error_rate: 1.0,
            error_status: 503,
            writes_only: true,
            ..Default::default()
        })
        .await
        .expect("faults");
    wait_for("expiry to pass while Azure fails", T, || async {
        (Timestamp::now() > expires_at + jiff::SignedDuration::from_millis(500)).then_some(())
    })
    .await;
    // While Azure fails, the grant says so: expired, rules still standing, retrying.
    wait_for("the grant to report the Azure failure", T, || async {
        let g = env.grants().get("frank").await.ok()?;
        let ready = g
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")?;
        (ready.reason == "CloseFailed" && ready.message.contains("retrying")).then_some(())
    })
    .await;
    env.admin.clear_faults().await.expect("clear");
    let recovered = Timestamp::now();
    let closed = wait_closed(&env, &frank, T).await;
    assert!(
        closed.duration_since(recovered).as_secs_f64() <= 2.0,
        "closed {:?} after Azure recovered",
        closed.duration_since(recovered)
    );
    env.wait_grant_phase("frank", GrantPhase::Expired, T).await;
    let stats = env.admin.stats().await.expect("stats");
    assert!(
        stats.faults_injected >= 12,
        "faults were injected: {stats:?}"
    );
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_world_makes_zero_writes_over_several_resyncs() {
    let env = ready_env("steady").await;
    // Several grants in the same NSGs: their resyncs come at different moments, some answered
    // by a round of the NSG and some by its last round's outcome.
    let names = ["gina", "gino", "gita", "gus"];
    for (i, name) in names.iter().enumerate() {
        let source = format!("203.0.113.{}/32", 12 + i);
        env.create_grant(name, grant_spec("vm1", &[22], &source, "PT1H"))
            .await;
    }
    let gina = env.wait_grant_phase("gina", GrantPhase::Active, T).await;
    wait_for("gina's rules", T, || async {
        (env.grant_names_in_nsg("nsg-subnet", &gina).await.len() == 1).then_some(())
    })
    .await;
    for name in names {
        env.wait_grant_condition(name, "Ready", "Opened", T).await;
    }
    let writes = env.writes().await;
    let versions = || async {
        let mut versions = Vec::new();
        for name in names {
            let g = env.grants().get(name).await.expect("grant");
            versions.push((name, g.metadata.resource_version, g.status));
        }
        versions
    };
    let before = versions().await;
    env.admin.clear_requests().await.expect("clear log");
    // Several resync periods (2 s each): wait until each NSG has been listed at least 4 more times.
    wait_for(
        "four resyncs of both NSGs",
        Duration::from_secs(40),
        || async {
            let log = env.admin.requests().await.ok()?;
            let lists = |nsg: &str| log.iter().filter(|r| reads_nsg_or_lists(r, nsg)).count();
            (lists("nsg-vm1") >= 4 && lists("nsg-subnet") >= 4).then_some(())
        },
    )
    .await;
    let log = env.admin.requests().await.expect("log");
    let written: Vec<_> = log
        .iter()
        .filter(|r| r.method != "GET" && !r.path.contains("oauth2"))
        .collect();
    assert!(written.is_empty(), "steady state wrote: {written:#?}");
    assert_eq!(env.writes().await, writes);
    // Nor is any grant's status written again (each write would wake every NSG's planning).
    let after = versions().await;
    for ((name, was, old), (_, is, new)) in before.iter().zip(&after) {
        assert_eq!(
            was, is,
            "{name}'s status was rewritten in a steady state: {old:#?} -> {new:#?}"
        );
    }
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapplying_an_expired_grant_does_not_reopen_it() {
    let env = ready_env("gitops").await;
    env.create_grant("hank", grant_spec("vm1", &[22], "203.0.113.13/32", "PT3S"))
        .await;
    let hank = env.wait_grant_phase("hank", GrantPhase::Expired, T).await;
    let expires_at = hank
        .status
        .as_ref()
        .and_then(|s| s.expires_at.clone())
        .expect("expiresAt");
    // GitOps re-applies the manifest with a new duration: spec changes, expiry does not.
    let patch = json!({"spec": {"duration": "PT30M"}});
    env.grants()
        .patch(
            "hank",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("re-apply");
    let writes = env.writes().await;
    env.admin.clear_requests().await.expect("clear");
    wait_for(
        "the operator to see the re-apply (a resync of nsg-vm1)",
        T,
        || async {
            let log = env.admin.requests().await.ok()?;
            (log.iter()
                .filter(|r| reads_nsg_or_lists(r, "nsg-vm1"))
                .count()
                >= 2)
                .then_some(())
        },
    )
    .await;
    let after = env.grants().get("hank").await.expect("grant");
    let status = after.status.expect("status");
    assert_eq!(status.phase, Some(GrantPhase::Expired));
    assert_eq!(status.expires_at, Some(expires_at));
    assert!(env.grant_names_in_nsg("nsg-vm1", &hank).await.is_empty());
    assert_eq!(env.writes().await, writes);
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_waits_for_its_policy_and_proceeds_when_it_appears() {
    let mut env = Env::with(
        "pending",
        EmulatorConfig {
            fixture: demo_fixture(),
            ..Default::default()
        },
        Default::default(),
    )
    .await;
    env.settings.resync = Duration::from_secs(60);
    env.start_operator();
    env.create_grant("ivy", grant_spec("vm1", &[22], "203.0.113.14/32", "PT1H"))
        .await;
    let ivy = env.wait_grant_phase("ivy", GrantPhase::Pending, T).await;
    let reason = ivy
        .status
        .as_ref()
        .and_then(|s| s.conditions.first())
        .map(|c| c.reason.clone());
    assert_eq!(reason.as_deref(), Some("PolicyNotFound"));
    assert_eq!(env.writes().await, 0);
    env.create_policy("prod", standard_policy()).await;
    // Well within the 60 s resync: the policy watch wakes the grant.
    env.wait_grant_phase("ivy", GrantPhase::Active, Duration::from_secs(20))
        .await;
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operator_watching_two_namespaces_keeps_both_namespaces_rules_in_a_shared_nsg() {
    let mut env = Env::new("multi-a").await;
    let other = support::kube::fresh_namespace(&env.client, "multi-b").await;
    env.allow_namespace(&other).await;
    env.settings.namespaces.push(other.clone());
    env.start_operator();
    let policies_b: kube::Api<portcullis::api::JitPolicy> =
        kube::Api::namespaced(env.client.clone(), &other);
    let grants_b: kube::Api<portcullis::api::AccessGrant> =
        kube::Api::namespaced(env.client.clone(), &other);
    env.create_policy("prod", standard_policy()).await;
    let policy_b: portcullis::api::JitPolicy = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "JitPolicy",
        "metadata": {"name": "prod", "namespace": other}, "spec": standard_policy()
    }))
    .expect("policy");
    policies_b
        .create(&Default::default(), &policy_b)
        .await
        .expect("policy in b");
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT1H"))
        .await;
    let grant_b: portcullis::api::AccessGrant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": {"name": "bob", "namespace": other},
        "spec": grant_spec("vm1", &[22], "203.0.113.8/32", "PT1H")
    }))
    .expect("grant");
    grants_b
        .create(&Default::default(), &grant_b)
        .await
        .expect("grant in b");
    let alice = env.wait_grant_phase("alice", GrantPhase::Active, T).await;
    let bob = wait_for("bob Active", T, || async {
        let g = grants_b.get("bob").await.ok()?;
        (g.status.as_ref()?.phase? == GrantPhase::Active).then_some(g)
    })
    .await;
    let both_open = || async {
        let a = env.grant_names_in_nsg("nsg-subnet", &alice).await.len();
        let b = env.grant_names_in_nsg("nsg-subnet", &bob).await.len();
        (a == 1 && b == 1).then_some(())
    };
    wait_for("both grants' rules in the shared subnet NSG", T, both_open).await;
    // Two policies, one per namespace, each keep their own Deny rules too: 2 x 3 in nsg-subnet,
    // 2 x 2 (vm1's TCP and UDP ports) in nsg-vm1, where both grants' rules stand as well. Wait for every
    // write to have finished (all rules `Succeeded`) before judging the steady state: a round
    // is one write per NSG, and the last one may still be running when the counts first match.
    wait_for(
        "both policies' Deny rules written in both NSGs",
        T,
        || async {
            for (nsg, wanted) in [("nsg-subnet", 6), ("nsg-vm1", 4)] {
                let owned = env.owned_rules(nsg).await;
                let deny = owned.iter().filter(|r| prop(r, "access") == "Deny").count();
                let settled = owned
                    .iter()
                    .all(|r| prop(r, "provisioningState") == "Succeeded");
                if deny != wanted || !settled {
                    return None;
                }
            }
            let a = env.grant_names_in_nsg("nsg-vm1", &alice).await.len();
            let b = env.grant_names_in_nsg("nsg-vm1", &bob).await.len();
            (a == 1 && b == 1).then_some(())
        },
    )
    .await;
    // Several resyncs later, neither namespace's reconciles removed the other's rules.
    env.admin.clear_requests().await.expect("clear");
    wait_for("three more syncs of nsg-subnet", T, || async {
        let log = env.admin.requests().await.ok()?;
        (log.iter()
            .filter(|r| reads_nsg_or_lists(r, "nsg-subnet"))
            .count()
            >= 3)
            .then_some(())
    })
    .await;
    assert!(
        both_open().await.is_some(),
        "a namespace's rules were removed by the other's reconciles"
    );
    let log = env.admin.requests().await.expect("log");
    assert!(
        log.iter()
            .all(|r| r.method == "GET" || r.path.contains("oauth2")),
        "steady state wrote: {log:#?}"
    );
    env.assert_user_rules_untouched().await;
}

/// The destinations of a rule (singular or plural field).
fn destinations(rule: &Value) -> Vec<String> {
    prefixes(
        rule,
        "destinationAddressPrefix",
        "destinationAddressPrefixes",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_private_ip_moves_deny_and_allow_rules_within_one_resync() {
    let env = ready_env("ipmove").await;
    // A second policy naming vm1: both share one resolution per resync period.
    env.create_policy(
        "web",
        json!({"virtualMachines": [{"id": vm_id("vm1"), "ports": [
            {"number": 8443, "protocol": "TCP", "allowedSourceAddressPrefixes": ["203.0.113.0/24"], "maxRequestAccessDuration": "PT1H"}
        ]}]}),
    )
    .await;
    env.wait_policy_ready("web", T).await;
    env.create_grant("ivy", grant_spec("vm1", &[22], "203.0.113.14/32", "PT1H"))
        .await;
    let ivy = env.wait_grant_phase("ivy", GrantPhase::Active, T).await;
    // vm1's Deny rules (prod's TCP and UDP rules, web's TCP rule) and ivy's Allow rule, in both
    // NSGs.
    let vm1_rules_at = |ip: &'static str| {
        let env = &env;
        let ivy = &ivy;
        async move {
            for nsg in ["nsg-vm1", "nsg-subnet"] {
                let allow = env.grant_names_in_nsg(nsg, ivy).await;
                if allow.len() != 1 || destinations(&allow[0]) != [ip] {
                    return None;
                }
                let deny_vm1 = env
                    .owned_rules(nsg)
                    .await
                    .into_iter()
                    .filter(|r| prop(r, "access") == "Deny")
                    .filter(|r| destinations(r) != ["10.0.1.5"]) // vm2's
                    .map(|r| destinations(&r))
                    .collect::<Vec<_>>();
                if deny_vm1.len() != 3 || deny_vm1.iter().any(|d| d != &[ip]) {
                    return None;
                }
            }
            Some(())
        }
    };
    wait_for("vm1's rules at 10.0.1.4", T, || vm1_rules_at("10.0.1.4")).await;

    // Deallocate and restart: the NIC comes back with another address.
    let nic = nsg_id("x").replace("networkSecurityGroups/x", "networkInterfaces/vm1-nic");
    env.admin
        .set_nic_private_ip(&nic, None, "10.0.1.40")
        .await
        .expect("new address");
    let changed = std::time::Instant::now();
    wait_for("vm1's rules at 10.0.1.40", T, || vm1_rules_at("10.0.1.40")).await;
    let took = changed.elapsed();
    // At most one resync period (2 s) for the resolution to go stale, plus one sync.
    let bound = env.settings.resync + Duration::from_secs(3);
    assert!(
        took <= bound,
        "rules followed the new address after {took:?} (bound {bound:?})"
    );
    for name in ["prod", "web"] {
        let status = env.policies().get(name).await.expect("policy").status;
        let target = status
            .expect("status")
            .targets
            .into_iter()
            .find(|t| t.virtual_machine == vm_id("vm1"))
            .expect("vm1 target");
        assert_eq!(target.private_ip_addresses, ["10.0.1.40"], "{name}");
    }
    let ivy_now = env.grants().get("ivy").await.expect("ivy");
    assert_eq!(
        ivy_now.status.and_then(|s| s.phase),
        Some(GrantPhase::Active)
    );

    // Cached: vm1 is resolved from its resource group's VM list, read once per resync period
    // however many policies name it and however often they reconcile, and never read alone.
    // Watch three lists go by and check their spacing.
    env.admin.clear_requests().await.expect("clear log");
    let vm_list = "/resourceGroups/rg-demo/providers/Microsoft.Compute/virtualMachines?";
    let reads = wait_for("three lists of vm1's resource group", T, || async {
        let log = env.admin.requests().await.ok()?;
        let at: Vec<i64> = log
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains(vm_list))
            .map(|r| r.at_unix_ms)
            .collect();
        (at.len() >= 3).then_some(at)
    })
    .await;
    let resync_ms = env.settings.resync.as_millis() as i64;
    for pair in reads.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= resync_ms - 100,
            "VMs listed {gap} ms after the previous list (resync {resync_ms} ms): {reads:?}"
        );
    }
    let log = env.admin.requests().await.expect("log");
    assert!(
        !log.iter().any(|r| r.path.contains("/virtualMachines/vm1?")),
        "vm1 was read alone"
    );
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nic_in_another_resource_group_is_governed_too() {
    let mut fixture = demo_fixture();
    let other = portcullis_azure_emulator::Fixture::from_yaml_str(&format!(
        r#"
subscriptions:
  - id: {SUB}
    resourceGroups:
      - name: rg-demo
        location: westeurope
      - name: rg-other
        location: westeurope
        networkSecurityGroups:
          - name: nsg-other
        virtualNetworks:
          - name: vnet-other
            subnets:
              - name: data
                addressPrefix: 10.9.0.0/24
        networkInterfaces:
          - name: vm1-data-nic
            virtualMachine: {vm1}
            networkSecurityGroup: nsg-other
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 10.9.0.7
                subnet: vnet-other/data
"#,
        SUB = support::operator::SUB,
        vm1 = vm_id("vm1")
    ))
    .expect("rg-other");
    // Only rg-other: rg-demo is there for the fixture's cross-reference check.
    fixture.subscriptions[0]
        .resource_groups
        .push(other.subscriptions[0].resource_groups[1].clone());
    let mut env = Env::with(
        "otherrg",
        EmulatorConfig {
            fixture,
            ..Default::default()
        },
        portcullis::controller::Settings {
            resync: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    let policy = env.wait_policy_ready("prod", T).await;
    let nsg_other = nsg_id("nsg-other").replace("/rg-demo/", "/rg-other/");
    let target = policy
        .status
        .expect("status")
        .targets
        .into_iter()
        .find(|t| t.virtual_machine == vm_id("vm1"))
        .expect("vm1 target");
    assert_eq!(target.private_ip_addresses, ["10.0.1.4", "10.9.0.7"]);
    assert!(
        target
            .network_security_groups
            .iter()
            .any(|n| n.eq_ignore_ascii_case(&nsg_other)),
        "{target:?}"
    );

    env.create_grant("jo", grant_spec("vm1", &[22], "203.0.113.15/32", "PT1H"))
        .await;
    env.wait_grant_phase("jo", GrantPhase::Active, T).await;
    // vm1's 2 Deny rules and jo's Allow rule stand in the other resource group's NSG, aimed at
    // both of vm1's addresses.
    let rules = wait_for("vm1's rules in nsg-other", T, || async {
        let rules = env.admin.rules(&nsg_other).await.ok()?;
        let deny = rules.iter().filter(|r| prop(r, "access") == "Deny").count();
        let allow = rules
            .iter()
            .filter(|r| prop(r, "access") == "Allow")
            .count();
        (deny == 2 && allow == 1).then_some(rules)
    })
    .await;
    for rule in &rules {
        assert!(env.settings.naming.is_owned(rule_name(rule)), "{rule:#?}");
        assert_eq!(destinations(rule), ["10.0.1.4", "10.9.0.7"], "{rule:#?}");
    }
    // Resolved from lists: rg-demo's VMs, and the NICs of both resource groups (vm1's second
    // NIC lives in rg-other); never a VM or NIC read one by one.
    let log = env.admin.requests().await.expect("log");
    let paths: Vec<String> = log.iter().map(|r| r.path.to_ascii_lowercase()).collect();
    assert!(
        paths.iter().any(|p| p
            .contains("/resourcegroups/rg-other/providers/microsoft.network/networkinterfaces?")),
        "rg-other's NICs were not listed"
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.contains("/virtualmachines/") || p.contains("/networkinterfaces/")),
        "a VM or NIC was read alone"
    );
    env.assert_user_rules_untouched().await;
}
