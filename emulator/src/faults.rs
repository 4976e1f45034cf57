//! Injected faults for ARM calls: latency, 500/503 errors, dropped connections, forced 429s.

use serde::{Deserialize, Serialize};

/// Faults set with `POST /_emulator/faults` (all fields optional in JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Added latency for every ARM call, in milliseconds.
    pub latency_ms: u64,
    /// Share (0..1) of ARM calls answered with `error_status`.
    pub error_rate: f64,
    /// The next N ARM calls are answered with `error_status`.
    pub error_count: u32,
    /// 500 (InternalServerError) or 503 (ServiceUnavailable); default 500.
    pub error_status: u16,
    /// The next N ARM calls get their connection closed without a response.
    pub drop_count: u32,
    /// Share (0..1) of ARM calls whose connection is closed without a response.
    pub drop_rate: f64,
    /// The next N ARM calls are answered 429 with `Retry-After: throttle_retry_after_secs`.
    pub throttle_count: u32,
    pub throttle_retry_after_secs: u64,
    /// The 429's error code; default `SubscriptionRequestsThrottled`.
    pub throttle_code: String,
    /// When true, faults only hit writes (PUT/DELETE/PATCH), not reads or polls.
    pub writes_only: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            error_rate: 0.0,
            error_count: 0,
            error_status: 500,
            drop_count: 0,
            drop_rate: 0.0,
            throttle_count: 0,
            throttle_retry_after_secs: 1,
            throttle_code: "SubscriptionRequestsThrottled".to_string(),
            writes_only: false,
        }
    }
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultAction {
    None,
    Drop,
    Error(u16),
    Throttle { retry_after_secs: u64, code: String },
}

impl Faults {
    /// Decides the fault for one ARM request, consuming counts. `roll` returns a number in [0, 1).
    pub fn decide(&mut self, is_write: bool, mut roll: impl FnMut() -> f64) -> FaultAction {
        if self.writes_only && !is_write {
            return FaultAction::None;
        }
        if self.drop_count > 0 {
            self.drop_count -= 1;
            return FaultAction::Drop;
        }
        if self.throttle_count > 0 {
            self.throttle_count -= 1;
            return FaultAction::Throttle {
                retry_after_secs: self.throttle_retry_after_secs,
                code: self.throttle_code.clone(),
            };
        }
        if self.error_count > 0 {
            self.error_count -= 1;
            return FaultAction::Error(self.error_status);
        }
        if self.drop_rate > 0.0 && roll() < self.drop_rate {
            return FaultAction::Drop;
        }
        if self.error_rate > 0.0 && roll() < self.error_rate {
            return FaultAction::Error(self.error_status);
        }
        FaultAction::None
    }
}

/// A persistent fault on one NSG (`POST /_emulator/nsg-faults`): every ARM request on the NSG
/// or its security rules is answered `status` with an ARM error body until cleared, while
/// every other NSG keeps working (a role assignment removed on one NSG, a broken NSG, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NsgFault {
    /// The NSG id (`/subscriptions/…/networkSecurityGroups/{name}`), matched case-insensitively.
    pub nsg: String,
    /// HTTP status, 400..=599 (default 403).
    #[serde(default = "default_nsg_fault_status")]
    pub status: u16,
    /// ARM error code; default by status (403 `AuthorizationFailed`, 500 `InternalServerError`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// ARM error message; default Azure-like text for the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When true only writes (PUT/DELETE/PATCH) fail; reads work.
    #[serde(default)]
    pub writes_only: bool,
}

fn default_nsg_fault_status() -> u16 {
    403
}

impl NsgFault {
    /// The NSG id in the form used to match requests.
    pub fn key(&self) -> String {
        self.nsg.trim().trim_end_matches('/').to_ascii_lowercase()
    }

    /// Whether this fault answers a request with `is_write`.
    pub fn applies(&self, is_write: bool) -> bool {
        is_write || !self.writes_only
    }

