//! `Microsoft.Compute/virtualMachines[/{vm}]` GET (api-version 2024-07-01): a VM lists its NICs,
//! wherever they live; ARM's errors for missing VMs and wrong api-versions; a NIC's private
//! IP changed through the admin API (as a deallocate and restart does).

mod common;

use common::*;
use portcullis_azure_emulator::{EmulatorConfig, Fixture};

const COMPUTE: &str = "api-version=2024-07-01";

fn vm_path(rg: &str, vm: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{vm}?{COMPUTE}"
    )
}

fn nic_id(rg: &str, nic: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces/{nic}"
    )
}

/// The demo fixture plus `rg-other`, holding a second NIC of vm1 (in rg-demo), and `rg-app`
/// with a VM `lonely` declared without any NIC.
fn cross_rg_config() -> EmulatorConfig {
    let text = format!(
        r#"
subscriptions:
  - id: {SUB}
    resourceGroups:
      - name: rg-demo
        location: westeurope
        virtualNetworks:
          - name: vnet-demo
            subnets:
              - name: app
                addressPrefix: 10.0.1.0/24
        networkInterfaces:
          - name: vm1-nic
            virtualMachine: vm1
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 10.0.1.4
                subnet: vnet-demo/app
        virtualMachines:
          - name: lonely
            vmSize: Standard_D2s_v5
      - name: rg-other
        location: westeurope
        virtualNetworks:
          - name: vnet-other
            subnets:
              - name: data
                addressPrefix: 10.9.0.0/24
        networkInterfaces:
          - name: vm1-data-nic
            virtualMachine: /subscriptions/{SUB}/resourceGroups/RG-DEMO/providers/Microsoft.Compute/virtualMachines/vm1
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 10.9.0.7
                subnet: vnet-other/data
"#
    );
    EmulatorConfig {
        fixture: Fixture::from_yaml_str(&text).expect("fixture"),
        ..EmulatorConfig::default()
    }
}

#[tokio::test]
async fn a_vm_lists_its_nic() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let r = arm.get(&vm_path(RG, "vm1")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["name"], "vm1");
    assert_eq!(r.body["type"], "Microsoft.Compute/virtualMachines");
    assert_eq!(r.body["location"], "westeurope");
    assert_eq!(r.body["properties"]["provisioningState"], "Succeeded");
    let nics = r.body["properties"]["networkProfile"]["networkInterfaces"]
        .as_array()
        .expect("networkInterfaces");
    assert_eq!(nics.len(), 1, "{nics:?}");
    assert_eq!(nics[0]["id"], nic_id(RG, "vm1-nic"));
    // The NIC points back at the VM.
    let nic = arm.get(&nic_id(RG, "vm1-nic")).await;
    assert_eq!(
        nic.body["properties"]["virtualMachine"]["id"], r.body["id"],
        "{nic:?}"
    );
    // Case-insensitive path, fixture casing in the answer.
    let r = arm.get(&vm_path("RG-DEMO", "VM1")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["name"], "vm1");
}

