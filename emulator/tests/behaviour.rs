//! Behaviour tests over raw HTTP: ARM semantics, validation, throttling, auth, faults,
//! drift, persistence.

mod common;

use std::time::{Duration, Instant};

use common::*;
use portcullis_azure_emulator::{ConfigUpdate, EmulatorConfig, Faults, Fixture};
use serde_json::{Value, json};

fn rule_names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn rule_create_update_and_async_operation() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::from_secs(2),
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    let nsg_before = arm.get(&nsg_path("nsg-vm1")).await;

    let created = arm
        .put(&rule_path("nsg-vm1", "jit-22"), &rule_body(120, "22"))
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body["properties"]["provisioningState"], "Updating");
    assert_eq!(created.body["name"], "jit-22");
    assert_eq!(created.body["properties"]["destinationPortRange"], "22");
    assert_eq!(
        created.body["properties"]["destinationPortRanges"],
        json!([])
    );
    let op_url = created.header("azure-asyncoperation").unwrap();
    assert!(op_url.starts_with(&emu.base_url()), "{op_url}");
    assert!(op_url.contains("/providers/Microsoft.Network/locations/westeurope/operations/"));
    assert!(op_url.ends_with("?api-version=2024-03-01"));
    assert_eq!(created.header("retry-after").as_deref(), Some("0"));
    assert_eq!(
        created
            .header("x-ms-ratelimit-remaining-subscription-writes")
            .as_deref(),
        Some("199")
    );

    // Visible immediately, still Updating; the operation is in progress.
    let got = arm.get(&rule_path("nsg-vm1", "jit-22")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["properties"]["provisioningState"], "Updating");
    let poll = arm.get(&op_url).await;
    assert_eq!(poll.body, json!({"status": "InProgress"}));

    arm.wait_op(&created).await;
    let got = arm.get(&rule_path("nsg-vm1", "jit-22")).await;
    assert_eq!(got.body["properties"]["provisioningState"], "Succeeded");
    let nsg_after = arm.get(&nsg_path("nsg-vm1")).await;
    assert_ne!(
        nsg_before.body["etag"], nsg_after.body["etag"],
        "NSG etag changes on write"
    );

    // Update: 200, etags change again.
    let updated = arm
        .put(&rule_path("nsg-vm1", "jit-22"), &rule_body(120, "2222"))
        .await;
    assert_eq!(updated.status, 200, "{updated:?}");
    assert_ne!(updated.body["etag"], got.body["etag"]);
    assert_eq!(updated.body["properties"]["destinationPortRange"], "2222");
    arm.wait_op(&updated).await;
    let nsg_final = arm.get(&nsg_path("nsg-vm1")).await;
    assert_ne!(nsg_after.body["etag"], nsg_final.body["etag"]);
    let stats = emu.admin().stats().await.unwrap();
    assert_eq!(stats.writes, 2);
    assert!(stats.operation_polls >= 2);
}

