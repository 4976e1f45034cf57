//! Subscription write throttling: a token bucket per subscription, as ARM's
//! "roughly 10 writes/s, bursts of 200" limit.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    refill_per_sec: f64,
    tokens: f64,
    last: Instant,
}

/// The outcome of taking a token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Take {
    /// Allowed; whole tokens left afterwards.
    Allowed { remaining: u64 },
    /// Refused; retry after this many whole seconds.
    Throttled { retry_after_secs: u64 },
}

impl TokenBucket {
    pub fn new(capacity: u32, refill_per_sec: f64, now: Instant) -> Self {
        Self {
            capacity: f64::from(capacity),
            refill_per_sec: refill_per_sec.max(0.0),
            tokens: f64::from(capacity),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.refill_per_sec).min(self.capacity);
        self.last = now;
    }

    /// Whole tokens available now (without taking one).
    #[cfg(test)]
    pub fn remaining(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens.floor().max(0.0) as u64
    }

    pub fn take(&mut self, now: Instant) -> Take {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Take::Allowed {
                remaining: self.tokens.floor().max(0.0) as u64,
            }
        } else {
            let missing = 1.0 - self.tokens;
            let secs = if self.refill_per_sec > 0.0 {
                Duration::from_secs_f64(missing / self.refill_per_sec)
                    .as_secs_f64()
                    .ceil()
                    .max(1.0) as u64
            } else {
                60
            };
            Take::Throttled {
                retry_after_secs: secs,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_throttle_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, 2.0, t0);
        assert_eq!(b.take(t0), Take::Allowed { remaining: 2 });
        assert_eq!(b.take(t0), Take::Allowed { remaining: 1 });
        assert_eq!(b.take(t0), Take::Allowed { remaining: 0 });
        assert_eq!(
            b.take(t0),
            Take::Throttled {
                retry_after_secs: 1
            }
        );
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(t1), Take::Allowed { remaining: 0 });
        let t2 = t1 + Duration::from_secs(100);
        assert_eq!(b.remaining(t2), 3, "capped at capacity");
    }

    #[test]
    fn slow_refill_gives_longer_retry_after() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, 0.1, t0);
        assert!(matches!(b.take(t0), Take::Allowed { .. }));
        assert_eq!(
            b.take(t0),
            Take::Throttled {
                retry_after_secs: 10
            }
        );
    }
}
