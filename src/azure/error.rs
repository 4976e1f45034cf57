//! One error type for everything the Azure edge can report, with the classification the
//! controller needs: is it worth retrying, after how long, and a short stable label for metrics.

use std::time::Duration;

use serde::Deserialize;

/// ARM error codes that mean "try again later" even when they do not arrive as a 429.
const RETRYABLE_CODES: &[&str] = &[
    "RetryableErrorDueToAnotherOperation",
    "AnotherOperationInProgress",
    "SubscriptionRequestsThrottled",
    "TooManyRequests",
    "OperationPreempted",
];

/// The code of a 409 caused by a management lock.
const SCOPE_LOCKED: &str = "ScopeLocked";

/// How long to wait after a 429 that carries no `Retry-After` header.
pub const DEFAULT_THROTTLE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AzureError {
    /// 429 (per-NSG `RetryableErrorDueToAnotherOperation`, subscription-wide
    /// `SubscriptionRequestsThrottled`, ...): wait `retry_after` and try again.
    #[error("throttled by Azure ({code}); retry after {retry_after:?}")]
    Throttled { retry_after: Duration, code: String },

    /// 409: the request conflicts with the current state (e.g. a duplicate priority).
    #[error("conflict ({code}): {message}")]
    Conflict { code: String, message: String },

    /// 409 `ScopeLocked`: a management lock on the resource or a parent scope forbids this
    /// write (`CanNotDelete` refuses deletes, `ReadOnly` every write). Azure's message names the
    /// locked scope(s). Only removing the lock helps; under `CanNotDelete` a whole-NSG PUT that
    /// leaves the rule out still works.
    #[error("scope locked: {scope_message}")]
    Locked { scope_message: String },

    /// 412: the `If-Match` etag no longer matches: someone wrote the resource since it was read.
    /// Re-read and re-plan; retrying the same request cannot succeed.
    #[error("precondition failed (the resource changed since it was read): {message}")]
    PreconditionFailed { message: String },

    /// 404: the resource (VM, NIC, NSG, rule, subnet) does not exist.
    #[error("not found: {what}")]
    NotFound { what: String },

    /// 400: Azure refused the request (e.g. an invalid rule). Not retryable.
    #[error("rejected by Azure ({code}): {message}")]
    BadRequest { code: String, message: String },

    /// 401/403: the identity is not authenticated or not authorised.
    #[error("unauthorized: {message}")]
    Unauthorized { message: String },

    /// 5xx (and 408): a server-side failure, usually transient.
    #[error("Azure server error {status} ({code}): {message}")]
    Server {
        status: u16,
        code: String,
        message: String,
    },

    /// Any other unexpected HTTP status.
    #[error("unexpected HTTP status {status} ({code}): {message}")]
    UnexpectedStatus {
        status: u16,
        code: String,
        message: String,
    },

    /// A long-running operation ended `Failed` or `Canceled`.
    #[error("Azure operation ended {status} ({code}): {message}")]
    OperationFailed {
        status: String,
        code: String,
        message: String,
    },

    /// The connection failed, was reset, or a single request took too long.
    #[error("transport error: {0}")]
    Transport(String),

    /// The operation (including its retries and polling) did not finish within its deadline.
    #[error("{what} did not complete within {after:?}")]
    Timeout { what: String, after: Duration },

    /// Azure answered something we could not understand.
    #[error("invalid response from Azure: {0}")]
    InvalidResponse(String),

    /// Getting a token failed (bad secret, unreadable token file, identity endpoint down...).
    #[error("credential error: {0}")]
    Credential(String),

    /// A resource id or configuration value is malformed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

impl AzureError {
    /// The wait Azure asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AzureError::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            AzureError::Throttled { .. }
            | AzureError::Server { .. }
            | AzureError::Transport(_)
            | AzureError::Timeout { .. } => true,
            AzureError::OperationFailed { code, .. } => is_retryable_code(code),
            AzureError::Conflict { code, .. } => is_retryable_code(code),
            AzureError::Locked { .. }
            | AzureError::PreconditionFailed { .. }
            | AzureError::NotFound { .. }
            | AzureError::BadRequest { .. }
            | AzureError::Unauthorized { .. }
            | AzureError::UnexpectedStatus { .. }
            | AzureError::InvalidResponse(_)
            | AzureError::Credential(_)
            | AzureError::InvalidInput(_) => false,
        }
    }

    /// Whether the error will not go away by retrying soon: refused input (400), missing rights
    /// (401 from ARM with a token in hand, 403), a management lock (409 `ScopeLocked`), another
    /// 409 conflict, a missing resource (404), or input refused before any request. Such errors
    /// deserve a long backoff and a report, not a tight retry loop. False for 429, 5xx,
    /// transport errors, timeouts, failed long-running operations, credential errors (a token
    /// endpoint can come back) and 412 (re-read and retry at once).
    pub fn is_permanent(&self) -> bool {
        match self {
            AzureError::BadRequest { .. }
            | AzureError::Unauthorized { .. }
            | AzureError::Locked { .. }
            | AzureError::NotFound { .. }
            | AzureError::InvalidInput(_) => true,
            AzureError::Conflict { code, .. } => !is_retryable_code(code),
            AzureError::UnexpectedStatus { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            AzureError::Throttled { .. }
            | AzureError::PreconditionFailed { .. }
            | AzureError::Server { .. }
            | AzureError::OperationFailed { .. }
            | AzureError::Transport(_)
            | AzureError::Timeout { .. }
            | AzureError::InvalidResponse(_)
            | AzureError::Credential(_) => false,
        }
    }

    /// Whether a management lock refused the write (409 `ScopeLocked`).
    pub fn is_scope_locked(&self) -> bool {
        matches!(self, AzureError::Locked { .. })
    }

    /// Whether an `If-Match` precondition failed (412): re-read, re-plan, write again.
    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, AzureError::PreconditionFailed { .. })
    }

    /// A short, stable label for metrics and Events.
    pub fn category(&self) -> &'static str {
        match self {
            AzureError::Throttled { .. } => "throttled",
            AzureError::Conflict { .. } => "conflict",
            AzureError::Locked { .. } => "locked",
            AzureError::PreconditionFailed { .. } => "precondition_failed",
            AzureError::NotFound { .. } => "not_found",
            AzureError::BadRequest { .. } => "bad_request",
            AzureError::Unauthorized { .. } => "unauthorized",
            AzureError::Server { .. } => "server",
            AzureError::UnexpectedStatus { .. } => "unexpected_status",
            AzureError::OperationFailed { .. } => "operation_failed",
            AzureError::Transport(_) => "transport",
            AzureError::Timeout { .. } => "timeout",
            AzureError::InvalidResponse(_) => "invalid_response",
            AzureError::Credential(_) => "credential",
            AzureError::InvalidInput(_) => "invalid_input",
        }
    }

    /// The ARM error code, when Azure gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            AzureError::Throttled { code, .. }
            | AzureError::Conflict { code, .. }
            | AzureError::BadRequest { code, .. }
            | AzureError::Server { code, .. }
            | AzureError::UnexpectedStatus { code, .. }
            | AzureError::OperationFailed { code, .. } => Some(code),
            AzureError::Locked { .. } => Some(SCOPE_LOCKED),
            AzureError::PreconditionFailed { .. } => Some("PreconditionFailed"),
            _ => None,
        }
    }

    /// Classifies a failed HTTP response from ARM. `body` is the raw response body;
    /// `retry_after` the parsed `Retry-After` header, if any.
    pub fn from_http(
        status: u16,
        body: &[u8],
        header_code: Option<&str>,
        retry_after: Option<Duration>,
    ) -> Self {
        let parsed = ArmError::parse(body);
        let code = header_code
            .map(str::to_string)
            .or_else(|| parsed.as_ref().and_then(|e| e.code.clone()))
            .unwrap_or_else(|| default_code(status).to_string());
        let message = parsed
            .and_then(|e| e.message)
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect());
        match status {
            429 => AzureError::Throttled {
                retry_after: retry_after.unwrap_or(DEFAULT_THROTTLE_WAIT),
                code,
            },
            409 if is_retryable_code(&code) => AzureError::Throttled {
                retry_after: retry_after.unwrap_or(DEFAULT_THROTTLE_WAIT),
                code,
            },
            409 if code.eq_ignore_ascii_case(SCOPE_LOCKED) => AzureError::Locked {
                scope_message: message,
            },
            409 => AzureError::Conflict { code, message },
            412 => AzureError::PreconditionFailed {
                message: with_details(message, body),
            },
            404 => AzureError::NotFound {
                what: format!("{code}: {message}"),
            },
            400 => AzureError::BadRequest { code, message },
            401 | 403 => AzureError::Unauthorized {
                message: format!("{code}: {message}"),
            },
            408 | 500..=599 => AzureError::Server {
                status,
                code,
                message,
            },
            _ => AzureError::UnexpectedStatus {
                status,
                code,
                message,
            },
        }
    }
}

