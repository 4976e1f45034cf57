//! The admission webhook's edge: the HTTPS server the API server calls, the certificates it
//! serves (cert-manager's files, or generated and rotated by the operator itself), the
//! kube-backed [`Lookup`](crate::admission::Lookup), and the stamp key's Secret. The decisions
//! themselves are `crate::admission`'s.

pub mod certs;
pub mod key;
pub mod lookup;
pub mod server;
pub mod tls;

pub use certs::{
    CaBundlePatcher, Patched, SelfManaged, ServingCert, default_dns_names,
    load_or_create_certificates, load_or_create_certificates_at, maintain,
};
pub use key::load_or_create_stamp_key;
pub use lookup::KubeLookup;
pub use server::{WebhookServer, WebhookStats, serve};
pub use tls::CertStore;

/// Everything that can go wrong at the webhook's edge.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("Kubernetes API error on {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name}: {problem}")]
    BadSecret {
        namespace: String,
        name: String,
        problem: String,
    },
    #[error("stamp key: {0}")]
    StampKey(String),
    #[error("certificate generation: {0}")]
    CertGen(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl WebhookError {
    pub(crate) fn kube(what: impl Into<String>, source: kube::Error) -> WebhookError {
        WebhookError::Kube {
            what: what.into(),
            source,
        }
    }
}

/// True when the API server answered 409 AlreadyExists (another replica created it first).
pub(crate) fn already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists")
}

/// True when the API server answered 409 Conflict (a stale resourceVersion).
pub(crate) fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict")
}

pub(crate) fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::info;

use crate::admission::{Admission, StampKey};

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// `tls.crt` and `tls.key` in this directory (cert-manager's Secret mount), reloaded when
    /// they change. The CA bundle is injected by cert-manager's ca-injector.
    Dir(PathBuf),
    /// Generated and renewed by the operator in a Secret; the bundle is patched into the
    /// webhook configurations of this name (both kinds), when given.
    SelfManaged {
        certs: SelfManaged,
        configuration_name: Option<String>,
    },
}

#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub certs: CertSource,
    /// Where answers are counted (the operator's `/metrics`).
    pub telemetry: Option<Arc<crate::controller::telemetry::Telemetry>>,
}

/// A webhook server running in the background.
pub struct RunningWebhook {
    pub addr: SocketAddr,
    pub stats: Arc<WebhookStats>,
    /// Ends after the shutdown future resolved and in-flight requests finished.
    pub task: tokio::task::JoinHandle<()>,
}

/// Loads the certificate (creating it in self-managed mode), binds, and spawns the server and
/// the certificate upkeep; both stop when `shutdown` resolves. Fails when no certificate can be
/// loaded, so a misconfigured webhook stops the operator at start-up rather than refusing
/// every request later.
pub async fn start(
    client: kube::Client,
    key: StampKey,
    config: WebhookConfig,
    shutdown: impl Future<Output = ()> + Send + Clone + 'static,
) -> Result<RunningWebhook, WebhookError> {
    let store = CertStore::new();
    let upkeep: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match config.certs {
        CertSource::Dir(dir) => {
            let mut watcher = tls::CertDir::new(dir.clone());
            watcher.reload(&store)?;
            info!(dir = %dir.display(), "webhook certificate from files");
            Box::pin(watcher.watch(store.clone(), shutdown.clone()))
        }
        CertSource::SelfManaged {
            certs,
            configuration_name,
        } => {
            let current = load_or_create_certificates(&client, &certs).await?;
            store.set_pem(current.cert_pem.as_bytes(), current.key_pem.as_bytes())?;
            info!(secret = %format!("{}/{}", certs.namespace, certs.secret_name), not_after = %current.serving_not_after, "self-managed webhook certificate");
            let patcher = configuration_name.map(|n| CaBundlePatcher::new(client.clone(), &n));
            Box::pin(maintain(
                client.clone(),
                certs,
                store.clone(),
                patcher,
                current,
                config.telemetry.clone(),
                shutdown.clone(),
            ))
        }
    };
    let admission = Arc::new(Admission::new(key, Arc::new(KubeLookup::new(client))));
    let server = serve(config.listen, admission, store, config.telemetry, shutdown).await?;
    let addr = server.addr;
    let stats = server.stats.clone();
    let task = tokio::spawn(async move {
        futures::join!(server.run(), upkeep);
    });
    Ok(RunningWebhook { addr, stats, task })
}