#[tokio::test]
async fn a_nic_in_another_resource_group_is_listed() {
    let emu = start(cross_rg_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let r = arm.get(&vm_path("rg-demo", "vm1")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let nics = r.body["properties"]["networkProfile"]["networkInterfaces"]
        .as_array()
        .expect("networkInterfaces");
    let ids: Vec<&str> = nics.iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            nic_id("rg-demo", "vm1-nic"),
            nic_id("rg-other", "vm1-data-nic")
        ]
    );
    // Several NICs: exactly one primary.
    let primaries: Vec<bool> = nics
        .iter()
        .map(|n| n["properties"]["primary"].as_bool().unwrap())
        .collect();
    assert_eq!(primaries, [true, false]);
    let nic = arm.get(&nic_id("rg-other", "vm1-data-nic")).await;
    assert_eq!(nic.status, 200, "{nic:?}");
    assert!(
        nic.body["properties"]["virtualMachine"]["id"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(r.body["id"].as_str().unwrap())
    );

    // A VM declared without NICs: found, with an empty list.
    let r = arm.get(&vm_path("rg-demo", "lonely")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.body["properties"]["hardwareProfile"]["vmSize"],
        "Standard_D2s_v5"
    );
    assert_eq!(
        r.body["properties"]["networkProfile"]["networkInterfaces"],
        serde_json::json!([])
    );
    // No VM of that name in rg-other, though its NIC lives there.
    let r = arm.get(&vm_path("rg-other", "vm1")).await;
    assert_eq!(r.status, 404, "{r:?}");
}

#[tokio::test]
async fn missing_vms_and_wrong_api_versions_get_arm_errors() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let r = arm.get(&vm_path(RG, "nope")).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (404, "ResourceNotFound"),
        "{r:?}"
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Microsoft.Compute/virtualMachines/nope"),
        "{r:?}"
    );
    let r = arm.get(&vm_path("rg-missing", "vm1")).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (404, "ResourceGroupNotFound"),
        "{r:?}"
    );
    // Compute answers its own api-version only, and Network keeps its own.
    let network_version = vm_path(RG, "vm1").replace(COMPUTE, "api-version=2024-03-01");
    let r = arm.get(&network_version).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "InvalidApiVersionParameter"),
        "{r:?}"
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2024-07-01")
    );
    let r = arm
        .get(&format!("{}?{COMPUTE}", nic_id(RG, "vm1-nic")))
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "InvalidApiVersionParameter"),
        "{r:?}"
    );
    let no_version = vm_path(RG, "vm1").replace(&format!("?{COMPUTE}"), "?x=1");
    let r = arm.get(&no_version).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "MissingApiVersionParameter"),
        "{r:?}"
    );
    // The emulator serves no VM writes, and no other Compute type.
    let r = arm
        .put(
            &vm_path(RG, "vm1"),
            &serde_json::json!({"location": "westeurope"}),
        )
        .await;
    assert_eq!(r.status, 405, "{r:?}");
    let r = arm
        .get(&format!(
            "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/disks/d1?{COMPUTE}"
        ))
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (404, "InvalidResourceType"),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_nic_gets_another_private_ip() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let admin = emu.admin();
    let nic = nic_id(RG, "vm1-nic");
    let before = arm.get(&nic).await;
    assert_eq!(
        before.body["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"],
        "10.0.1.4"
    );

    admin
        .set_nic_private_ip(&nic, None, "10.0.1.40")
        .await
        .expect("new address");
    let after = arm.get(&nic).await;
    let ipc = &after.body["properties"]["ipConfigurations"][0];
    assert_eq!(ipc["properties"]["privateIPAddress"], "10.0.1.40");
    assert_ne!(
        ipc["etag"],
        before.body["properties"]["ipConfigurations"][0]["etag"]
    );
    assert_ne!(after.body["etag"], before.body["etag"]);
    // The NSG is untouched by an address change.
    assert_eq!(
        after.body["properties"]["networkSecurityGroup"],
        before.body["properties"]["networkSecurityGroup"]
    );

    admin
        .set_nic_private_ip(&nic, Some("IPCONFIG1"), "10.0.1.41")
        .await
        .expect("by configuration name");
    let after = arm.get(&nic).await;
    assert_eq!(
        after.body["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"],
        "10.0.1.41"
    );

    for (ipc, ip, status) in [
        (None, "10.0.2.4", "400"), // outside the subnet 10.0.1.0/24
        (None, "not-an-ip", "400"),
        (Some("nope"), "10.0.1.42", "404"),
    ] {
        let err = admin.set_nic_private_ip(&nic, ipc, ip).await.unwrap_err();
        assert!(err.to_string().contains(status), "{ip}: {err}");
    }
    let unchanged = arm.get(&nic).await;
    assert_eq!(
        unchanged.body["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"],
        "10.0.1.41"
    );
}

/// `VirtualMachines_List` in a resource group: every VM with its NICs (wherever they live),
/// paged by `nextLink` on Compute's api-version, each page one read.
#[tokio::test]
async fn the_vms_of_a_resource_group_are_listed_in_pages() {
    let mut config = cross_rg_config();
    config.page_size = 1;
    let emu = start(config).await;
    let arm = Arm::login(&emu.base_url()).await;
    let reads_before = emu.admin().stats().await.expect("stats").reads;
    let list = |rg: &str| {
        format!(
            "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines?{COMPUTE}"
        )
    };
    let mut next = Some(list("RG-DEMO"));
    let mut vms = Vec::new();
    let mut pages = 0;
    while let Some(path) = next.take() {
        let r = arm.get(&path).await;
        assert_eq!(r.status, 200, "{r:?}");
        pages += 1;
        vms.extend(r.body["value"].as_array().expect("value").iter().cloned());
        if let Some(link) = r.body["nextLink"].as_str() {
            assert!(link.contains(COMPUTE), "{link}");
            next = Some(link.to_string());
        }
    }
    assert_eq!(pages, 2);
    let reads = emu.admin().stats().await.expect("stats").reads - reads_before;
    assert_eq!(reads, 2, "one read per page");
    let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["lonely", "vm1"]);
    // The same body as the VM's own GET.
    let one = arm.get(&vm_path("rg-demo", "vm1")).await;
    assert_eq!(vms[1], one.body);
    let nics: Vec<&str> = vms[1]["properties"]["networkProfile"]["networkInterfaces"]
        .as_array()
        .expect("networkInterfaces")
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        nics,
        [
            nic_id("rg-demo", "vm1-nic"),
            nic_id("rg-other", "vm1-data-nic")
        ]
    );
    assert_eq!(
        vms[0]["properties"]["networkProfile"]["networkInterfaces"],
        serde_json::json!([])
    );

    // A resource group without VMs lists none; a missing one is ARM's 404.
    let r = arm.get(&list("rg-other")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["value"], serde_json::json!([]));
    let r = arm.get(&list("rg-missing")).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (404, "ResourceGroupNotFound"),
        "{r:?}"
    );
}
