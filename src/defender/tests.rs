//! Round trips through the text the commands read and write. Property runs take
//! `PROPTEST_CASES` (default 256).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::model::*;
use super::*;
use crate::api::duration::format_iso8601;
use crate::api::{JitPolicy, JitPolicySpec, PolicyPort, PolicyVirtualMachine, Protocol};

fn options() -> ImportOptions {
    ImportOptions {
        namespace: "team-a".into(),
    }
}

fn vm_id(sub: &str, rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
    )
}

fn arb_prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        Just("Internet".to_string()),
        (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(a, l)| format!("{}.{}.{}.{}/{l}", a[0], a[1], a[2], a[3])),
        any::<[u8; 4]>().prop_map(|a| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])),
        (any::<u16>(), 16u8..=128).prop_map(|(h, l)| format!("2001:db8:{h:x}::/{l}")),
    ]
}

/// Singular or plural, as Defender allows (never both).
fn arb_sources() -> impl Strategy<Value = (Option<String>, Vec<String>)> {
    prop_oneof![
        arb_prefix().prop_map(|p| (Some(p), Vec::new())),
        prop::collection::vec(arb_prefix(), 1..4).prop_map(|v| (None, v)),
    ]
}

fn arb_duration() -> impl Strategy<Value = String> {
    prop_oneof![
        (300u64..=86_400).prop_map(|s| format_iso8601(std::time::Duration::from_secs(s))),
        Just("PT3H".to_string()),
        Just("P1D".to_string()),
        Just("PT90M".to_string()),
        Just("P0DT1H".to_string()),
    ]
}

/// VM names and per-VM ports, unique where the policy wants them unique. Each VM has its own
/// port set.
/// A port: number, protocol, (singular, plural) sources, maximum duration.
type GenPort = (u16, Protocol, (Option<String>, Vec<String>), String);

fn arb_vms() -> impl Strategy<Value = Vec<(String, Vec<GenPort>)>> {
    prop::collection::btree_map(
        "[a-z][a-z0-9-]{0,10}[a-z0-9]",
        prop::collection::btree_map(
            (1u16..=65535, 0u8..3),
            (arb_sources(), arb_duration()),
            1..5,
        ),
        1..5,
    )
    .prop_map(|vms| {
        vms.into_iter()
            .map(|(name, ports)| {
                let ports = ports
                    .into_iter()
                    .map(|((n, p), (s, d))| {
                        (
                            n,
                            [Protocol::Tcp, Protocol::Udp, Protocol::Any][usize::from(p)],
                            s,
                            d,
                        )
                    })
                    .collect();
                (name, ports)
            })
            .collect()
    })
}

fn arb_rg() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9_.()-]{0,20}[A-Za-z0-9]"
}

/// Defender policies that Portcullis can express (and what a GET returns around them).
fn arb_defender_policy() -> impl Strategy<Value = JitNetworkAccessPolicy> {
    (
        arb_rg(),
        prop::option::of("[a-z]{4,12}"),
        prop::option::of(Just("Basic".to_string())),
        arb_vms(),
        prop::collection::vec(prop::option::of("[0-9]{1,3}\\.[0-9]{1,3}\\.0\\.1"), 5),
    )
        .prop_map(|(rg, location, kind, vms, ips)| {
            let sub = "20ff7fc3-e762-44dd-bd96-b71116dcdc23";
            let virtual_machines = vms
                .into_iter()
                .zip(ips)
                .map(|((name, ports), ip)| JitNetworkAccessPolicyVirtualMachine {
                    id: vm_id(sub, &rg, &name),
                    ports: ports
                        .into_iter()
                        .map(|(number, protocol, (singular, plural), duration)| {
                            JitNetworkAccessPortRule {
                                number,
                                protocol: crate::plan::validate::protocol_str(protocol).into(),
                                allowed_source_address_prefix: singular,
                                allowed_source_address_prefixes: (!plural.is_empty())
                                    .then_some(plural),
                                max_request_access_duration: duration,
                                extra: BTreeMap::new(),
                            }
                        })
                        .collect(),
                    public_ip_address: ip,
                    extra: BTreeMap::new(),
                })
                .collect();
            let id = location.as_ref().map(|l| PolicyId {
                subscription: sub.into(),
                resource_group: rg.clone(),
                location: l.clone(),
                name: "default".into(),
            });
            JitNetworkAccessPolicy {
                id: id.as_ref().map(PolicyId::path),
                name: id.as_ref().map(|_| "default".to_string()),
                type_: id.as_ref().map(|_| RESOURCE_TYPE.to_string()),
                location,
                kind,
                properties: JitNetworkAccessPolicyProperties {
                    virtual_machines,
                    requests: None,
                    provisioning_state: id.as_ref().map(|_| "Succeeded".to_string()),
                    extra: BTreeMap::new(),
                },
                extra: BTreeMap::new(),
            }
        })
}

