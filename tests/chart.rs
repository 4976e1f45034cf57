//! The Helm chart (`charts/portcullis`) against Helm itself and the real API server: it lints
//! strictly, renders every credential mode into manifests the API server accepts, refuses wrong
//! values naming them, installs the objects it promises and removes them on uninstall. Helm
//! comes from `scripts/helm.sh` (installed on first use); if it cannot be had, these tests fail.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

use support::kube::{client, fresh_namespace, install_crds};

const TENANT_ID: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const IMAGE: &str = "registry.example/portcullis";
const MODES: [&str; 3] = ["workloadIdentity", "clientSecret", "managedIdentity"];

fn chart_dir() -> PathBuf {
    support::repo_root().join("charts/portcullis")
}

/// The cached Helm binary, installed by `scripts/helm.sh` once per test binary.
fn helm_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = support::repo_root().join("scripts/helm.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "scripts/helm.sh could not install Helm (the chart tests need it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            path.is_file(),
            "scripts/helm.sh printed {path:?}, which is not a file"
        );
        path
    })
}

/// Helm with its cache/config/data homes in a private temporary directory.
struct Helm {
    home: tempfile::TempDir,
}

impl Helm {
    fn new() -> Self {
        Helm {
            home: tempfile::tempdir().expect("a temporary directory for Helm"),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(helm_bin());
        for (var, sub) in [
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ] {
            cmd.env(var, self.home.path().join(sub));
        }
        cmd
    }

    fn run(&self, args: &[String]) -> Output {
        self.command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("helm {args:?} does not run: {e}"))
    }

    /// Runs helm and fails the test unless it succeeds; returns stdout.
    fn ok(&self, args: &[String]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "helm {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("helm prints UTF-8")
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `--set` arguments supplying what a credential mode requires.
fn mode_values(mode: &str) -> Vec<String> {
    let mut sets = vec![
        format!("image.repository={IMAGE}"),
        format!("azure.credentialMode={mode}"),
    ];
    match mode {
        "workloadIdentity" => {
            sets.push(format!("azure.tenantId={TENANT_ID}"));
            sets.push(format!("azure.clientId={CLIENT_ID}"));
        }
        "clientSecret" => {
            sets.push(format!("azure.tenantId={TENANT_ID}"));
            sets.push(format!("azure.clientId={CLIENT_ID}"));
            sets.push("azure.existingSecret=portcullis-azure".into());
        }
        "managedIdentity" => {}
        other => panic!("unknown mode {other}"),
    }
    sets.into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

/// The documents of a rendered multi-document YAML stream, as JSON values.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|doc| {
            let v = serde_yaml::Value::deserialize(doc).expect("helm renders valid YAML");
            (!v.is_null()).then(|| serde_json::to_value(v).expect("YAML maps onto JSON"))
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(
        found.len(),
        1,
        "exactly one {kind} rendered, found {found:?}"
    );
    found[0]
}

fn env_var<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == name))
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl {args:?} does not run: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin piped")
            .write_all(input.as_bytes())
            .expect("writing to kubectl");
    }
    child.wait_with_output().expect("kubectl finishes")
}

/// `kubectl get -o json`: `Some(object)`, or `None` when it does not exist.
fn kubectl_get(kind: &str, name: &str, namespace: Option<&str>) -> Option<Value> {
    let mut args = vec!["get", kind, name, "-o", "json"];
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    let out = kubectl(&args, None);
    if out.status.success() {
        return Some(serde_json::from_slice(&out.stdout).expect("kubectl prints JSON"));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "kubectl {args:?} failed: {err}"
    );
    None
}

fn must_get(kind: &str, name: &str, namespace: Option<&str>) -> Value {
    kubectl_get(kind, name, namespace)
        .unwrap_or_else(|| panic!("{kind} {name} (namespace {namespace:?}) was not created"))
}

#[test]
fn chart_crds_are_byte_identical_copies_of_crds_dir() {
    let root = support::repo_root();
    let source = std::fs::read(root.join("crds/portcullis.dev.yaml")).expect("crds/ exists");
    let chart_crds = chart_dir().join("crds");
    let mut files: Vec<_> = std::fs::read_dir(&chart_crds)
        .expect("charts/portcullis/crds exists")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["portcullis.dev.yaml"],
        "charts/portcullis/crds holds exactly a copy of crds/portcullis.dev.yaml"
    );
    let copy = std::fs::read(chart_crds.join("portcullis.dev.yaml")).expect("readable");
    assert!(
        copy == source,
        "charts/portcullis/crds/portcullis.dev.yaml differs from crds/portcullis.dev.yaml: \
         `cp crds/portcullis.dev.yaml charts/portcullis/crds/`"
    );
}

#[test]
fn chart_lints_strictly_with_defaults_and_every_credential_mode() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    let out = helm.ok(&strings(&["lint", "--strict", &chart]));
    assert!(out.contains("0 chart(s) failed"), "{out}");
    for mode in MODES {
        let mut args = strings(&["lint", "--strict", &chart]);
        args.extend(mode_values(mode));
        let out = helm.ok(&args);
        assert!(out.contains("0 chart(s) failed"), "{mode}: {out}");
    }
}

