//! One test's world: its own namespace on the real API server, its own Azure emulator (seeded
//! with the demo fixture), and the operator running in-process against both, over HTTP with the
//! real SDK client and a real client-secret credential.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use portcullis::api::{AccessGrant, GrantPhase, JitPolicy};
use portcullis::azure::client::{AzureClientOptions, AzureNetworkClient};
use portcullis::azure::credential::{CredentialConfig, build_credential};
use portcullis::azure::{AzureStats, PacingOptions};
use portcullis::controller::telemetry::Telemetry;
use portcullis::controller::{self, Settings};
use portcullis::plan::naming;
use portcullis_azure_emulator::{
    AdminClient, EmulatorConfig, Fixture, RequestRecord, RunningEmulator, spawn,
};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::wait_for;

pub const SUB: &str = "00000000-0000-0000-0000-000000000001";

pub fn vm_id(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-demo/providers/Microsoft.Compute/virtualMachines/{name}"
    )
}

pub fn nsg_id(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-demo/providers/Microsoft.Network/networkSecurityGroups/{name}"
    )
}

pub fn demo_fixture() -> Fixture {
    let path = super::repo_root().join("emulator/fixtures/demo.yaml");
    Fixture::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An operator running in-process.
pub struct Replica {
    pub shutdown: oneshot::Sender<()>,
    pub task: JoinHandle<Result<(), controller::Error>>,
    pub telemetry: Arc<Telemetry>,
    pub stats: AzureStats,
}

impl Replica {
    /// Azure writes this replica made (accepted or not).
    pub fn writes(&self) -> u64 {
        self.stats
            .snapshot()
            .iter()
            .filter(|((op, _), _)| matches!(op.as_str(), "put_rule" | "delete_rule" | "put_nsg"))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The shutdown trigger and the task of an operator running in-process.
type RunningOperator = (
    oneshot::Sender<()>,
    JoinHandle<Result<(), controller::Error>>,
);

pub struct Env {
    pub client: Client,
    pub ns: String,
    pub emu: RunningEmulator,
    pub admin: AdminClient,
    pub settings: Settings,
    /// The operator's estimate of ARM's budget (Azure's defaults unless a test sets the
    /// emulator's buckets otherwise).
    pub pacing: PacingOptions,
    /// The fixture's user rules as the emulator served them before the operator ran.
    pub user_rules_at_start: Vec<Value>,
    operator: Option<RunningOperator>,
    /// The admission webhook, when started (`Env::with_webhook`, `Env::start_webhook`).
    pub(crate) webhook: Option<super::webhook::Webhook>,
    /// Namespaces given a JitScope of their own (see [`Env::allow_namespace`]).
    scoped: Vec<String>,
}

impl Drop for Env {
    fn drop(&mut self) {
        super::kube::forget_namespaces(&self.client, &self.scoped);
    }
}

impl Env {
    /// Demo fixture, 20 ms async operations, a 2 s resync.
    pub async fn new(prefix: &str) -> Env {
        let settings = Settings {
            resync: Duration::from_secs(2),
            ..Default::default()
        };
        Env::with(
            prefix,
            EmulatorConfig {
                fixture: demo_fixture(),
                ..Default::default()
            },
            settings,
        )
        .await
    }

    pub async fn with(prefix: &str, emulator: EmulatorConfig, settings: Settings) -> Env {
        let client = super::kube::client().await;
        Env::with_client(prefix, client, emulator, settings).await
    }

    /// As [`Env::with`], on the API server `client` talks to.
    pub async fn with_client(
        prefix: &str,
        client: Client,
        emulator: EmulatorConfig,
        mut settings: Settings,
    ) -> Env {
        super::init_tracing();
        super::kube::install_crds(&client).await;
        let ns = super::kube::fresh_namespace(&client, prefix).await;
        settings.namespaces = vec![ns.clone()];
        let emu = spawn(emulator, "127.0.0.1:0".parse().expect("literal address"))
            .await
            .unwrap_or_else(|e| panic!("emulator: {e}"));
        let admin = emu.admin();
        let mut env = Env {
            client,
            ns,
            emu,
            admin,
            settings,
            pacing: AzureClientOptions::default().pacing,
            user_rules_at_start: Vec::new(),
            operator: None,
            webhook: None,
            scoped: Vec::new(),
        };
        let ns = env.ns.clone();
        env.allow_namespace(&ns).await;
        env.user_rules_at_start = env.foreign_rules().await;
        assert!(
            !env.user_rules_at_start.is_empty(),
            "the fixture has user rules"
        );
        env
    }

    /// Gives `ns` a JitScope allowing the demo fixture's subscription (as a cluster
    /// administrator would), deleted when the Env is dropped. The Env's own namespace has one.
    pub async fn allow_namespace(&mut self, ns: &str) {
        super::kube::allow_namespace(&self.client, ns).await;
        self.scoped.push(ns.to_string());
    }

    pub fn azure_client(&self) -> AzureNetworkClient {
        let base = self.emu.base_url();
        let authority = url::Url::parse(&format!("{base}/")).expect("emulator URL");
        let cfg = CredentialConfig::ClientSecret {
            tenant_id: "test-tenant".into(),
            client_id: "portcullis-test".into(),
            client_secret: "test-secret".into(),
        };
        let credential =
            build_credential(&cfg, &authority, azure_core::new_http_client()).expect("credential");
        let options = AzureClientOptions {
            operation_deadline: Duration::from_secs(30),
            pacing: self.pacing.clone(),
            ..Default::default()
        };
        AzureNetworkClient::new(
            url::Url::parse(&base).expect("emulator URL"),
            credential,
            options,
        )
        .expect("client")
    }

    /// Starts the operator in-process; returns its telemetry (metrics and health).
    pub fn start_operator(&mut self) -> Arc<Telemetry> {
        assert!(self.operator.is_none(), "operator already running");
        let replica = self.spawn_replica(self.settings.clone());
        let telemetry = replica.telemetry.clone();
        self.operator = Some((replica.shutdown, replica.task));
        telemetry
    }

    /// Starts one more operator process (in-process) with its own Azure client and telemetry.
    pub fn spawn_replica(&self, settings: Settings) -> Replica {
        self.spawn_replica_with_client(self.client.clone(), settings)
    }

    /// As `spawn_replica`, talking to the API server through `client` (e.g. through a proxy).
    pub fn spawn_replica_with_client(&self, client: Client, settings: Settings) -> Replica {
        let (tx, rx) = oneshot::channel::<()>();
        let azure = self.azure_client();
        let stats = azure.stats();
        let telemetry = Telemetry::new(Some(stats.clone()));
        let task = tokio::spawn(controller::run(
            client,
            Arc::new(azure),
            settings,
            telemetry.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        Replica {
            shutdown: tx,
            task,
            telemetry,
            stats,
        }
    }

    pub async fn stop_operator(&mut self) {
        let (tx, handle) = self.operator.take().expect("operator running");
        let _ = tx.send(());
        match tokio::time::timeout(Duration::from_secs(20), handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("operator failed: {e}"),
            Ok(Err(e)) => panic!("operator task panicked: {e}"),
            Err(_) => panic!("operator did not stop within 20 s of shutdown"),
        }
    }

    pub fn policies(&self) -> Api<JitPolicy> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn grants(&self) -> Api<AccessGrant> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn create_policy(&self, name: &str, spec: Value) -> JitPolicy {
        let obj: JitPolicy = serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "JitPolicy",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec
        }))
        .unwrap_or_else(|e| panic!("policy {name}: {e}"));
        self.policies()
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("create policy {name}: {e}"))
    }

    pub async fn create_grant(&self, name: &str, spec: Value) -> AccessGrant {
        let obj: AccessGrant = serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec
        }))
        .unwrap_or_else(|e| panic!("grant {name}: {e}"));
        self.grants()
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("create grant {name}: {e}"))
    }

    pub async fn delete_grant(&self, name: &str) {
        self.grants()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete grant {name}: {e}"));
    }

    pub async fn wait_grant_phase(
        &self,
        name: &str,
        phase: GrantPhase,
        timeout: Duration,
    ) -> AccessGrant {
        let api = self.grants();
        wait_for(
            &format!("grant {name} to be {}", phase.as_str()),
            timeout,
            || {
                let api = api.clone();
                async move {
                    let g = api.get(name).await.ok()?;
                    (g.status.as_ref()?.phase? == phase).then_some(g)
                }
            },
        )
        .await
    }

    pub async fn wait_policy_ready(&self, name: &str, timeout: Duration) -> JitPolicy {
        let api = self.policies();
        wait_for(&format!("policy {name} Ready"), timeout, || {
            let api = api.clone();
            async move {
                let p = api.get(name).await.ok()?;
                let ready = p
                    .status
                    .as_ref()?
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready.then_some(p)
            }
        })
        .await
    }

    pub async fn wait_gone_grant(&self, name: &str, timeout: Duration) {
        let api = self.grants();
        wait_for(&format!("grant {name} to be gone"), timeout, || {
            let api = api.clone();
            async move { matches!(api.get_opt(name).await, Ok(None)).then_some(()) }
        })
        .await
    }

    /// The NSG's non-default rules, as ARM JSON, straight from the emulator.
    pub async fn rules(&self, nsg: &str) -> Vec<Value> {
        self.admin
            .rules(&nsg_id(nsg))
            .await
            .unwrap_or_else(|e| panic!("emulator rules of {nsg}: {e}"))
    }

    /// The rules this test's operator (`self.settings.naming`) owns in the NSG.
    pub async fn owned_rules(&self, nsg: &str) -> Vec<Value> {
        self.rules(nsg)
            .await
            .into_iter()
            .filter(|r| self.settings.naming.is_owned(rule_name(r)))
            .collect()
    }

    /// Rules that are no Portcullis installation's (by the exact name grammar, legacy names
    /// included), for byte-for-byte comparison: people's rules, look-alikes such as
    /// `Portcullis-Bastion` too.
    pub async fn foreign_rules(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for nsg in ["nsg-vm1", "nsg-subnet"] {
            out.extend(
                self.rules(nsg)
                    .await
                    .into_iter()
                    .filter(|r| !naming::is_portcullis_rule_name(rule_name(r))),
            );
        }
        out
    }

    /// Rules that are not Portcullis's are as they were, but for their etags: a whole-NSG PUT
    /// (a round of several changes, the write Azure allows under a `CanNotDelete` lock, the
    /// `flushConnection` opt-in) gives every rule of the NSG a new etag while changing nothing
    /// else.
    pub async fn assert_user_rules_untouched(&self) {
        self.assert_foreign_rules_as(&self.user_rules_at_start)
            .await;
    }

    /// As [`Env::assert_user_rules_untouched`], against rules read at another moment.
    pub async fn assert_foreign_rules_as(&self, before: &[Value]) {
        use super::invariants::content_of_rules;
        let expected = content_of_rules(before);
        // A whole-NSG write still in flight shows every rule `Updating` for its long-running
        // operation: judge the NSG once it has settled (or show the difference at the deadline).
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.foreign_rules().await;
            let settled = now
                .iter()
                .all(|r| r["properties"]["provisioningState"] == "Succeeded");
            let now = content_of_rules(&now);
            if (settled && now == expected) || std::time::Instant::now() > deadline {
                assert_eq!(
                    now, expected,
                    "user rules must be unchanged but for their etags"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn writes(&self) -> u64 {
        self.admin.stats().await.expect("emulator stats").writes
    }

    /// The Allow rules of `grant` in the NSG, as this test's operator names them.
    pub async fn grant_names_in_nsg(&self, nsg: &str, grant: &AccessGrant) -> Vec<Value> {
        let uid = grant.uid().expect("uid");
        self.rules(nsg)
            .await
            .into_iter()
            .filter(|r| self.settings.naming.is_grant_rule_of(rule_name(r), &uid))
            .collect()
    }
}

impl Env {
    /// The reasons of the Events about the object `name` in this namespace, with their notes.
    pub async fn events_for(&self, name: &str) -> Vec<(String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        let list = api
            .list(&kube::api::ListParams::default())
            .await
            .unwrap_or_else(|e| panic!("list events: {e}"));
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// Waits for an Event with this reason about `name`; returns its note.
    pub async fn wait_event(&self, name: &str, reason: &str, timeout: Duration) -> String {
        wait_for(&format!("Event {reason} on {name}"), timeout, || async {
            self.events_for(name)
                .await
                .into_iter()
                .find(|(r, _)| r == reason)
                .map(|(_, note)| note)
        })
        .await
    }

    /// Waits until the grant's rules are gone from both NSGs of the demo fixture.
    pub async fn wait_rules_gone(&self, grant: &AccessGrant, timeout: Duration) {
        wait_for(
            &format!("{}'s rules gone", grant.name_any()),
            timeout,
            || async {
                let a = self.grant_names_in_nsg("nsg-vm1", grant).await;
                let b = self.grant_names_in_nsg("nsg-subnet", grant).await;
                (a.is_empty() && b.is_empty()).then_some(())
            },
        )
        .await;
    }

    /// Merge-patches a grant's spec, as `kubectl edit` or a GitOps re-apply would.
    pub async fn patch_grant_spec(&self, name: &str, spec: Value) -> AccessGrant {
        self.grants()
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap_or_else(|e| panic!("patch grant {name}: {e}"))
    }

    /// Merge-patches a policy's spec.
    pub async fn patch_policy_spec(&self, name: &str, spec: Value) -> JitPolicy {
        self.policies()
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap_or_else(|e| panic!("patch policy {name}: {e}"))
    }

    /// Waits until the object's condition `type_` has this reason; returns the grant.
    pub async fn wait_grant_condition(
        &self,
        name: &str,
        type_: &str,
        reason: &str,
        timeout: Duration,
    ) -> AccessGrant {
        let api = self.grants();
        wait_for(
            &format!("grant {name} condition {type_} reason {reason}"),
            timeout,
            || {
                let api = api.clone();
                async move {
                    let g = api.get(name).await.ok()?;
                    let found = g
                        .status
                        .as_ref()?
                        .conditions
                        .iter()
                        .any(|c| c.type_ == type_ && c.reason == reason);
                    found.then_some(g)
                }
            },
        )
        .await
    }

    pub async fn wait_policy_condition(
        &self,
        name: &str,
        reason: &str,
        timeout: Duration,
    ) -> JitPolicy {
        let api = self.policies();
        wait_for(
            &format!("policy {name} Ready reason {reason}"),
            timeout,
            || {
                let api = api.clone();
                async move {
                    let p = api.get(name).await.ok()?;
                    let found = p
                        .status
                        .as_ref()?
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.reason == reason);
                    found.then_some(p)
                }
            },
        )
        .await
    }
}

/// Whether `request` read NSG `nsg`'s rules: a GET of the NSG, or of its rule list.
pub fn reads_nsg(request: &RequestRecord, nsg: &str) -> bool {
    request.method == "GET"
        && [
            format!("/networkSecurityGroups/{nsg}?"),
            format!("/networkSecurityGroups/{nsg}/securityRules?"),
        ]
        .iter()
        .any(|path| request.path.contains(path))
}

/// Whether `request` listed the demo resource group's NSGs (the sweep's one read of them all).
pub fn lists_nsgs(request: &RequestRecord) -> bool {
    request.method == "GET"
        && request
            .path
            .contains("/resourceGroups/rg-demo/providers/Microsoft.Network/networkSecurityGroups?")
}

/// Whether `request` read NSG `nsg` of the demo resource group, on its own or in a list.
pub fn reads_nsg_or_lists(request: &RequestRecord, nsg: &str) -> bool {
    reads_nsg(request, nsg) || lists_nsgs(request)
}

pub fn rule_name(rule: &Value) -> &str {
    rule["name"].as_str().unwrap_or_default()
}

pub fn prop<'a>(rule: &'a Value, field: &str) -> &'a Value {
    &rule["properties"][field]
}

/// The standard policy of these tests: vm1 (22/TCP, 3389/TCP, 53/UDP) and vm2 (22/TCP).
pub fn standard_policy() -> Value {
    json!({
        "virtualMachines": [
            {"id": vm_id("vm1"), "ports": [
                {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefixes": ["203.0.113.0/24"], "maxRequestAccessDuration": "PT1H"},
                {"number": 3389, "protocol": "TCP", "allowedSourceAddressPrefix": "203.0.113.0/24", "maxRequestAccessDuration": "PT10M"},
                {"number": 53, "protocol": "UDP", "allowedSourceAddressPrefixes": ["198.51.100.0/24"], "maxRequestAccessDuration": "PT1H"}
            ]},
            {"id": vm_id("vm2"), "ports": [
                {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefixes": ["198.51.100.0/24"], "maxRequestAccessDuration": "PT1H"}
            ]}
        ]
    })
}

pub fn grant_spec(vm: &str, ports: &[u16], source: &str, duration: &str) -> Value {
    json!({
        "policyRef": {"name": "prod"},
        "virtualMachine": vm,
        "ports": ports,
        "sourceAddressPrefix": source,
        "duration": duration,
        "justification": "INC-42: integration test",
    })
}