#[tokio::test]
async fn rule_delete_is_async_and_idempotent() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::from_millis(1500),
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    let del = arm.delete(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(del.status, 202, "{del:?}");
    let location = del.header("location").expect("Location header");
    assert!(del.header("azure-asyncoperation").is_some());
    assert!(location.contains("/operationResults/"), "{location}");
    let first = arm.get(&location).await;
    assert_eq!(first.status, 202, "in progress");
    eventually(10, "rule gone", || async {
        arm.get(&rule_path("nsg-vm1", "allow-https")).await.status == 404
    })
    .await;
    let gone = arm.get(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(gone.code(), "NotFound");
    assert_eq!(arm.get(&location).await.status, 204);
    let op = arm.get(&del.header("azure-asyncoperation").unwrap()).await;
    assert_eq!(op.body["status"], "Succeeded");
    let again = arm.delete(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(again.status, 204);
}

#[tokio::test]
async fn list_rules_pages_with_next_link() {
    let emu = start(EmulatorConfig {
        page_size: 2,
        async_delay: Duration::ZERO,
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    for (i, prio) in [(1, 121), (2, 122), (3, 123)] {
        let r = arm
            .put(
                &rule_path("nsg-vm1", &format!("jit-{i}")),
                &rule_body(prio, "22"),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let mut names = Vec::new();
    let mut pages = 0;
    let mut next = Some(format!("{}/securityRules", nsg_path("nsg-vm1")));
    while let Some(url) = next {
        let page = arm.get(&url).await;
        assert_eq!(page.status, 200, "{page:?}");
        pages += 1;
        let value = page.body["value"].as_array().unwrap();
        assert!(value.len() <= 2);
        names.extend(rule_names(&page.body["value"]));
        next = page.body["nextLink"].as_str().map(str::to_string);
        if let Some(n) = &next {
            assert!(n.starts_with("http://"), "absolute nextLink: {n}");
            assert!(n.contains("$skipToken="), "{n}");
            assert!(n.contains("api-version=2024-03-01"), "{n}");
        }
    }
    assert_eq!(pages, 3);
    names.sort();
    assert_eq!(
        names,
        ["allow-https", "jit-1", "jit-2", "jit-3", "user-rule-110"]
    );
}

/// Every invalid write answers 400 with the code, and leaves the NSG exactly as it was.
#[tokio::test]
async fn validation_errors_change_nothing() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let before = arm.get(&nsg_path("nsg-vm1")).await;
    let base = rule_body(150, "22");
    let with = |key: &str, value: Value| {
        let mut b = base.clone();
        b["properties"][key] = value;
        b
    };
    let without = |key: &str| {
        let mut b = base.clone();
        b["properties"].as_object_mut().unwrap().remove(key);
        b
    };
    let long_name = "a".repeat(81);
    let cases: Vec<(&str, String, Value, &str)> = vec![
        (
            "priority too low",
            "r1".into(),
            with("priority", json!(99)),
            "SecurityRuleInvalidPriority",
        ),
        (
            "priority too high",
            "r1".into(),
            with("priority", json!(4097)),
            "SecurityRuleInvalidPriority",
        ),
        (
            "priority missing",
            "r1".into(),
            without("priority"),
            "SecurityRuleInvalidPriority",
        ),
        (
            "same priority+direction",
            "r1".into(),
            with("priority", json!(110)),
            "SecurityRuleConflict",
        ),
        (
            "protocol",
            "r1".into(),
            with("protocol", json!("Tcpx")),
            "SecurityRuleInvalidProtocol",
        ),
        (
            "access",
            "r1".into(),
            with("access", json!("Permit")),
            "SecurityRuleInvalidAccess",
        ),
        (
            "direction",
            "r1".into(),
            with("direction", json!("Sideways")),
            "SecurityRuleInvalidDirection",
        ),
        (
            "description",
            "r1".into(),
            with("description", json!("x".repeat(141))),
            "SecurityRuleDescriptionTooLong",
        ),
        (
            "name start",
            "-r1".into(),
            base.clone(),
            "InvalidResourceName",
        ),
        (
            "name end",
            "r1.".into(),
            base.clone(),
            "InvalidResourceName",
        ),
        (
            "name chars",
            "r%201".into(),
            base.clone(),
            "InvalidResourceName",
        ),
        (
            "name length",
            long_name,
            base.clone(),
            "InvalidResourceName",
        ),
        (
            "prefix /33",
            "r1".into(),
            with("sourceAddressPrefix", json!("10.0.0.0/33")),
            "SecurityRuleInvalidAddressPrefix",
        ),
        (
            "prefix garbage",
            "r1".into(),
            with("destinationAddressPrefix", json!("not-an-ip")),
            "SecurityRuleInvalidAddressPrefix",
        ),
        (
            "prefix missing",
            "r1".into(),
            without("sourceAddressPrefix"),
            "SecurityRuleInvalidAddressPrefix",
        ),
        (
            "port too big",
            "r1".into(),
            with("destinationPortRange", json!("70000")),
            "SecurityRuleInvalidPortRange",
        ),
        (
            "port reversed",
            "r1".into(),
            with("destinationPortRange", json!("30-20")),
            "SecurityRuleInvalidPortRange",
        ),
        (
            "port word",
            "r1".into(),
            with("sourcePortRange", json!("ssh")),
            "SecurityRuleInvalidPortRange",
        ),
        (
            "both prefix forms",
            "r1".into(),
            with("sourceAddressPrefixes", json!(["192.0.2.1"])),
            "SecurityRuleParameterContainsUnsupportedValue",
        ),
        (
            "both port forms",
            "r1".into(),
            with("destinationPortRanges", json!(["22"])),
            "SecurityRuleParameterContainsUnsupportedValue",
        ),
        (
            "no properties",
            "r1".into(),
            json!({"name": "r1"}),
            "InvalidRequestFormat",
        ),
        (
            "priority as string",
            "r1".into(),
            with("priority", json!("high")),
            "InvalidRequestFormat",
        ),
    ];
    for (what, name, body, code) in &cases {
        let r = arm.put(&rule_path("nsg-vm1", name), body).await;
        assert_eq!(r.status, 400, "{what}: {r:?}");
        assert_eq!(r.code(), *code, "{what}: {r:?}");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let malformed = arm.put_raw(&rule_path("nsg-vm1", "r1"), "{not json").await;
    assert_eq!(
        (malformed.status, malformed.code().as_str()),
        (400, "InvalidRequestFormat")
    );
    // A whole-NSG PUT with an invalid inline rule is refused too.
    let mut bad_nsg = json!({"location": "westeurope", "properties": {"securityRules": [
        {"name": "ok", "properties": base["properties"].clone()},
    ]}});
    bad_nsg["properties"]["securityRules"][0]["properties"]["priority"] = json!(5000);
    let r = arm.put(&nsg_path("nsg-vm1"), &bad_nsg).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "SecurityRuleInvalidPriority")
    );
    let no_location = arm
        .put(&nsg_path("nsg-vm1"), &json!({"properties": {}}))
        .await;
    assert_eq!(
        (no_location.status, no_location.code().as_str()),
        (400, "LocationRequired")
    );

    let after = arm.get(&nsg_path("nsg-vm1")).await;
    assert_eq!(
        before.body, after.body,
        "refused writes must not change the NSG"
    );
    let stats = emu.admin().stats().await.unwrap();
    assert_eq!(stats.writes, 0);
    assert_eq!(stats.rejected, cases.len() as u64 + 3);

    // The plural forms are accepted and echoed, the singular then absent.
    let mut plural = without("destinationAddressPrefix");
    plural["properties"]["destinationAddressPrefixes"] = json!(["10.0.1.4", "10.0.1.5"]);
    plural["properties"]
        .as_object_mut()
        .unwrap()
        .remove("destinationPortRange");
    plural["properties"]["destinationPortRanges"] = json!(["22", "8000-8100"]);
    let ok = arm.put(&rule_path("nsg-vm1", "plural"), &plural).await;
    assert_eq!(ok.status, 201, "{ok:?}");
    let p = &ok.body["properties"];
    assert_eq!(
        p["destinationAddressPrefixes"],
        json!(["10.0.1.4", "10.0.1.5"])
    );
    assert_eq!(p["destinationPortRanges"], json!(["22", "8000-8100"]));
    assert!(p.get("destinationAddressPrefix").is_none());
    assert!(p.get("destinationPortRange").is_none());
    assert_eq!(p["sourceAddressPrefixes"], json!([]));
}

#[tokio::test]
async fn too_many_rules_is_refused() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::ZERO,
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    let admin = emu.admin();
    // nsg-vm1 has 2 rules; drift 998 more in (inbound and outbound priorities).
    for i in 0..998u32 {
        let (prio, dir) = if i < 499 {
            (400 + i, "Inbound")
        } else {
            (400 + i - 499, "Outbound")
        };
        let mut body = rule_body(i64::from(prio), "22");
        body["properties"]["direction"] = json!(dir);
        let id = format!("{}/securityRules/bulk-{i}", nsg_path("nsg-vm1"));
        admin.put_rule_directly(&id, &body).await.unwrap();
    }
    assert_eq!(admin.rules(&nsg_path("nsg-vm1")).await.unwrap().len(), 1000);
    let before = arm.get(&nsg_path("nsg-vm1")).await;
    let r = arm
        .put(
            &rule_path("nsg-vm1", "one-too-many"),
            &rule_body(4000, "22"),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.code(), "SecurityRuleCountLimitReached");
    assert_eq!(arm.get(&nsg_path("nsg-vm1")).await.body, before.body);
    // Replacing an existing rule is still allowed at the limit.
    let r = arm
        .put(&rule_path("nsg-vm1", "bulk-0"), &rule_body(4000, "23"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// Azure's 4,000 IP addresses and ranges per NSG, summed over its rules and counted apart for
/// sources and destinations, on both ways of writing rules.
#[tokio::test]
async fn too_many_addresses_in_an_nsg_is_refused() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::ZERO,
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    let ips = |n: usize, third: u8| -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{third}.{}.{}", i / 250, i % 250 + 1))
            .collect()
    };
    let wide = |name: &str, priority: i64, sources: Vec<String>, destinations: Vec<String>| {
        let mut body = rule_body(priority, "22");
        let p = &mut body["properties"];
        p.as_object_mut().unwrap().remove("sourceAddressPrefix");
        p.as_object_mut()
            .unwrap()
            .remove("destinationAddressPrefix");
        p["sourceAddressPrefixes"] = json!(sources);
        p["destinationAddressPrefixes"] = json!(destinations);
        json!({"name": name, "properties": body["properties"].clone()})
    };
    let nsg = |rules: Vec<Value>| json!({"location": "westeurope", "properties": {"securityRules": rules}});

    // 4,000 sources and 4,000 destinations, over two rules: at the limit on both sides.
    let at_limit = nsg(vec![
        wide("a", 130, ips(2000, 1), ips(3999, 2)),
        wide("b", 131, ips(2000, 3), vec!["10.9.0.1".into()]),
    ]);
    let r = arm.put(&nsg_path("nsg-wide"), &at_limit).await;
    assert_eq!(r.status, 201, "{r:?}");
    arm.wait_op(&r).await;
    let before = arm.get(&nsg_path("nsg-wide")).await;

    // One more source, in a rule of its own: refused, nothing changed.
    let r = arm
        .put(&rule_path("nsg-wide", "c"), &rule_body(132, "22"))
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.code(),
        "SecurityRuleAddressesOrPortsPerSecurityGroupLimitReached"
    );
    assert!(
        r.body.to_string().contains("4001 SourceAddressPrefixes"),
        "{r:?}"
    );
    assert_eq!(arm.get(&nsg_path("nsg-wide")).await.body, before.body);

    // Replacing a rule counts its new addresses instead of its old ones.
    let narrower = wide("b", 131, ips(1999, 3), vec!["10.9.0.1".into()]);
    let r = arm
        .put(
            &rule_path("nsg-wide", "b"),
            &json!({"properties": narrower["properties"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    arm.wait_op(&r).await;

    // The whole NSG in one write: one destination too many.
    let over = nsg(vec![
        wide("a", 130, ips(10, 1), ips(4000, 2)),
        wide("b", 131, ips(10, 3), vec!["10.9.0.1".into()]),
    ]);
    let before = arm.get(&nsg_path("nsg-wide")).await;
    let r = arm.put(&nsg_path("nsg-wide"), &over).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        r.code(),
        "SecurityRuleAddressesOrPortsPerSecurityGroupLimitReached"
    );
    assert!(
        r.body
            .to_string()
            .contains("4001 DestinationAddressPrefixes"),
        "{r:?}"
    );
    assert_eq!(arm.get(&nsg_path("nsg-wide")).await.body, before.body);
}

#[tokio::test]
async fn one_write_at_a_time_per_nsg() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::from_secs(2),
        retry_after_secs: 3,
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    let first = arm
        .put(&rule_path("nsg-vm1", "a"), &rule_body(121, "22"))
        .await;
    assert_eq!(first.status, 201);
    let nsg_mid = arm.get(&nsg_path("nsg-vm1")).await;
    let second = arm
        .put(&rule_path("nsg-vm1", "b"), &rule_body(122, "22"))
        .await;
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.code(), "RetryableErrorDueToAnotherOperation");
    assert_eq!(second.header("retry-after").as_deref(), Some("3"));
    let del = arm.delete(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(
        (del.status, del.code().as_str()),
        (429, "RetryableErrorDueToAnotherOperation")
    );
    assert_eq!(
        arm.get(&nsg_path("nsg-vm1")).await.body,
        nsg_mid.body,
        "429 changes nothing"
    );
    // Another NSG is independent.
    let other = arm
        .put(&rule_path("nsg-subnet", "b"), &rule_body(122, "22"))
        .await;
    assert_eq!(other.status, 201);
    arm.wait_op(&first).await;
    let retry = arm
        .put(&rule_path("nsg-vm1", "b"), &rule_body(122, "22"))
        .await;
    assert_eq!(retry.status, 201, "{retry:?}");
    let stats = emu.admin().stats().await.unwrap();
    assert_eq!(stats.conflicts, 2);
}

#[tokio::test]
async fn subscription_writes_are_throttled() {
    let emu = start(EmulatorConfig {
        write_burst: 3,
        write_refill_per_sec: 0.25,
        async_delay: Duration::ZERO,
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    for (i, remaining) in [(1, "2"), (2, "1"), (3, "0")] {
        let r = arm
            .put(
                &rule_path("nsg-subnet", &format!("t{i}")),
                &rule_body(120 + i, "22"),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(
            r.header("x-ms-ratelimit-remaining-subscription-writes")
                .as_deref(),
            Some(remaining)
        );
    }
    let before = arm.get(&nsg_path("nsg-subnet")).await;
    let r = arm
        .put(&rule_path("nsg-subnet", "t4"), &rule_body(124, "22"))
        .await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.code(), "SubscriptionRequestsThrottled");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=4).contains(&retry), "{retry}");
    assert_eq!(
        r.header("x-ms-ratelimit-remaining-subscription-writes")
            .as_deref(),
        Some("0")
    );
    assert_eq!(arm.get(&nsg_path("nsg-subnet")).await.body, before.body);
    // Reads are not throttled.
    assert_eq!(arm.get(&nsg_path("nsg-subnet")).await.status, 200);
    let stats = emu.admin().stats().await.unwrap();
    assert_eq!(
        (stats.throttled, stats.writes, stats.write_attempts),
        (1, 3, 4)
    );
    // Raising the limit at runtime refills the bucket.
    emu.admin()
        .set_config(&ConfigUpdate {
            write_burst: Some(10),
            ..ConfigUpdate::default()
        })
        .await
        .unwrap();
    let r = arm
        .put(&rule_path("nsg-subnet", "t4"), &rule_body(124, "22"))
        .await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn subscription_reads_and_deletes_have_buckets_of_their_own() {
    let emu = start(EmulatorConfig {
        read_burst: 4,
        read_refill_per_sec: 0.25,
        delete_burst: 1,
        delete_refill_per_sec: 0.25,
        write_burst: 10,
        async_delay: Duration::ZERO,
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    // A write is charged to writes only.
    let put = arm
        .put(&rule_path("nsg-subnet", "d1"), &rule_body(130, "22"))
        .await;
    assert_eq!(put.status, 201, "{put:?}");
    assert_eq!(
        put.header("x-ms-ratelimit-remaining-subscription-writes")
            .as_deref(),
        Some("9")
    );
    assert_eq!(
        put.header("x-ms-ratelimit-remaining-subscription-reads"),
        None
    );
    // Reads, an operation poll among them, spend the read bucket.
    let op = put.header("azure-asyncoperation").expect("operation URL");
    let poll = arm.get(&op).await;
    assert_eq!(poll.status, 200, "{poll:?}");
    assert_eq!(
        poll.header("x-ms-ratelimit-remaining-subscription-reads")
            .as_deref(),
        Some("3")
    );
    for remaining in ["2", "1", "0"] {
        let r = arm.get(&nsg_path("nsg-subnet")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.header("x-ms-ratelimit-remaining-subscription-reads")
                .as_deref(),
            Some(remaining)
        );
        assert_eq!(
            r.header("x-ms-ratelimit-remaining-subscription-writes"),
            None
        );
    }
    let r = arm.get(&nsg_path("nsg-subnet")).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.code(), "SubscriptionRequestsThrottled");
    let message = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("'read'"), "{message}");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=4).contains(&retry), "{retry}");
    assert_eq!(
        r.header("x-ms-ratelimit-remaining-subscription-reads")
            .as_deref(),
        Some("0")
    );
    // Polls are throttled like any read.
    assert_eq!(arm.get(&op).await.status, 429);
    // Deletes: a bucket of their own (one token here), with their own header.
    let del = arm.delete(&rule_path("nsg-subnet", "d1")).await;
    assert!(del.status == 202 || del.status == 200, "{del:?}");
    assert_eq!(
        del.header("x-ms-ratelimit-remaining-subscription-deletes")
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        del.header("x-ms-ratelimit-remaining-subscription-writes"),
        None
    );
    let again = arm.delete(&rule_path("nsg-subnet", "d1")).await;
    assert_eq!(again.status, 429, "{again:?}");
    assert!(
        again.body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("'delete'")
    );
    // Writes still have room.
    let put = arm
        .put(&rule_path("nsg-subnet", "d2"), &rule_body(131, "22"))
        .await;
    assert_eq!(put.status, 201, "{put:?}");
    let stats = emu.admin().stats().await.unwrap();
    assert_eq!(
        (stats.reads_throttled, stats.throttled),
        (2, 1),
        "{stats:?}"
    );
    // Raising the read limit at runtime refills the bucket.
    emu.admin()
        .set_config(&ConfigUpdate {
            read_burst: Some(5),
            ..ConfigUpdate::default()
        })
        .await
        .unwrap();
    let r = arm.get(&nsg_path("nsg-subnet")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-ms-ratelimit-remaining-subscription-reads")
            .as_deref(),
        Some("4")
    );
}

#[tokio::test]
async fn arm_requires_an_issued_bearer_token() {
    let emu = start(demo_config()).await;
    let http = reqwest::Client::new();
    let url = format!(
        "{}{}?api-version=2024-03-01",
        emu.base_url(),
        nsg_path("nsg-vm1")
    );
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "AuthenticationFailed");
    let r = http.get(&url).bearer_auth("forged").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "InvalidAuthenticationToken");
    let tok = token(&http, &emu.base_url()).await;
    assert_eq!(
        http.get(&url)
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let stats = emu.admin().stats().await.unwrap();
    assert_eq!(stats.auth_failures, 2);
}

#[tokio::test]
async fn token_endpoint_secret_assertion_and_managed_identity() {
    let emu = start(EmulatorConfig {
        credentials: Some(("portcullis".into(), "s3cret".into())),
        ..demo_config()
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/my-tenant/oauth2/v2.0/token", emu.base_url());
    let post = |form: Vec<(&'static str, &'static str)>| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.post(&url).form(&form).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = post(vec![
        ("grant_type", "client_credentials"),
        ("client_id", "portcullis"),
        ("client_secret", "s3cret"),
        ("scope", "https://management.azure.com/.default"),
    ])
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["expires_in"].is_u64() && v["ext_expires_in"].is_u64());
    assert!(v["access_token"].as_str().is_some_and(|t| t.len() > 20));

    let (status, v) = post(vec![
        ("grant_type", "client_credentials"),
        ("client_id", "portcullis"),
        ("client_secret", "wrong"),
    ])
    .await;
    assert_eq!((status, v["error"].as_str()), (401, Some("invalid_client")));
    let (status, v) = post(vec![
        ("grant_type", "client_credentials"),
        ("client_id", "someone"),
        ("client_secret", "s3cret"),
    ])
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("unauthorized_client"))
    );
    let (status, v) = post(vec![
        ("client_id", "portcullis"),
        ("client_secret", "s3cret"),
    ])
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, v) = post(vec![
        ("grant_type", "password"),
        ("client_id", "portcullis"),
    ])
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );

    for assertion in ["federated-token-1", "federated-token-2"] {
        let form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", "portcullis"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", "https://management.azure.com/.default"),
        ];
        let (status, v) = post(form).await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, _) = post(vec![
        ("grant_type", "client_credentials"),
        ("client_id", "portcullis"),
        ("client_assertion_type", "bogus"),
        ("client_assertion", "x"),
    ])
    .await;
    assert_eq!(status, 400);

    let mi = format!(
        "{}/metadata/identity/oauth2/token?api-version=2019-08-01&resource=https://management.azure.com",
        emu.base_url()
    );
    let r = http
        .get(&mi)
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["expires_on"].is_string() && v["access_token"].is_string());
    // The managed identity token is accepted by ARM.
    let arm_url = format!(
        "{}{}?api-version=2024-03-01",
        emu.base_url(),
        nsg_path("nsg-vm1")
    );
    let r = http
        .get(&arm_url)
        .bearer_auth(v["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        http.get(&mi).send().await.unwrap().status(),
        400,
        "Metadata header required"
    );

    let stats = emu.admin().stats().await.unwrap();
    assert_eq!(stats.tokens_issued, 4);
    assert_eq!(stats.tokens_by_grant.get("client_secret"), Some(&1));
    assert_eq!(stats.tokens_by_grant.get("client_assertion"), Some(&2));
    assert_eq!(stats.tokens_by_grant.get("managed_identity"), Some(&1));
    assert_eq!(
        stats.last_client_assertion.as_deref(),
        Some("federated-token-2")
    );
    assert_eq!(stats.tokens_by_assertion.get("federated-token-1"), Some(&1));
    assert_eq!(
        stats.token_failures, 6,
        "5 refused at the token endpoint, 1 at the managed identity endpoint"
    );
}

