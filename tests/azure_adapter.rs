//! The Azure edge against the emulator: the real `azure_mgmt_network` client over HTTP.
//!
//! Every test starts its own emulator on an ephemeral port, drives `AzureNetworkClient`
//! through the `NetworkApi` trait and checks the emulator's resulting state through its admin
//! API. No test sleeps to wait for something: each awaited call returns only when done.

use std::sync::Arc;
use std::time::Duration;

use azure_core::auth::{AccessToken, TokenCredential};
use portcullis::azure::{
    AzureClientOptions, AzureError, AzureNetworkClient, BucketSpec, BudgetKind, CredentialConfig,
    FederatedTokenFileCredential, ImdsCredential, IpConfigView, NetworkApi, NicView, PacingOptions,
    SubnetView, VmNics, build_credential,
};
use portcullis::plan::rule::{Access, Direction, NsgRule, RuleProtocol};
use portcullis_azure_emulator::{
    AdminClient, ConfigUpdate, EmulatorConfig, Faults, Fixture, LockLevel, NsgFault,
    RunningEmulator, spawn,
};
use url::Url;

const SUB: &str = "00000000-0000-0000-0000-000000000001";
const TENANT: &str = "72f988bf-0000-0000-0000-000000000000";
const CLIENT_ID: &str = "portcullis-test";
const SECRET: &str = "s3cret";

const FIXTURE: &str = r#"
subscriptions:
  - id: 00000000-0000-0000-0000-000000000001
    resourceGroups:
      - name: rg1
        location: westeurope
        networkSecurityGroups:
          - name: nsg-nic
            securityRules:
              - name: user-allow-https
                properties:
                  protocol: Tcp
                  sourceAddressPrefix: "*"
                  sourcePortRange: "*"
                  destinationAddressPrefix: "*"
                  destinationPortRange: "443"
                  access: Allow
                  priority: 300
                  direction: Inbound
          - name: nsg-subnet
          - name: nsg-empty
        virtualNetworks:
          - name: vnet1
            subnets:
              - name: app
                addressPrefix: 10.0.1.0/24
                networkSecurityGroup: nsg-subnet
              - name: plain
                addressPrefix: 10.0.2.0/24
        networkInterfaces:
          - name: vm1-nic
            virtualMachine: vm1
            networkSecurityGroup: nsg-nic
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 10.0.1.4
                subnet: vnet1/app
              - name: ipconfig2
                privateIPAddress: 10.0.1.14
                subnet: vnet1/app
          - name: vm1-nic2
            virtualMachine: vm1
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 10.0.2.4
                subnet: vnet1/plain
          - name: vm2-nic
            virtualMachine: vm2
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 10.0.2.5
                subnet: vnet1/plain
          - name: orphan-nic
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 10.0.2.9
                subnet: vnet1/plain
"#;

fn rg_id() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/rg1")
}

fn nsg_id(name: &str) -> String {
    format!(
        "{}/providers/Microsoft.Network/networkSecurityGroups/{name}",
        rg_id()
    )
}

fn vm_id(name: &str) -> String {
    format!(
        "{}/providers/Microsoft.Compute/virtualMachines/{name}",
        rg_id()
    )
}

fn rule(name: &str, priority: u16, port: &str) -> NsgRule {
    NsgRule {
        name: name.to_string(),
        description: format!("portcullis test rule {name}"),
        priority,
        direction: Direction::Inbound,
        access: Access::Allow,
        protocol: RuleProtocol::Tcp,
        source_address_prefixes: vec!["203.0.113.7/32".into()],
        source_port_ranges: vec!["*".into()],
        destination_address_prefixes: vec!["10.0.1.4".into(), "10.0.1.14".into()],
        destination_port_ranges: vec![port.to_string()],
        provisioning_failed: false,
    }
}

fn config() -> EmulatorConfig {
    EmulatorConfig {
        fixture: Fixture::from_yaml_str(FIXTURE).expect("fixture parses"),
        async_delay: Duration::from_millis(20),
        ..EmulatorConfig::default()
    }
}

async fn start(config: EmulatorConfig) -> RunningEmulator {
    spawn(config, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("emulator starts")
}

/// The adapter's own retries are under test here: let them run up to the operation deadline.
fn options() -> AzureClientOptions {
    AzureClientOptions {
        operation_deadline: Duration::from_secs(30),
        retry_budget: Duration::from_secs(30),
        ..AzureClientOptions::default()
    }
}

/// [`options`] with pacing against ARM's budget turned off.
fn unpaced() -> AzureClientOptions {
    let mut o = options();
    o.pacing.enabled = false;
    o
}

fn secret_credential(emu: &RunningEmulator, secret: &str) -> Arc<dyn TokenCredential> {
    let cfg = CredentialConfig::ClientSecret {
        tenant_id: TENANT.into(),
        client_id: CLIENT_ID.into(),
        client_secret: secret.into(),
    };
    let authority = Url::parse(&emu.base_url()).expect("base url");
    build_credential(&cfg, &authority, azure_core::new_http_client()).expect("credential")
}

fn client_with(
    emu: &RunningEmulator,
    credential: Arc<dyn TokenCredential>,
    options: AzureClientOptions,
) -> AzureNetworkClient {
    let endpoint = Url::parse(&emu.base_url()).expect("base url");
    AzureNetworkClient::new(endpoint, credential, options).expect("client")
}

fn client(emu: &RunningEmulator) -> AzureNetworkClient {
    client_with(emu, secret_credential(emu, SECRET), options())
}

/// The emulator's rules of an NSG, by lower-cased name.
async fn admin_rules(
    admin: &AdminClient,
    nsg: &str,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    admin
        .rules(&nsg_id(nsg))
        .await
        .expect("admin rules")
        .into_iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap_or_default().to_ascii_lowercase();
            (name, r)
        })
        .collect()
}

fn same_ids(got: &[String], want: &[String]) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(a, b)| a.eq_ignore_ascii_case(b))
}

#[tokio::test]
async fn resolve_vm_finds_nic_and_subnet_nsgs() {
    let emu = start(config()).await;
    let api: Box<dyn NetworkApi> = Box::new(client(&emu));

    let t = api.resolve_vm(&vm_id("vm1")).await.expect("vm1 resolves");
    assert_eq!(t.vm_id, vm_id("vm1"));
    assert_eq!(t.private_ips, vec!["10.0.1.4", "10.0.1.14", "10.0.2.4"]);
    assert!(
        same_ids(&t.nsg_ids, &[nsg_id("nsg-nic"), nsg_id("nsg-subnet")]),
        "{:?}",
        t.nsg_ids
    );

    // The VM name is matched case-insensitively, as ARM ids are.
    let t2 = api.resolve_vm(&vm_id("VM1")).await.expect("VM1 resolves");
    assert!(same_ids(&t2.nsg_ids, &t.nsg_ids));

    // A VM whose NIC and subnet have no NSG: IPs, but no NSGs.
    let t = api.resolve_vm(&vm_id("vm2")).await.expect("vm2 resolves");
    assert_eq!(t.private_ips, vec!["10.0.2.5"]);
    assert!(t.nsg_ids.is_empty());
    emu.shutdown().await;
}

#[tokio::test]
async fn resolve_unknown_vm_is_not_found() {
    let emu = start(config()).await;
    let api = client(&emu);
    let err = api.resolve_vm(&vm_id("nope")).await.unwrap_err();
    assert!(matches!(err, AzureError::NotFound { .. }), "{err:?}");
    assert!(!err.is_retryable());

    // An unknown resource group is a 404 from ARM: also NotFound.
    let other_rg = format!(
        "/subscriptions/{SUB}/resourceGroups/rg-missing/providers/Microsoft.Compute/virtualMachines/vm1"
    );
    let err = api.resolve_vm(&other_rg).await.unwrap_err();
    assert!(matches!(err, AzureError::NotFound { .. }), "{err:?}");

    // Not a VM id at all: refused before any request.
    let err = api.resolve_vm(&nsg_id("nsg-nic")).await.unwrap_err();
    assert_eq!(err.category(), "invalid_input");
    emu.shutdown().await;
}

