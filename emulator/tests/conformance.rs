//! Conformance: replays the request of every Swagger example the emulator serves and checks
//! the status against the example's `responses` and the body's shape (field names, JSON types,
//! nesting) recursively.
//!
//! The spec folder comes from `AZURE_REST_API_SPECS` (default `../shared/azure-rest-api-specs`
//! relative to the workspace root). A missing folder fails the test.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use common::Arm;
use portcullis_azure_emulator::{EmulatorConfig, Fixture};
use serde_json::{Value, json};

const NETWORK_DIR: &str =
    "specification/network/resource-manager/Microsoft.Network/stable/2024-03-01";
const SWAGGERS: &[&str] = &["networkSecurityGroup.json", "networkInterface.json"];
/// Compute: the VM GET only, read in place from the shared specs.
const COMPUTE_DIR: &str =
    "specification/compute/resource-manager/Microsoft.Compute/ComputeRP/stable/2024-07-01";
const COMPUTE_SWAGGERS: &[&str] = &["virtualMachine.json"];

/// Examples the emulator serves.
const SERVED: &[&str] = &[
    "NetworkSecurityGroupCreate.json",
    "NetworkSecurityGroupCreateWithRule.json",
    "NetworkSecurityGroupGet.json",
    "NetworkSecurityGroupDelete.json",
    "NetworkSecurityGroupList.json",
    "NetworkSecurityGroupListAll.json",
    "NetworkSecurityGroupUpdateTags.json",
    "NetworkSecurityGroupRuleCreate.json",
    "NetworkSecurityGroupRuleDelete.json",
    "NetworkSecurityGroupRuleGet.json",
    "NetworkSecurityGroupRuleList.json",
    "DefaultSecurityRuleGet.json",
    "DefaultSecurityRuleList.json",
    "NetworkInterfaceGet.json",
    "NetworkInterfaceList.json",
    "NetworkInterfaceListAll.json",
    "virtualMachineExamples/VirtualMachine_Get.json",
];

/// Fields of the examples the emulator deliberately does not model (all optional in the Swagger).
const NOT_MODELLED: &[&str] = &[
    "publicIPAddress",
    "privateIPAddressPrefixLength",
    "dscpConfiguration",
    "internalDomainNameSuffix",
    "loadBalancerBackendAddressPools",
    "loadBalancerInboundNatRules",
    "virtualNetworkTaps",
    "tapConfigurations",
    "hostedWorkloads",
    "auxiliaryMode",
    "auxiliarySku",
    "applicationGatewayBackendAddressPools",
    "applicationSecurityGroups",
    "gatewayLoadBalancer",
    "sourceApplicationSecurityGroups",
    "destinationApplicationSecurityGroups",
    "flowLogs",
    "privateEndpoint",
    "privateLinkService",
    "migrationPhase",
    "workloadType",
    // VM fields (the emulator models a VM's identity, size and NICs only).
    "tags",
    "availabilitySet",
    "proximityPlacementGroup",
    "storageProfile",
    "applicationProfile",
    "userData",
    "osProfile",
    "diagnosticsProfile",
    "extensionsTimeBudget",
    "resources",
    "managedBy",
];

/// Fields the emulator returns beyond the examples: all defined by the Swagger and returned
/// by real Azure (etags, types, GUIDs, the plural forms of rule fields, back references).
const EXTRA_ALLOWED: &[&str] = &[
    "etag",
    "type",
    "resourceGuid",
    "sourcePortRanges",
    "destinationPortRanges",
    "sourceAddressPrefixes",
    "destinationAddressPrefixes",
    "networkInterfaces",
    "subnets",
    "nicType",
    "disableTcpStateTracking",
    "vnetEncryptionSupported",
    "enableAcceleratedNetworking",
    "enableIPForwarding",
    "macAddress",
    "dnsSettings",
    "privateIPAddressVersion",
    "flushConnection",
];

fn specs_dir() -> PathBuf {
    let workspace = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let configured = std::env::var("AZURE_REST_API_SPECS")
        .unwrap_or_else(|_| "../shared/azure-rest-api-specs".to_string());
    let p = PathBuf::from(&configured);
    if p.is_absolute() {
        p
    } else {
        workspace.join(p)
    }
}

fn read_json(p: &std::path::Path) -> Value {
    let text =
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("invalid JSON in {}: {e}", p.display()))
}

struct Operation {
    method: String,
    path: String,
    body_param: Option<String>,
    example: String,
}