#[tokio::test]
async fn faults_errors_latency_drops_and_429s() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let admin = emu.admin();
    let path = nsg_path("nsg-vm1");

    admin
        .set_faults(&Faults {
            error_count: 2,
            error_status: 503,
            ..Faults::default()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let r = arm.get(&path).await;
        assert_eq!((r.status, r.code().as_str()), (503, "ServiceUnavailable"));
    }
    assert_eq!(arm.get(&path).await.status, 200);

    admin
        .set_faults(&Faults {
            error_rate: 1.0,
            ..Faults::default()
        })
        .await
        .unwrap();
    let r = arm.get(&path).await;
    assert_eq!((r.status, r.code().as_str()), (500, "InternalServerError"));
    admin.clear_faults().await.unwrap();
    assert_eq!(arm.get(&path).await.status, 200);

    admin
        .set_faults(&Faults {
            latency_ms: 300,
            ..Faults::default()
        })
        .await
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(arm.get(&path).await.status, 200);
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    admin.clear_faults().await.unwrap();

    admin
        .set_faults(&Faults {
            drop_count: 1,
            ..Faults::default()
        })
        .await
        .unwrap();
    let dropped = arm
        .http
        .get(arm.url(&path))
        .bearer_auth(&arm.token)
        .send()
        .await;
    assert!(
        dropped.is_err(),
        "connection should be dropped: {dropped:?}"
    );
    assert_eq!(arm.get(&path).await.status, 200);

    admin
        .set_faults(&Faults {
            throttle_count: 1,
            throttle_retry_after_secs: 7,
            writes_only: true,
            ..Faults::default()
        })
        .await
        .unwrap();
    assert_eq!(arm.get(&path).await.status, 200, "writes_only spares reads");
    let before = arm.get(&path).await;
    let r = arm
        .put(&rule_path("nsg-vm1", "x"), &rule_body(130, "22"))
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (429, "SubscriptionRequestsThrottled")
    );
    assert_eq!(r.header("retry-after").as_deref(), Some("7"));
    assert_eq!(arm.get(&path).await.body, before.body);

    let stats = admin.stats().await.unwrap();
    assert_eq!(stats.faults_injected, 5);
    assert_eq!(stats.writes, 0);
    let records = admin.requests().await.unwrap();
    assert!(
        records.iter().any(|r| r.status == 0),
        "the dropped request is recorded with status 0"
    );
    assert!(records.iter().any(|r| r.status == 503));
}

