//! `portcullis import defender` / `export defender` against Defender for Cloud's own examples
//! (read in place from `AZURE_REST_API_SPECS`, default `../shared/azure-rest-api-specs`; the
//! tests fail when the folder is absent), and the emitted manifests against the real API server.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use portcullis::api::JitPolicy;
use portcullis::defender::model::JitNetworkAccessPolicy;
use portcullis::defender::{self, ImportError, ImportOptions, Severity, annotations};

const JIT_EXAMPLES: [&str; 2] = [
    "specification/security/resource-manager/Microsoft.Security/stable/2020-01-01/examples/JitNetworkAccessPolicies",
    "specification/security/resource-manager/Microsoft.Security/preview/2015-06-01-preview/examples/JitNetworkAccessPolicies",
];

fn specs_dir() -> PathBuf {
    let configured = std::env::var("AZURE_REST_API_SPECS")
        .unwrap_or_else(|_| "../shared/azure-rest-api-specs".to_string());
    let p = PathBuf::from(&configured);
    let p = if p.is_absolute() {
        p
    } else {
        support::repo_root().join(p)
    };
    assert!(
        p.is_dir(),
        "Azure REST API specs not found at {} — set AZURE_REST_API_SPECS to a checkout of azure-rest-api-specs (default ../shared/azure-rest-api-specs relative to the workspace root)",
        p.display()
    );
    p
}

/// Every example file of the JIT policies, both api-versions, sorted.
fn example_files() -> Vec<PathBuf> {
    let root = specs_dir();
    let mut files = Vec::new();
    for dir in JIT_EXAMPLES {
        let dir = root.join(dir);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "{} missing under AZURE_REST_API_SPECS={}: {e}",
                dir.display(),
                root.display()
            )
        });
        let before = files.len();
        files.extend(
            entries
                .map(|e| e.expect("directory entry").path())
                .filter(|p| p.extension().is_some_and(|x| x == "json")),
        );
        assert!(files.len() > before, "no example in {}", dir.display());
    }
    files.sort();
    files
}

fn read_json(p: &Path) -> Value {
    let text =
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("invalid JSON in {}: {e}", p.display()))
}

/// The bodies an example holds: the request's, then each response's, with a label.
fn bodies(example: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    if let Some(b) = example.pointer("/parameters/body") {
        out.push(("request".to_string(), b.clone()));
    }
    if let Some(Value::Object(responses)) = example.get("responses") {
        for (code, r) in responses {
            if let Some(b) = r.get("body") {
                out.push((format!("response {code}"), b.clone()));
            }
        }
    }
    out
}

/// A body holds policies when it is one (`properties`) or a list of them (`value`).
fn holds_policies(body: &Value) -> bool {
    body.get("properties").is_some() || body.get("value").is_some()
}

/// The policies of a body, raw.
fn raw_policies(body: &Value) -> Vec<Value> {
    match body.get("value") {
        Some(Value::Array(items)) => items.clone(),
        _ => vec![body.clone()],
    }
}

/// Every leaf of `v` with its path in the import's notation (`a.b[0].c`).
fn leaves(v: &Value, path: String, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                leaves(x, p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, x) in items.iter().enumerate() {
                leaves(x, format!("{path}[{i}]"), out);
            }
        }
        other => out.push((path, other.clone())),
    }
}

/// `properties.virtualMachines[1].ports[2].number` -> (1, Some(2), "number").
fn vm_port_field(path: &str) -> Option<(usize, Option<usize>, &str)> {
    let rest = path.strip_prefix("properties.virtualMachines[")?;
    let (vm, rest) = rest.split_once("]")?;
    let vm = vm.parse().ok()?;
    let rest = rest.strip_prefix('.')?;
    match rest.strip_prefix("ports[") {
        Some(r) => {
            let (port, field) = r.split_once("].")?;
            Some((vm, Some(port.parse().ok()?), field))
        }
        None => Some((vm, None, rest)),
    }
}