#[test]
fn every_credential_mode_renders_its_identity_wiring() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    for mode in MODES {
        let mut args = strings(&["template", "rel", &chart, "--namespace", "ops"]);
        args.extend(mode_values(mode));
        let docs = documents(&helm.ok(&args));
        let sa = one(&docs, "ServiceAccount");
        let deploy = one(&docs, "Deployment");
        let pod = &deploy["spec"]["template"];
        let container = &pod["spec"]["containers"][0];
        let wi_label = &pod["metadata"]["labels"]["azure.workload.identity/use"];
        let sa_annotations = &sa["metadata"]["annotations"];
        assert_eq!(pod["spec"]["serviceAccountName"], sa["metadata"]["name"]);
        assert_eq!(container["image"], format!("{IMAGE}:0.1.0"), "{mode}");
        match mode {
            "workloadIdentity" => {
                assert_eq!(*wi_label, "true", "{mode}: pod label");
                assert_eq!(
                    sa_annotations["azure.workload.identity/client-id"],
                    CLIENT_ID
                );
                assert_eq!(
                    sa_annotations["azure.workload.identity/tenant-id"],
                    TENANT_ID
                );
                assert!(env_var(container, "AZURE_CLIENT_SECRET").is_none());
            }
            "clientSecret" => {
                assert!(wi_label.is_null(), "{mode}: no workload-identity label");
                let secret = env_var(container, "AZURE_CLIENT_SECRET")
                    .expect("AZURE_CLIENT_SECRET from the Secret");
                let key_ref = &secret["valueFrom"]["secretKeyRef"];
                assert_eq!(key_ref["name"], "portcullis-azure");
                assert_eq!(key_ref["key"], "client-secret");
                assert_eq!(
                    env_var(container, "AZURE_TENANT_ID").unwrap()["value"],
                    TENANT_ID
                );
                assert_eq!(
                    env_var(container, "AZURE_CLIENT_ID").unwrap()["value"],
                    CLIENT_ID
                );
            }
            "managedIdentity" => {
                assert!(wi_label.is_null(), "{mode}: no workload-identity label");
                assert!(sa_annotations.is_null(), "{mode}: no SA annotations");
                for var in ["AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_CLIENT_ID"] {
                    assert!(env_var(container, var).is_none(), "{mode}: no {var}");
                }
            }
            _ => unreachable!(),
        }
        // Operator settings and identity of the pod.
        for (var, value) in [
            ("PORTCULLIS_ALLOW_BAND", "100-199"),
            ("PORTCULLIS_DENY_BAND", "4000-4096"),
            ("PORTCULLIS_LEADER_ELECTION", "true"),
            ("PORTCULLIS_LEASE_NAME", "portcullis-leader"),
            ("PORTCULLIS_HTTP_LISTEN", "0.0.0.0:8080"),
            ("PORTCULLIS_INSTALLATION", "default"),
            ("PORTCULLIS_ADOPT_LEGACY_RULES", "true"),
        ] {
            assert_eq!(
                env_var(container, var).map(|e| &e["value"]),
                Some(&Value::from(value)),
                "{mode}: {var}"
            );
        }
        for (var, path) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ] {
            assert_eq!(
                env_var(container, var).unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
                path
            );
        }
        assert!(
            env_var(container, "PORTCULLIS_NAMESPACES").is_none(),
            "all namespaces by default"
        );
        assert!(find(&docs, "ServiceMonitor").is_empty(), "off by default");
        assert!(find(&docs, "NetworkPolicy").is_empty(), "off by default");
    }
}

/// Every replica count runs leader election, so scaling the Deployment later (kubectl scale, an
/// HPA) never gives two writers.
#[test]
fn leader_election_is_on_for_every_replica_count() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    for replicas in ["1", "2", "5"] {
        let mut args = strings(&["template", "rel", &chart, "--namespace", "ops"]);
        args.extend(mode_values("workloadIdentity"));
        args.extend(strings(&["--set", &format!("replicaCount={replicas}")]));
        let docs = documents(&helm.ok(&args));
        let deploy = one(&docs, "Deployment");
        let container = &deploy["spec"]["template"]["spec"]["containers"][0];
        for (var, value) in [
            ("PORTCULLIS_LEADER_ELECTION", "true"),
            ("PORTCULLIS_LEASE_NAME", "portcullis-leader"),
            ("PORTCULLIS_LEASE_NAMESPACE", "ops"),
        ] {
            assert_eq!(
                env_var(container, var).map(|e| &e["value"]),
                Some(&Value::from(value)),
                "replicaCount={replicas}: {var}"
            );
        }
        // The downward API gives each pod its own identity in the election.
        assert_eq!(
            env_var(container, "POD_NAME").map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
            Some(&Value::from("metadata.name")),
            "replicaCount={replicas}"
        );
    }
}

#[test]
fn installation_id_and_legacy_adoption_reach_the_operator() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    let mut args = strings(&["template", "rel", &chart, "--namespace", "ops"]);
    args.extend(mode_values("workloadIdentity"));
    args.extend(strings(&[
        "--set",
        "installation=green2",
        "--set",
        "adoptLegacyRules=false",
    ]));
    let docs = documents(&helm.ok(&args));
    let container = &one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    for (var, value) in [
        ("PORTCULLIS_INSTALLATION", "green2"),
        ("PORTCULLIS_ADOPT_LEGACY_RULES", "false"),
    ] {
        assert_eq!(
            env_var(container, var).map(|e| &e["value"]),
            Some(&Value::from(value)),
            "{var}"
        );
    }
}

/// The pacing settings reach the operator's flags: Azure's default buckets unless set, and a
/// subscription's own limits when set (fractions through `--set-json`, as Helm's `--set` reads
/// them as strings).
#[test]
fn pacing_settings_reach_the_operator() {
    let helm = Helm::new();
    let render = |extra: &[&str]| {
        let docs = render_workload_identity(&helm, extra);
        let container = operator_container(&docs);
        [
            "PORTCULLIS_AZURE_PACING",
            "PORTCULLIS_AZURE_READ_BURST",
            "PORTCULLIS_AZURE_READ_REFILL_PER_SEC",
            "PORTCULLIS_AZURE_WRITE_BURST",
            "PORTCULLIS_AZURE_WRITE_REFILL_PER_SEC",
            "PORTCULLIS_AZURE_BUDGET_RESERVE",
        ]
        .map(|var| {
            env_var(&container, var)
                .and_then(|e| e["value"].as_str())
                .unwrap_or_else(|| panic!("{var} is set"))
                .to_string()
        })
    };
    assert_eq!(render(&[]), ["true", "250", "25", "200", "10", "0.05"]);
    let set = render(&[
        "--set",
        "azure.pacing.enabled=false",
        "--set",
        "azure.pacing.writeBurst=100",
        "--set-json",
        "azure.pacing.writeRefillPerSec=2.5",
        "--set-json",
        "azure.pacing.reserve=0.2",
    ]);
    assert_eq!(set, ["false", "250", "25", "100", "2.5", "0.2"]);
}

/// Whether a rendered Role/ClusterRole rule grants `verbs` on core Secrets (any names).
fn reads_all_secrets(role: &Value) -> bool {
    role["rules"].as_array().into_iter().flatten().any(|r| {
        r["apiGroups"] == serde_json::json!([""])
            && r["resources"] == serde_json::json!(["secrets"])
            && r.get("resourceNames").is_none()
            && r["verbs"] == serde_json::json!(["get", "list", "watch"])
    })
}

#[test]
fn notifications_add_the_flag_and_read_access_to_secrets_only_when_enabled() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    for (watch, kind) in [(None, "ClusterRole"), (Some("team-a"), "Role")] {
        for enabled in [false, true] {
            let mut args = strings(&["template", "rel", &chart, "--namespace", "ops"]);
            args.extend(mode_values("workloadIdentity"));
            args.extend(strings(&[
                "--set",
                &format!("notifications.enabled={enabled}"),
            ]));
            if let Some(ns) = watch {
                args.extend(strings(&["--set", &format!("watchNamespaces={{{ns}}}")]));
            }
            let docs = documents(&helm.ok(&args));
            let container = &one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(
                env_var(container, "PORTCULLIS_NOTIFICATIONS").map(|e| &e["value"]),
                Some(&Value::from(enabled.to_string())),
            );
            let operator_roles: Vec<&Value> = find(&docs, kind)
                .into_iter()
                .filter(|r| {
                    r["rules"].as_array().into_iter().flatten().any(|rule| {
                        rule["resources"] == serde_json::json!(["jitpolicies", "accessgrants"])
                    })
                })
                .collect();
            assert_eq!(operator_roles.len(), 1, "{kind} for {watch:?}");
            assert_eq!(
                reads_all_secrets(operator_roles[0]),
                enabled,
                "{kind} (watch {watch:?}, notifications {enabled}): {}",
                operator_roles[0]
            );
        }
    }
}