/// vm1's NICs as the Compute API lists them: one in rg1, one in rg2 (its own VNet and NSG).
fn cross_rg_config() -> EmulatorConfig {
    let mut fixture = Fixture::from_yaml_str(FIXTURE).expect("fixture parses");
    let rg2 = Fixture::from_yaml_str(&format!(
        r#"
subscriptions:
  - id: {SUB}
    resourceGroups:
      - name: rg1
        location: westeurope
      - name: rg2
        location: westeurope
        networkSecurityGroups:
          - name: nsg-rg2
        virtualNetworks:
          - name: vnet2
            subnets:
              - name: data
                addressPrefix: 10.2.0.0/24
        networkInterfaces:
          - name: vm1-data-nic
            virtualMachine: {}
            networkSecurityGroup: nsg-rg2
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 10.2.0.7
                subnet: vnet2/data
"#,
        vm_id("vm1")
    ))
    .expect("rg2 parses")
    .subscriptions[0]
        .resource_groups[1]
        .clone();
    fixture.subscriptions[0].resource_groups.push(rg2);
    EmulatorConfig {
        fixture,
        ..config()
    }
}

#[tokio::test]
async fn resolve_vm_reads_the_vm_and_finds_a_nic_in_another_resource_group() {
    let emu = start(cross_rg_config()).await;
    let api = client(&emu);
    emu.admin().clear_requests().await.expect("clear");
    let t = api.resolve_vm(&vm_id("vm1")).await.expect("vm1 resolves");
    assert_eq!(
        t.private_ips,
        vec!["10.0.1.4", "10.0.1.14", "10.0.2.4", "10.2.0.7"]
    );
    let rg2_nsg = format!(
        "/subscriptions/{SUB}/resourceGroups/rg2/providers/Microsoft.Network/networkSecurityGroups/nsg-rg2"
    );
    assert!(
        same_ids(
            &t.nsg_ids,
            &[nsg_id("nsg-nic"), nsg_id("nsg-subnet"), rg2_nsg]
        ),
        "{:?}",
        t.nsg_ids
    );
    // One VM GET with Compute's api-version, one GET per NIC, no NIC list of a resource group.
    let paths: Vec<String> = emu
        .admin()
        .requests()
        .await
        .expect("requests")
        .into_iter()
        .filter(|r| r.method == "GET" && !r.path.contains("/oauth2/"))
        .map(|r| r.path.to_ascii_lowercase())
        .collect();
    let vm_gets: Vec<&String> = paths
        .iter()
        .filter(|p| p.contains("/microsoft.compute/virtualmachines/vm1?"))
        .collect();
    assert_eq!(vm_gets.len(), 1, "{paths:#?}");
    assert!(vm_gets[0].contains("api-version=2024-07-01"), "{paths:#?}");
    assert!(
        !paths.iter().any(|p| p.contains("/networkinterfaces?")),
        "no NIC listing: {paths:#?}"
    );
    let nic_gets = paths
        .iter()
        .filter(|p| p.contains("/networkinterfaces/"))
        .count();
    assert_eq!(nic_gets, 3, "{paths:#?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn a_changed_private_ip_shows_on_the_next_resolve() {
    let emu = start(config()).await;
    let api = client(&emu);
    let nic = format!(
        "{}/providers/Microsoft.Network/networkInterfaces/vm1-nic",
        rg_id()
    );
    emu.admin()
        .set_nic_private_ip(&nic, Some("ipconfig2"), "10.0.1.99")
        .await
        .expect("new address");
    let t = api.resolve_vm(&vm_id("vm1")).await.expect("vm1 resolves");
    assert_eq!(t.private_ips, vec!["10.0.1.4", "10.0.1.99", "10.0.2.4"]);
    emu.shutdown().await;
}

#[tokio::test]
async fn create_update_delete_rule() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-nic");

    let mut r = rule("portcullis-ssh", 110, "22");
    api.put_rule(&nsg, &r).await.expect("create");
    let rules = admin_rules(&admin, "nsg-nic").await;
    let stored = &rules["portcullis-ssh"]["properties"];
    assert_eq!(stored["priority"], 110);
    assert_eq!(stored["destinationPortRange"], "22");
    assert_eq!(stored["sourceAddressPrefix"], "203.0.113.7/32");
    assert_eq!(stored["destinationAddressPrefixes"][1], "10.0.1.14");
    assert_eq!(stored["provisioningState"], "Succeeded");
    assert!(
        rules.contains_key("user-allow-https"),
        "others' rules are untouched"
    );

    let listed = api.list_rules(&nsg).await.expect("list");
    let mine = listed
        .iter()
        .find(|x| x.name == "portcullis-ssh")
        .expect("listed");
    assert!(mine.same_content(&r), "{mine:?} vs {r:?}");
    assert_eq!(listed.len(), 2);

    // Update: new ports (plural), new description.
    r.destination_port_ranges = vec!["22".into(), "2222".into()];
    r.description = "updated".into();
    api.put_rule(&nsg, &r).await.expect("update");
    let rules = admin_rules(&admin, "nsg-nic").await;
    let stored = &rules["portcullis-ssh"]["properties"];
    assert_eq!(stored["description"], "updated");
    assert_eq!(
        stored["destinationPortRanges"],
        serde_json::json!(["22", "2222"])
    );
    let listed = api.list_rules(&nsg).await.expect("list");
    assert!(listed.iter().any(|x| x.same_content(&r)));

    api.delete_rule(&nsg, "portcullis-ssh")
        .await
        .expect("delete");
    let rules = admin_rules(&admin, "nsg-nic").await;
    assert!(!rules.contains_key("portcullis-ssh"));
    assert!(rules.contains_key("user-allow-https"));

    // Deleting what is already gone is fine.
    api.delete_rule(&nsg, "portcullis-ssh")
        .await
        .expect("delete again");
    emu.shutdown().await;
}

#[tokio::test]
async fn list_rules_follows_paging() {
    let emu = start(EmulatorConfig {
        page_size: 2,
        async_delay: Duration::from_millis(0),
        ..config()
    })
    .await;
    let admin = emu.admin();
    let nsg = nsg_id("nsg-empty");
    for i in 0..5u16 {
        let body = serde_json::json!({"properties": {
            "protocol": "Udp", "access": "Deny", "direction": "Outbound", "priority": 1000 + i,
            "sourceAddressPrefix": "*", "sourcePortRange": "*",
            "destinationAddressPrefix": "10.0.0.0/8", "destinationPortRanges": ["53", "5353"],
        }});
        admin
            .put_rule_directly(&format!("{nsg}/securityRules/other-{i}"), &body)
            .await
            .expect("seed rule");
    }
    admin.clear_requests().await.expect("clear log");

    let api = client(&emu);
    let mut rules = api.list_rules(&nsg).await.expect("list");
    rules.sort_by_key(|r| r.priority);
    assert_eq!(rules.len(), 5);
    assert_eq!(
        rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        vec!["other-0", "other-1", "other-2", "other-3", "other-4"]
    );
    assert_eq!(rules[0].protocol, RuleProtocol::Udp);
    assert_eq!(rules[0].direction, Direction::Outbound);
    assert_eq!(rules[0].destination_port_ranges, vec!["53", "5353"]);

    let pages = admin
        .requests()
        .await
        .expect("requests")
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.to_ascii_lowercase().contains("/securityrules"))
        .count();
    assert_eq!(pages, 3, "5 rules at 2 per page");
    assert_eq!(api.stats().count("list_rules", "200"), 3);

    // An NSG that does not exist.
    let err = api.list_rules(&nsg_id("nsg-missing")).await.unwrap_err();
    assert!(matches!(err, AzureError::NotFound { .. }), "{err:?}");
    emu.shutdown().await;
}

