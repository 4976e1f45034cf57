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