/// JitPolicy specs that Defender can express: no requesters, no approvals, VMs in one resource
/// group.
fn arb_spec() -> impl Strategy<Value = JitPolicySpec> {
    (arb_rg(), arb_vms()).prop_map(|(rg, vms)| JitPolicySpec {
        virtual_machines: vms
            .into_iter()
            .map(|(name, ports)| PolicyVirtualMachine {
                id: vm_id("sub-1", &rg, &name),
                ports: ports
                    .into_iter()
                    .map(
                        |(number, protocol, (singular, plural), duration)| PolicyPort {
                            number,
                            protocol,
                            allowed_source_address_prefix: singular,
                            allowed_source_address_prefixes: plural,
                            max_request_access_duration: duration,
                            approval: None,
                        },
                    )
                    .collect(),
            })
            .collect(),
        requesters: None,
        approval: None,
        notifications: None,
    })
}

/// What a PUT of `p` sends: `kind` (Basic when absent) and the VMs.
fn put_shape(p: &JitNetworkAccessPolicy) -> JitNetworkAccessPolicy {
    JitNetworkAccessPolicy {
        kind: Some(p.kind.clone().unwrap_or_else(|| "Basic".into())),
        properties: JitNetworkAccessPolicyProperties {
            virtual_machines: p.properties.virtual_machines.clone(),
            ..Default::default()
        },
        ..Default::default()
    }
}