fn operations(dir: &std::path::Path, swaggers: &[&str]) -> Vec<Operation> {
    let mut out = Vec::new();
    for file in swaggers {
        let swagger = read_json(&dir.join(file));
        let Some(paths) = swagger["paths"].as_object() else {
            panic!("{file}: no paths")
        };
        for (path, ops) in paths {
            let Some(ops) = ops.as_object() else { continue };
            for (method, op) in ops {
                let Some(examples) = op["x-ms-examples"].as_object() else {
                    continue;
                };
                let body_param = op["parameters"].as_array().and_then(|ps| {
                    ps.iter()
                        .find(|p| p["in"] == "body")
                        .and_then(|p| p["name"].as_str().map(str::to_string))
                });
                for ex in examples.values() {
                    let Some(r) = ex["$ref"].as_str() else {
                        continue;
                    };
                    out.push(Operation {
                        method: method.to_uppercase(),
                        path: path.clone(),
                        body_param: body_param.clone(),
                        example: r.trim_start_matches("./examples/").to_string(),
                    });
                }
            }
        }
    }
    out
}

fn fill(template: &str, params: &Value) -> String {
    let mut s = template.to_string();
    if let Some(obj) = params.as_object() {
        for (k, v) in obj {
            if let Some(v) = v.as_str() {
                s = s.replace(&format!("{{{k}}}"), v);
            }
        }
    }
    assert!(!s.contains('{'), "unfilled path template {s}");
    s
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Compares shapes; pushes one message per difference.
fn compare(expected: &Value, actual: &Value, at: &str, errs: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Null, _) => {}
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                match a.get(k) {
                    Some(av) => compare(ev, av, &format!("{at}.{k}"), errs),
                    None if NOT_MODELLED.contains(&k.as_str()) => {}
                    None => errs.push(format!("{at}.{k}: missing")),
                }
            }
            for k in a.keys() {
                if !e.contains_key(k) && !EXTRA_ALLOWED.contains(&k.as_str()) {
                    errs.push(format!("{at}.{k}: not in the example"));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.is_empty() {
                return;
            }
            for (i, av) in a.iter().enumerate() {
                // Each element must match one of the example's elements.
                let mut best: Option<Vec<String>> = None;
                for ev in e {
                    let mut local = Vec::new();
                    compare(ev, av, &format!("{at}[{i}]"), &mut local);
                    if best.as_ref().is_none_or(|b| local.len() < b.len()) {
                        best = Some(local);
                    }
                }
                errs.extend(best.unwrap_or_default());
            }
        }
        (e, a) => {
            if json_type(e) != json_type(a) {
                errs.push(format!(
                    "{at}: expected {}, got {}",
                    json_type(e),
                    json_type(a)
                ));
            }
        }
    }
}

fn fixture() -> Fixture {
    Fixture::from_yaml_str(
        r#"
subscriptions:
  - id: subid
    resourceGroups:
      - name: rg1
        location: eastus
        networkSecurityGroups:
          - name: nsg
        virtualNetworks:
          - name: rg1-vnet
            subnets:
              - name: default
                addressPrefix: 172.20.2.0/24
        networkInterfaces:
          - name: test-nic
            virtualMachine: vm1
            networkSecurityGroup: nsg
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 172.20.2.4
                subnet: rg1-vnet/default
              - name: ipconfig2
                privateIPAddress: 172.20.2.16
                subnet: rg1-vnet/default
      - name: testrg
        location: eastus
"#,
    )
    .expect("conformance fixture")
}