impl From<azure_core::Error> for AzureError {
    fn from(err: azure_core::Error) -> Self {
        use azure_core::error::ErrorKind;
        // Failures produced by our own transport policy carry everything (status, body, headers).
        if let Some(failure) = err.downcast_ref::<super::transport::HttpFailure>() {
            return failure.to_azure_error();
        }
        match err.kind() {
            ErrorKind::HttpResponse { status, error_code } => {
                let (code, message) = match err.as_http_error() {
                    Some(h) => (
                        h.error_code().map(str::to_string).or(error_code.clone()),
                        h.error_message().unwrap_or_default().to_string(),
                    ),
                    None => (error_code.clone(), err.to_string()),
                };
                let body = serde_json::json!({"error": {"code": code, "message": message}});
                AzureError::from_http(u16::from(*status), body.to_string().as_bytes(), None, None)
            }
            ErrorKind::Io => AzureError::Transport(error_chain(&err)),
            ErrorKind::DataConversion => AzureError::InvalidResponse(error_chain(&err)),
            ErrorKind::Credential => AzureError::Credential(error_chain(&err)),
            ErrorKind::MockFramework | ErrorKind::Other => {
                AzureError::InvalidResponse(error_chain(&err))
            }
        }
    }
}

/// The error text with its causes, so a credential failure says why.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `message` followed by the messages of `error.details` (a 412 says which etags differ there).
fn with_details(message: String, body: &[u8]) -> String {
    let details: Vec<String> = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/details")
                .and_then(|d| d.as_array())
                .cloned()
        })
        .unwrap_or_default()
        .iter()
        .filter_map(|d| {
            d.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .collect();
    if details.is_empty() {
        message
    } else {
        format!("{message} {}", details.join(" "))
    }
}

pub(crate) fn is_retryable_code(code: &str) -> bool {
    RETRYABLE_CODES.iter().any(|c| c.eq_ignore_ascii_case(code))
}

fn default_code(status: u16) -> &'static str {
    match status {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        429 => "TooManyRequests",
        500 => "InternalServerError",
        502 => "BadGateway",
        503 => "ServiceUnavailable",
        504 => "GatewayTimeout",
        _ => "Unknown",
    }
}