fn deletes_grants(role: &Value) -> bool {
    role["rules"].as_array().into_iter().flatten().any(|r| {
        r["apiGroups"] == serde_json::json!(["portcullis.dev"])
            && r["resources"] == serde_json::json!(["accessgrants"])
            && r["verbs"] == serde_json::json!(["delete"])
    })
}

#[test]
fn finished_grant_ttl_reaches_the_operator_and_adds_delete_only_when_set() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    // (the --set argument, the env var the operator gets)
    let cases: [(Option<&str>, Option<&str>); 5] = [
        (None, None),
        (Some("finishedGrantTTL=24h"), Some("24h")),
        (Some("finishedGrantTTL=1h30m"), Some("1h30m")),
        // An integer is seconds; 0 deletes at once, it is not "off".
        (Some("finishedGrantTTL=3600"), Some("3600")),
        (Some("finishedGrantTTL=0"), Some("0")),
    ];
    for (watch, kind) in [(None, "ClusterRole"), (Some("team-a"), "Role")] {
        for (set, expected) in cases {
            let mut args = strings(&["template", "rel", &chart, "--namespace", "ops"]);
            args.extend(mode_values("workloadIdentity"));
            if let Some(set) = set {
                args.extend(strings(&["--set", set]));
            }
            if let Some(ns) = watch {
                args.extend(strings(&["--set", &format!("watchNamespaces={{{ns}}}")]));
            }
            let docs = documents(&helm.ok(&args));
            let container = &one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(
                env_var(container, "PORTCULLIS_FINISHED_GRANT_TTL").map(|e| &e["value"]),
                expected.map(Value::from).as_ref(),
                "{set:?}"
            );
            // The value the chart passes is one the operator's parser takes.
            if let Some(value) = expected {
                assert!(portcullis::api::duration::parse_setting(value).is_ok());
            }
            let operator_roles: Vec<&Value> = find(&docs, kind)
                .into_iter()
                .filter(|r| {
                    r["rules"].as_array().into_iter().flatten().any(|rule| {
                        rule["resources"] == serde_json::json!(["jitpolicies", "accessgrants"])
                    })
                })
                .collect();
            assert_eq!(operator_roles.len(), 1, "{kind} for {watch:?}");
            assert_eq!(
                deletes_grants(operator_roles[0]),
                expected.is_some(),
                "{kind} (watch {watch:?}, {set:?}): {}",
                operator_roles[0]
            );
        }
    }
    // The schema's pattern is the operator's own.
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).expect("schema"),
    )
    .expect("schema is JSON");
    assert_eq!(
        schema["properties"]["finishedGrantTTL"]["pattern"],
        portcullis::api::duration::SETTING_DURATION
    );
}

#[test]
fn optional_service_monitor_and_network_policy_render_when_enabled() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    let mut args = strings(&["template", "rel", &chart, "--namespace", "ops"]);
    args.extend(mode_values("workloadIdentity"));
    args.extend(strings(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.interval=15s",
        "--set",
        "networkPolicy.enabled=true",
    ]));
    let docs = documents(&helm.ok(&args));
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "http-metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");
    let np = one(&docs, "NetworkPolicy");
    let ingress = np["spec"]["ingress"].as_array().expect("ingress rules");
    assert_eq!(
        ingress.len(),
        2,
        "ingress only to the metrics and webhook ports"
    );
    assert_eq!(ingress[0]["ports"][0]["port"], "http-metrics");
    assert_eq!(ingress[1]["ports"][0]["port"], "https-webhook");
    let egress_ports: Vec<Value> = np["spec"]["egress"]
        .as_array()
        .expect("egress rules")
        .iter()
        .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
        .map(|p| p["port"].clone())
        .collect();
    for port in [53, 443] {
        assert!(
            egress_ports.contains(&Value::from(port)),
            "egress to {port}: {egress_ports:?}"
        );
    }
}

/// Limits the chart's webhooks to the test's own namespace: the tests share one API server,
/// and webhooks that fail closed with no pod behind them would refuse every other test's grants.
fn only_this_namespace(ns: &str) -> Vec<String> {
    strings(&[
        "--set",
        &format!("webhook.namespaceSelector.matchLabels.portcullis\\.dev/test-namespace={ns}"),
    ])
}

/// The chart rendered in namespace `ops` with workload identity and `extra` arguments.
fn render_workload_identity(helm: &Helm, extra: &[&str]) -> Vec<Value> {
    let chart = chart_dir().display().to_string();
    let mut args = strings(&["template", "rel", &chart, "--namespace", "ops"]);
    args.extend(mode_values("workloadIdentity"));
    args.extend(strings(extra));
    documents(&helm.ok(&args))
}

/// The operator's container in the rendered Deployment.
fn operator_container(docs: &[Value]) -> Value {
    one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0].clone()
}