#[tokio::test]
async fn swagger_examples_conform() {
    let root = specs_dir();
    assert!(
        root.is_dir(),
        "Azure REST API specs not found at {} — set AZURE_REST_API_SPECS to a checkout of azure-rest-api-specs (default ../shared/azure-rest-api-specs relative to the workspace root)",
        root.display()
    );
    let dir = root.join(NETWORK_DIR);
    let compute_dir = root.join(COMPUTE_DIR);
    for d in [&dir, &compute_dir] {
        assert!(
            d.is_dir(),
            "{} missing under AZURE_REST_API_SPECS={}",
            d.display(),
            root.display()
        );
    }
    let mut ops: Vec<(&PathBuf, Operation)> = operations(&dir, SWAGGERS)
        .into_iter()
        .map(|op| (&dir, op))
        .collect();
    ops.extend(
        operations(&compute_dir, COMPUTE_SWAGGERS)
            .into_iter()
            .map(|op| (&compute_dir, op)),
    );
    let create_with_rule = read_json(&dir.join("examples/NetworkSecurityGroupCreateWithRule.json"));
    let nsg_path = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Network/networkSecurityGroups/{networkSecurityGroupName}";

    let mut ran = BTreeSet::new();
    let mut skipped = BTreeSet::new();
    let mut failures: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (dir, op) in &ops {
        if !SERVED.contains(&op.example.as_str()) {
            skipped.insert(op.example.clone());
            continue;
        }
        let example = read_json(&dir.join("examples").join(&op.example));
        let is_compute = op.path.contains("/Microsoft.Compute/");
        let mut params = example["parameters"].clone();
        if is_compute {
            // The Compute examples use placeholders (`{subscription-id}`): ask for the
            // fixture's VM instead.
            params["subscriptionId"] = json!("subid");
            params["resourceGroupName"] = json!("rg1");
            params["vmName"] = json!("vm1");
        }
        let params = &params;
        let emu = common::start(EmulatorConfig {
            fixture: fixture(),
            async_delay: Duration::ZERO,
            ..EmulatorConfig::default()
        })
        .await;
        let arm = Arm::login(&emu.base_url()).await;

        // Seed: every example except NSG creation needs its NSG; create it with the
        // CreateWithRule example's body under this example's names.
        let creates_nsg = op.method == "PUT" && op.path.ends_with("{networkSecurityGroupName}");
        if !creates_nsg && !is_compute {
            let mut seed_params = params.clone();
            if seed_params.get("networkSecurityGroupName").is_none() {
                seed_params["networkSecurityGroupName"] = json!("testnsg");
            }
            if seed_params.get("resourceGroupName").is_none() {
                seed_params["resourceGroupName"] = json!("rg1");
            }
            let seed = arm
                .put(
                    &fill(nsg_path, &seed_params),
                    &create_with_rule["parameters"]["parameters"],
                )
                .await;
            assert!(
                matches!(seed.status, 200 | 201),
                "{}: seeding failed: {seed:?}",
                op.example
            );
            arm.wait_op(&seed).await;
        }

        let path = format!(
            "{}?api-version={}",
            fill(&op.path, params),
            params["api-version"].as_str().unwrap_or("2024-03-01")
        );
        let body = op.body_param.as_ref().and_then(|b| params.get(b)).cloned();
        let method = reqwest::Method::from_bytes(op.method.as_bytes()).unwrap();
        let resp = arm.send(method, &path, body.as_ref()).await;
        let responses = example["responses"].as_object().expect("responses");
        let mut errs = Vec::new();
        match responses.get(&resp.status.to_string()) {
            None => errs.push(format!(
                "status {} not among the example's {:?}: {}",
                resp.status,
                responses.keys().collect::<Vec<_>>(),
                resp.body
            )),
            Some(expected) => {
                if let Some(eb) = expected.get("body") {
                    compare(eb, &resp.body, "$", &mut errs);
                }
                if let Some(headers) = expected.get("headers").and_then(Value::as_object) {
                    for h in headers.keys() {
                        if resp.header(h).is_none() {
                            errs.push(format!("header {h} missing"));
                        }
                    }
                }
            }
        }
        if !errs.is_empty() {
            failures.insert(op.example.clone(), errs);
        }
        ran.insert(op.example.clone());
        emu.shutdown().await;
    }
    eprintln!("conformance: replayed {} examples: {ran:?}", ran.len());
    eprintln!(
        "conformance: SKIPPED {} examples the emulator does not serve: {skipped:?}",
        skipped.len()
    );
    let missing: Vec<_> = SERVED.iter().filter(|e| !ran.contains(**e)).collect();
    assert!(
        missing.is_empty(),
        "served examples not found in the Swagger: {missing:?}"
    );
    assert!(failures.is_empty(), "conformance failures:\n{failures:#?}");
}

#[test]
fn shape_comparison_detects_differences() {
    let mut errs = Vec::new();
    compare(
        &json!({"a": 1, "b": {"c": "x"}}),
        &json!({"a": "1", "b": {}}),
        "$",
        &mut errs,
    );
    assert_eq!(errs, ["$.a: expected number, got string", "$.b.c: missing"]);
    let mut errs = Vec::new();
    compare(
        &json!({"a": []}),
        &json!({"a": [1, 2], "zzz": 1}),
        "$",
        &mut errs,
    );
    assert_eq!(errs, ["$.zzz: not in the example"]);
    let mut errs = Vec::new();
    compare(
        &json!([{"x": 1}]),
        &json!([{"x": 1}, {"x": true}]),
        "$",
        &mut errs,
    );
    assert_eq!(errs, ["$[1].x: expected number, got bool"]);
}