/// Checks that every leaf of the raw policy landed in the spec where it belongs, or is named by a
/// finding (its own path or an enclosing one).
fn assert_every_field_accounted_for(what: &str, raw: &Value, imported: &defender::ImportedPolicy) {
    let spec = &imported.manifest.spec;
    let mut all = Vec::new();
    leaves(raw, String::new(), &mut all);
    assert!(all.len() > 5, "{what}: a policy has fields");
    let reported = |path: &str| {
        imported.findings.iter().any(|f| {
            f.field.split(", ").any(|field| {
                path == field
                    || path.starts_with(&format!("{field}."))
                    || path.starts_with(&format!("{field}["))
            })
        })
    };
    for (path, value) in all {
        let landed = match vm_port_field(&path) {
            Some((v, None, "id")) => Some(Value::from(spec.virtual_machines[v].id.clone())),
            Some((v, Some(p), field)) => {
                let port = &spec.virtual_machines[v].ports[p];
                match field {
                    "number" => Some(Value::from(port.number)),
                    "protocol" => Some(serde_json::to_value(port.protocol).unwrap()),
                    "allowedSourceAddressPrefix" => {
                        port.allowed_source_address_prefix.clone().map(Value::from)
                    }
                    "maxRequestAccessDuration" => {
                        Some(Value::from(port.max_request_access_duration.clone()))
                    }
                    f if f.starts_with("allowedSourceAddressPrefixes[") => {
                        let i: usize = f
                            .trim_start_matches("allowedSourceAddressPrefixes[")
                            .trim_end_matches(']')
                            .parse()
                            .unwrap();
                        port.allowed_source_address_prefixes
                            .get(i)
                            .cloned()
                            .map(Value::from)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        match landed {
            Some(got) => assert_eq!(got, value, "{what}: {path} lands in the spec unchanged"),
            None => assert!(
                reported(&path),
                "{what}: {path} = {value} neither lands in the spec nor is reported: {:#?}",
                imported.findings
            ),
        }
    }
    let ann = imported
        .manifest
        .metadata
        .annotations
        .clone()
        .unwrap_or_default();
    if let Some(id) = raw.get("id").and_then(Value::as_str) {
        assert_eq!(
            ann.get(annotations::ID).map(String::as_str),
            Some(id),
            "{what}"
        );
    }
    if let Some(kind) = raw.get("kind").and_then(Value::as_str) {
        assert_eq!(
            ann.get(annotations::KIND).map(String::as_str),
            Some(kind),
            "{what}"
        );
    }
    if raw
        .pointer("/properties/requests")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty())
    {
        assert!(
            imported
                .findings
                .iter()
                .any(|f| f.severity == Severity::NotCarried && f.field == "properties.requests"),
            "{what}: requests are reported loudly"
        );
        assert!(
            ann.get(annotations::NOT_CARRIED)
                .is_some_and(|v| v.contains("properties.requests")),
            "{what}: and annotated"
        );
    }
}

#[test]
fn every_policy_in_the_shared_examples_imports_and_every_field_is_accounted_for() {
    let options = ImportOptions {
        namespace: "team-a".into(),
    };
    let mut imported_from = Vec::new();
    let mut refused = Vec::new();
    for file in example_files() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let example = read_json(&file);
        for (label, body) in bodies(&example) {
            let what = format!("{name} ({label})");
            let text = body.to_string();
            if !holds_policies(&body) {
                // An initiate request and its answer: refused as not a policy, naming why.
                if body.get("virtualMachines").is_some() {
                    let err = defender::import(&text, &options).expect_err(&what);
                    assert!(
                        matches!(&err, ImportError::NotAPolicy { why, .. } if why.contains("request")),
                        "{what}: {err}"
                    );
                    refused.push(what);
                }
                continue;
            }
            let imported = defender::import(&text, &options)
                .unwrap_or_else(|e| panic!("{what} does not import: {e}"));
            let raws = raw_policies(&body);
            assert_eq!(imported.policies.len(), raws.len(), "{what}");
            for (raw, policy) in raws.iter().zip(&imported.policies) {
                assert_every_field_accounted_for(&what, raw, policy);
                assert_eq!(
                    policy.manifest.metadata.namespace.as_deref(),
                    Some("team-a")
                );
            }
            // And back: the export gives the request body's policy again.
            let exported = defender::export(&imported.to_yaml().unwrap())
                .unwrap_or_else(|e| panic!("{what}: export: {e}"));
            for (raw, e) in raws.iter().zip(&exported.policies) {
                let raw: JitNetworkAccessPolicy = serde_json::from_value(raw.clone()).unwrap();
                assert_eq!(
                    e.body.properties.virtual_machines, raw.properties.virtual_machines,
                    "{what}: round trip"
                );
                assert_eq!(e.body.kind, raw.kind, "{what}: kind");
                if let Some(id) = &raw.id {
                    assert_eq!(e.target, format!("{id}?api-version=2020-01-01"), "{what}");
                }
            }
            imported_from.push(what);
        }
    }
    // Both api-versions, requests and responses, single policies and lists.
    for want in [
        "CreateJitNetworkAccessPolicy_example.json (request)",
        "CreateJitNetworkAccessPolicy_example.json (response 200)",
        "GetJitNetworkAccessPolicy_example.json (response 200)",
        "GetJitNetworkAccessPoliciesResourceGroupLocation_example.json (response 200)",
        "GetJitNetworkAccessPoliciesSubscription_example.json (response 200)",
        "GetJitNetworkAccessPoliciesResourceGroup_example.json (response 200)",
        "GetJitNetworkAccessPoliciesSubscriptionLocation_example.json (response 200)",
    ] {
        assert!(
            imported_from.iter().any(|w| w == want),
            "{want} not imported; imported: {imported_from:?}"
        );
    }
    assert!(
        refused
            .iter()
            .any(|w| w.starts_with("InitiateJitNetworkAccessPolicy_example.json")),
        "the initiate example is refused as not a policy: {refused:?}"
    );
}

fn example_body(name: &str) -> Value {
    let file = example_files()
        .into_iter()
        .find(|f| f.file_name().is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("{name} not among the examples"));
    read_json(&file)
        .pointer("/responses/200/body")
        .cloned()
        .unwrap_or_else(|| panic!("{name} has no 200 body"))
}

/// Runs the built `portcullis` with `args`, `stdin` fed in.
fn portcullis(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("portcullis runs");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("portcullis finishes")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Creates the manifests with a server-side dry run in `ns`: the API server checks names and
/// the schema, and stores nothing.
fn assert_server_accepts(yaml: &str, ns: &str) {
    let out = support::kubectl(
        &[
            "create",
            "--dry-run=server",
            "-n",
            ns,
            "-o",
            "name",
            "-f",
            "-",
        ],
        Some(yaml),
    );
    assert!(
        out.status.success(),
        "the API server refuses the imported manifests: {}\n{yaml}",
        support::output_text(&out)
    );
}

#[tokio::test]
async fn the_cli_imports_a_file_and_stdin_and_the_api_server_accepts_the_result() {
    let client = support::kube::client().await;
    support::kube::install_crds(&client).await;
    let ns = support::kube::fresh_namespace(&client, "defender").await;

    // A file: the subscription-wide list as the REST API returns it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.json");
    let list = example_body("GetJitNetworkAccessPoliciesSubscription_example.json");
    std::fs::write(&file, list.to_string()).unwrap();
    let out = portcullis(
        &[
            "import",
            "defender",
            file.to_str().unwrap(),
            "--namespace",
            &ns,
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let yaml = stdout(&out);
    assert!(
        stderr(&out).contains("NOT CARRIED") && stderr(&out).contains("properties.requests"),
        "the report names the requests on stderr: {}",
        stderr(&out)
    );
    assert!(
        yaml.contains("# NOT CARRIED: properties.requests"),
        "{yaml}"
    );
    let docs: Vec<JitPolicy> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("a JitPolicy"))
        .collect();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].metadata.name.as_deref(), Some("myrg1-default"));
    assert_eq!(docs[0].metadata.namespace.as_deref(), Some(ns.as_str()));
    assert_server_accepts(&yaml, &ns);

    // Stdin: the Azure CLI's shape (flattened, nulls, `resourceGroup`), with names that need
    // cleaning, truncating and telling apart.
    let single = example_body("GetJitNetworkAccessPolicy_example.json");
    let long_rg = format!("My_Team.{}(Prod)", "Resource-Group".repeat(5));
    let az: Vec<Value> = [long_rg.as_str(), long_rg.as_str(), "RG.with.dots"]
        .iter()
        .map(|rg| {
            let mut p = single.as_object().unwrap().clone();
            let props = p.remove("properties").unwrap();
            for (k, v) in props.as_object().unwrap() {
                p.insert(k.clone(), v.clone());
            }
            let id = p["id"].as_str().unwrap().replace("myRg1", rg);
            p.insert("id".into(), id.into());
            p.insert("resourceGroup".into(), Value::from(*rg));
            p["virtualMachines"][0]["publicIpAddress"] = Value::Null;
            Value::Object(p)
        })
        .collect();
    let out = portcullis(
        &["import", "defender", "-", "-n", &ns],
        Some(&serde_json::to_string_pretty(&az).unwrap()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let yaml = stdout(&out);
    let names: Vec<String> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| {
            let p: JitPolicy = serde::Deserialize::deserialize(d).unwrap();
            p.metadata.name.unwrap()
        })
        .collect();
    assert_eq!(names.len(), 3);
    assert!(names.iter().all(|n| n.len() <= 63), "{names:?}");
    assert_ne!(names[0], names[1], "unique within the output");
    assert_eq!(names[2], "rg-with-dots-default");
    assert_server_accepts(&yaml, &ns);

    // And back to Defender: the PUT body, its path on stderr.
    let out = portcullis(&["export", "defender", "-"], Some(&yaml));
    assert!(out.status.success(), "{}", stderr(&out));
    let bodies: Vec<JitNetworkAccessPolicy> =
        serde_json::from_str(&stdout(&out)).expect("a JSON array of PUT bodies");
    assert_eq!(bodies.len(), 3);
    let want: JitNetworkAccessPolicy = serde_json::from_value(single.clone()).unwrap();
    for b in &bodies {
        assert_eq!(
            b.properties.virtual_machines,
            want.properties.virtual_machines
        );
        assert_eq!(b.kind.as_deref(), Some("Basic"));
        assert_eq!(b.id, None, "read-only fields stay out of a PUT body");
        assert_eq!(b.properties.requests, None);
    }
    assert!(
        stderr(&out).contains("PUT /subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23/resourceGroups/RG.with.dots/providers/Microsoft.Security/locations/westeurope/jitNetworkAccessPolicies/default?api-version=2020-01-01"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_cli_fails_clearly_on_bad_input_and_under_strict() {
    let out = portcullis(&["import", "defender", "-"], Some("{\"value\": [42]}"));
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty(), "no manifest on failure");
    assert!(
        stderr(&out).contains("error: value[0]: not a Defender JIT policy"),
        "{}",
        stderr(&out)
    );
    let out = portcullis(&["import", "defender", "/nonexistent/policies.json"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("reading /nonexistent/policies.json"),
        "{}",
        stderr(&out)
    );
    let out = portcullis(&["export", "defender", "-"], Some("kind: ConfigMap\n"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no JitPolicy manifest"),
        "{}",
        stderr(&out)
    );

    // The example records a request: not carried, so --strict refuses.
    let body = example_body("GetJitNetworkAccessPolicy_example.json").to_string();
    let out = portcullis(&["import", "defender", "-", "--strict"], Some(&body));
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty(), "no manifest under --strict");
    assert!(stderr(&out).contains("--strict"), "{}", stderr(&out));
}
