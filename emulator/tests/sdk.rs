//! Drives the emulator with the real `azure_mgmt_network` 0.21 client and `azure_identity`
//! credentials, as Portcullis does.

mod common;

use std::sync::Arc;
use std::time::Duration;

use azure_core::Url;
use azure_core::auth::TokenCredential;
use azure_identity::{ClientSecretCredential, WorkloadIdentityCredential};
use azure_mgmt_network::models::security_rule_properties_format::Protocol;
use azure_mgmt_network::models::{
    SecurityRule, SecurityRuleAccess, SecurityRuleDirection, SecurityRulePropertiesFormat,
};
use common::*;
use futures::StreamExt;
use portcullis_azure_emulator::EmulatorConfig;

fn client(base: &str, cred: Arc<dyn TokenCredential>) -> azure_mgmt_network::Client {
    azure_mgmt_network::Client::builder(cred)
        .endpoint(Url::parse(base).unwrap())
        .scopes(&["https://management.azure.com/.default"])
        .build()
        .unwrap()
}

fn jit_rule(priority: i32, port: &str) -> SecurityRule {
    let mut props = SecurityRulePropertiesFormat::new(
        Protocol::Tcp,
        SecurityRuleAccess::Allow,
        priority,
        SecurityRuleDirection::Inbound,
    );
    props.source_address_prefix = Some("203.0.113.7/32".into());
    props.source_port_range = Some("*".into());
    props.destination_address_prefixes = vec!["10.0.1.4".into()];
    props.destination_port_range = Some(port.into());
    props.description = Some("portcullis: grant default/g1".into());
    let mut rule = SecurityRule::new();
    rule.properties = Some(props);
    rule
}

#[tokio::test]
async fn sdk_client_with_secret_credential() {
    let emu = start(EmulatorConfig {
        page_size: 2,
        async_delay: Duration::from_millis(30),
        credentials: Some(("portcullis".into(), "s3cret".into())),
        ..demo_config()
    })
    .await;
    let base = emu.base_url();
    let cred = Arc::new(ClientSecretCredential::new(
        azure_core::new_http_client(),
        Url::parse(&base).unwrap(),
        "tenant-1".into(),
        "portcullis".into(),
        "s3cret".into(),
    ));
    let c = client(&base, cred);
    let rules = c.security_rules_client();

    // create_or_update drives the long-running operation to completion.
    let created = rules
        .create_or_update(RG, "nsg-vm1", "portcullis-g1-22", jit_rule(120, "22"), SUB)
        .await
        .unwrap();
    let p = created.properties.unwrap();
    assert_eq!(p.priority, 120);
    assert_eq!(p.destination_address_prefixes, ["10.0.1.4"]);
    assert!(format!("{:?}", p.provisioning_state).contains("Succeeded"));

    // Paged list (page size 2, 3 rules) through nextLink.
    let mut names = Vec::new();
    let mut pages = rules.list(RG, "nsg-vm1", SUB).into_stream();
    while let Some(page) = pages.next().await {
        for r in page.unwrap().value {
            names.push(r.name.unwrap());
        }
    }
    names.sort();
    assert_eq!(names, ["allow-https", "portcullis-g1-22", "user-rule-110"]);

    let nic = c
        .network_interfaces_client()
        .get(RG, "vm1-nic", SUB)
        .await
        .unwrap();
    let nic_props = nic.properties.unwrap();
    assert!(nic_props.virtual_machine.is_some());
    let ipc = &nic_props.ip_configurations[0];
    assert_eq!(
        ipc.properties
            .as_ref()
            .unwrap()
            .private_ip_address
            .as_deref(),
        Some("10.0.1.4")
    );
    let subnet = c
        .subnets_client()
        .get(RG, "vnet-demo", "app", SUB)
        .await
        .unwrap();
    assert!(subnet.properties.unwrap().network_security_group.is_some());
    let nsg = c
        .network_security_groups_client()
        .get(RG, "nsg-vm1", SUB)
        .await
        .unwrap();
    assert_eq!(nsg.properties.unwrap().default_security_rules.len(), 6);

    // Delete: 202, then gone.
    let resp = rules
        .delete(RG, "nsg-vm1", "portcullis-g1-22", SUB)
        .send()
        .await
        .unwrap();
    assert_eq!(u16::from(resp.as_raw_response().status()), 202);
    eventually(10, "rule deleted", || async {
        rules
            .get(RG, "nsg-vm1", "portcullis-g1-22", SUB)
            .await
            .is_err()
    })
    .await;
    let stats = emu.admin().stats().await.unwrap();
    assert_eq!(stats.writes, 2);
    assert_eq!(
        stats.tokens_by_grant.get("client_secret"),
        Some(&1),
        "token cached"
    );
}

#[tokio::test]
async fn sdk_client_with_workload_identity() {
    let emu = start(demo_config()).await;
    let base = emu.base_url();
    for assertion in ["federated-token-v1", "federated-token-v2"] {
        let cred = Arc::new(WorkloadIdentityCredential::new(
            azure_core::new_http_client(),
            Url::parse(&base).unwrap(),
            "tenant-1".into(),
            "portcullis".into(),
            assertion.to_string(),
        ));
        let c = client(&base, cred);
        let rules = c
            .security_rules_client()
            .list(RG, "nsg-vm1", SUB)
            .into_stream();
        let pages: Vec<_> = rules.collect().await;
        assert_eq!(pages.len(), 1);
        assert!(pages[0].is_ok());
        let stats = emu.admin().stats().await.unwrap();
        assert_eq!(stats.last_client_assertion.as_deref(), Some(assertion));
    }
    let stats = emu.admin().stats().await.unwrap();
    assert_eq!(stats.tokens_by_grant.get("client_assertion"), Some(&2));
}