/// A resource group's NSGs, one page at a time (the sweep's one read for many NSGs): every
/// page followed, each NSG exactly as `read_nsg` reads it (etag, rules, text).
#[tokio::test]
async fn nsg_list_pages_read_each_nsg_as_read_nsg_does() {
    let emu = start(EmulatorConfig {
        page_size: 2,
        async_delay: Duration::from_millis(0),
        ..config()
    })
    .await;
    let admin = emu.admin();
    admin.clear_requests().await.expect("clear log");
    let api = client(&emu);
    let mut listed = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = api
            .list_nsgs_page(SUB, "rg1", next.as_deref())
            .await
            .expect("a page");
        pages += 1;
        for nsg in page.nsgs().expect("the page's NSGs") {
            let snapshot = nsg.snapshot().expect("an NSG of the page");
            assert_eq!(nsg.rules().expect("its rules"), snapshot.rules);
            listed.push(snapshot);
        }
        match page.next {
            Some(link) => next = Some(link),
            None => break,
        }
    }
    let reads = admin
        .requests()
        .await
        .expect("requests")
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/networkSecurityGroups?"))
        .count();
    assert_eq!(reads, pages, "one read per page");
    assert_eq!(
        pages,
        listed.len().div_ceil(2),
        "{} NSGs at 2 per page",
        listed.len()
    );
    assert!(listed.len() >= 3, "the fixture's NSGs: {}", listed.len());
    for snapshot in &listed {
        let read = api.read_nsg(&snapshot.nsg_id).await.expect("read");
        assert_eq!(
            snapshot.nsg_id.to_ascii_lowercase(),
            read.nsg_id.to_ascii_lowercase()
        );
        assert!(snapshot.etag.is_some(), "{}", snapshot.nsg_id);
        assert_eq!(snapshot.etag, read.etag, "{}", snapshot.nsg_id);
        assert_eq!(snapshot.rules, read.rules, "{}", snapshot.nsg_id);
        assert_eq!(json_of(snapshot), json_of(&read), "{}", snapshot.nsg_id);
    }
    let err = api
        .list_nsgs_page(SUB, "rg-missing", None)
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::NotFound { .. }), "{err:?}");
    // A next link elsewhere than ARM would carry our token away.
    let err = api
        .list_nsgs_page(SUB, "rg1", Some("http://elsewhere.example/next"))
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::InvalidResponse(_)), "{err:?}");
    emu.shutdown().await;
}

/// The lists resolution reads once per period: a resource group's VMs (with the NICs each
/// lists) and NICs, a virtual network's subnets; every page followed, each one read.
#[tokio::test]
async fn vm_nic_and_subnet_lists_follow_paging() {
    let emu = start(EmulatorConfig {
        page_size: 1,
        ..config()
    })
    .await;
    let api = client(&emu);
    let nic = |name: &str| {
        format!(
            "{}/providers/Microsoft.Network/networkInterfaces/{name}",
            rg_id()
        )
    };
    let subnet = |name: &str| {
        format!(
            "{}/providers/Microsoft.Network/virtualNetworks/vnet1/subnets/{name}",
            rg_id()
        )
    };

    let mut vms = api.list_vms(SUB, "RG1").await.expect("VMs");
    vms.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    assert_eq!(
        vms,
        [
            VmNics {
                vm_id: vm_id("vm1"),
                nic_ids: vec![nic("vm1-nic"), nic("vm1-nic2")],
            },
            VmNics {
                vm_id: vm_id("vm2"),
                nic_ids: vec![nic("vm2-nic")],
            },
        ]
    );
    assert_eq!(api.stats().count("list_vms", "200"), 2, "one VM per page");

    let nics = api.list_nics(SUB, "rg1").await.expect("NICs");
    assert_eq!(nics.len(), 4, "{nics:?}");
    assert_eq!(api.stats().count("list_nics", "200"), 4);
    assert_eq!(
        nics[0],
        NicView {
            id: nic("vm1-nic"),
            nsg_id: Some(nsg_id("nsg-nic")),
            ip_configurations: vec![
                IpConfigView {
                    private_ip: Some("10.0.1.4".into()),
                    subnet_id: Some(subnet("app")),
                },
                IpConfigView {
                    private_ip: Some("10.0.1.14".into()),
                    subnet_id: Some(subnet("app")),
                },
            ],
        }
    );

    let subnets = api
        .list_subnets(SUB, "rg1", "vnet1")
        .await
        .expect("subnets");
    assert_eq!(
        subnets,
        [
            SubnetView {
                id: subnet("app"),
                nsg_id: Some(nsg_id("nsg-subnet")),
            },
            SubnetView {
                id: subnet("plain"),
                nsg_id: None,
            },
        ]
    );
    assert_eq!(api.stats().count("list_subnets", "200"), 2);

    // What is not there is NotFound, for the caller to read VMs alone.
    for err in [
        api.list_vms(SUB, "rg-missing").await.unwrap_err(),
        api.list_nics(SUB, "rg-missing").await.unwrap_err(),
        api.list_subnets(SUB, "rg1", "vnet-missing")
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(err, AzureError::NotFound { .. }), "{err:?}");
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn writes_return_only_after_the_async_operation_succeeded() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::from_millis(300),
        retry_after_secs: 0,
        ..config()
    })
    .await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-subnet");

    let started = std::time::Instant::now();
    api.put_rule(&nsg, &rule("portcullis-async", 120, "3389"))
        .await
        .expect("put");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let rules = admin_rules(&admin, "nsg-subnet").await;
    assert_eq!(
        rules["portcullis-async"]["properties"]["provisioningState"],
        "Succeeded"
    );
    let stats = admin.stats().await.expect("stats");
    assert!(stats.operation_polls >= 2, "polled until done: {stats:?}");
    assert!(api.stats().count("poll_operation", "200") >= 2);

    let started = std::time::Instant::now();
    api.delete_rule(&nsg, "portcullis-async")
        .await
        .expect("delete");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(admin_rules(&admin, "nsg-subnet").await.is_empty());
    emu.shutdown().await;
}