#[test]
fn webhook_modes_render_their_certificate_wiring() {
    let helm = Helm::new();
    let render = |extra: &[&str]| render_workload_identity(&helm, extra);

    // cert-manager: a Certificate for the Service's names from a self-signed Issuer, its
    // Secret mounted and named to the operator, the CA injected by the ca-injector, and no
    // permission to patch the configurations.
    let docs = render(&["--set", "webhook.certManager.enabled=true"]);
    let cert = one(&docs, "Certificate");
    assert_eq!(cert["apiVersion"], "cert-manager.io/v1");
    assert_eq!(cert["spec"]["secretName"], "rel-portcullis-webhook-tls");
    assert_eq!(
        cert["spec"]["dnsNames"],
        serde_json::json!([
            "rel-portcullis-webhook.ops.svc",
            "rel-portcullis-webhook.ops.svc.cluster.local"
        ])
    );
    let issuer = one(&docs, "Issuer");
    assert!(issuer["spec"]["selfSigned"].is_object());
    assert_eq!(
        cert["spec"]["issuerRef"]["name"],
        issuer["metadata"]["name"]
    );
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        let config = one(&docs, kind);
        assert_eq!(
            config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "ops/rel-portcullis-webhook",
            "{kind}"
        );
        assert!(config["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    }
    let container = operator_container(&docs);
    assert_eq!(
        env_var(&container, "PORTCULLIS_WEBHOOK_CERT_DIR").expect("cert dir")["value"],
        "/webhook-tls"
    );
    assert!(env_var(&container, "PORTCULLIS_WEBHOOK_CONFIGURATION_NAME").is_none());
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["secret"]["secretName"] == "rel-portcullis-webhook-tls")
    );
    assert!(
        !find(&docs, "ClusterRole")
            .iter()
            .any(|r| r.to_string().contains("webhookconfigurations")),
        "nothing to patch with cert-manager"
    );

    // An issuer of one's own: no Issuer rendered.
    let docs = render(&[
        "--set",
        "webhook.certManager.enabled=true",
        "--set",
        "webhook.certManager.issuerRef.name=corp-ca",
        "--set",
        "webhook.certManager.issuerRef.kind=ClusterIssuer",
    ]);
    assert!(find(&docs, "Issuer").is_empty());
    assert_eq!(
        one(&docs, "Certificate")["spec"]["issuerRef"],
        serde_json::json!({"name": "corp-ca", "kind": "ClusterIssuer"})
    );

    // Watched namespaces: the webhooks select them (by kubernetes.io/metadata.name).
    let docs = render(&["--set", "watchNamespaces={team-a,team-b}"]);
    let selector =
        &one(&docs, "ValidatingWebhookConfiguration")["webhooks"][0]["namespaceSelector"];
    assert_eq!(
        selector["matchExpressions"][0]["values"],
        serde_json::json!(["team-a", "team-b"])
    );

    // Turned off: no webhooks, no Service, no certificate wiring; the stamp key stays.
    let docs = render(&["--set", "webhook.enabled=false"]);
    assert!(find(&docs, "MutatingWebhookConfiguration").is_empty());
    assert!(find(&docs, "ValidatingWebhookConfiguration").is_empty());
    assert!(
        !find(&docs, "Service")
            .iter()
            .any(|s| s["metadata"]["name"] == "rel-portcullis-webhook")
    );
    let container = operator_container(&docs);
    assert_eq!(
        env_var(&container, "PORTCULLIS_WEBHOOK").expect("webhook flag")["value"],
        "false"
    );
    assert!(env_var(&container, "PORTCULLIS_STAMP_KEY_SECRET").is_some());
    assert!(env_var(&container, "PORTCULLIS_WEBHOOK_CERT_SECRET").is_none());
}

#[test]
fn wrong_values_fail_naming_the_value() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    let wi = mode_values("workloadIdentity");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            strings(&["--set", "azure.credentialMode=bogus"]),
            "azure.credentialMode",
        ),
        (
            strings(&["--set-string", "replicaCount=two"]),
            "replicaCount",
        ),
        (strings(&["--set", "replicaCount=0"]), "replicaCount"),
        (
            strings(&["--set", "priorityBands.allow=abc"]),
            "priorityBands.allow",
        ),
        (
            strings(&["--set", "priorityBands.deny=4000-5000"]),
            "priorityBands.deny",
        ),
        (
            strings(&["--set", "priorityBands.allow=100-4000"]),
            "priorityBands.allow",
        ),
        (strings(&["--set", "logFormat=xml"]), "logFormat"),
        (
            strings(&["--set-json", "azure.pacing.reserve=2"]),
            "azure.pacing.reserve",
        ),
        (
            strings(&["--set", "azure.pacing.writeBurst=0"]),
            "azure.pacing.writeBurst",
        ),
        (
            strings(&["--set-string", "notifications.enabled=yes"]),
            "notifications.enabled",
        ),
        (
            strings(&["--set", "notifications.url=https://x"]),
            "notifications",
        ),
        (
            strings(&["--set", "finishedGrantTTL=1.5h"]),
            "finishedGrantTTL",
        ),
        (
            strings(&["--set-string", "finishedGrantTTL=-1h"]),
            "finishedGrantTTL",
        ),
        (
            strings(&["--set", "finishedGrantTTL=-5"]),
            "finishedGrantTTL",
        ),
        (
            strings(&["--set", "finishedGrantTTL=24H"]),
            "finishedGrantTTL",
        ),
        (strings(&["--set", "installation=Blue"]), "installation"),
        (
            strings(&["--set", "installation=toolongid"]),
            "installation",
        ),
        (
            strings(&["--set-string", "adoptLegacyRules=yes"]),
            "adoptLegacyRules",
        ),
        (strings(&["--set", "resyncSeconds=1"]), "resyncSeconds"),
        (
            strings(&["--set", "azure.clientId=not-a-guid"]),
            "azure.clientId",
        ),
        (strings(&["--set", "notAValue=1"]), "notAValue"),
        // The removed single-namespace key: refused by the schema, and by the templates when
        // schema validation is skipped (there the message points to the list).
        (strings(&["--set", "watchNamespace=foo"]), "watchNamespace"),
        (
            strings(&["--skip-schema-validation", "--set", "watchNamespace=foo"]),
            "watchNamespaces",
        ),
        (
            strings(&["--set", "watchNamespaces=team-a"]),
            "watchNamespaces",
        ),
        (
            strings(&["--set", "watchNamespaces={team-a,Team_B}"]),
            "watchNamespaces",
        ),
        (
            strings(&["--set", "watchNamespaces={team-a,team-a}"]),
            "watchNamespaces",
        ),
        (strings(&["--set", "azure.tenantId="]), "azure.tenantId"),
        (strings(&["--set", "azure.clientId="]), "azure.clientId"),
        (strings(&["--set", "image.repository="]), "image.repository"),
        (
            strings(&["--set", "azure.credentialMode=clientSecret"]),
            "azure.existingSecret",
        ),
        // Without election a second pod would be a second writer: refused by the schema, and
        // by the templates when schema validation is skipped.
        (
            strings(&["--set", "leaderElection.enabled=false"]),
            "leaderElection.enabled",
        ),
        (
            strings(&["--set", "webhook.timeoutSeconds=60"]),
            "webhook.timeoutSeconds",
        ),
        (
            strings(&["--set", "webhook.certManager.issuerRef.kind=Vault"]),
            "webhook.certManager.issuerRef.kind",
        ),
        (
            strings(&["--set", "stampKeySecretName=Not_A_Name"]),
            "stampKeySecretName",
        ),
        (
            strings(&[
                "--skip-schema-validation",
                "--set",
                "leaderElection.enabled=false",
            ]),
            "leaderElection.enabled",
        ),
    ];
    for (extra, named) in cases {
        let mut args = strings(&["template", "rel", &chart]);
        args.extend(wi.iter().cloned());
        args.extend(extra.iter().cloned());
        let out = helm.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "helm template with {extra:?} should fail"
        );
        let error = stderr
            .lines()
            .filter(|l| !l.starts_with("engine.go"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            error.contains(named),
            "the error for {extra:?} should name {named}: {error}"
        );
    }
}

