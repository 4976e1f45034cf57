//! One error type for the reconcilers, with a category for metrics and Events.

use crate::azure::AzureError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),

    #[error("Azure: {0}")]
    Azure(#[from] AzureError),

    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    #[error("object has no {0}")]
    MissingField(&'static str),

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("serialisation: {0}")]
    Serialisation(#[from] serde_json::Error),

    #[error("leadership lost: {0}")]
    LeadershipLost(String),

    #[error("not the leader: Azure writes are stopped")]
    NotLeader,

    /// Some NSGs failed; the object's status already names each NSG and its error.
    #[error("{summary}")]
    NsgsFailed {
        summary: String,
        #[source]
        first: std::sync::Arc<Error>,
    },

    /// The NSG could not be recorded in the inventory, so nothing was written to it.
    #[error("cannot record NSG {nsg} in the inventory, so it was not written: {source}")]
    Inventory {
        nsg: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Whether the failure is already told in the object's status, in more detail than a
    /// generic report would (also through the finalizer's wrapper).
    pub fn reported_in_status(&self) -> bool {
        match self {
            Error::NsgsFailed { .. } => true,
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reported_in_status(),
                _ => false,
            },
            _ => false,
        }
    }

    /// The Azure error underneath, if any (also through the finalizer's wrapper).
    pub fn azure(&self) -> Option<&AzureError> {
        match self {
            Error::Azure(e) => Some(e),
            Error::NsgsFailed { first, .. } => first.azure(),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.azure(),
                _ => None,
            },
            _ => None,
        }
    }

    /// A short stable label, used as a metric label, a condition reason and an Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.category(),
                _ => "FinalizerError",
            },
            Error::NsgsFailed { first, .. } => first.category(),
            Error::Kube(_) => "KubernetesError",
            Error::Azure(e) => match e {
                AzureError::Throttled { .. } => "AzureThrottled",
                _ => "AzureError",
            },
            Error::MissingField(_) => "InvalidObject",
            Error::Config(_) => "ConfigError",
            Error::Serialisation(_) => "SerialisationError",
            Error::LeadershipLost(_) | Error::NotLeader => "NotLeader",
            Error::Inventory { .. } => "InventoryError",
        }
    }
}
