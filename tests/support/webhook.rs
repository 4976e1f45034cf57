//! The admission webhook in-process for one test's [`Env`]: the real server (`portcullis::webhook`)
//! on 127.0.0.1, with its self-managed certificate in a Secret of the test's namespace, and a
//! Mutating- and a ValidatingWebhookConfiguration named after the namespace that select only
//! that namespace (by the `portcullis.dev/test-namespace` label every test namespace carries),
//! so that tests running in parallel, and configurations left behind by a crashed run, never
//! reach each other's objects.
//!
//! Users are impersonated: [`client_as`] builds a client acting as a user and groups, and
//! [`allow_user`] gives them, through RBAC, what a requester or approver needs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Config};
use portcullis::admission::StampKey;
use portcullis::controller::telemetry::Telemetry;
use portcullis::webhook::{self, CertSource, SelfManaged, WebhookConfig, WebhookStats};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::operator::Env;

/// The label `fresh_namespace` puts on every test namespace (v1.20 has no automatic
/// `kubernetes.io/metadata.name` label to select on).
pub const NAMESPACE_LABEL: &str = "portcullis.dev/test-namespace";
/// The Secret, in the test namespace, that holds the webhook's certificate.
pub const CERT_SECRET: &str = "portcullis-webhook-cert";

/// A webhook server running in-process and registered for one namespace. Dropping it deletes
/// the configurations (and the server stops with the test's runtime).
pub struct Webhook {
    pub addr: SocketAddr,
    pub stats: Arc<WebhookStats>,
    pub ca_bundle_pem: String,
    /// The name of both configurations (the namespace's name).
    pub configuration_name: String,
    pub key: StampKey,
    /// Where the server counts its answers (`portcullis_webhook_admissions_total`).
    pub telemetry: Arc<Telemetry>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Webhook {
    /// Starts the server with `key` and registers it for `ns`; returns once the API server
    /// calls it.
    pub async fn start(client: &Client, ns: &str, key: StampKey) -> Webhook {
        super::kube::install_these_crds(
            client,
            [<portcullis::api::AccessApproval as kube::CustomResourceExt>::crd()],
        )
        .await;
        let certs = SelfManaged::new(
            ns,
            CERT_SECRET,
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
        );
        let cert = webhook::load_or_create_certificates(client, &certs)
            .await
            .unwrap_or_else(|e| panic!("webhook certificate: {e}"));
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = rx.map(|_| ()).shared();
        let telemetry = Telemetry::new(None);
        let running = webhook::start(
            client.clone(),
            key.clone(),
            WebhookConfig {
                listen: "127.0.0.1:0".parse().expect("literal address"),
                certs: CertSource::SelfManaged {
                    certs,
                    configuration_name: Some(ns.to_string()),
                },
                telemetry: Some(telemetry.clone()),
            },
            shutdown,
        )
        .await
        .unwrap_or_else(|e| panic!("webhook server: {e}"));
        let hook = Webhook {
            addr: running.addr,
            stats: running.stats,
            ca_bundle_pem: cert.ca_bundle_pem.clone(),
            configuration_name: ns.to_string(),
            key,
            telemetry,
            shutdown: Some(tx),
            task: Some(running.task),
        };
        register(client, ns, running.addr, Some(&cert.ca_bundle_pem)).await;
        hook.wait_called(client, ns).await;
        hook
    }

    /// Waits until the API server calls this webhook: it picks up new configurations a moment
    /// after they are created. Probes with server-side dry-run creates, which go through
    /// admission but store nothing.
    pub async fn wait_called(&self, client: &Client, ns: &str) {
        let grants: Api<portcullis::api::AccessGrant> = Api::namespaced(client.clone(), ns);
        let probe: portcullis::api::AccessGrant = serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": "webhook-probe"},
            "spec": super::operator::grant_spec("vm1", &[22], "203.0.113.7/32", "PT5M"),
        }))
        .expect("probe grant");
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        super::wait_for(
            "the API server to call the test webhook",
            Duration::from_secs(30),
            || {
                let (grants, probe, pp) = (grants.clone(), probe.clone(), pp.clone());
                let before = self.stats.requests();
                async move {
                    let _ = grants.create(&pp, &probe).await;
                    (self.stats.requests() > before).then_some(())
                }
            },
        )
        .await;
    }

    /// Stops the server; the configurations stay, so the API server's calls now fail
    /// (`failurePolicy: Fail`).
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("webhook server stops within 20 s")
                .expect("webhook server task");
        }
    }

    /// Deletes both configurations now (the Drop guard does it too, best effort).
    pub async fn unregister(&self, client: &Client) {
        unregister(client, &self.configuration_name).await;
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Drop cannot await, and the test's client is bound to its runtime: kubectl does it.
        let _ = std::process::Command::new("kubectl")
            .args([
                "delete",
                "mutatingwebhookconfiguration,validatingwebhookconfiguration",
                &self.configuration_name,
                "--ignore-not-found",
                "--wait=false",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The two configurations for `ns`, calling `https://<addr>/mutate` and `/validate`, as the
/// chart has them (`failurePolicy: Fail`, CREATE and UPDATE of grants and approvals), but
/// selecting only `ns`. `ca_bundle`: `None` leaves it to the operator to patch.
pub fn configurations(ns: &str, addr: SocketAddr, ca_bundle_pem: Option<&str>) -> (Value, Value) {
    let hook = |name: &str, path: &str| {
        let mut client_config = json!({ "url": format!("https://{addr}{path}") });
        if let Some(pem) = ca_bundle_pem {
            use base64::Engine;
            client_config["caBundle"] =
                json!(base64::engine::general_purpose::STANDARD.encode(pem));
        }
        json!({
            "name": name,
            "clientConfig": client_config,
            "rules": [{
                "apiGroups": ["portcullis.dev"],
                "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["accessgrants", "accessapprovals"],
                "scope": "Namespaced",
            }],
            "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: ns}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        })
    };
    let mut mutating_hook = hook("mutate.portcullis.dev", "/mutate");
    mutating_hook["reinvocationPolicy"] = json!("Never");
    let mutating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": ns},
        "webhooks": [mutating_hook],
    });
    let validating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": ns},
        "webhooks": [hook("validate.portcullis.dev", "/validate")],
    });
    (mutating, validating)
}

/// Deletes both configurations for `ns` (best effort: they may be gone already).
pub async fn unregister(client: &Client, ns: &str) {
    let dp = kube::api::DeleteParams::default();
    let m: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let v: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let _ = m.delete(ns, &dp).await;
    let _ = v.delete(ns, &dp).await;
}

/// Creates (or replaces, server-side apply) both configurations for `ns`.
pub async fn register(client: &Client, ns: &str, addr: SocketAddr, ca_bundle_pem: Option<&str>) {
    let (mutating, validating) = configurations(ns, addr, ca_bundle_pem);
    let pp = PatchParams::apply("portcullis-tests").force();
    let m: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let v: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    m.patch(ns, &pp, &Patch::Apply(&mutating))
        .await
        .unwrap_or_else(|e| panic!("MutatingWebhookConfiguration {ns}: {e}"));
    v.patch(ns, &pp, &Patch::Apply(&validating))
        .await
        .unwrap_or_else(|e| panic!("ValidatingWebhookConfiguration {ns}: {e}"));
}

impl Env {
    /// As [`Env::new`], with the webhook running and registered for the namespace, and its
    /// stamp key in `settings.stamp_key`, so the operator started afterwards
    /// ([`Env::start_operator`]) checks stamps with the key the webhook signs them with.
    pub async fn with_webhook(prefix: &str) -> Env {
        let mut env = Env::new(prefix).await;
        env.start_webhook().await;
        env
    }

    /// Starts the webhook for this Env with a fresh stamp key (put in `settings.stamp_key`).
    /// Call it before `start_operator`.
    pub async fn start_webhook(&mut self) -> &Webhook {
        assert!(self.webhook.is_none(), "webhook already running");
        let key = StampKey::generate().expect("stamp key");
        self.settings.stamp_key = Some(key.clone());
        let hook = Webhook::start(&self.client, &self.ns, key).await;
        self.webhook.insert(hook)
    }

    /// The running webhook (panics when the Env has none).
    pub fn webhook(&self) -> &Webhook {
        self.webhook.as_ref().expect("Env::with_webhook")
    }

    /// As [`Env::webhook`], to stop it.
    pub fn webhook_mut(&mut self) -> &mut Webhook {
        self.webhook.as_mut().expect("Env::with_webhook")
    }

    /// A client acting as `user` in `groups` (impersonation).
    pub async fn client_as(&self, user: &str, groups: &[&str]) -> Client {
        client_as(user, groups).await
    }

    /// The grants API in this namespace, as `user` in `groups`.
    pub async fn grants_as(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Api<portcullis::api::AccessGrant> {
        Api::namespaced(client_as(user, groups).await, &self.ns)
    }

    /// The approvals API in this namespace, as `user` in `groups`.
    pub async fn approvals_as(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Api<portcullis::api::AccessApproval> {
        Api::namespaced(client_as(user, groups).await, &self.ns)
    }
}

/// A client for the test API server (`KUBECONFIG`) that impersonates `user` in `groups`
/// (as `kubectl --as user --as-group group`). The API server adds `system:authenticated`.
pub async fn client_as(user: &str, groups: &[&str]) -> Client {
    let mut config = Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig: {e}"));
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = if groups.is_empty() {
        None
    } else {
        Some(groups.iter().map(|g| g.to_string()).collect())
    };
    Client::try_from(config).unwrap_or_else(|e| panic!("client as {user}: {e}"))
}

/// The RBAC a requester or approver needs in `ns`: create, read, update, patch and delete
/// AccessGrants and AccessApprovals, and read JitPolicies. Bound to `user` (a Role and
/// RoleBinding named after the user).
pub async fn allow_user(client: &Client, ns: &str, user: &str) {
    allow(client, ns, "User", user).await
}

/// As [`allow_user`], for every member of `group`.
pub async fn allow_group(client: &Client, ns: &str, group: &str) {
    allow(client, ns, "Group", group).await
}

async fn allow(client: &Client, ns: &str, kind: &str, subject: &str) {
    let name = format!(
        "portcullis-test-{}-{}",
        kind.to_ascii_lowercase(),
        subject
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            })
            .collect::<String>()
    );
    let role: Role = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": name, "namespace": ns},
        "rules": [
            {"apiGroups": ["portcullis.dev"], "resources": ["accessgrants", "accessapprovals"],
             "verbs": ["create", "get", "list", "watch", "update", "patch", "delete"]},
            {"apiGroups": ["portcullis.dev"], "resources": ["jitpolicies"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["get", "list"]},
        ],
    }))
    .expect("role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}],
    }))
    .expect("role binding");
    let pp = PatchParams::apply("portcullis-tests").force();
    Api::<Role>::namespaced(client.clone(), ns)
        .patch(&name, &pp, &Patch::Apply(&role))
        .await
        .unwrap_or_else(|e| panic!("Role {name}: {e}"));
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .patch(&name, &pp, &Patch::Apply(&binding))
        .await
        .unwrap_or_else(|e| panic!("RoleBinding {name}: {e}"));
}