#[tokio::test]
async fn every_credential_mode_passes_server_side_dry_run() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "chart-dry").await;
    let watched = fresh_namespace(&client, "chart-dry-watched").await;
    let watched2 = fresh_namespace(&client, "chart-dry-watched").await;
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    let variants: Vec<(&str, Vec<String>)> = vec![
        ("workloadIdentity", vec![]),
        ("clientSecret", vec![]),
        ("managedIdentity", vec![]),
        (
            "workloadIdentity",
            strings(&[
                "--set",
                &format!("watchNamespaces={{{watched},{watched2}}}"),
                "--set",
                "networkPolicy.enabled=true",
                "--set",
                "replicaCount=1",
            ]),
        ),
    ];
    for (i, (mode, extra)) in variants.into_iter().enumerate() {
        let release = format!("dry{i}");
        // --validate: rendered with the API server's capabilities (policy/v1beta1 PDB on 1.20).
        let mut args = strings(&[
            "template",
            &release,
            &chart,
            "--validate",
            "--namespace",
            &ns,
        ]);
        args.extend(mode_values(mode));
        args.extend(extra.iter().cloned());
        let rendered = helm.ok(&args);
        let kinds: Vec<String> = documents(&rendered)
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
            .collect();
        assert!(kinds.iter().any(|k| k == "Deployment"), "{kinds:?}");
        let out = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode} {extra:?}: the API server refused the rendered chart: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.matches("(server dry run)").count(),
            kinds.len(),
            "every object went through server dry run: {stdout}"
        );
    }
}

