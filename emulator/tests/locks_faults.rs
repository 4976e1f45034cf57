//! Behaviour over raw HTTP of what can refuse an operator's write for good or on purpose:
//! persistent per-NSG faults, an NSG deleted out from under its users, management locks,
//! `If-Match` preconditions, and rules mixing address families. Plus the whole-NSG PUT
//! round-trip that conditional writes rely on.

mod common;

use common::*;
use portcullis_azure_emulator::{LockLevel, NsgFault};
use reqwest::Method;
use serde_json::{Value, json};

fn nsg_id(nsg: &str) -> String {
    nsg_path(nsg)
}

fn rule_names(nsg: &Value) -> Vec<String> {
    nsg["properties"]["securityRules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

/// The NSG as read, made into a PUT body without the rule named `drop`.
fn nsg_body_without(nsg: &Value, drop: &str) -> Value {
    let mut body = nsg.clone();
    let rules: Vec<Value> = body["properties"]["securityRules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] != drop)
        .cloned()
        .collect();
    body["properties"]["securityRules"] = json!(rules);
    body
}

#[tokio::test]
async fn per_nsg_fault_refuses_one_nsg_until_cleared_while_others_work() {
    let emu = start(demo_config()).await;
    let admin = emu.admin();
    let arm = Arm::login(&emu.base_url()).await;
    let before = arm.get(&nsg_path("nsg-vm1")).await;

    admin
        .set_nsg_fault(&NsgFault {
            nsg: nsg_id("NSG-VM1"),
            status: 403,
            code: None,
            message: None,
            writes_only: false,
        })
        .await
        .unwrap();
    for (method, path, body) in [
        (Method::GET, nsg_path("nsg-vm1"), None),
        (Method::GET, rule_path("nsg-vm1", "allow-https"), None),
        (
            Method::GET,
            format!("{}/securityRules", nsg_path("nsg-vm1")),
            None,
        ),
        (
            Method::PUT,
            rule_path("nsg-vm1", "jit-22"),
            Some(rule_body(120, "22")),
        ),
        (Method::DELETE, rule_path("nsg-vm1", "allow-https"), None),
        (Method::PUT, nsg_path("nsg-vm1"), Some(before.body.clone())),
    ] {
        let r = arm.send(method.clone(), &path, body.as_ref()).await;
        assert_eq!(r.status, 403, "{method} {path}: {r:?}");
        assert_eq!(r.code(), "AuthorizationFailed");
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("does not have authorization"), "{msg}");
    }
    // Another NSG in the same resource group works throughout.
    let other = arm
        .put(&rule_path("nsg-subnet", "jit-22"), &rule_body(120, "22"))
        .await;
    assert_eq!(other.status, 201, "{other:?}");
    arm.wait_op(&other).await;
    assert_eq!(arm.get(&nsg_path("nsg-subnet")).await.status, 200);
    // Nothing changed on the faulted NSG.
    let rules = admin.rules(&nsg_id("nsg-vm1")).await.unwrap();
    assert_eq!(rules.len(), 2);

    // Writes only, another status: reads work again, writes fail.
    admin
        .set_nsg_fault(&NsgFault {
            nsg: nsg_id("nsg-vm1"),
            status: 500,
            code: None,
            message: None,
            writes_only: true,
        })
        .await
        .unwrap();
    assert_eq!(
        admin.state().await.unwrap()["nsg_faults"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "replaced, not added"
    );
    assert_eq!(arm.get(&nsg_path("nsg-vm1")).await.status, 200);
    let w = arm
        .put(&rule_path("nsg-vm1", "jit-22"), &rule_body(120, "22"))
        .await;
    assert_eq!((w.status, w.code().as_str()), (500, "InternalServerError"));

    admin.clear_nsg_fault(&nsg_id("nsg-vm1")).await.unwrap();
    let ok = arm
        .put(&rule_path("nsg-vm1", "jit-22"), &rule_body(120, "22"))
        .await;
    assert_eq!(ok.status, 201, "{ok:?}");
    let stats = admin.stats().await.unwrap();
    assert_eq!(stats.faults_injected, 7);
    emu.shutdown().await;
}

#[tokio::test]
async fn nsg_can_be_deleted_out_from_under_its_users() {
    let emu = start(demo_config()).await;
    let admin = emu.admin();
    let arm = Arm::login(&emu.base_url()).await;
    // ARM refuses to delete an NSG a NIC uses; the admin endpoint detaches it first.
    let refused = arm.delete(&nsg_path("nsg-vm1")).await;
    assert_eq!(refused.code(), "InUseNetworkSecurityGroupCannotBeDeleted");
    admin.delete_nsg_directly(&nsg_id("nsg-vm1")).await.unwrap();
    let gone = arm.get(&nsg_path("nsg-vm1")).await;
    assert_eq!(
        (gone.status, gone.code().as_str()),
        (404, "ResourceNotFound")
    );
    let rule = arm.get(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(rule.status, 404);
    let nic = arm
        .get(&format!("{}/networkInterfaces/vm1-nic", rg_path()))
        .await;
    assert!(
        nic.body["properties"].get("networkSecurityGroup").is_none(),
        "{:?}",
        nic.body
    );
    assert!(admin.delete_nsg_directly(&nsg_id("nsg-vm1")).await.is_err());
    // The subnet's NSG is untouched.
    assert_eq!(arm.get(&nsg_path("nsg-subnet")).await.status, 200);
    emu.shutdown().await;
}

#[tokio::test]
async fn can_not_delete_lock_refuses_rule_delete_but_not_a_whole_nsg_put() {
    let emu = start(demo_config()).await;
    let admin = emu.admin();
    let arm = Arm::login(&emu.base_url()).await;
    let rg = format!("/subscriptions/{SUB}/resourceGroups/{RG}");
    admin.set_lock(&rg, LockLevel::CanNotDelete).await.unwrap();

    let rule_id = rule_path("nsg-vm1", "allow-https");
    let del = arm.delete(&rule_id).await;
    assert_eq!(
        (del.status, del.code().as_str()),
        (409, "ScopeLocked"),
        "{del:?}"
    );
    assert_eq!(
        del.body["error"]["message"],
        format!(
            "The scope '{rule_id}' cannot perform delete operation because following scope(s) are locked: '{rg}'. Please remove the lock and try again."
        )
    );
    assert_eq!(arm.get(&rule_id).await.status, 200, "the rule stays");
    let del_nsg = arm.delete(&nsg_path("nsg-subnet")).await;
    assert_eq!(del_nsg.code(), "ScopeLocked");

    // Modifying is allowed under CanNotDelete.
    let put = arm
        .put(&rule_path("nsg-vm1", "jit-22"), &rule_body(120, "22"))
        .await;
    assert_eq!(put.status, 201, "{put:?}");
    arm.wait_op(&put).await;

    // A PUT of the whole NSG that leaves the rule out removes it despite the lock.
    let nsg = arm.get(&nsg_path("nsg-vm1")).await;
    let whole = arm
        .put(
            &nsg_path("nsg-vm1"),
            &nsg_body_without(&nsg.body, "allow-https"),
        )
        .await;
    assert_eq!(whole.status, 200, "{whole:?}");
    arm.wait_op(&whole).await;
    assert_eq!(arm.get(&rule_id).await.status, 404);
    let after = arm.get(&nsg_path("nsg-vm1")).await;
    assert_eq!(rule_names(&after.body), vec!["user-rule-110", "jit-22"]);

    admin.clear_lock(&rg).await.unwrap();
    let del = arm.delete(&rule_path("nsg-vm1", "jit-22")).await;
    assert_eq!(del.status, 202, "{del:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn read_only_lock_refuses_every_write_under_its_scope() {
    let emu = start(demo_config()).await;
    let admin = emu.admin();
    let arm = Arm::login(&emu.base_url()).await;
    let scope = nsg_id("nsg-vm1");
    admin.set_lock(&scope, LockLevel::ReadOnly).await.unwrap();
    let nsg = arm.get(&nsg_path("nsg-vm1")).await;
    assert_eq!(nsg.status, 200, "reads work");

    let put = arm
        .put(&rule_path("nsg-vm1", "jit-22"), &rule_body(120, "22"))
        .await;
    assert_eq!((put.status, put.code().as_str()), (409, "ScopeLocked"));
    let msg = put.body["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("cannot perform write operation") && msg.contains(&format!("'{scope}'")),
        "{msg}"
    );
    let del = arm.delete(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(del.code(), "ScopeLocked");
    assert!(
        del.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("delete operation")
    );
    let whole = arm
        .put(
            &nsg_path("nsg-vm1"),
            &nsg_body_without(&nsg.body, "allow-https"),
        )
        .await;
    assert_eq!(whole.code(), "ScopeLocked");
    let patch = arm
        .send(
            Method::PATCH,
            &nsg_path("nsg-vm1"),
            Some(&json!({"tags": {"a": "b"}})),
        )
        .await;
    assert_eq!(patch.code(), "ScopeLocked");
    assert_eq!(
        arm.get(&nsg_path("nsg-vm1")).await.body,
        nsg.body,
        "nothing changed"
    );

    // Another NSG is outside the scope.
    let other = arm
        .put(&rule_path("nsg-subnet", "jit-22"), &rule_body(120, "22"))
        .await;
    assert_eq!(other.status, 201, "{other:?}");
    assert_eq!(admin.stats().await.unwrap().rejected, 4);

    admin.clear_locks().await.unwrap();
    let put = arm
        .put(&rule_path("nsg-vm1", "jit-22"), &rule_body(120, "22"))
        .await;
    assert_eq!(put.status, 201, "{put:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn if_match_guards_nsg_and_rule_writes() {
    let emu = start(demo_config()).await;
    let admin = emu.admin();
    let arm = Arm::login(&emu.base_url()).await;
    let nsg = arm.get(&nsg_path("nsg-vm1")).await;
    let etag = nsg.body["etag"].as_str().unwrap().to_string();
    assert!(etag.starts_with("W/\""), "{etag}");
    assert_eq!(nsg.header("etag").as_deref(), Some(etag.as_str()));

    // Someone else writes a rule: the NSG's etag moves.
    admin
        .put_rule_directly(&rule_path("nsg-vm1", "foreign"), &rule_body(130, "3389"))
        .await
        .unwrap();
    let moved = arm.get(&nsg_path("nsg-vm1")).await;
    let current = moved.body["etag"].as_str().unwrap().to_string();
    assert_ne!(current, etag);

    // A PUT based on the stale read is refused with Azure's 412 and changes nothing.
    let stale = arm
        .send_if_match(
            Method::PUT,
            &nsg_path("nsg-vm1"),
            Some(&nsg_body_without(&nsg.body, "allow-https")),
            Some(&etag),
        )
        .await;
    assert_eq!(stale.status, 412, "{stale:?}");
    assert_eq!(stale.body["error"]["code"], "PreconditionFailed");
    assert_eq!(stale.body["error"]["message"], "Precondition failed.");
    let detail = &stale.body["error"]["details"][0];
    assert_eq!(detail["code"], "PreconditionFailedEtagMismatch");
    let expected = format!(
        "Etag provided in if-match header {etag} does not match etag {current} of resource {} in NRP data store.",
        nsg_id("nsg-vm1")
    );
    assert_eq!(detail["message"], expected);
    assert_eq!(arm.get(&nsg_path("nsg-vm1")).await.body, moved.body);

    // With the current etag (or `*`) it goes through; the etag moves again.
    let ok = arm
        .send_if_match(
            Method::PUT,
            &nsg_path("nsg-vm1"),
            Some(&nsg_body_without(&moved.body, "allow-https")),
            Some(&current),
        )
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    arm.wait_op(&ok).await;
    let after = arm.get(&nsg_path("nsg-vm1")).await;
    assert_eq!(rule_names(&after.body), vec!["user-rule-110", "foreign"]);
    assert_ne!(after.body["etag"], json!(current));
    let star = arm
        .send_if_match(
            Method::PUT,
            &nsg_path("nsg-vm1"),
            Some(&after.body),
            Some("*"),
        )
        .await;
    assert_eq!(star.status, 200, "{star:?}");
    arm.wait_op(&star).await;
    // `*` needs the resource to exist.
    let none = arm
        .send_if_match(
            Method::PUT,
            &nsg_path("nsg-new"),
            Some(&json!({"location": "westeurope"})),
            Some("*"),
        )
        .await;
    assert_eq!(none.status, 412, "{none:?}");
    assert_eq!(arm.get(&nsg_path("nsg-new")).await.status, 404);

    // Security rules: PUT and DELETE compare the rule's own etag.
    let rule = arm.get(&rule_path("nsg-vm1", "foreign")).await;
    let rule_etag = rule.body["etag"].as_str().unwrap().to_string();
    assert_eq!(rule.header("etag").as_deref(), Some(rule_etag.as_str()));
    let wrong = "W/\"00000000-0000-0000-0000-000000000000\"";
    let put = arm
        .send_if_match(
            Method::PUT,
            &rule_path("nsg-vm1", "foreign"),
            Some(&rule_body(130, "22")),
            Some(wrong),
        )
        .await;
    assert_eq!(put.status, 412, "{put:?}");
    let del = arm
        .send_if_match(
            Method::DELETE,
            &rule_path("nsg-vm1", "foreign"),
            None,
            Some(wrong),
        )
        .await;
    assert_eq!(del.status, 412, "{del:?}");
    let put = arm
        .send_if_match(
            Method::PUT,
            &rule_path("nsg-vm1", "foreign"),
            Some(&rule_body(130, "22")),
            Some(&rule_etag),
        )
        .await;
    assert_eq!(put.status, 200, "{put:?}");
    arm.wait_op(&put).await;
    let del = arm
        .send_if_match(
            Method::DELETE,
            &rule_path("nsg-vm1", "foreign"),
            None,
            Some(&rule_etag),
        )
        .await;
    assert_eq!(del.status, 412, "the rule's etag moved with its update");
    let fresh = arm.get(&rule_path("nsg-vm1", "foreign")).await;
    let del = arm
        .send_if_match(
            Method::DELETE,
            &rule_path("nsg-vm1", "foreign"),
            None,
            fresh.body["etag"].as_str(),
        )
        .await;
    assert_eq!(del.status, 202, "{del:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn whole_nsg_put_round_trips_unknown_properties_and_flush_connection() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let nsg = arm.get(&nsg_path("nsg-vm1")).await;
    assert_eq!(nsg.body["properties"]["flushConnection"], false);
    let mut body = nsg.body.clone();
    body["properties"]["flushConnection"] = json!(true);
    body["properties"]["futureFeature"] = json!({"mode": "strict", "levels": [1, 2]});
    body["properties"]["securityRules"][0]["properties"]["futureRuleField"] = json!("kept");
    body["tags"] = json!({"owner": "net-team"});
    let put = arm.put(&nsg_path("nsg-vm1"), &body).await;
    assert_eq!(put.status, 200, "{put:?}");
    arm.wait_op(&put).await;

    let got = arm.get(&nsg_path("nsg-vm1")).await;
    let p = &got.body["properties"];
    assert_eq!(p["flushConnection"], true);
    assert_eq!(p["futureFeature"], body["properties"]["futureFeature"]);
    assert_eq!(
        p["provisioningState"], "Succeeded",
        "read-only fields are the emulator's"
    );
    assert_eq!(p["resourceGuid"], nsg.body["properties"]["resourceGuid"]);
    assert_eq!(
        p["securityRules"][0]["properties"]["futureRuleField"],
        "kept"
    );
    assert_eq!(
        p["securityRules"][0]["properties"]["provisioningState"],
        "Succeeded"
    );
    assert_eq!(got.body["tags"], json!({"owner": "net-team"}));
    assert_eq!(rule_names(&got.body), rule_names(&nsg.body));
    // The rule read on its own shows the same field.
    let rule = arm.get(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(rule.body["properties"]["futureRuleField"], "kept");

    let bad = arm
        .put(
            &nsg_path("nsg-vm1"),
            &json!({"location": "westeurope", "properties": {"flushConnection": "yes"}}),
        )
        .await;
    assert_eq!(
        (bad.status, bad.code().as_str()),
        (400, "InvalidRequestFormat")
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn rules_mixing_address_families_are_refused() {
    let emu = start(demo_config()).await;
    let admin = emu.admin();
    let arm = Arm::login(&emu.base_url()).await;
    let mut mixed = rule_body(120, "22");
    mixed["properties"]["sourceAddressPrefix"] = json!("2001:db8::7/128");
    let r = arm.put(&rule_path("nsg-vm1", "jit-22"), &mixed).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.code(),
        "ResourceCannotContainAddressPrefixesFromDifferentAddressFamilies"
    );
    assert_eq!(
        r.body["error"]["message"],
        format!(
            "Resource /subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/networkSecurityGroups/nsg-vm1/securityRules/jit-22 contains IP addresses or prefixes that belong to different address families. All IP addresses or prefixes in the resource should belong to the same address family."
        )
    );

    // Plural destination lists mixing families, inside a whole-NSG PUT.
    let nsg = arm.get(&nsg_path("nsg-vm1")).await;
    let mut body = nsg.body.clone();
    let mut deny = rule_body(130, "22");
    deny["name"] = json!("deny-both");
    deny["properties"]["access"] = json!("Deny");
    deny["properties"]["sourceAddressPrefix"] = json!("*");
    deny["properties"]["destinationAddressPrefix"] = Value::Null;
    deny["properties"]["destinationAddressPrefixes"] = json!(["10.0.1.4", "2001:db8::4"]);
    body["properties"]["securityRules"]
        .as_array_mut()
        .unwrap()
        .push(deny.clone());
    let r = arm.put(&nsg_path("nsg-vm1"), &body).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.code(),
        "ResourceCannotContainAddressPrefixesFromDifferentAddressFamilies"
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/securityRules/deny-both contains")
    );
    assert_eq!(
        admin.rules(&nsg_id("nsg-vm1")).await.unwrap().len(),
        2,
        "nothing changed"
    );

    // One family per rule is fine; `*` stands beside IPv6.
    let mut v6 = rule_body(120, "22");
    v6["properties"]["sourceAddressPrefix"] = json!("2001:db8::7/128");
    v6["properties"]["destinationAddressPrefix"] = json!("2001:db8::4");
    assert_eq!(
        arm.put(&rule_path("nsg-vm1", "jit-22"), &v6).await.status,
        201
    );
    emu.shutdown().await;
}
