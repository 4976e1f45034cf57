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
    fn partial_json_uses_defaults() {
        let f: Faults = serde_json::from_str(r#"{"error_count": 2}"#).unwrap();
        assert_eq!(f.error_status, 500);
        assert_eq!(f.error_count, 2);
    }
}
