//! How the operator writes an NSG with `--one-write-per-nsg` (opt-in): a round with several
//! changes goes to Azure as one conditional write of the whole NSG (`If-Match` on the etag just
//! read), re-planned from a fresh read on 412, so that a rule someone else wrote in between
//! survives.

mod support;

use std::time::Duration;

use serde_json::json;
use support::operator::{Env, nsg_id, standard_policy};

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
    // vm1 lists three ports: three Deny rules for nsg-vm1 in one round.
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
    assert_eq!(denies.len(), 3, "one Deny rule per port of vm1: {names:?}");

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