#[tokio::test]
async fn validation_errors_are_bad_requests_and_change_nothing() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-nic");
    let before = admin_rules(&admin, "nsg-nic").await;

    let base = rule("portcullis-bad", 150, "22");
    let cases: Vec<(&str, NsgRule)> = vec![
        (
            "SecurityRuleInvalidPriority",
            NsgRule {
                priority: 99,
                ..base.clone()
            },
        ),
        (
            "SecurityRuleInvalidPriority",
            NsgRule {
                priority: 4097,
                ..base.clone()
            },
        ),
        (
            "SecurityRuleInvalidAddressPrefix",
            NsgRule {
                source_address_prefixes: vec!["300.1.2.3/32".into()],
                ..base.clone()
            },
        ),
        (
            "SecurityRuleInvalidPortRange",
            NsgRule {
                destination_port_ranges: vec!["70000".into()],
                ..base.clone()
            },
        ),
        (
            "SecurityRuleDescriptionTooLong",
            NsgRule {
                description: "x".repeat(141),
                ..base.clone()
            },
        ),
        (
            "SecurityRuleInvalidProtocol",
            NsgRule {
                protocol: RuleProtocol::Other("Gre".into()),
                ..base.clone()
            },
        ),
        (
            "InvalidResourceName",
            NsgRule {
                name: "bad name!".into(),
                ..base.clone()
            },
        ),
        // Same priority and direction as the user's rule at 300.
        (
            "SecurityRuleConflict",
            NsgRule {
                priority: 300,
                ..base.clone()
            },
        ),
    ];
    let n = cases.len() as u64;
    for (code, bad) in cases {
        let err = api.put_rule(&nsg, &bad).await.unwrap_err();
        match &err {
            AzureError::BadRequest { code: got, message } => {
                assert_eq!(got, code, "{message}");
                assert!(!message.is_empty());
            }
            other => panic!("expected BadRequest {code}, got {other:?}"),
        }
        assert!(!err.is_retryable());
        assert_eq!(err.category(), "bad_request");
    }
    assert_eq!(
        admin_rules(&admin, "nsg-nic").await,
        before,
        "nothing changed"
    );
    // One request per case: a 400 is never retried.
    let stats = api.stats();
    assert_eq!(stats.count("put_rule", "400"), n, "{:?}", stats.snapshot());
    assert_eq!(
        stats
            .snapshot()
            .keys()
            .filter(|(op, _)| op == "put_rule")
            .count(),
        1
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn wrong_secret_is_refused() {
    let emu = start(EmulatorConfig {
        credentials: Some((CLIENT_ID.into(), SECRET.into())),
        ..config()
    })
    .await;
    let admin = emu.admin();
    let nsg = nsg_id("nsg-nic");
    let before = admin_rules(&admin, "nsg-nic").await;

    let bad = client_with(&emu, secret_credential(&emu, "wrong"), options());
    let err = bad
        .put_rule(&nsg, &rule("portcullis-x", 150, "22"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AzureError::Credential(_) | AzureError::Unauthorized { .. }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let err = bad.list_rules(&nsg).await.unwrap_err();
    assert!(matches!(err, AzureError::Credential(_)), "{err:?}");
    assert_eq!(admin_rules(&admin, "nsg-nic").await, before);
    let stats = admin.stats().await.expect("stats");
    assert!(stats.token_failures >= 1);
    assert_eq!(stats.writes, 0);

    // A token ARM does not know: 401 from ARM itself -> Unauthorized.
    let forged = client_with(&emu, Arc::new(StaticToken("forged".into())), options());
    let err = forged.list_rules(&nsg).await.unwrap_err();
    assert!(matches!(err, AzureError::Unauthorized { .. }), "{err:?}");
    assert_eq!(err.category(), "unauthorized");
    assert_eq!(forged.stats().count("list_rules", "401"), 1);

    // The right secret works.
    let good = client_with(&emu, secret_credential(&emu, SECRET), options());
    good.put_rule(&nsg, &rule("portcullis-x", 150, "22"))
        .await
        .expect("put");
    assert!(
        admin_rules(&admin, "nsg-nic")
            .await
            .contains_key("portcullis-x")
    );
    emu.shutdown().await;
}

#[derive(Debug)]
struct StaticToken(String);

#[async_trait::async_trait]
impl TokenCredential for StaticToken {
    async fn get_token(&self, _scopes: &[&str]) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            self.0.clone(),
            time::OffsetDateTime::now_utc() + Duration::from_secs(3600),
        ))
    }
    async fn clear_cache(&self) -> azure_core::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_one_nsg_retry_another_operation_429() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::from_millis(300),
        retry_after_secs: 0,
        ..config()
    })
    .await;
    let admin = emu.admin();
    // Two separate adapters (as two operator replicas would be): no shared lock.
    let a = client(&emu);
    let b = client(&emu);
    let nsg = nsg_id("nsg-subnet");
    let (rule_a, rule_b) = (
        rule("portcullis-a", 130, "22"),
        rule("portcullis-b", 131, "22"),
    );
    let (ra, rb) = tokio::join!(a.put_rule(&nsg, &rule_a), b.put_rule(&nsg, &rule_b));
    ra.expect("a succeeds");
    rb.expect("b succeeds");
    let rules = admin_rules(&admin, "nsg-subnet").await;
    assert!(rules.contains_key("portcullis-a") && rules.contains_key("portcullis-b"));

    let throttled = a.stats().count("put_rule", "429") + b.stats().count("put_rule", "429");
    assert!(throttled >= 1, "one writer met the other's operation");
    let stats = admin.stats().await.expect("stats");
    assert!(stats.conflicts >= 1, "{stats:?}");
    // The 429'd PUT was sent again and accepted.
    let log = admin.requests().await.expect("requests");
    let puts: Vec<_> = log.iter().filter(|r| r.method == "PUT").collect();
    let refused = puts
        .iter()
        .find(|r| r.status == 429)
        .expect("a 429 in the log");
    assert!(
        puts.iter()
            .any(|r| r.path == refused.path && (200..300).contains(&r.status)),
        "{puts:?}"
    );
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_never_overlaps_writes_on_one_nsg() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::from_millis(150),
        retry_after_secs: 0,
        ..config()
    })
    .await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-subnet");
    let r1 = rule("portcullis-1", 140, "22");
    let r2 = rule("portcullis-2", 141, "22");
    let r3 = rule("portcullis-3", 142, "22");
    let (x, y, z) = tokio::join!(
        api.put_rule(&nsg, &r1),
        api.put_rule(&nsg, &r2),
        api.put_rule(&nsg, &r3),
    );
    x.and(y).and(z).expect("all succeed");
    assert_eq!(admin_rules(&admin, "nsg-subnet").await.len(), 3);
    assert_eq!(api.stats().count_status("429"), 0, "serialised locally");
    assert_eq!(admin.stats().await.expect("stats").conflicts, 0);
    emu.shutdown().await;
}