#[tokio::test]
async fn drift_admin_endpoints() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let admin = emu.admin();
    let id = format!("{}/securityRules/portcullis-drift", nsg_path("nsg-vm1"));
    let before = arm.get(&nsg_path("nsg-vm1")).await;
    admin
        .put_rule_directly(&id, &rule_body(140, "3389"))
        .await
        .unwrap();
    let got = arm.get(&rule_path("nsg-vm1", "portcullis-drift")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["properties"]["destinationPortRange"], "3389");
    assert_eq!(got.body["properties"]["provisioningState"], "Succeeded");
    assert_ne!(
        arm.get(&nsg_path("nsg-vm1")).await.body["etag"],
        before.body["etag"]
    );
    let rules = admin.rules(&nsg_path("nsg-vm1")).await.unwrap();
    assert_eq!(rules.len(), 3);
    // Change by hand, then delete by hand.
    admin
        .put_rule_directly(&id, &rule_body(140, "3390"))
        .await
        .unwrap();
    let got = arm.get(&rule_path("nsg-vm1", "portcullis-drift")).await;
    assert_eq!(got.body["properties"]["destinationPortRange"], "3390");
    admin.delete_rule_directly(&id).await.unwrap();
    assert_eq!(
        arm.get(&rule_path("nsg-vm1", "portcullis-drift"))
            .await
            .status,
        404
    );
    assert!(
        admin.delete_rule_directly(&id).await.is_err(),
        "second delete: not found"
    );
    let stats = admin.stats().await.unwrap();
    assert_eq!(
        (stats.writes, stats.write_attempts),
        (0, 0),
        "drift is not an operator write"
    );
    let bad = admin.put_rule_directly("/not/a/rule/id", &json!({})).await;
    assert!(bad.is_err());
}

