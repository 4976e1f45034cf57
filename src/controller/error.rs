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
}

impl Error {
    /// A short stable label, used as a metric label and an Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesError",
            Error::Azure(e) => match e {
                AzureError::Throttled { .. } => "AzureThrottled",
                _ => "AzureError",
            },
            Error::Finalizer(_) => "FinalizerError",
            Error::MissingField(_) => "InvalidObject",
            Error::Config(_) => "ConfigError",
            Error::Serialisation(_) => "SerialisationError",
            Error::LeadershipLost(_) | Error::NotLeader => "NotLeader",
        }
    }
}