#[tokio::test]
async fn subscription_throttling_is_waited_out() {
    let emu = start(EmulatorConfig {
        write_burst: 2,
        write_refill_per_sec: 4.0,
        async_delay: Duration::from_millis(0),
        ..config()
    })
    .await;
    let admin = emu.admin();
    // Pacing off: the 429s themselves are under test here.
    let api = client_with(&emu, secret_credential(&emu, SECRET), unpaced());
    for (i, nsg) in ["nsg-nic", "nsg-subnet", "nsg-empty", "nsg-nic"]
        .iter()
        .enumerate()
    {
        let r = rule(&format!("portcullis-t{i}"), 160 + i as u16, "22");
        api.put_rule(&nsg_id(nsg), &r)
            .await
            .expect("write succeeds");
    }
    assert_eq!(admin_rules(&admin, "nsg-nic").await.len(), 3);
    let stats = admin.stats().await.expect("stats");
    assert!(stats.throttled >= 1, "{stats:?}");
    assert!(
        api.stats().count("put_rule", "429") >= 1,
        "{:?}",
        api.stats().snapshot()
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn throttling_that_outlasts_the_deadline_surfaces_with_retry_after() {
    let emu = start(config()).await;
    let admin = emu.admin();
    admin
        .set_faults(&Faults {
            throttle_count: 100,
            throttle_retry_after_secs: 30,
            writes_only: true,
            ..Faults::default()
        })
        .await
        .expect("faults");
    let api = client_with(
        &emu,
        secret_credential(&emu, SECRET),
        AzureClientOptions {
            operation_deadline: Duration::from_secs(2),
            max_wait: Duration::from_millis(500),
            ..AzureClientOptions::default()
        },
    );
    let err = api
        .put_rule(&nsg_id("nsg-nic"), &rule("portcullis-z", 170, "22"))
        .await
        .unwrap_err();
    match &err {
        AzureError::Throttled { retry_after, code } => {
            assert_eq!(*retry_after, Duration::from_secs(30));
            assert_eq!(code, "SubscriptionRequestsThrottled");
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert!(err.is_retryable());
    // Retried (Retry-After capped at max_wait) until the deadline, not once and not forever.
    let n = api.stats().count("put_rule", "429");
    assert!((2..=5).contains(&n), "{n}");
    emu.shutdown().await;
}

#[tokio::test]
async fn server_errors_drops_and_latency_are_retried() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-nic");
    admin
        .set_faults(&Faults {
            error_count: 2,
            error_status: 500,
            drop_count: 1,
            latency_ms: 100,
            ..Faults::default()
        })
        .await
        .expect("faults");
    api.put_rule(&nsg, &rule("portcullis-f", 180, "22"))
        .await
        .expect("put");
    assert!(
        admin_rules(&admin, "nsg-nic")
            .await
            .contains_key("portcullis-f")
    );
    let s = api.stats();
    assert_eq!(s.count_status("transport_error"), 1, "{:?}", s.snapshot());
    assert_eq!(s.count_status("500"), 2, "{:?}", s.snapshot());

    admin
        .set_faults(&Faults {
            error_count: 1,
            error_status: 503,
            latency_ms: 50,
            ..Faults::default()
        })
        .await
        .expect("faults");
    api.delete_rule(&nsg, "portcullis-f").await.expect("delete");
    assert!(
        !admin_rules(&admin, "nsg-nic")
            .await
            .contains_key("portcullis-f")
    );
    assert_eq!(api.stats().count_status("503"), 1);

    // Reads are retried too.
    admin
        .set_faults(&Faults {
            error_count: 1,
            ..Faults::default()
        })
        .await
        .expect("faults");
    let t = api.resolve_vm(&vm_id("vm1")).await.expect("resolve");
    assert_eq!(t.nsg_ids.len(), 2);
    emu.shutdown().await;
}

#[tokio::test]
async fn operation_deadline_times_out() {
    let emu = start(EmulatorConfig {
        async_delay: Duration::from_secs(5),
        retry_after_secs: 0,
        ..config()
    })
    .await;
    let api = client_with(
        &emu,
        secret_credential(&emu, SECRET),
        AzureClientOptions {
            operation_deadline: Duration::from_millis(800),
            ..AzureClientOptions::default()
        },
    );
    let started = std::time::Instant::now();
    let err = api
        .put_rule(&nsg_id("nsg-nic"), &rule("portcullis-slow", 190, "22"))
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::Timeout { .. }), "{err:?}");
    assert_eq!(err.category(), "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn workload_identity_rereads_the_rotated_token_file() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, "sa-token-1\n").expect("write token");

    let cred = Arc::new(
        FederatedTokenFileCredential::new(
            azure_core::new_http_client(),
            Url::parse(&emu.base_url()).expect("url"),
            TENANT.into(),
            CLIENT_ID.into(),
            token_file.clone(),
        )
        .expect("credential"),
    );
    let api = client_with(&emu, cred.clone(), options());
    let nsg = nsg_id("nsg-nic");

    api.list_rules(&nsg).await.expect("list 1");
    let s = admin.stats().await.expect("stats");
    assert_eq!(s.last_client_assertion.as_deref(), Some("sa-token-1"));
    assert_eq!(s.last_client_id.as_deref(), Some(CLIENT_ID));

    // Cached: a second call does not ask for a new token.
    api.list_rules(&nsg).await.expect("list 2");
    let s = admin.stats().await.expect("stats");
    assert_eq!(s.tokens_by_assertion.get("sa-token-1"), Some(&1));

    // AKS rotates the file; the next token request presents the new assertion.
    std::fs::write(&token_file, "sa-token-2").expect("rotate token");
    cred.clear_cache().await.expect("clear cache");
    api.put_rule(&nsg, &rule("portcullis-wi", 200, "22"))
        .await
        .expect("put");
    let s = admin.stats().await.expect("stats");
    assert_eq!(s.last_client_assertion.as_deref(), Some("sa-token-2"));
    assert_eq!(s.tokens_by_grant.get("client_assertion"), Some(&2));
    assert!(
        admin_rules(&admin, "nsg-nic")
            .await
            .contains_key("portcullis-wi")
    );

    // A missing token file is a credential error, not a panic.
    std::fs::remove_file(&token_file).expect("remove");
    cred.clear_cache().await.expect("clear cache");
    let err = api.list_rules(&nsg).await.unwrap_err();
    assert!(matches!(err, AzureError::Credential(_)), "{err:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn managed_identity_via_imds() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let endpoint = Url::parse(&format!(
        "{}/metadata/identity/oauth2/token",
        emu.base_url()
    ))
    .expect("url");
    let cred = Arc::new(ImdsCredential::new(
        azure_core::new_http_client(),
        endpoint,
        Some("user-assigned-id".into()),
    ));
    let api = client_with(&emu, cred, options());
    let rules = api.list_rules(&nsg_id("nsg-nic")).await.expect("list");
    assert_eq!(rules.len(), 1);
    let s = admin.stats().await.expect("stats");
    assert_eq!(s.tokens_by_grant.get("managed_identity"), Some(&1));
    emu.shutdown().await;
}

/// `snapshot.rules` by name, for lookups.
fn snapshot_rule<'a>(rules: &'a [NsgRule], name: &str) -> Option<&'a NsgRule> {
    rules.iter().find(|r| r.name.eq_ignore_ascii_case(name))
}

/// The NSG a snapshot holds, as JSON.
fn json_of(snapshot: &portcullis::azure::NsgSnapshot) -> serde_json::Value {
    serde_json::from_str(snapshot.raw.get()).expect("an NSG read is JSON")
}

#[tokio::test]
async fn read_nsg_and_put_nsg_round_trip_unknown_fields_and_foreign_rules() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-nic");
    // A foreign rule carrying a field no typed model knows.
    admin
        .put_rule_directly(
            &format!("{nsg}/securityRules/team-rdp"),
            &serde_json::json!({"properties": {
                "protocol": "Tcp", "access": "Allow", "direction": "Inbound", "priority": 310,
                "sourceAddressPrefix": "192.0.2.0/24", "sourcePortRange": "*",
                "destinationAddressPrefix": "*", "destinationPortRange": "3389",
                "futureRuleField": {"keep": true},
            }}),
        )
        .await
        .expect("seed foreign rule");

    let snap = api.read_nsg(&nsg).await.expect("read");
    assert_eq!(snap.nsg_id, nsg);
    let etag = snap.etag.clone().expect("an etag");
    assert_eq!(json_of(&snap)["etag"], serde_json::json!(etag));
    assert_eq!(snap.rules.len(), 2, "user rules only: {:?}", snap.rules);
    let https = snapshot_rule(&snap.rules, "user-allow-https").expect("parsed");
    assert_eq!(https.destination_port_ranges, vec!["443"]);

    // Give the NSG properties the client's model does not know, through a first put_nsg.
    let mut seeded = snap.clone();
    let mut raw = json_of(&seeded);
    raw["properties"]["flushConnection"] = serde_json::json!(true);
    raw["properties"]["futureFeature"] = serde_json::json!({"levels": [1, 2]});
    raw["tags"] = serde_json::json!({"owner": "net-team"});
    seeded.raw = serde_json::value::to_raw_value(&raw).expect("encodes");
    let mine = rule("portcullis-ssh", 110, "22");
    api.put_nsg(seeded.clone(), &[], std::slice::from_ref(&mine))
        .await
        .expect("put_nsg");

    let snap = api.read_nsg(&nsg).await.expect("read again");
    assert_ne!(snap.etag.as_deref(), Some(etag.as_str()), "the etag moved");
    let read = json_of(&snap);
    let p = &read["properties"];
    assert_eq!(p["flushConnection"], true);
    assert_eq!(p["futureFeature"], serde_json::json!({"levels": [1, 2]}));
    assert_eq!(
        p["provisioningState"], "Succeeded",
        "returned only when done"
    );
    assert_eq!(read["tags"], serde_json::json!({"owner": "net-team"}));
    assert!(snapshot_rule(&snap.rules, "portcullis-ssh").is_some_and(|r| r.same_content(&mine)));

    // A second write that deletes ours and replaces nothing else keeps all of it.
    api.put_nsg(snap.clone(), &["PORTCULLIS-SSH".to_string()], &[])
        .await
        .expect("put_nsg delete");
    let rules = admin_rules(&admin, "nsg-nic").await;
    assert_eq!(
        rules.keys().cloned().collect::<Vec<_>>(),
        vec!["team-rdp", "user-allow-https"]
    );
    assert_eq!(
        rules["team-rdp"]["properties"]["futureRuleField"],
        serde_json::json!({"keep": true})
    );
    assert_eq!(rules["user-allow-https"]["properties"]["priority"], 300);
    let last = json_of(&api.read_nsg(&nsg).await.expect("read last"));
    assert_eq!(last["properties"]["futureFeature"], p["futureFeature"]);
    assert_eq!(last["properties"]["flushConnection"], true);
    assert_eq!(api.stats().count("put_nsg", "200"), 2);

    let err = api.read_nsg(&nsg_id("nsg-missing")).await.unwrap_err();
    assert!(matches!(err, AzureError::NotFound { .. }), "{err:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn put_nsg_after_someone_else_wrote_fails_with_precondition_and_is_not_retried() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-subnet");
    let stale = api.read_nsg(&nsg).await.expect("read");

    // Someone adds a rule between our read and our write.
    let foreign = serde_json::json!({"properties": {
        "protocol": "Tcp", "access": "Deny", "direction": "Inbound", "priority": 4000,
        "sourceAddressPrefix": "*", "sourcePortRange": "*",
        "destinationAddressPrefix": "*", "destinationPortRange": "23",
    }});
    admin
        .put_rule_directly(&format!("{nsg}/securityRules/someone-else"), &foreign)
        .await
        .expect("foreign write");

    let mine = rule("portcullis-rdp", 120, "3389");
    let err = api
        .put_nsg(stale.clone(), &[], std::slice::from_ref(&mine))
        .await
        .unwrap_err();
    assert!(err.is_precondition_failed(), "{err:?}");
    assert!(matches!(err, AzureError::PreconditionFailed { .. }));
    assert!(!err.is_retryable() && !err.is_permanent());
    assert!(err.to_string().contains("does not match etag"), "{err}");
    assert_eq!(api.stats().count("put_nsg", "412"), 1, "not retried");
    let rules = admin_rules(&admin, "nsg-subnet").await;
    assert_eq!(
        rules.keys().cloned().collect::<Vec<_>>(),
        vec!["someone-else"]
    );

    // Re-read and write again: ours lands and theirs survives.
    let fresh = api.read_nsg(&nsg).await.expect("fresh read");
    assert!(snapshot_rule(&fresh.rules, "someone-else").is_some());
    api.put_nsg(fresh.clone(), &[], std::slice::from_ref(&mine))
        .await
        .expect("put on a fresh read");
    let rules = admin_rules(&admin, "nsg-subnet").await;
    assert_eq!(
        rules.keys().cloned().collect::<Vec<_>>(),
        vec!["portcullis-rdp", "someone-else"]
    );
    assert_eq!(rules["someone-else"]["properties"]["priority"], 4000);
    emu.shutdown().await;
}

