//! Error types: [`EmulatorError`] for the library API and [`ArmError`] for ARM wire errors.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Errors of the emulator's library API (fixture loading, startup, admin client).
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid fixture: {0}")]
    Fixture(String),
    #[error("invalid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid state file {path}: {message}")]
    StateFile { path: String, message: String },
    #[error("HTTP error talking to the emulator: {0}")]
    Http(#[from] reqwest::Error),
    #[error("admin API answered {status}: {body}")]
    Admin { status: u16, body: String },
}

/// An ARM-shaped error response: `{"error":{"code":...,"message":...}}` with a status.
#[derive(Debug, Clone)]
pub struct ArmError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    /// `Retry-After` header value in seconds, when set.
    pub retry_after: Option<u64>,
    /// `error.details`: (code, message) pairs, as ARM nests them (e.g. under a 412).
    pub details: Vec<(String, String)>,
}

impl ArmError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_string(),
            message: message.into(),
            retry_after: None,
            details: Vec::new(),
        }
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn with_detail(mut self, code: &str, message: impl Into<String>) -> Self {
        self.details.push((code.to_string(), message.into()));
        self
    }

    pub fn body(&self) -> serde_json::Value {
        let mut error = serde_json::json!({ "code": self.code, "message": self.message });
        if !self.details.is_empty() {
            error["details"] = self
                .details
                .iter()
                .map(|(code, message)| serde_json::json!({ "code": code, "message": message }))
                .collect();
        }
        serde_json::json!({ "error": error })
    }
}

impl std::fmt::Display for ArmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ArmError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
        }
        resp
    }
}