#[tokio::test]
async fn install_creates_the_operator_objects_and_uninstall_removes_them() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "chart-install").await;
    let release = format!("pc-{}", ns.rsplit('-').next().unwrap());
    let full = format!("{release}-portcullis");
    let cluster_name = format!("{full}-{ns}");
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();

    // A wrong value fails the install too, and leaves no release behind.
    let mut bad = strings(&["install", &release, &chart, "--namespace", &ns]);
    bad.extend(mode_values("workloadIdentity"));
    bad.extend(strings(&["--set", "azure.credentialMode=bogus"]));
    let out = helm.run(&bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("azure.credentialMode"));
    let list = helm.ok(&strings(&["list", "--namespace", &ns, "-q"]));
    assert!(
        list.trim().is_empty(),
        "no release after a failed install: {list}"
    );

    let mut args = strings(&["install", &release, &chart, "--namespace", &ns]);
    args.extend(mode_values("workloadIdentity"));
    args.extend(only_this_namespace(&ns));
    helm.ok(&args);

    let deploy = must_get("deployment", &full, Some(&ns));
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["runAsUser"], 65532);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
    let container = &pod["containers"][0];
    let csc = &container["securityContext"];
    assert_eq!(csc["runAsNonRoot"], true);
    assert_eq!(csc["runAsUser"], 65532);
    assert_eq!(csc["readOnlyRootFilesystem"], true);
    assert_eq!(csc["allowPrivilegeEscalation"], false);
    assert_eq!(csc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(csc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        container["livenessProbe"]["httpGet"]["port"],
        "http-metrics"
    );
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert_eq!(
        deploy["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"],
        "true"
    );

    let sa = must_get("serviceaccount", &full, Some(&ns));
    assert_eq!(
        sa["metadata"]["annotations"]["azure.workload.identity/client-id"],
        CLIENT_ID
    );
    assert_eq!(pod["serviceAccountName"], full);

    let role = must_get("clusterrole", &cluster_name, None);
    let rules = role["rules"].as_array().expect("rules");
    let verbs_for = |resource: &str| -> Vec<String> {
        rules
            .iter()
            .filter(|r| {
                r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == resource)
            })
            .flat_map(|r| r["verbs"].as_array().unwrap().iter())
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        verbs_for("accessgrants"),
        ["get", "list", "watch", "patch", "update"]
    );
    assert_eq!(verbs_for("jitpolicies/status"), ["patch"]);
    // JitScopes are read, never written: cluster administrators write them.
    assert_eq!(verbs_for("jitscopes"), ["get", "list", "watch"]);
    assert_eq!(verbs_for("events"), ["create", "patch"]);
    assert!(
        !rules
            .iter()
            .any(|r| r["verbs"].as_array().unwrap().iter().any(|v| v == "*")
                || r["resources"].as_array().unwrap().iter().any(|v| v == "*")),
        "no wildcards: {rules:?}"
    );
    let binding = must_get("clusterrolebinding", &cluster_name, None);
    assert_eq!(binding["roleRef"]["name"], cluster_name);
    assert_eq!(binding["subjects"][0]["name"], full);
    assert_eq!(binding["subjects"][0]["namespace"], ns);

    let lease_role_name = format!("{full}-leader-election");
    let lease_role = must_get("role", &lease_role_name, Some(&ns));
    assert!(
        lease_role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["apiGroups"] == serde_json::json!(["coordination.k8s.io"])),
        "the namespaced Role is for Leases only: {lease_role}"
    );
    must_get("rolebinding", &lease_role_name, Some(&ns));

    // The inventory ConfigMap: in the release namespace, created by the operator, read and
    // patched by name only.
    let inventory_name = format!("{full}-inventory");
    assert_eq!(
        env_var(container, "PORTCULLIS_INVENTORY_NAMESPACE").unwrap()["value"],
        ns
    );
    assert_eq!(
        env_var(container, "PORTCULLIS_INVENTORY_NAME").unwrap()["value"],
        inventory_name
    );
    let inventory_role = must_get("role", &inventory_name, Some(&ns));
    let inventory_rules = inventory_role["rules"].as_array().expect("rules");
    assert!(
        inventory_rules
            .iter()
            .all(|r| r["resources"] == serde_json::json!(["configmaps"])),
        "the inventory Role is for ConfigMaps only: {inventory_role}"
    );
    let named: Vec<&Value> = inventory_rules
        .iter()
        .filter(|r| r["resourceNames"] == serde_json::json!([inventory_name]))
        .collect();
    assert_eq!(named.len(), 1, "{inventory_role}");
    assert_eq!(named[0]["verbs"], serde_json::json!(["get", "patch"]));
    assert!(
        inventory_rules.iter().any(
            |r| r["verbs"] == serde_json::json!(["create"]) && r.get("resourceNames").is_none()
        ),
        "{inventory_role}"
    );
    must_get("rolebinding", &inventory_name, Some(&ns));
    // What the API server's RBAC actually lets the operator's ServiceAccount do.
    let sa_user = format!("system:serviceaccount:{ns}:{full}");
    let can_i = |verb: &str, resource: &str, namespace: &str| -> bool {
        let out = kubectl(
            &[
                "auth", "can-i", verb, resource, "-n", namespace, "--as", &sa_user,
            ],
            None,
        );
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let this_inventory = format!("configmaps/{inventory_name}");
    assert!(can_i("create", "configmaps", &ns));
    assert!(can_i("get", &this_inventory, &ns));
    assert!(can_i("patch", &this_inventory, &ns));
    assert!(
        !can_i("get", "configmaps/other", &ns),
        "other ConfigMaps stay unreadable"
    );
    assert!(!can_i("delete", &this_inventory, &ns));
    assert!(!can_i("create", "configmaps", "default"));

    let svc_name = format!("{full}-metrics");
    let svc = must_get("service", &svc_name, Some(&ns));
    assert_eq!(svc["spec"]["ports"][0]["name"], "http-metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    let pdb = must_get("poddisruptionbudget", &full, Some(&ns));
    assert_eq!(pdb["spec"]["minAvailable"], 1);

    // The admission webhooks: a Service on 443 to the pods' webhook port, both
    // configurations calling it, failing closed, with the self-managed certificate's wiring.
    let webhook_svc = format!("{full}-webhook");
    let svc = must_get("service", &webhook_svc, Some(&ns));
    assert_eq!(svc["spec"]["ports"][0]["port"], 443);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "https-webhook");
    let port = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "https-webhook")
        .expect("the webhook port");
    assert_eq!(port["containerPort"], 9443);
    let webhook_configuration = cluster_name.clone();
    for (kind, path) in [
        ("mutatingwebhookconfiguration", "/mutate"),
        ("validatingwebhookconfiguration", "/validate"),
    ] {
        let config = must_get(kind, &webhook_configuration, None);
        let hooks = config["webhooks"].as_array().expect("webhooks");
        assert_eq!(hooks.len(), 1, "{config}");
        let hook = &hooks[0];
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(hook["admissionReviewVersions"], serde_json::json!(["v1"]));
        assert_eq!(hook["timeoutSeconds"], 10);
        let service = &hook["clientConfig"]["service"];
        assert_eq!(service["name"], webhook_svc);
        assert_eq!(service["namespace"], ns);
        assert_eq!(service["path"], path);
        assert_eq!(service["port"], 443);
        let rule = &hook["rules"][0];
        assert_eq!(rule["apiGroups"], serde_json::json!(["portcullis.dev"]));
        assert_eq!(
            rule["resources"],
            serde_json::json!(["accessgrants", "accessapprovals"])
        );
        assert_eq!(rule["operations"], serde_json::json!(["CREATE", "UPDATE"]));
        assert!(
            config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].is_null(),
            "self-managed: the operator patches the bundle, no ca-injector"
        );
    }
    for (var, value) in [
        ("PORTCULLIS_WEBHOOK", "true".to_string()),
        ("PORTCULLIS_WEBHOOK_LISTEN", "0.0.0.0:9443".to_string()),
        ("PORTCULLIS_WEBHOOK_SERVICE_NAME", webhook_svc.clone()),
        (
            "PORTCULLIS_WEBHOOK_CONFIGURATION_NAME",
            webhook_configuration.clone(),
        ),
        (
            "PORTCULLIS_WEBHOOK_CERT_SECRET",
            format!("{full}-webhook-cert"),
        ),
        ("PORTCULLIS_STAMP_KEY_SECRET", format!("{full}-stamp-key")),
    ] {
        assert_eq!(
            env_var(container, var).unwrap_or_else(|| panic!("{var}"))["value"],
            value,
            "{var}"
        );
    }
    assert!(env_var(container, "PORTCULLIS_WEBHOOK_CERT_DIR").is_none());
    // Its Secrets by name only; its two configurations by name only.
    let webhook_role = format!("{full}-webhook");
    must_get("role", &webhook_role, Some(&ns));
    must_get("rolebinding", &webhook_role, Some(&ns));
    must_get("clusterrole", &format!("{cluster_name}-webhook"), None);
    must_get(
        "clusterrolebinding",
        &format!("{cluster_name}-webhook"),
        None,
    );
    assert!(can_i("create", "secrets", &ns));
    for secret in [format!("{full}-stamp-key"), format!("{full}-webhook-cert")] {
        assert!(can_i("get", &format!("secrets/{secret}"), &ns), "{secret}");
        assert!(
            can_i("update", &format!("secrets/{secret}"), &ns),
            "{secret}"
        );
        assert!(
            !can_i("delete", &format!("secrets/{secret}"), &ns),
            "{secret}"
        );
    }
    assert!(
        !can_i("get", "secrets/other", &ns),
        "other Secrets stay unreadable"
    );
    assert!(!can_i(
        "get",
        &format!("secrets/{full}-stamp-key"),
        "default"
    ));
    for kind in [
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
    ] {
        assert!(can_i(
            "patch",
            &format!("{kind}/{webhook_configuration}"),
            &ns
        ));
        assert!(!can_i("patch", &format!("{kind}/someone-elses"), &ns));
        assert!(!can_i("create", kind, &ns));
    }
    assert!(can_i("list", "accessapprovals.portcullis.dev", &ns));

    helm.ok(&strings(&[
        "uninstall",
        &release,
        "--namespace",
        &ns,
        "--wait",
    ]));
    for (kind, name, namespace) in [
        ("deployment", full.as_str(), Some(ns.as_str())),
        ("serviceaccount", &full, Some(&ns)),
        ("clusterrole", &cluster_name, None),
        ("clusterrolebinding", &cluster_name, None),
        ("role", &lease_role_name, Some(&ns)),
        ("rolebinding", &lease_role_name, Some(&ns)),
        ("role", &inventory_name, Some(&ns)),
        ("rolebinding", &inventory_name, Some(&ns)),
        ("service", &svc_name, Some(&ns)),
        ("poddisruptionbudget", &full, Some(&ns)),
        ("service", &webhook_svc, Some(&ns)),
        ("mutatingwebhookconfiguration", &webhook_configuration, None),
        (
            "validatingwebhookconfiguration",
            &webhook_configuration,
            None,
        ),
        ("role", &webhook_role, Some(&ns)),
        ("rolebinding", &webhook_role, Some(&ns)),
        ("clusterrole", &format!("{cluster_name}-webhook"), None),
        (
            "clusterrolebinding",
            &format!("{cluster_name}-webhook"),
            None,
        ),
    ] {
        assert!(
            kubectl_get(kind, name, namespace).is_none(),
            "{kind} {name} is left after helm uninstall"
        );
    }
    // CRDs are kept (crds/ is never deleted by Helm).
    must_get("crd", "accessgrants.portcullis.dev", None);
    must_get("crd", "jitpolicies.portcullis.dev", None);
}