#[tokio::test]
async fn state_file_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let config = EmulatorConfig {
        state_file: Some(state.clone()),
        async_delay: Duration::from_secs(5),
        ..demo_config()
    };
    let emu = start(config.clone()).await;
    let arm = Arm::login(&emu.base_url()).await;
    // Still in progress at shutdown: persisted as completed.
    let r = arm
        .put(&rule_path("nsg-vm1", "jit-persist"), &rule_body(125, "22"))
        .await;
    assert_eq!(r.status, 201);
    let del = arm.delete(&rule_path("nsg-subnet", "deny-telnet")).await;
    assert_eq!(del.status, 202);
    emu.shutdown().await;
    assert!(state.exists());

    let emu = start(EmulatorConfig {
        fixture: Fixture::default(),
        ..config
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    let got = arm.get(&rule_path("nsg-vm1", "jit-persist")).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body["properties"]["provisioningState"], "Succeeded");
    assert_eq!(
        arm.get(&rule_path("nsg-subnet", "deny-telnet"))
            .await
            .status,
        404
    );
    assert_eq!(
        arm.get(&rule_path("nsg-vm1", "allow-https")).await.status,
        200
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn api_version_is_required_and_checked() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let missing = arm.get(&format!("{}?x=1", nsg_path("nsg-vm1"))).await;
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (400, "MissingApiVersionParameter")
    );
    let unknown = arm
        .get(&format!("{}?api-version=2099-01-01", nsg_path("nsg-vm1")))
        .await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (400, "InvalidApiVersionParameter")
    );
    let put = arm
        .send(
            reqwest::Method::PUT,
            &format!("{}?api-version=2020-01-01", rule_path("nsg-vm1", "r")),
            Some(&rule_body(130, "22")),
        )
        .await;
    assert_eq!(put.status, 400);
    assert_eq!(emu.admin().stats().await.unwrap().writes, 0);
}

