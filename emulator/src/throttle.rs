//! Subscription throttling: token buckets per subscription and operation type, as ARM's
//! current limits (learn.microsoft.com, "request-limits-and-throttling"): reads 250 burst / 25
//! per s, writes 200 / 10 per s, deletes 200 / 10 per s, each bucket on its own.

use std::time::{Duration, Instant};

/// The operation type a request is charged to, as ARM counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketKind {
    /// GET, including polls of async-operation URLs: ARM answers those with
    /// `x-ms-ratelimit-remaining-subscription-reads` too (Azure/autorest.powershell#608).
    Read,
    /// PUT and PATCH.
    Write,
    /// DELETE.
    Delete,
}

impl BucketKind {
    /// The response header ARM sends the bucket's remaining tokens in.
    pub fn header(self) -> &'static str {
        match self {
            BucketKind::Read => "x-ms-ratelimit-remaining-subscription-reads",
            BucketKind::Write => "x-ms-ratelimit-remaining-subscription-writes",
            BucketKind::Delete => "x-ms-ratelimit-remaining-subscription-deletes",
        }
    }

    /// The word ARM's throttling message uses ("Number of 'read' requests ...").
    pub fn word(self) -> &'static str {
        match self {
            BucketKind::Read => "read",
            BucketKind::Write => "write",
            BucketKind::Delete => "delete",
        }
    }
}

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