proptest! {
    #[test]
    fn defender_import_then_export_gives_the_policy_back(
        policies in prop::collection::vec(arb_defender_policy(), 1..4),
        az_shape in any::<bool>(),
    ) {
        // The REST API's list page, or the Azure CLI's flattened array.
        let text = if az_shape {
            let flat: Vec<serde_json::Value> = policies.iter().map(|p| {
                let mut v = serde_json::to_value(p).unwrap();
                let props = v.as_object_mut().unwrap().remove("properties").unwrap();
                for (k, x) in props.as_object().unwrap() {
                    v.as_object_mut().unwrap().insert(k.clone(), x.clone());
                }
                v
            }).collect();
            serde_json::to_string(&flat).unwrap()
        } else {
            serde_json::to_string(&JitNetworkAccessPoliciesList { value: policies.clone(), next_link: None }).unwrap()
        };
        let imported = import(&text, &options()).unwrap();
        prop_assert_eq!(imported.policies.len(), policies.len());
        let not_carried: Vec<_> = imported.all_findings()
            .filter(|f| f.severity == Severity::NotCarried && !f.field.ends_with("publicIpAddress"))
            .collect();
        prop_assert!(not_carried.is_empty(), "{:?}", not_carried);
        let yaml = imported.to_yaml().unwrap();
        let exported = export(&yaml).unwrap();
        prop_assert_eq!(exported.policies.len(), policies.len());
        prop_assert!(exported.all_findings().next().is_none(), "{:?}", exported.all_findings().collect::<Vec<_>>());
        let json = exported.to_json().unwrap();
        let bodies: Vec<JitNetworkAccessPolicy> = if policies.len() == 1 {
            vec![serde_json::from_str(&json).unwrap()]
        } else {
            serde_json::from_str(&json).unwrap()
        };
        for ((original, body), e) in policies.iter().zip(&bodies).zip(&exported.policies) {
            prop_assert_eq!(body, &put_shape(original));
            if let Some(id) = &original.id {
                prop_assert_eq!(&e.target, &format!("{id}?api-version=2020-01-01"));
            }
        }
        let names: std::collections::BTreeSet<_> = imported.policies.iter()
            .map(|p| p.manifest.metadata.name.clone().unwrap()).collect();
        prop_assert_eq!(names.len(), policies.len(), "names are unique");
    }

    #[test]
    fn jitpolicy_export_then_import_gives_the_spec_back(
        specs in prop::collection::vec(arb_spec(), 1..4),
    ) {
        let yaml: String = specs.iter().enumerate().map(|(i, spec)| {
            let mut p = JitPolicy::new(&format!("p{i}"), spec.clone());
            p.metadata.namespace = Some("team-a".into());
            format!("---\n{}", serde_yaml::to_string(&p).unwrap())
        }).collect();
        let exported = export(&yaml).unwrap();
        prop_assert!(exported.all_findings().next().is_none());
        let imported = import(&exported.to_json().unwrap(), &options()).unwrap();
        let back: Vec<&JitPolicySpec> = imported.policies.iter().map(|p| &p.manifest.spec).collect();
        prop_assert_eq!(back, specs.iter().collect::<Vec<_>>());
        let not_carried: Vec<_> = imported.all_findings().filter(|f| f.severity == Severity::NotCarried).collect();
        prop_assert!(not_carried.is_empty(), "{:?}", not_carried);
    }
}

#[test]
fn per_vm_port_sets_stay_in_one_policy() {
    let text = serde_json::json!({
        "kind": "Basic",
        "properties": {"virtualMachines": [
            {"id": vm_id("s", "rg", "web"), "ports": [
                {"number": 443, "protocol": "TCP", "allowedSourceAddressPrefixes": ["10.0.0.0/8"], "maxRequestAccessDuration": "PT1H"}]},
            {"id": vm_id("s", "rg", "db"), "ports": [
                {"number": 5432, "protocol": "TCP", "allowedSourceAddressPrefix": "10.1.0.0/16", "maxRequestAccessDuration": "PT30M"},
                {"number": 22, "protocol": "tcp", "allowedSourceAddressPrefix": "10.1.0.0/16", "maxRequestAccessDuration": "PT30M"}]}
        ]}
    })
    .to_string();
    let imported = import(&text, &options()).unwrap();
    assert_eq!(imported.policies.len(), 1);
    let spec = &imported.policies[0].manifest.spec;
    assert_eq!(spec.virtual_machines[0].ports.len(), 1);
    assert_eq!(spec.virtual_machines[1].ports.len(), 2);
    assert_eq!(spec.virtual_machines[1].ports[1].protocol, Protocol::Tcp);
    assert_eq!(
        imported.policies[0].manifest.metadata.name.as_deref(),
        Some("rg-jit"),
        "no id nor name: named after the VMs' resource group"
    );
    assert!(
        imported
            .all_findings()
            .any(|f| f.severity == Severity::Note && f.field.ends_with("ports[1].protocol")),
        "lower-case tcp is reported as normalised"
    );
}