/// ARM's error body: `{"error": {"code": "...", "message": "..."}}` (some services put
/// `code`/`message` at the top level).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ArmError {
    #[serde(default, alias = "Code")]
    pub code: Option<String>,
    #[serde(default, alias = "Message")]
    pub message: Option<String>,
}

impl ArmError {
    pub fn parse(body: &[u8]) -> Option<ArmError> {
        #[derive(Deserialize)]
        struct Envelope {
            #[serde(default, alias = "Error")]
            error: Option<ArmError>,
            #[serde(default, alias = "Code")]
            code: Option<String>,
            #[serde(default, alias = "Message")]
            message: Option<String>,
        }
        let env: Envelope = serde_json::from_slice(body).ok()?;
        let nested = env.error.unwrap_or_default();
        let out = ArmError {
            code: nested.code.or(env.code),
            message: nested.message.or(env.message),
        };
        (out.code.is_some() || out.message.is_some()).then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arm_error_bodies() {
        let e = ArmError::parse(
            br#"{"error":{"code":"SecurityRuleInvalidPortRange","message":"bad port"}}"#,
        )
        .unwrap();
        assert_eq!(e.code.as_deref(), Some("SecurityRuleInvalidPortRange"));
        assert_eq!(e.message.as_deref(), Some("bad port"));
        let e = ArmError::parse(br#"{"code":"X","message":"y"}"#).unwrap();
        assert_eq!(e.code.as_deref(), Some("X"));
        assert!(ArmError::parse(b"not json").is_none());
        assert!(ArmError::parse(b"{}").is_none());
    }

    #[test]
    fn maps_statuses() {
        let body = br#"{"error":{"code":"RetryableErrorDueToAnotherOperation","message":"busy"}}"#;
        let e = AzureError::from_http(429, body, None, Some(Duration::from_secs(3)));
        assert_eq!(
            e,
            AzureError::Throttled {
                retry_after: Duration::from_secs(3),
                code: "RetryableErrorDueToAnotherOperation".into()
            }
        );
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(e.category(), "throttled");

        let e = AzureError::from_http(429, b"", None, None);
        assert_eq!(e.retry_after(), Some(DEFAULT_THROTTLE_WAIT));
        assert_eq!(e.code(), Some("TooManyRequests"));

        let e = AzureError::from_http(
            400,
            br#"{"error":{"code":"InvalidRule","message":"no"}}"#,
            None,
            None,
        );
        assert!(
            matches!(&e, AzureError::BadRequest { code, message } if code == "InvalidRule" && message == "no")
        );
        assert!(!e.is_retryable());

        let e = AzureError::from_http(
            409,
            br#"{"error":{"code":"AnotherOperationInProgress"}}"#,
            None,
            None,
        );
        assert!(matches!(e, AzureError::Throttled { .. }));
        let e = AzureError::from_http(
            409,
            br#"{"error":{"code":"SecurityRuleConflict"}}"#,
            None,
            None,
        );
        assert!(matches!(e, AzureError::Conflict { .. }));
        assert!(!e.is_retryable());

        assert!(matches!(
            AzureError::from_http(404, b"", None, None),
            AzureError::NotFound { .. }
        ));
        assert!(matches!(
            AzureError::from_http(401, b"", None, None),
            AzureError::Unauthorized { .. }
        ));
        assert!(matches!(
            AzureError::from_http(403, b"", None, None),
            AzureError::Unauthorized { .. }
        ));
        let e = AzureError::from_http(503, b"oops", Some("HdrCode"), None);
        assert!(
            matches!(&e, AzureError::Server { status: 503, code, message } if code == "HdrCode" && message == "oops")
        );
        assert!(e.is_retryable());
        assert!(matches!(
            AzureError::from_http(418, b"", None, None),
            AzureError::UnexpectedStatus { .. }
        ));
    }

    #[test]
    fn classifies_locks_preconditions_and_permanence() {
        let locked = AzureError::from_http(
            409,
            br#"{"error":{"code":"ScopeLocked","message":"The scope '/x' cannot perform delete operation because following scope(s) are locked: '/rg'. Please remove the lock and try again."}}"#,
            None,
            None,
        );
        assert!(locked.is_scope_locked(), "{locked:?}");
        assert!(locked.is_permanent() && !locked.is_retryable());
        assert_eq!(locked.category(), "locked");
        assert_eq!(locked.code(), Some("ScopeLocked"));
        assert!(
            locked
                .to_string()
                .contains("following scope(s) are locked: '/rg'")
        );

        let pre = AzureError::from_http(
            412,
            br#"{"error":{"code":"PreconditionFailed","message":"Precondition failed.","details":[{"code":"PreconditionFailedEtagMismatch","message":"Etag provided in if-match header W/"a" does not match etag W/"b"."}]}}"#,
            None,
            None,
        );
        assert!(pre.is_precondition_failed(), "{pre:?}");
        assert!(!pre.is_retryable() && !pre.is_permanent());
        assert_eq!(pre.category(), "precondition_failed");
        assert!(
            pre.to_string().contains("does not match etag W/\"b\""),
            "{pre}"
        );

        for (status, permanent) in [
            (400, true),
            (401, true),
            (403, true),
            (404, true),
            (418, true),
            (429, false),
            (500, false),
            (503, false),
        ] {
            let e = AzureError::from_http(status, b"", None, None);
            assert_eq!(e.is_permanent(), permanent, "{status}: {e:?}");
        }
        let busy = AzureError::from_http(
            409,
            br#"{"error":{"code":"AnotherOperationInProgress"}}"#,
            None,
            None,
        );
        assert!(!busy.is_permanent());
        let conflict = AzureError::from_http(
            409,
            br#"{"error":{"code":"SecurityRuleConflict"}}"#,
            None,
            None,
        );
        assert!(conflict.is_permanent() && !conflict.is_scope_locked());
        assert!(!AzureError::Transport("reset".into()).is_permanent());
        assert!(
            !AzureError::Timeout {
                what: "x".into(),
                after: Duration::from_secs(1)
            }
            .is_permanent()
        );
    }

    #[test]
    fn maps_azure_core_errors() {
        use azure_core::error::{Error, ErrorKind};
        let e: AzureError = Error::message(ErrorKind::Io, "connection reset").into();
        assert_eq!(e.category(), "transport");
        let e: AzureError = Error::message(ErrorKind::Credential, "bad secret").into();
        assert_eq!(e.category(), "credential");
        let e: AzureError = Error::from(ErrorKind::HttpResponse {
            status: azure_core::StatusCode::TooManyRequests,
            error_code: Some("SubscriptionRequestsThrottled".into()),
        })
        .into();
        assert!(
            matches!(e, AzureError::Throttled { ref code, .. } if code == "SubscriptionRequestsThrottled")
        );
    }
}
