//! The real API server the tests run against: started by the test command
//! (`scripts/test.sh`), found through `KUBECONFIG`. Never skipped: without it the tests fail
//! and say how to start one.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Config};

pub async fn client() -> Client {
    let Ok(path) = std::env::var("KUBECONFIG") else {
        panic!(
            "KUBECONFIG is not set: these tests need the local control plane. Run them with \
             `scripts/test.sh`, or `scripts/local-cluster.sh start` and export the KUBECONFIG it prints"
        );
    };
    let config = Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("cannot read the kubeconfig at {path}: {e}"));
    let client = Client::try_from(config).unwrap_or_else(|e| panic!("cannot build a client: {e}"));
    if let Err(e) = client.apiserver_version().await {
        panic!(
            "the API server in {path} does not answer ({e}); start it with `scripts/local-cluster.sh start`"
        );
    }
    client
}

/// Applies the generated CRDs (server-side apply, so repeated calls from parallel tests agree)
/// and waits until both are Established.
pub async fn install_crds(client: &Client) {
    install_these_crds(
        client,
        [
            <portcullis::api::JitPolicy as kube::CustomResourceExt>::crd(),
            <portcullis::api::AccessGrant as kube::CustomResourceExt>::crd(),
            <portcullis::api::AccessApproval as kube::CustomResourceExt>::crd(),
            <portcullis::api::JitScope as kube::CustomResourceExt>::crd(),
        ],
    )
    .await;
}

/// Applies these CRDs and waits until they are Established and served.
pub async fn install_these_crds(
    client: &Client,
    these: impl IntoIterator<Item = CustomResourceDefinition>,
) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("portcullis-tests").force();
    for crd in these {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        super::wait_for(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let crd = crds.get(&name).await.ok()?;
                    let established = crd
                        .status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    established.then_some(())
                }
            },
        )
        .await;
    }
    // Discovery lags Established by a moment; wait until the resources can be listed.
    let grants: Api<portcullis::api::AccessGrant> = Api::all(client.clone());
    let policies: Api<portcullis::api::JitPolicy> = Api::all(client.clone());
    super::wait_for("the CRDs to be served", Duration::from_secs(30), || {
        let (g, p) = (grants.clone(), policies.clone());
        async move {
            (g.list(&Default::default()).await.is_ok() && p.list(&Default::default()).await.is_ok())
                .then_some(())
        }
    })
    .await;
}

/// The name of the JitScope [`allow_namespace`] creates for `ns`.
pub fn scope_name(ns: &str) -> String {
    format!("test-{ns}")
}

/// Lets the policies of `ns` name every VM of the demo fixture's subscription, as a cluster
/// administrator would with a JitScope (the operator refuses namespaces no JitScope names).
pub async fn allow_namespace(client: &Client, ns: &str) {
    let api: Api<portcullis::api::JitScope> = Api::all(client.clone());
    let scope = portcullis::api::JitScope::new(
        &scope_name(ns),
        portcullis::api::JitScopeSpec {
            namespaces: vec![ns.to_string()],
            subscriptions: vec![super::operator::SUB.to_string()],
            ..Default::default()
        },
    );
    api.create(&PostParams::default(), &scope)
        .await
        .unwrap_or_else(|e| panic!("creating JitScope for {ns}: {e}"));
}

/// Deletes the JitScopes [`allow_namespace`] made for `namespaces`, at a test's teardown (from a
/// `Drop`): waited for on a multi-threaded runtime, else only started. Best effort: the
/// namespaces themselves are left behind too.
pub fn forget_namespaces(client: &Client, namespaces: &[String]) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let api: Api<portcullis::api::JitScope> = Api::all(client.clone());
    let names: Vec<String> = namespaces.iter().map(|ns| scope_name(ns)).collect();
    let delete = async move {
        for name in names {
            let _ = api.delete(&name, &Default::default()).await;
        }
    };
    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(|| handle.block_on(delete));
    } else {
        handle.spawn(delete);
    }
}

/// A namespace of the test's own, so tests can run in parallel on one API server.
pub async fn fresh_namespace(client: &Client, prefix: &str) -> String {
    let suffix: u32 = rand_suffix();
    let name = format!("{prefix}-{suffix:08x}");
    let ns: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        // What the test webhooks select their own namespace by (support::webhook).
        "metadata": {"name": name, "labels": {super::webhook::NAMESPACE_LABEL: name}}
    }))
    .unwrap_or_else(|e| panic!("namespace object: {e}"));
    ns.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    name
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// A kube-apiserver of one test's own (`scripts/local-cluster.sh` in a directory of its own),
/// for tests that must change cluster-wide things, such as the CRDs, without disturbing the
/// tests running in parallel on the shared one. Stopped when dropped.
pub struct PrivateApiServer {
    dir: tempfile::TempDir,
    pub client: Client,
}

impl PrivateApiServer {
    pub async fn start() -> PrivateApiServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let script = super::repo_root().join("scripts/local-cluster.sh");
        let path = dir.path().to_path_buf();
        let status = tokio::task::spawn_blocking(move || {
            std::process::Command::new("bash")
                .arg(&script)
                .arg("start")
                .env("PORTCULLIS_CLUSTER_DIR", path)
                .status()
        })
        .await
        .unwrap_or_else(|e| panic!("local-cluster.sh: {e}"))
        .unwrap_or_else(|e| panic!("running local-cluster.sh: {e}"));
        assert!(status.success(), "local-cluster.sh start failed: {status}");
        let kubeconfig = kube::config::Kubeconfig::read_from(dir.path().join("kubeconfig"))
            .unwrap_or_else(|e| panic!("private kubeconfig: {e}"));
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .unwrap_or_else(|e| panic!("private kubeconfig: {e}"));
        let client = Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"));
        PrivateApiServer { dir, client }
    }
}

impl Drop for PrivateApiServer {
    fn drop(&mut self) {
        let script = super::repo_root().join("scripts/local-cluster.sh");
        let _ = std::process::Command::new("bash")
            .arg(script)
            .arg("stop")
            .env("PORTCULLIS_CLUSTER_DIR", self.dir.path())
            .status();
    }
}