#[test]
fn what_portcullis_does_not_serve_is_reported_and_annotated() {
    let text = serde_json::json!({
        "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default",
        "name": "default", "location": "westeurope", "kind": "Basic", "resourceGroup": "rg",
        "shinyNewField": 1,
        "virtualMachines": [{"id": vm_id("s", "rg", "vm1"), "publicIpAddress": "20.1.2.3", "ports": [
            {"number": 22, "protocol": "*", "allowedSourceAddressPrefix": "1.2.3.4", "allowedSourceAddressPrefixes": ["5.6.7.0/24"], "maxRequestAccessDuration": "PT3H", "mappedPort": 5022}]}],
        "requests": [],
        "provisioningState": "Succeeded"
    })
    .to_string();
    let imported = import(&text, &options()).unwrap();
    let p = &imported.policies[0];
    let fields: Vec<(Severity, &str)> = p
        .findings
        .iter()
        .map(|f| (f.severity, f.field.as_str()))
        .collect();
    for want in [
        (
            Severity::NotCarried,
            "properties.virtualMachines[0].publicIpAddress",
        ),
        (Severity::NotCarried, "shinyNewField"),
        (
            Severity::NotCarried,
            "properties.virtualMachines[0].ports[0].mappedPort",
        ),
        (Severity::Note, "resourceGroup"),
        (Severity::Note, "properties.provisioningState"),
        (
            Severity::Note,
            "properties.virtualMachines[0].ports[0].allowedSourceAddressPrefix",
        ),
    ] {
        assert!(fields.contains(&want), "{want:?} missing from {fields:?}");
    }
    let port = &p.manifest.spec.virtual_machines[0].ports[0];
    assert_eq!(port.allowed_source_address_prefix, None);
    assert_eq!(
        port.allowed_source_address_prefixes,
        ["1.2.3.4", "5.6.7.0/24"]
    );
    let ann = p.manifest.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        ann[annotations::PUBLIC_IP_ADDRESSES],
        format!("{{\"{}\":\"20.1.2.3\"}}", vm_id("s", "rg", "vm1"))
    );
    assert!(ann[annotations::NOT_CARRIED].contains("publicIpAddress"));
    let yaml = imported.to_yaml().unwrap();
    assert!(
        yaml.contains("# NOT CARRIED: properties.virtualMachines[0].publicIpAddress"),
        "{yaml}"
    );
    // The export puts the firewall address back.
    let exported = export(&yaml).unwrap();
    assert_eq!(
        exported.policies[0].body.properties.virtual_machines[0]
            .public_ip_address
            .as_deref(),
        Some("20.1.2.3")
    );
}

#[test]
fn malformed_input_is_a_typed_error_naming_the_place() {
    type Check = fn(&ImportError) -> bool;
    let cases: &[(&str, Check)] = &[
        ("not json", |e| matches!(e, ImportError::Json(_))),
        ("[]", |e| matches!(e, ImportError::Empty)),
        ("{\"value\": []}", |e| matches!(e, ImportError::Empty)),
        (
            "[1]",
            |e| matches!(e, ImportError::NotAPolicy { at, .. } if at == "[0]"),
        ),
        ("{\"kind\": \"Basic\"}", |e| {
            matches!(e, ImportError::NotAPolicy { .. })
        }),
        (
            r#"{"virtualMachines": [{"id": "x", "ports": []}], "justification": "j"}"#,
            |e| matches!(e, ImportError::NotAPolicy { why, .. } if why.contains("request")),
        ),
        (
            r#"{"value": [{"properties": {"virtualMachines": [{"id": "x", "ports": [{"number": 70000, "protocol": "TCP", "maxRequestAccessDuration": "PT1H"}]}]}}]}"#,
            |e| matches!(e, ImportError::Malformed { at, path, .. } if at == "value[0]" && path == "properties.virtualMachines[0].ports[0].number"),
        ),
        (
            r#"{"properties": {"virtualMachines": [{"id": "x", "ports": [{"number": 22, "maxRequestAccessDuration": "PT1H"}]}]}}"#,
            |e| matches!(e, ImportError::Malformed { message, .. } if message.contains("protocol")),
        ),
        (
            r#"{"properties": {"virtualMachines": [{"id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v", "ports": [{"number": 22, "protocol": "ICMP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT1H"}]}]}}"#,
            |e| matches!(e, ImportError::Protocol { value, .. } if value == "ICMP"),
        ),
        (
            r#"{"properties": {"virtualMachines": [{"id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v", "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT1H"}]}]}}"#,
            |e| {
                matches!(
                    e,
                    ImportError::Unexpressible {
                        reason: "NoAllowedSource",
                        ..
                    }
                )
            },
        ),
        (
            r#"{"properties": {"virtualMachines": [{"id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v", "ports": [{"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "P2D"}]}]}}"#,
            |e| {
                matches!(
                    e,
                    ImportError::Unexpressible {
                        reason: "InvalidMaxRequestAccessDuration",
                        ..
                    }
                )
            },
        ),
        (
            r#"{"properties": {"virtualMachines": [{"id": "vm1", "ports": [{"number": 0, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT1H"}]}]}}"#,
            |e| {
                matches!(
                    e,
                    ImportError::Unexpressible {
                        reason: "InvalidVirtualMachineId",
                        ..
                    }
                )
            },
        ),
    ];
    for (input, is) in cases {
        let err = import(input, &options()).expect_err(input);
        assert!(is(&err), "{input}: {err:?}");
    }
}