#[tokio::test]
async fn can_not_delete_lock_blocks_delete_rule_but_put_nsg_removes_the_rule() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-nic");
    api.put_rule(&nsg, &rule("portcullis-ssh", 110, "22"))
        .await
        .expect("put before the lock");
    admin
        .set_lock(&rg_id(), LockLevel::CanNotDelete)
        .await
        .expect("lock");

    let err = api.delete_rule(&nsg, "portcullis-ssh").await.unwrap_err();
    assert!(err.is_scope_locked(), "{err:?}");
    assert!(err.is_permanent());
    assert_eq!(err.category(), "locked");
    assert!(
        err.to_string()
            .contains(&format!("following scope(s) are locked: '{}'", rg_id())),
        "{err}"
    );
    assert_eq!(api.stats().count("delete_rule", "409"), 1, "not retried");
    assert!(
        admin_rules(&admin, "nsg-nic")
            .await
            .contains_key("portcullis-ssh")
    );

    // The write Azure allows: the whole NSG without the rule.
    let snap = api.read_nsg(&nsg).await.expect("read under the lock");
    api.put_nsg(snap.clone(), &["portcullis-ssh".to_string()], &[])
        .await
        .expect("put_nsg under CanNotDelete");
    let rules = admin_rules(&admin, "nsg-nic").await;
    assert_eq!(
        rules.keys().cloned().collect::<Vec<_>>(),
        vec!["user-allow-https"]
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn read_only_lock_makes_every_write_fail_permanently() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-nic");
    admin
        .set_lock(&nsg, LockLevel::ReadOnly)
        .await
        .expect("lock");
    let snap = api.read_nsg(&nsg).await.expect("reads work");

    let put = api
        .put_rule(&nsg, &rule("portcullis-ssh", 110, "22"))
        .await
        .unwrap_err();
    let delete = api.delete_rule(&nsg, "user-allow-https").await.unwrap_err();
    let whole = api
        .put_nsg(snap.clone(), &["user-allow-https".to_string()], &[])
        .await
        .unwrap_err();
    for err in [&put, &delete, &whole] {
        assert!(err.is_permanent() && err.is_scope_locked(), "{err:?}");
    }
    assert!(
        put.to_string().contains("cannot perform write operation"),
        "{put}"
    );
    assert_eq!(
        admin_rules(&admin, "nsg-nic").await.len(),
        1,
        "nothing changed"
    );
    // Outside the locked scope, writes work.
    api.put_rule(&nsg_id("nsg-subnet"), &rule("portcullis-ssh", 110, "22"))
        .await
        .expect("other NSG");
    emu.shutdown().await;
}

#[tokio::test]
async fn per_nsg_fault_is_permanent_on_that_nsg_only() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let api = client(&emu);
    admin
        .set_nsg_fault(&NsgFault {
            nsg: nsg_id("nsg-nic"),
            status: 403,
            code: None,
            message: None,
            writes_only: false,
        })
        .await
        .expect("fault");
    let err = api
        .put_rule(&nsg_id("nsg-nic"), &rule("portcullis-ssh", 110, "22"))
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::Unauthorized { .. }), "{err:?}");
    assert!(err.is_permanent());
    let err = api.read_nsg(&nsg_id("nsg-nic")).await.unwrap_err();
    assert!(err.is_permanent(), "{err:?}");
    api.put_rule(&nsg_id("nsg-subnet"), &rule("portcullis-ssh", 110, "22"))
        .await
        .expect("another NSG works");
    // A deleted NSG reads as NotFound, also permanent; a write based on an older read never
    // recreates it, even from a snapshot without an etag.
    let mut before = api.read_nsg(&nsg_id("nsg-subnet")).await.expect("read");
    admin
        .delete_nsg_directly(&nsg_id("nsg-subnet"))
        .await
        .expect("delete NSG");
    let err = api.read_nsg(&nsg_id("nsg-subnet")).await.unwrap_err();
    assert!(
        matches!(err, AzureError::NotFound { .. }) && err.is_permanent(),
        "{err:?}"
    );
    let err = api.put_nsg(before.clone(), &[], &[]).await.unwrap_err();
    assert!(err.is_precondition_failed(), "{err:?}");
    before.etag = None;
    let err = api.put_nsg(before.clone(), &[], &[]).await.unwrap_err();
    assert!(err.is_precondition_failed(), "{err:?}");
    let err = api.read_nsg(&nsg_id("nsg-subnet")).await.unwrap_err();
    assert!(
        matches!(err, AzureError::NotFound { .. }),
        "still gone: {err:?}"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn rules_mixing_address_families_are_bad_requests() {
    let emu = start(config()).await;
    let admin = emu.admin();
    let api = client(&emu);
    let nsg = nsg_id("nsg-nic");
    let mut mixed = rule("portcullis-v6", 110, "22");
    mixed.source_address_prefixes = vec!["2001:db8::7/128".into()];
    let code = "ResourceCannotContainAddressPrefixesFromDifferentAddressFamilies";
    let err = api.put_rule(&nsg, &mixed).await.unwrap_err();
    assert!(
        matches!(&err, AzureError::BadRequest { code: c, .. } if c == code),
        "{err:?}"
    );
    assert!(err.is_permanent());
    let snap = api.read_nsg(&nsg).await.expect("read");
    let err = api
        .put_nsg(snap.clone(), &[], std::slice::from_ref(&mixed))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AzureError::BadRequest { code: c, .. } if c == code),
        "{err:?}"
    );
    assert_eq!(
        admin_rules(&admin, "nsg-nic").await.len(),
        1,
        "nothing changed"
    );
    // One family per rule works.
    let mut v6 = mixed.clone();
    v6.destination_address_prefixes = vec!["2001:db8::4".into()];
    api.put_nsg(snap.clone(), &[], std::slice::from_ref(&v6))
        .await
        .expect("IPv6-only rule");
    emu.shutdown().await;
}

// ----- pacing against ARM's subscription budget -----