    /// The error code and message for a request on `resource_id` doing `action`
    /// (`read`, `write` or `delete`), as ARM words them.
    pub fn code_and_message(&self, resource_id: &str, action: &str) -> (String, String) {
        let kind = if resource_id.to_ascii_lowercase().contains("/securityrules/") {
            "networkSecurityGroups/securityRules"
        } else {
            "networkSecurityGroups"
        };
        let (code, message) = match self.status {
            400 => (
                "BadRequest",
                format!("The request on {resource_id} is invalid (injected fault)."),
            ),
            401 => (
                "InvalidAuthenticationToken",
                "The access token is invalid (injected fault).".to_string(),
            ),
            403 => (
                "AuthorizationFailed",
                format!(
                    "The client 'portcullis' with object id '00000000-0000-0000-0000-000000000000' does not have authorization to perform action 'Microsoft.Network/{kind}/{action}' over scope '{resource_id}' or the scope is invalid. If access was recently granted, please refresh your credentials."
                ),
            ),
            404 => (
                "ResourceNotFound",
                format!("The Resource {resource_id} was not found (injected fault)."),
            ),
            409 => (
                "Conflict",
                format!("The request on {resource_id} conflicts (injected fault)."),
            ),
            429 => (
                "TooManyRequests",
                "The request was throttled (injected fault). Please retry later.".to_string(),
            ),
            503 => (
                "ServiceUnavailable",
                "The service is temporarily unavailable. Please retry later.".to_string(),
            ),
            _ => (
                "InternalServerError",
                "An error occurred while processing the request (injected fault).".to_string(),
            ),
        };
        (
            self.code.clone().unwrap_or_else(|| code.to_string()),
            self.message.clone().unwrap_or(message),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_consumed_in_order() {
        let mut f = Faults {
            drop_count: 1,
            throttle_count: 1,
            error_count: 1,
            error_status: 503,
            ..Faults::default()
        };
        assert_eq!(f.decide(true, || 0.5), FaultAction::Drop);
        assert!(matches!(
            f.decide(true, || 0.5),
            FaultAction::Throttle { .. }
        ));
        assert_eq!(f.decide(true, || 0.5), FaultAction::Error(503));
        assert_eq!(f.decide(true, || 0.5), FaultAction::None);
    }

    #[test]
    fn rates_and_writes_only() {
        let mut f = Faults {
            error_rate: 0.5,
            writes_only: true,
            ..Faults::default()
        };
        assert_eq!(f.decide(false, || 0.0), FaultAction::None);
        assert_eq!(f.decide(true, || 0.1), FaultAction::Error(500));
        assert_eq!(f.decide(true, || 0.9), FaultAction::None);
    }

    #[test]
    fn nsg_fault_defaults_and_messages() {
        let f: NsgFault = serde_json::from_str(r#"{"nsg": "/subscriptions/S/resourceGroups/RG/providers/Microsoft.Network/networkSecurityGroups/N/"}"#).unwrap();
        assert_eq!(f.status, 403);
        assert!(!f.writes_only && f.applies(false));
        assert!(f.key().ends_with("networksecuritygroups/n"));
        let (code, msg) = f.code_and_message("/x/securityRules/r", "delete");
        assert_eq!(code, "AuthorizationFailed");
        assert!(
            msg.contains("networkSecurityGroups/securityRules/delete"),
            "{msg}"
        );
        let w = NsgFault {
            writes_only: true,
            status: 500,
            code: Some("X".into()),
            ..f
        };
        assert!(!w.applies(false) && w.applies(true));
        assert_eq!(w.code_and_message("/x", "write").0, "X");
    }

    #[test]
    fn partial_json_uses_defaults() {
        let f: Faults = serde_json::from_str(r#"{"error_count": 2}"#).unwrap();
        assert_eq!(f.error_status, 500);
        assert_eq!(f.error_count, 2);
    }
}
