//! The admin routes for fault scenarios: NIC moved to another NSG, NSG deleted under the
//! operator, async operations that end `Failed`.

mod common;

use common::*;
use portcullis_azure_emulator::EmulatorConfig;

fn nic_id(nic: &str) -> String {
    format!("{}/networkInterfaces/{nic}", rg_path())
}

#[tokio::test]
async fn a_nic_moves_to_another_nsg_and_is_detached() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let admin = emu.admin();
    let nic_path = nic_id("vm1-nic");
    let before = arm.get(&nic_path).await;
    assert!(
        before.body["properties"]["networkSecurityGroup"]["id"]
            .as_str()
            .unwrap()
            .ends_with("/nsg-vm1")
    );

    admin
        .set_nic_nsg(&nic_path, Some("nsg-subnet"))
        .await
        .unwrap();
    let moved = arm.get(&nic_path).await;
    assert!(
        moved.body["properties"]["networkSecurityGroup"]["id"]
            .as_str()
            .unwrap()
            .ends_with("/nsg-subnet"),
        "{:?}",
        moved.body
    );
    assert_ne!(moved.body["etag"], before.body["etag"]);

    admin.set_nic_nsg(&nic_path, None).await.unwrap();
    let detached = arm.get(&nic_path).await;
    assert!(detached.body["properties"]["networkSecurityGroup"].is_null());

    let err = admin
        .set_nic_nsg(&nic_path, Some("nsg-nope"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    let err = admin.set_nic_nsg(&nic_id("nope"), None).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
}

#[tokio::test]
async fn an_nsg_in_use_is_detached_and_deleted() {
    let emu = start(demo_config()).await;
    let arm = Arm::login(&emu.base_url()).await;
    let admin = emu.admin();
    // ARM itself refuses: the NSG is in use by the subnet.
    let refused = arm.delete(&nsg_path("nsg-subnet")).await;
    assert_eq!(refused.status, 400, "{refused:?}");

    admin
        .delete_nsg_directly(&nsg_path("nsg-subnet"))
        .await
        .unwrap();
    assert_eq!(arm.get(&nsg_path("nsg-subnet")).await.status, 404);
    let subnet = arm
        .get(&format!(
            "{}/virtualNetworks/vnet-demo/subnets/app",
            rg_path()
        ))
        .await;
    assert!(subnet.body["properties"]["networkSecurityGroup"].is_null());
    // The other NSG and its NIC are untouched.
    assert_eq!(arm.get(&nsg_path("nsg-vm1")).await.status, 200);
    let err = admin
        .delete_nsg_directly(&nsg_path("nsg-subnet"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
}

#[tokio::test]
async fn operations_that_end_failed() {
    let emu = start(EmulatorConfig {
        async_delay: std::time::Duration::from_millis(200),
        ..demo_config()
    })
    .await;
    let arm = Arm::login(&emu.base_url()).await;
    emu.admin().fail_next_operations(2).await.unwrap();

    // A PUT is accepted, its operation ends Failed, the rule stays Failed.
    let put = arm
        .put(&rule_path("nsg-vm1", "jit-22"), &rule_body(120, "22"))
        .await;
    assert_eq!(put.status, 201, "{put:?}");
    let op = put.header("azure-asyncoperation").unwrap();
    eventually(10, "PUT operation Failed", || async {
        arm.get(&op).await.body["status"] == "Failed"
    })
    .await;
    let polled = arm.get(&op).await;
    assert_eq!(polled.body["error"]["code"], "InternalServerError");
    let rule = arm.get(&rule_path("nsg-vm1", "jit-22")).await;
    assert_eq!(rule.body["properties"]["provisioningState"], "Failed");

    // A DELETE is accepted, its operation ends Failed, the rule is still there.
    let del = arm.delete(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(del.status, 202, "{del:?}");
    let location = del.header("location").unwrap();
    eventually(10, "DELETE operation result 500", || async {
        arm.get(&location).await.status == 500
    })
    .await;
    let kept = arm.get(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(kept.status, 200);
    assert_eq!(kept.body["properties"]["provisioningState"], "Succeeded");

    // Then operations succeed again.
    let again = arm.delete(&rule_path("nsg-vm1", "allow-https")).await;
    assert_eq!(again.status, 202);
    arm.wait_op(&again).await;
    assert_eq!(
        arm.get(&rule_path("nsg-vm1", "allow-https")).await.status,
        404
    );
}