/// Small buckets, so that a short burst outruns them: writes and deletes 5 burst / 2 per s,
/// reads 10 / 5 per s.
fn small_buckets() -> EmulatorConfig {
    EmulatorConfig {
        write_burst: 5,
        write_refill_per_sec: 2.0,
        delete_burst: 5,
        delete_refill_per_sec: 2.0,
        read_burst: 10,
        read_refill_per_sec: 5.0,
        async_delay: Duration::ZERO,
        ..config()
    }
}

/// The client's view of the same buckets, pacing on or off.
fn pacing(enabled: bool) -> AzureClientOptions {
    let write = BucketSpec {
        burst: 5,
        refill_per_sec: 2.0,
    };
    AzureClientOptions {
        pacing: PacingOptions {
            enabled,
            read: BucketSpec {
                burst: 10,
                refill_per_sec: 5.0,
            },
            write,
            delete: write,
            ..PacingOptions::default()
        },
        ..options()
    }
}

/// A burst through the real client: 10 rule PUTs over three NSGs (each polled to the end;
/// the client keeps one write in flight per NSG) and 12 rule lists at once, then the 10 rules
/// deleted at once.
async fn burst(api: &AzureNetworkClient, tag: &str) {
    let nsgs = ["nsg-nic", "nsg-subnet", "nsg-empty"];
    let rules: Vec<(String, NsgRule)> = (0..10u16)
        .map(|i| {
            (
                nsg_id(nsgs[usize::from(i) % nsgs.len()]),
                rule(&format!("portcullis-{tag}{i}"), 150 + i, "22"),
            )
        })
        .collect();
    let puts = rules.iter().map(|(nsg, r)| api.put_rule(nsg, r));
    let list_ids: Vec<String> = (0..12).map(|i| nsg_id(nsgs[i % nsgs.len()])).collect();
    let lists = list_ids.iter().map(|id| api.list_rules(id));
    let (puts, lists) = tokio::join!(
        futures::future::join_all(puts),
        futures::future::join_all(lists)
    );
    for r in puts {
        r.expect("put succeeds");
    }
    for r in lists {
        r.expect("list succeeds");
    }
    let deletes = rules.iter().map(|(nsg, r)| api.delete_rule(nsg, &r.name));
    for r in futures::future::join_all(deletes).await {
        r.expect("delete succeeds");
    }
}

async fn throttled_in_log(admin: &AdminClient) -> usize {
    admin
        .requests()
        .await
        .expect("request log")
        .iter()
        .filter(|r| r.status == 429)
        .count()
}

#[tokio::test]
async fn pacing_keeps_a_burst_inside_the_subscription_budget() {
    let emu = start(small_buckets()).await;
    let admin = emu.admin();

    // Pacing off: the same burst outruns both buckets and Azure answers 429s (which the client
    // waits out, so everything still lands).
    let unpaced = client_with(&emu, secret_credential(&emu, SECRET), pacing(false));
    burst(&unpaced, "off").await;
    let stats = admin.stats().await.expect("stats");
    assert!(
        stats.throttled >= 1,
        "writes throttled without pacing: {stats:?}"
    );
    assert!(
        stats.reads_throttled >= 1,
        "reads throttled without pacing: {stats:?}"
    );
    assert!(throttled_in_log(&admin).await >= 2);
    assert!(unpaced.stats().paced().is_empty(), "pacing off never waits");

    // Full buckets again (new limits start full), clean counters.
    admin
        .set_config(&ConfigUpdate {
            write_burst: Some(5),
            read_burst: Some(10),
            delete_burst: Some(5),
            ..ConfigUpdate::default()
        })
        .await
        .expect("config");
    admin.reset_stats().await.expect("reset stats");
    admin.clear_requests().await.expect("clear log");

    // Pacing on: the client waits for the refill itself and Azure never throttles.
    let paced = client_with(&emu, secret_credential(&emu, SECRET), pacing(true));
    burst(&paced, "on").await;
    let stats = admin.stats().await.expect("stats");
    assert_eq!(throttled_in_log(&admin).await, 0, "{stats:?}");
    assert_eq!(
        (stats.throttled, stats.reads_throttled),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(paced.stats().count_status("429"), 0);
    assert_eq!(
        admin_rules(&admin, "nsg-nic").await.len(),
        1,
        "only the user's rule is left"
    );
    // Reads and deletes outran their buckets; the PUTs, one per NSG at a time behind their
    // polls, did not need to wait.
    let waited = paced.stats().paced();
    for kind in [BudgetKind::Read, BudgetKind::Delete] {
        let p = waited.get(&kind).copied().unwrap_or_default();
        assert!(
            p.requests >= 1 && p.seconds > 0.0,
            "{kind:?} paced: {waited:?}"
        );
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn the_budget_estimate_follows_the_remaining_headers() {
    // A bucket that barely refills, so the counts are exact.
    let emu = start(EmulatorConfig {
        write_burst: 5,
        write_refill_per_sec: 0.001,
        async_delay: Duration::ZERO,
        ..config()
    })
    .await;
    // Someone else under the same principal spends three writes.
    let other = client_with(&emu, secret_credential(&emu, SECRET), pacing(false));
    for i in 0..3u16 {
        other
            .put_rule(
                &nsg_id("nsg-empty"),
                &rule(&format!("portcullis-x{i}"), 170 + i, "22"),
            )
            .await
            .expect("put");
    }
    let mut slow = pacing(true);
    slow.pacing.write.refill_per_sec = 0.001;
    let api = client_with(&emu, secret_credential(&emu, SECRET), slow);
    assert_eq!(
        api.budget_estimate(SUB, BudgetKind::Write),
        None,
        "nothing sent yet"
    );
    api.put_rule(&nsg_id("nsg-empty"), &rule("portcullis-y", 180, "22"))
        .await
        .expect("put");
    // Its own count alone would say 4; Azure's header says 1.
    assert_eq!(api.budget_estimate(SUB, BudgetKind::Write), Some(1));
    assert_eq!(api.budget_estimate(SUB, BudgetKind::Delete), None);
    emu.shutdown().await;
}

/// One policy over vm1 (port 22 in nsg-nic) and one grant under it, active until `expires_at`.
fn planned_world(expires_at: jiff::Timestamp) -> portcullis::controller::world::World {
    let policy: portcullis::api::JitPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "JitPolicy",
        "metadata": {"name": "p", "namespace": "t", "uid": "policy-uid"},
        "spec": {"virtualMachines": [{"id": vm_id("vm1"), "ports": [{
            "number": 22, "protocol": "TCP",
            "allowedSourceAddressPrefixes": ["203.0.113.0/24"],
            "maxRequestAccessDuration": "PT1H"}]}]},
        "status": {"targets": [{"virtualMachine": vm_id("vm1"),
            "privateIpAddresses": ["10.0.1.4"], "networkSecurityGroups": [nsg_id("nsg-nic")]}]}
    }))
    .expect("policy");
    let activated = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1);
    let grant: portcullis::api::AccessGrant = serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AccessGrant",
        "metadata": {"name": "g", "namespace": "t", "uid": "grant-uid"},
        "spec": {"policyRef": {"name": "p"}, "virtualMachine": "vm1", "ports": [22],
            "sourceAddressPrefix": "203.0.113.7", "duration": "PT1H",
            "justification": "plan cache test"},
        "status": {"phase": "Active", "activatedAt": activated.to_string(),
            "expiresAt": expires_at.to_string()}
    }))
    .expect("grant");
    portcullis::controller::world::World {
        policies: vec![Arc::new(policy)],
        grants: vec![Arc::new(grant)],
        ..Default::default()
    }
}