#[tokio::test]
async fn watch_namespaces_install_uses_a_role_in_each_and_a_cluster_role_only_to_read_scopes() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "chart-ns").await;
    let watched = [
        fresh_namespace(&client, "chart-ns-watched").await,
        fresh_namespace(&client, "chart-ns-watched").await,
    ];
    assert_ne!(watched[0], watched[1], "two distinct namespaces");
    let release = format!("pn-{}", ns.rsplit('-').next().unwrap());
    let full = format!("{release}-portcullis");
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    let mut args = strings(&["install", &release, &chart, "--namespace", &ns]);
    args.extend(mode_values("managedIdentity"));
    args.extend(strings(&[
        "--set",
        &format!("watchNamespaces={{{},{}}}", watched[0], watched[1]),
        "--set",
        "replicaCount=1",
    ]));
    let notes = helm.ok(&args);
    assert!(
        notes.contains(&format!("namespaces {},{}", watched[0], watched[1])),
        "NOTES name the watched namespaces: {notes}"
    );

    let deploy = must_get("deployment", &full, Some(&ns));
    assert_eq!(deploy["spec"]["replicas"], 1);
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_var(container, "PORTCULLIS_NAMESPACES").unwrap()["value"],
        format!("{},{}", watched[0], watched[1])
    );
    assert!(
        env_var(container, "PORTCULLIS_NAMESPACE").is_none(),
        "the single-namespace variable is gone"
    );
    assert_eq!(
        env_var(container, "PORTCULLIS_LEADER_ELECTION").unwrap()["value"],
        "true",
        "a one-replica install elects too, so `kubectl scale` cannot add a second writer"
    );
    for watched in &watched {
        let role = must_get("role", &full, Some(watched));
        assert!(
            role["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == "accessgrants")),
            "{role}"
        );
        let binding = must_get("rolebinding", &full, Some(watched));
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(binding["roleRef"]["name"], full);
        assert_eq!(binding["subjects"][0]["name"], full);
        assert_eq!(binding["subjects"][0]["namespace"], ns);
    }
    // The operator's own rules are not in the release namespace; only the Lease Role is.
    assert!(kubectl_get("role", &full, Some(&ns)).is_none());
    must_get("role", &format!("{full}-leader-election"), Some(&ns));
    must_get("role", &format!("{full}-inventory"), Some(&ns));
    assert!(kubectl_get("clusterrole", &format!("{full}-{ns}"), None).is_none());
    assert!(kubectl_get("clusterrolebinding", &format!("{full}-{ns}"), None).is_none());
    // JitScopes are cluster-scoped, which no Role can grant: one ClusterRole reads them, and
    // nothing else.
    let scopes_name = format!("{full}-{ns}-scopes");
    let scopes_role = must_get("clusterrole", &scopes_name, None);
    assert_eq!(
        scopes_role["rules"],
        serde_json::json!([{"apiGroups": ["portcullis.dev"], "resources": ["jitscopes"], "verbs": ["get", "list", "watch"]}]),
        "{scopes_role}"
    );
    let scopes_binding = must_get("clusterrolebinding", &scopes_name, None);
    assert_eq!(scopes_binding["roleRef"]["name"], scopes_name);
    assert_eq!(scopes_binding["subjects"][0]["name"], full);
    assert_eq!(scopes_binding["subjects"][0]["namespace"], ns);
    assert!(
        kubectl_get("poddisruptionbudget", &full, Some(&ns)).is_none(),
        "no PDB with a single replica"
    );

    helm.ok(&strings(&[
        "uninstall",
        &release,
        "--namespace",
        &ns,
        "--wait",
    ]));
    for watched in &watched {
        assert!(kubectl_get("role", &full, Some(watched)).is_none());
        assert!(kubectl_get("rolebinding", &full, Some(watched)).is_none());
    }
    assert!(kubectl_get("clusterrole", &scopes_name, None).is_none());
    assert!(kubectl_get("clusterrolebinding", &scopes_name, None).is_none());
    assert!(kubectl_get("deployment", &full, Some(&ns)).is_none());
}

/// The rules of the ClusterRole in an `examples/rbac/` file.
fn example_rules(file: &str) -> Value {
    let path = support::repo_root().join("examples/rbac").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = documents(&text);
    one(&docs, "ClusterRole")["rules"].clone()
}

#[test]
fn user_roles_match_the_examples_and_aggregate_only_when_asked() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    let render = |extra: &[&str]| {
        let mut args = strings(&["template", "rel", &chart, "--namespace", "ops"]);
        args.extend(mode_values("workloadIdentity"));
        args.extend(strings(extra));
        documents(&helm.ok(&args))
    };
    let role = |docs: &[Value], name: &str| -> Value {
        find(docs, "ClusterRole")
            .into_iter()
            .find(|r| r["metadata"]["labels"]["portcullis.dev/user-role"] == name)
            .unwrap_or_else(|| panic!("no {name} user role"))
            .clone()
    };
    let docs = render(&[]);
    for (name, file) in [
        ("requester", "requester.yaml"),
        ("approver", "approver.yaml"),
        ("policy-admin", "policy-admin.yaml"),
        ("scope-admin", "scope-admin.yaml"),
    ] {
        let r = role(&docs, name);
        assert_eq!(r["metadata"]["name"], format!("rel-portcullis-ops-{name}"));
        assert_eq!(
            r["rules"],
            example_rules(file),
            "{name} differs from examples/rbac/{file}"
        );
        let labels = r["metadata"]["labels"].as_object().expect("labels");
        assert!(
            !labels
                .keys()
                .any(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to")),
            "{name} aggregates by default"
        );
    }
    let docs = render(&["--set", "userRoles.aggregateToDefaultRoles=true"]);
    let aggregated = |name: &str, to: &str| {
        role(&docs, name)["metadata"]["labels"]
            [format!("rbac.authorization.k8s.io/aggregate-to-{to}")]
            == "true"
    };
    assert!(aggregated("requester", "edit") && aggregated("requester", "admin"));
    assert!(aggregated("approver", "admin") && !aggregated("approver", "edit"));
    assert!(aggregated("policy-admin", "admin"));
    assert!(aggregated("viewer", "view"));
    for to in ["view", "edit", "admin"] {
        assert!(
            !aggregated("scope-admin", to),
            "the scope admin never aggregates"
        );
    }
    let none = render(&["--set", "userRoles.create=false"]);
    assert!(
        find(&none, "ClusterRole")
            .iter()
            .all(|r| r["metadata"]["labels"]["portcullis.dev/user-role"].is_null())
    );
}

