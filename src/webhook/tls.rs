//! The serving certificate, swappable while the server runs: cert-manager rotates the files
//! it mounts, and the self-managed mode renews its Secret, without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::WebhookError;

/// The certificate the server presents; empty until the first one is set (handshakes fail
/// meanwhile, which the API server treats as the webhook being down).
#[derive(Debug, Default)]
pub struct CertStore {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertStore {
    pub fn new() -> Arc<CertStore> {
        Arc::new(CertStore::default())
    }

    /// Replaces the served certificate with this PEM chain and PEM private key.
    pub fn set_pem(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), WebhookError> {
        let certified = certified_key(cert_pem, key_pem)?;
        match self.current.write() {
            Ok(mut slot) => *slot = Some(Arc::new(certified)),
            Err(poisoned) => *poisoned.into_inner() = Some(Arc::new(certified)),
        }
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.get().is_some()
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        match self.current.read() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, WebhookError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WebhookError::Tls(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(WebhookError::Tls("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| WebhookError::Tls(format!("private key PEM: {e}")))?;
    let signer =
        any_supported_type(&key).map_err(|e| WebhookError::Tls(format!("private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    // A key from one renewal and a certificate from another (files caught mid-rotation) would
    // fail every handshake: refuse the pair and keep serving the previous one.
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e) => Err(WebhookError::Tls(format!(
            "the private key does not match the certificate: {e}"
        ))),
    }
}

/// How often the mounted files are checked for a new certificate.
pub const CERT_DIR_POLL: Duration = Duration::from_secs(10);

/// cert-manager mode: `tls.crt` and `tls.key` in `dir` (a Secret volume).
pub struct CertDir {
    dir: PathBuf,
    last: Option<[u8; 32]>,
}

impl CertDir {
    pub fn new(dir: impl Into<PathBuf>) -> CertDir {
        CertDir {
            dir: dir.into(),
            last: None,
        }
    }

    /// Loads the files into `store` if they changed since the last load. Returns whether it
    /// loaded a new certificate.
    pub fn reload(&mut self, store: &CertStore) -> Result<bool, WebhookError> {
        let cert = read(&self.dir.join("tls.crt"))?;
        let key = read(&self.dir.join("tls.key"))?;
        let mut hash = Sha256::new();
        hash.update(&cert);
        hash.update([0]);
        hash.update(&key);
        let digest: [u8; 32] = hash.finalize().into();
        if self.last == Some(digest) {
            return Ok(false);
        }
        // A Secret volume swaps both files at once (an atomic symlink flip); a half-written
        // pair fails to parse and is retried at the next poll.
        store.set_pem(&cert, &key)?;
        self.last = Some(digest);
        Ok(true)
    }

    /// Reloads on change until `shutdown` resolves.
    pub async fn watch(
        mut self,
        store: Arc<CertStore>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(CERT_DIR_POLL) => {}
            }
            match self.reload(&store) {
                Ok(true) => info!(dir = %self.dir.display(), "reloaded the webhook certificate"),
                Ok(false) => {}
                Err(e) => {
                    warn!(dir = %self.dir.display(), error = %e, "cannot reload the webhook certificate; serving the previous one")
                }
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, WebhookError> {
    std::fs::read(path).map_err(|source| WebhookError::Io {
        path: path.display().to_string(),
        source,
    })
}