#[tokio::test]
async fn not_found_codes_and_case_insensitive_ids() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let r = arm.get(&nsg_path("nope")).await;
    assert_eq!((r.status, r.code().as_str()), (404, "ResourceNotFound"));
    let r = arm.get(&rule_path("nsg-vm1", "nope")).await;
    assert_eq!((r.status, r.code().as_str()), (404, "NotFound"));
    let r = arm
        .get(&format!("{}/networkInterfaces/nope", rg_path()))
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "ResourceNotFound"));
    let r = arm
        .get(&format!(
            "{}/virtualNetworks/vnet-demo/subnets/nope",
            rg_path()
        ))
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "ResourceNotFound"));
    let r = arm.get(&format!("/subscriptions/{SUB}/resourceGroups/rg-nope/providers/Microsoft.Network/networkSecurityGroups/nsg-vm1")).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (404, "ResourceGroupNotFound")
    );
    let r = arm.put(&format!("/subscriptions/{SUB}/resourceGroups/rg-nope/providers/Microsoft.Network/networkSecurityGroups/n"), &json!({"location": "westeurope"})).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (404, "ResourceGroupNotFound")
    );
    let r = arm
        .get("/subscriptions/other/providers/Microsoft.Network/networkSecurityGroups")
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "SubscriptionNotFound"));

    let upper = format!(
        "/SUBSCRIPTIONS/{SUB}/RESOURCEGROUPS/RG-DEMO/PROVIDERS/MICROSOFT.NETWORK/NETWORKSECURITYGROUPS/NSG-VM1/SECURITYRULES/ALLOW-HTTPS"
    );
    let r = arm.get(&upper).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["name"], "allow-https", "fixture casing preserved");
    assert_eq!(
        r.body["id"],
        format!("{}/securityRules/allow-https", nsg_path("nsg-vm1"))
    );
}