/// With the world's generation and read sharing, an NSG found in line is planned again only
/// when the world changed or a live grant lapsed: a steady state takes no snapshot and plans
/// nothing, and a lapse still closes on time with no event at all. (Only a digest of what it
/// was asked for is kept: a sync that reads Azure plans from a snapshot again.)
#[tokio::test]
async fn an_nsg_is_planned_again_only_when_the_world_changes_or_a_grant_lapses() {
    use portcullis::controller::nsg::NsgSyncer;
    use portcullis::controller::world::WorldGeneration;
    use portcullis::plan::{Bands, Naming};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let emu = start(config()).await;
    let generation = WorldGeneration::default();
    let syncer = NsgSyncer::new(Arc::new(client(&emu)), Bands::default(), Naming::default())
        .with_world_generation(generation.clone())
        .with_read_sharing(Duration::from_secs(60));
    let expires_at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3);
    let world = planned_world(expires_at);
    let snapshots = AtomicUsize::new(0);
    let nsg = nsg_id("nsg-nic");
    let sync = || async {
        syncer
            .sync(
                &nsg,
                || {
                    snapshots.fetch_add(1, Ordering::SeqCst);
                    world.clone()
                },
                jiff::Timestamp::now(),
            )
            .await
            .expect("sync")
    };
    let allow_rules = || async {
        admin_rules(&emu.admin(), "nsg-nic")
            .await
            .values()
            .filter(|r| r["properties"]["access"] == "Allow" && r["name"] != "user-allow-https")
            .count()
    };

    let first = sync().await;
    assert_eq!(
        first.created.len(),
        2,
        "the Deny and the Allow rule: {first:?}"
    );
    assert_eq!(snapshots.load(Ordering::SeqCst), 1);
    sync().await;
    assert_eq!(
        snapshots.load(Ordering::SeqCst),
        1,
        "unchanged world: no new snapshot"
    );
    generation.advance();
    sync().await;
    assert_eq!(
        snapshots.load(Ordering::SeqCst),
        2,
        "a change: planned again"
    );
    assert_eq!(allow_rules().await, 1);

    // The lapse needs no event: past expiresAt the plan no longer holds and the rule goes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while jiff::Timestamp::now() <= expires_at {
        assert!(tokio::time::Instant::now() < deadline, "the clock stalled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed = sync().await;
    assert_eq!(
        snapshots.load(Ordering::SeqCst),
        3,
        "the lapse: planned again"
    );
    assert_eq!(closed.deleted.len(), 1, "{closed:?}");
    assert_eq!(allow_rules().await, 0);
}

/// The sweep's one list for many NSGs stands for an NSG's read only while nothing newer does: a
/// copy listed before a sync began, or before the NSG's last write ended, is not taken as read
/// even when it shows the NSG as asked.
#[tokio::test]
async fn a_listed_copy_counts_as_a_read_only_if_no_sync_or_write_came_after_it() {
    use portcullis::controller::nsg::{Listed, NsgSyncer};
    use portcullis::plan::{Bands, Naming};
    use std::time::Instant;

    let emu = start(EmulatorConfig {
        // Long enough to list the NSG while its write runs, on a loaded machine too.
        async_delay: Duration::from_secs(2),
        ..config()
    })
    .await;
    let api = Arc::new(client(&emu));
    // The world's generation moves whenever the test changes the world, as watch events do.
    let generation = portcullis::controller::world::WorldGeneration::default();
    let syncer = Arc::new(
        NsgSyncer::new(api.clone(), Bands::default(), Naming::default())
            .with_world_generation(generation.clone()),
    );
    let nsg = nsg_id("nsg-nic");
    let granted = planned_world(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1800));
    // A second grant in the same NSG: one rule more to write.
    let mut second = (*granted.grants[0]).clone();
    second.metadata.name = Some("g2".into());
    second.metadata.uid = Some("grant-2-uid".into());
    second.spec.source_address_prefix = "203.0.113.8".into();
    let both = portcullis::controller::world::World {
        grants: vec![granted.grants[0].clone(), Arc::new(second)],
        ..granted.clone()
    };
    let listed = || async {
        let at = Instant::now();
        let page = api.list_nsgs_page(SUB, "rg1", None).await.expect("a page");
        let nsgs = page.nsgs().expect("its NSGs");
        let copy = nsgs
            .iter()
            .find(|n| n.nsg_id.eq_ignore_ascii_case(&nsg))
            .expect("nsg-nic listed");
        (at, copy.rules().expect("its rules"))
    };
    let check = |world: &portcullis::controller::world::World, rules: &[NsgRule], at: Instant| {
        syncer.check_listed(&nsg, || world.clone(), jiff::Timestamp::now(), rules, at)
    };
    let now = jiff::Timestamp::now;

    syncer
        .sync(&nsg, || granted.clone(), now())
        .await
        .expect("open");
    let (at, in_line) = listed().await;
    assert_eq!(
        check(&granted, &in_line, at),
        Listed::InLine,
        "listed after the open"
    );
    syncer
        .sync_fresh(&nsg, || granted.clone(), now())
        .await
        .expect("a read of its own");
    assert_eq!(
        check(&granted, &in_line, at),
        Listed::Busy,
        "a sync began after the list: its read stands, not the list's"
    );

    // The second grant's rule is written while the NSG is listed.
    generation.advance();
    emu.admin().clear_requests().await.expect("clear log");
    let opening = tokio::spawn({
        let (syncer, nsg, both) = (syncer.clone(), nsg.clone(), both.clone());
        async move { syncer.sync(&nsg, || both.clone(), now()).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = emu.admin().requests().await.expect("requests");
        if log
            .iter()
            .any(|r| r.method == "PUT" && r.path.contains("/nsg-nic"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no write of nsg-nic: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (during, mid_write) = listed().await;
    opening.await.expect("task").expect("the second open");
    let (_, after) = listed().await;
    assert_eq!(
        mid_write, after,
        "the copy listed mid-write already shows the result"
    );
    assert_eq!(
        check(&both, &mid_write, during),
        Listed::OutOfLine,
        "listed before the write ended: not taken as read"
    );
    emu.shutdown().await;
}

/// A write that closes takes its place in the write budget before the opens already waiting
/// for theirs, through the real client: with the emulator's bucket spent, the close waits for
/// one refill, the opens for the close's token and then their own.
#[tokio::test]
async fn a_close_takes_its_place_in_the_write_budget_before_waiting_opens() {
    let bucket = BucketSpec {
        burst: 2,
        refill_per_sec: 2.0,
    };
    let emu = start(EmulatorConfig {
        write_burst: bucket.burst,
        write_refill_per_sec: bucket.refill_per_sec,
        ..config()
    })
    .await;
    let mut paced = options();
    paced.pacing.write = bucket;
    paced.pacing.reserve = 0.0;
    let api = Arc::new(client_with(&emu, secret_credential(&emu, SECRET), paced));
    let nsg = nsg_id("nsg-empty");
    // Spend the bucket; Azure's headers then say none is left.
    for i in 0..2u16 {
        api.put_rule(&nsg, &rule(&format!("portcullis-spend{i}"), 150 + i, "22"))
            .await
            .expect("put");
    }
    assert_eq!(api.budget_estimate(SUB, BudgetKind::Write), Some(0));
    let place = |urgent: bool| {
        let (api, nsg) = (api.clone(), nsg.clone());
        tokio::spawn(async move {
            let reserved = api
                .reserve_budget(&nsg, BudgetKind::Write, urgent, Duration::from_secs(30))
                .await
                .expect("a pacing client reserves");
            // Sent and answered without a header: one token spent.
            drop(reserved.admission);
            reserved.waited
        })
    };
    let opens: Vec<_> = (0..3).map(|_| place(false)).collect();
    // On this one-thread runtime the opens run up to their wait, each place taken, before the
    // close is asked for.
    tokio::task::yield_now().await;
    assert_eq!(
        api.budget_estimate(SUB, BudgetKind::Write),
        Some(-3),
        "three opens queued"
    );
    let close = place(true).await.expect("close task");
    let mut opened = Vec::new();
    for open in opens {
        opened.push(open.await.expect("open task"));
    }
    assert!(
        close < Duration::from_millis(800),
        "the close waited for one refill only: {close:?}"
    );
    assert!(
        opened.iter().all(|waited| *waited > close),
        "every waiting open went after the close: close {close:?}, opens {opened:?}"
    );
    emu.shutdown().await;
}