/// Every sample name the operator exports, from its own registry (counters carry `_total`,
/// histograms `_bucket`, `_sum` and `_count`).
fn exported_metrics() -> std::collections::BTreeSet<String> {
    let telemetry = portcullis::controller::telemetry::Telemetry::new(Some(
        portcullis::azure::AzureStats::new(),
    ));
    // A family shows in the text only once it has a series: give each one.
    let active: portcullis::api::AccessGrant = serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AccessGrant",
        "metadata": {"name": "g", "namespace": "ns"},
        "spec": {"policyRef": {"name": "p"}, "virtualMachine": "vm1", "ports": [22],
                 "sourceAddressPrefix": "203.0.113.7", "duration": "PT1H",
                 "justification": "metrics"},
        "status": {"phase": "Active"}
    }))
    .expect("a grant");
    telemetry.observe_world(&portcullis::controller::world::World {
        grants: vec![active.into()],
        ..Default::default()
    });
    telemetry.reconciled("grant", "ok", 0.1);
    telemetry.set_undecodable("AccessGrant", 0);
    telemetry.webhook_admission("/validate", "allowed");
    telemetry.set_band_usage(
        "nsg",
        portcullis::plan::BandUsage {
            allow: 0.1,
            deny: 0.1,
        },
    );
    let text = telemetry.encode().expect("the metrics encode");
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE <name> <type>");
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// Parses a PromQL expression (as Prometheus would) and returns the metric names it selects.
fn promql_metrics(expr: &str) -> Vec<String> {
    use promql_parser::parser::{Expr, parse};
    use promql_parser::util::{ExprVisitor, walk_expr};
    struct Names(Vec<String>);
    impl ExprVisitor for Names {
        type Error = String;
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
            let selector = match e {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(vs) = selector {
                let name = vs
                    .name
                    .clone()
                    .ok_or_else(|| format!("a selector without a metric name: {vs}"))?;
                self.0.push(name);
            }
            Ok(true)
        }
    }
    let ast = parse(expr).unwrap_or_else(|e| panic!("PromQL does not parse: {e}\n{expr}"));
    let mut names = Names(Vec::new());
    walk_expr(&mut names, &ast).unwrap_or_else(|e| panic!("{e}\n{expr}"));
    names.0
}

fn assert_names_exported_metrics(
    exported: &std::collections::BTreeSet<String>,
    what: &str,
    expr: &str,
) {
    let names = promql_metrics(expr);
    assert!(!names.is_empty(), "{what} selects no metric: {expr}");
    for name in names {
        assert!(
            exported.contains(&name),
            "{what} names {name}, which the operator does not export ({exported:?}): {expr}"
        );
    }
}

#[tokio::test]
async fn dashboard_and_alert_rules_parse_name_only_exported_metrics_and_have_runbooks() {
    let helm = Helm::new();
    let chart = chart_dir().display().to_string();
    let render = |extra: &[&str]| {
        let mut args = strings(&["template", "rel", &chart, "--namespace", "ops"]);
        args.extend(mode_values("workloadIdentity"));
        args.extend(strings(&[
            "--set",
            "metrics.dashboard.enabled=true",
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.prometheusRule.runbookBaseUrl=https://runbooks.example/portcullis",
        ]));
        args.extend(strings(extra));
        documents(&helm.ok(&args))
    };
    let docs = render(&[]);
    let exported = exported_metrics();

    // The dashboard: a ConfigMap Grafana's sidecar picks up, holding JSON whose every query
    // parses and names only what the operator exports.
    let dashboards: Vec<&Value> = find(&docs, "ConfigMap")
        .into_iter()
        .filter(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(dashboards.len(), 1, "one dashboard ConfigMap");
    let json = dashboards[0]["data"]["portcullis.json"]
        .as_str()
        .expect("the dashboard JSON");
    let dashboard: Value = serde_json::from_str(json).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Open grants by namespace and VM",
        "Grants by phase",
        "Time to close after expiry",
        "Azure requests and throttling",
        "Reconcile errors",
        "Leader and Azure reachability",
    ] {
        assert!(titles.contains(&wanted), "a panel {wanted:?}: {titles:?}");
    }
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            // Grafana's own variable, replaced before Prometheus sees the query.
            let expr = expr.replace("$__rate_interval", "5m");
            assert_names_exported_metrics(&exported, &format!("panel {:?}", panel["title"]), &expr);
        }
    }

    // The alerts.
    let rule = one(&docs, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let rules = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules");
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).expect("chart README");
    let runbooks = readme
        .split_once("## Runbooks")
        .map(|(_, r)| r.to_string())
        .expect("the chart README has a Runbooks section");
    let mut alerts = Vec::new();
    for r in rules {
        let alert = r["alert"].as_str().expect("alert name");
        alerts.push(alert);
        assert_names_exported_metrics(&exported, alert, r["expr"].as_str().expect("expr"));
        assert!(
            ["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap_or("")),
            "{alert} has a severity"
        );
        assert_eq!(
            r["annotations"]["runbook_url"],
            format!(
                "https://runbooks.example/portcullis#{}",
                alert.to_ascii_lowercase()
            )
        );
        assert!(
            runbooks.contains(&format!("### {alert}\n")),
            "the chart README has a runbook for {alert}"
        );
    }
    for wanted in [
        "PortcullisGrantOverdue",
        "PortcullisAzureUnreachable",
        "PortcullisReconcileErrors",
        "PortcullisNoLeader",
        "PortcullisBandNearlyFull",
        "PortcullisWebhookCertificateExpiring",
    ] {
        assert!(alerts.contains(&wanted), "an alert {wanted}: {alerts:?}");
    }
    // Without webhooks there is no certificate to watch.
    let without = render(&["--set", "webhook.enabled=false"]);
    let names: Vec<Value> = one(&without, "PrometheusRule")["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| r["alert"].clone())
        .collect();
    assert!(!names.contains(&Value::from("PortcullisWebhookCertificateExpiring")));

    // The API server takes the dashboard ConfigMap (a server-side dry run in a namespace of
    // its own; the PrometheusRule needs the Prometheus Operator's CRD, which is not here).
    let kube = client().await;
    let ns = fresh_namespace(&kube, "dashboard").await;
    let mut cm = dashboards[0].clone();
    cm["metadata"]["namespace"] = Value::from(ns.clone());
    let out = kubectl(
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        Some(&serde_json::to_string(&cm).expect("json")),
    );
    assert!(
        out.status.success(),
        "the dashboard ConfigMap is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