#[tokio::test]
async fn nics_subnets_and_nsgs_read() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let nic = arm
        .get(&format!("{}/networkInterfaces/vm1-nic", rg_path()))
        .await;
    assert_eq!(nic.status, 200);
    let p = &nic.body["properties"];
    assert_eq!(
        p["virtualMachine"]["id"],
        format!(
            "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/vm1"
        )
    );
    assert_eq!(p["networkSecurityGroup"]["id"], nsg_path("nsg-vm1"));
    let ipc = &p["ipConfigurations"][0]["properties"];
    assert_eq!(ipc["privateIPAddress"], "10.0.1.4");
    assert_eq!(ipc["privateIPAllocationMethod"], "Dynamic");
    assert_eq!(ipc["primary"], true);
    assert_eq!(
        ipc["subnet"]["id"],
        format!("{}/virtualNetworks/vnet-demo/subnets/app", rg_path())
    );
    let nic2 = arm
        .get(&format!("{}/networkInterfaces/vm2-nic", rg_path()))
        .await;
    assert!(
        nic2.body["properties"]
            .get("networkSecurityGroup")
            .is_none()
    );

    let subnet = arm
        .get(&format!(
            "{}/virtualNetworks/vnet-demo/subnets/app",
            rg_path()
        ))
        .await;
    assert_eq!(subnet.status, 200);
    assert_eq!(subnet.body["properties"]["addressPrefix"], "10.0.1.0/24");
    assert_eq!(
        subnet.body["properties"]["networkSecurityGroup"]["id"],
        nsg_path("nsg-subnet")
    );

    let nics = arm.get(&format!("{}/networkInterfaces", rg_path())).await;
    assert_eq!(rule_names(&nics.body["value"]), ["vm1-nic", "vm2-nic"]);
    let all = arm
        .get(&format!(
            "/subscriptions/{SUB}/providers/Microsoft.Network/networkInterfaces"
        ))
        .await;
    assert_eq!(all.body["value"].as_array().unwrap().len(), 2);
    let nsgs = arm
        .get(&format!("{}/networkSecurityGroups", rg_path()))
        .await;
    assert_eq!(rule_names(&nsgs.body["value"]), ["nsg-vm1", "nsg-subnet"]);
    let nsg = arm.get(&nsg_path("nsg-vm1")).await;
    let p = &nsg.body["properties"];
    assert_eq!(p["defaultSecurityRules"].as_array().unwrap().len(), 6);
    assert_eq!(p["securityRules"].as_array().unwrap().len(), 2);
    assert!(nsg.body["etag"].as_str().unwrap().starts_with("W/\""));
    assert!(p["resourceGuid"].is_string());
    let d = arm
        .get(&format!(
            "{}/defaultSecurityRules/DenyAllInBound",
            nsg_path("nsg-vm1")
        ))
        .await;
    assert_eq!(d.body["properties"]["priority"], 65500);
    // Counted apart: where VMs are (two NICs, a subnet, two NIC lists), then the NSG reads.
    let stats = emu.admin().stats().await.unwrap();
    assert_eq!((stats.topology_reads, stats.reads), (5, 8), "{stats:?}");
}