#[test]
fn a_next_link_is_reported() {
    let text = serde_json::json!({"value": [{"properties": {"virtualMachines": [{"id": vm_id("s", "rg", "v"), "ports": [
        {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": "*", "maxRequestAccessDuration": "PT1H"}]}]}}],
        "nextLink": "https://management.azure.com/next"})
    .to_string();
    let imported = import(&text, &options()).unwrap();
    assert!(
        imported
            .findings
            .iter()
            .any(|f| f.severity == Severity::NotCarried && f.field == "nextLink")
    );
}

#[test]
fn export_reports_what_defender_cannot_express() {
    let yaml = format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: x}}
---
apiVersion: portcullis.dev/v1alpha1
kind: JitPolicy
metadata: {{name: p, namespace: team-a}}
spec:
  requesters: {{groups: [oncall]}}
  approval: {{required: 1, approvers: {{users: [carol]}}}}
  notifications: [{{secretName: team-a-slack}}]
  virtualMachines:
    - id: {a}
      ports:
        - {{number: 22, protocol: TCP, allowedSourceAddressPrefix: "*", maxRequestAccessDuration: PT1M}}
    - id: {b}
      ports:
        - {{number: 22, protocol: TCP, allowedSourceAddressPrefix: "*", maxRequestAccessDuration: PT1H}}
"#,
        a = vm_id("s", "rg1", "a"),
        b = vm_id("s", "rg2", "b")
    );
    let exported = export(&yaml).unwrap();
    let fields: Vec<&str> = exported.all_findings().map(|f| f.field.as_str()).collect();
    for want in [
        "kind",
        "spec.requesters",
        "spec.approval",
        "spec.notifications",
        "spec.virtualMachines[0].ports[0].maxRequestAccessDuration",
        "spec.virtualMachines",
    ] {
        assert!(fields.contains(&want), "{want} missing from {fields:?}");
    }
    assert_eq!(
        exported.policies[0].target,
        "/subscriptions/s/resourceGroups/rg1/providers/Microsoft.Security/locations/<location>/jitNetworkAccessPolicies/p?api-version=2020-01-01"
    );
    for (bad, is) in [
        (
            "",
            (|e: &ExportError| matches!(e, ExportError::Empty)) as fn(&ExportError) -> bool,
        ),
        ("a: [", |e| {
            matches!(e, ExportError::Yaml { document: 1, .. })
        }),
        (
            "apiVersion: portcullis.dev/v1alpha1\nkind: JitPolicy\nmetadata: {name: p}\nspec: {virtualMachines: 3}\n",
            |e| matches!(e, ExportError::Manifest { document: 1, .. }),
        ),
        (
            "apiVersion: portcullis.dev/v1alpha1\nkind: JitPolicy\nmetadata: {name: p}\nspec: {virtualMachines: []}\n",
            |e| matches!(e, ExportError::Invalid { .. }),
        ),
    ] {
        let err = export(bad).expect_err(bad);
        assert!(is(&err), "{bad}: {err:?}");
    }
}