#[tokio::test]
async fn nsg_create_and_delete() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::from_millis(50),
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    let body = json!({"location": "westeurope", "properties": {"securityRules": [
        {"name": "rule1", "properties": rule_body(130, "80")["properties"].clone()}
    ]}});
    let r = arm.put(&nsg_path("nsg-new"), &body).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r.header("azure-asyncoperation").is_some());
    assert_eq!(
        r.body["properties"]["defaultSecurityRules"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    arm.wait_op(&r).await;
    let r2 = arm.put(&nsg_path("nsg-new"), &body).await;
    assert_eq!(r2.status, 200);
    arm.wait_op(&r2).await;
    let del = arm.delete(&nsg_path("nsg-new")).await;
    assert_eq!(del.status, 202);
    assert!(del.header("location").is_some());
    eventually(10, "NSG deleted", || async {
        arm.get(&nsg_path("nsg-new")).await.status == 404
    })
    .await;
    assert_eq!(arm.delete(&nsg_path("nsg-new")).await.status, 204);
    let in_use = arm.delete(&nsg_path("nsg-vm1")).await;
    assert_eq!(
        (in_use.status, in_use.code().as_str()),
        (400, "InUseNetworkSecurityGroupCannotBeDeleted")
    );
}

#[tokio::test]
async fn request_log_and_state_dump() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let admin = emu.admin();
    admin.clear_requests().await.unwrap();
    arm.get(&nsg_path("nsg-vm1")).await;
    let log = admin.requests().await.unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].method, "GET");
    assert!(
        log[0].path.ends_with("nsg-vm1?api-version=2024-03-01"),
        "{}",
        log[0].path
    );
    assert_eq!(log[0].status, 200);
    assert!(log[0].at.contains('T') && log[0].at_unix_ms > 0);
    admin.clear_requests().await.unwrap();
    assert!(admin.requests().await.unwrap().is_empty());
    let dump = admin.state().await.unwrap();
    assert_eq!(
        dump["subscriptions"][0]["resourceGroups"][0]["networkSecurityGroups"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
