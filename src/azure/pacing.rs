//! Pacing against ARM's subscription budget. ARM limits each principal per subscription and
//! region with token buckets, one per operation type (reads 250 burst / 25 per s, writes and
//! deletes 200 / 10 per s), and reports what is left in `x-ms-ratelimit-remaining-*` response
//! headers. [`Pacer`] keeps an estimate of each bucket from those headers and the refill rate,
//! and holds a request back until the estimate says a token will be there for it (keeping a
//! small reserve), so a burst is spread out by us rather than refused by Azure with 429s.
//!
//! The accounting is conservative: a request counts against its bucket from the moment it is
//! admitted until its response (whose header then replaces the estimate), so concurrent callers
//! queue behind each other instead of all seeing the same last header. They queue in the order
//! they were admitted, except that an urgent place (a write that closes) goes before every
//! waiting place that is not: a close never waits behind a burst of opens. The lock guards only
//! the arithmetic; waits happen outside it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::locks::lock;
use azure_core::Method;
use azure_core::headers::{HeaderName, Headers};

/// The operation type ARM charges a request to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetKind {
    /// GET (and HEAD), polls of long-running operations included: ARM counts them as reads.
    Read,
    /// PUT, PATCH, POST.
    Write,
    /// DELETE: its own bucket in ARM.
    Delete,
}

impl BudgetKind {
    pub const ALL: [BudgetKind; 3] = [BudgetKind::Read, BudgetKind::Write, BudgetKind::Delete];

    pub fn of(method: &Method) -> BudgetKind {
        match method {
            Method::Get | Method::Head => BudgetKind::Read,
            Method::Delete => BudgetKind::Delete,
            _ => BudgetKind::Write,
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetKind::Read => "read",
            BudgetKind::Write => "write",
            BudgetKind::Delete => "delete",
        }
    }

    /// The headers that report this bucket: the subscription's and the tenant's (both limit the
    /// principal, with the same sizes; the smaller wins).
    fn headers(self) -> [&'static str; 2] {
        match self {
            BudgetKind::Read => [
                "x-ms-ratelimit-remaining-subscription-reads",
                "x-ms-ratelimit-remaining-tenant-reads",
            ],
            BudgetKind::Write => [
                "x-ms-ratelimit-remaining-subscription-writes",
                "x-ms-ratelimit-remaining-tenant-writes",
            ],
            BudgetKind::Delete => [
                "x-ms-ratelimit-remaining-subscription-deletes",
                "x-ms-ratelimit-remaining-tenant-deletes",
            ],
        }
    }
}

/// One bucket's size and refill rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketSpec {
    pub burst: u32,
    pub refill_per_sec: f64,
}

/// How the client paces itself against ARM's budget.
#[derive(Clone, Debug, PartialEq)]
pub struct PacingOptions {
    /// Off: requests go out at once (the budget is still tracked; 429s are still honoured).
    pub enabled: bool,
    /// ARM's read bucket (default 250 burst / 25 per s).
    pub read: BucketSpec,
    /// ARM's write bucket (default 200 burst / 10 per s).
    pub write: BucketSpec,
    /// ARM's delete bucket (default 200 burst / 10 per s).
    pub delete: BucketSpec,
    /// The share of each bucket kept in reserve (the low-water mark): a request that would
    /// leave fewer tokens than `burst * reserve` waits for the refill. Leaves room for other
    /// clients of the same principal and for estimates that run ahead of Azure's.
    pub reserve: f64,
    /// The longest one request waits for its bucket; after that it goes anyway (a 429, if any,
    /// is then honoured as usual).
    pub max_wait: Duration,
}

impl Default for PacingOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            read: BucketSpec {
                burst: 250,
                refill_per_sec: 25.0,
            },
            write: BucketSpec {
                burst: 200,
                refill_per_sec: 10.0,
            },
            delete: BucketSpec {
                burst: 200,
                refill_per_sec: 10.0,
            },
            reserve: 0.05,
            max_wait: Duration::from_secs(10),
        }
    }
}

impl PacingOptions {
    /// The whole tokens of a bucket kept in reserve.
    fn reserve_of(&self, spec: BucketSpec) -> f64 {
        (f64::from(spec.burst) * self.reserve.clamp(0.0, 1.0)).floor()
    }

    fn spec(&self, kind: BudgetKind) -> BucketSpec {
        match kind {
            BudgetKind::Read => self.read,
            BudgetKind::Write => self.write,
            BudgetKind::Delete => self.delete,
        }
    }
}

/// The remaining budget ARM reports for `kind` in `headers`: the smallest of the subscription's
/// and the tenant's headers that parse as a whole number. `None` when neither is present or
/// parses (a garbage value is ignored, not taken for zero).
pub fn remaining_budget(headers: &Headers, kind: BudgetKind) -> Option<u64> {
    kind.headers()
        .iter()
        .filter_map(|name| {
            let raw = headers.get_optional_str(&HeaderName::from_static(name))?;
            match raw.trim().parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    tracing::debug!(
                        header = name,
                        value = raw,
                        "ignoring unparsable rate-limit header"
                    );
                    None
                }
            }
        })
        .min()
}

/// The subscription a request URL is under (lowercased; empty when there is none).
fn subscription_of(path: &str) -> String {
    let mut segs = path.split('/').filter(|s| !s.is_empty());
    while let Some(seg) = segs.next() {
        if seg.eq_ignore_ascii_case("subscriptions") {
            return segs.next().unwrap_or_default().to_ascii_lowercase();
        }
    }
    String::new()
}

#[derive(Debug)]
struct Estimate {
    /// Tokens left as of `at`, before counting the requests in flight.
    tokens: f64,
    at: Instant,
    /// Requests admitted and not yet answered (waiting ones included), by admission number.
    pending: BTreeMap<u64, Place>,
    /// Admissions are numbered in order; the header of an answer older than the last one
    /// applied is stale (answers can overtake each other) and is not taken.
    next_seq: u64,
    applied_seq: u64,
}

impl Estimate {
    fn refill(&mut self, spec: BucketSpec, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * spec.refill_per_sec).min(f64::from(spec.burst));
        self.at = now;
    }

    /// How long the request admitted as `seq` should still wait: until the refill covers it and
    /// every request ahead of it, above the reserve.
    fn wait_for(&self, seq: u64, spec: BucketSpec, options: &PacingOptions) -> Duration {
        let Some(me) = self.pending.get(&seq) else {
            return Duration::ZERO;
        };
        let ahead = self
            .pending
            .iter()
            .filter(|&(&other, place)| other == seq || place.goes_before(other, me, seq))
            .count();
        self.wait_behind(ahead, spec, options)
    }

    fn grant(&mut self, seq: u64) {
        if let Some(place) = self.pending.get_mut(&seq) {
            place.granted = true;
        }
    }

    /// How long a request with `ahead` requests before it (itself included) should wait.
    fn wait_behind(&self, ahead: usize, spec: BucketSpec, options: &PacingOptions) -> Duration {
        let left = self.tokens - ahead as f64;
        let reserve = options.reserve_of(spec);
        if options.enabled && left < reserve && spec.refill_per_sec > 0.0 {
            Duration::from_secs_f64((reserve - left) / spec.refill_per_sec).min(options.max_wait)
        } else {
            Duration::ZERO
        }
    }
}

/// A request's place in its bucket's queue.
#[derive(Clone, Copy, Debug)]
struct Place {
    /// Goes before every waiting request that is not urgent: a write that closes.
    urgent: bool,
    /// Its turn has come: it is being sent, or awaits its answer, and spends a token.
    granted: bool,
}

impl Place {
    /// Whether this place (admitted as `seq`) is served before `other` (admitted as `other_seq`):
    /// a place whose turn came is; an urgent one is before any waiting one that is not; else
    /// the first admitted is.
    fn goes_before(&self, seq: u64, other: &Place, other_seq: u64) -> bool {
        self.granted
            || (self.urgent && !other.urgent)
            || (self.urgent == other.urgent && seq < other_seq)
    }
}

type Key = (String, BudgetKind);

/// What is left of a bucket by the estimate (see [`Pacer::left_for`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetLeft {
    /// Whole tokens that could be spent now without waiting (negative: requests queue).
    pub usable: i64,
    /// `usable` when the bucket is full: its burst less the reserve.
    pub full: i64,
    pub spec: BucketSpec,
}

/// The budget estimates of one client. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Pacer {
    options: PacingOptions,
    estimates: Mutex<HashMap<Key, Estimate>>,
}

/// A request admitted against its bucket. Call [`Admission::answered`] with the response
/// headers; dropped without that (a transport error, a cancelled call), the request is
/// counted as having spent a token.
#[derive(Debug)]
pub struct Admission {
    pacer: Arc<Pacer>,
    key: Option<Key>,
    seq: u64,
    /// How long the request should wait before it is sent.
    pub wait: Duration,
    pub kind: BudgetKind,
}

impl Pacer {
    pub fn new(options: PacingOptions) -> Arc<Self> {
        Arc::new(Self {
            options,
            estimates: Mutex::new(HashMap::new()),
        })
    }

    pub fn options(&self) -> &PacingOptions {
        &self.options
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Estimate>> {
        lock(&self.estimates)
    }

    /// Counts a request to `path` with `method` against its bucket and says how long it should
    /// wait first (zero when pacing is off or the bucket has room).
    pub fn admit(self: &Arc<Self>, method: &Method, path: &str, now: Instant) -> Admission {
        self.admit_kind(BudgetKind::of(method), path, now)
    }

    /// [`Pacer::admit`] by the bucket's kind: a place in its queue taken before the request
    /// is made up (see [`with_reserved`]).
    pub fn admit_kind(self: &Arc<Self>, kind: BudgetKind, path: &str, now: Instant) -> Admission {
        self.admit_place(kind, path, false, now)
    }

    /// [`Pacer::admit_kind`], `urgent`: served before every waiting request that is not (a
    /// write that closes does not queue behind a burst of opens), never before one whose turn
    /// has come.
    pub fn admit_place(
        self: &Arc<Self>,
        kind: BudgetKind,
        path: &str,
        urgent: bool,
        now: Instant,
    ) -> Admission {
        let key = (subscription_of(path), kind);
        let spec = self.options.spec(kind);
        let mut map = self.lock();
        let est = map.entry(key.clone()).or_insert_with(|| Estimate {
            tokens: f64::from(spec.burst),
            at: now,
            pending: BTreeMap::new(),
            next_seq: 0,
            applied_seq: 0,
        });
        est.refill(spec, now);
        est.next_seq += 1;
        let seq = est.next_seq;
        let granted = false;
        est.pending.insert(seq, Place { urgent, granted });
        let wait = est.wait_for(seq, spec, &self.options);
        if wait.is_zero() {
            est.grant(seq);
        }
        Admission {
            pacer: Arc::clone(self),
            key: Some(key),
            seq,
            wait,
            kind,
        }
    }

    /// Waits until `admission`'s turn, at most `bound`; returns how long it waited.
    pub async fn wait_turn(&self, admission: &Admission, bound: Duration) -> Duration {
        let mut wait = admission.wait.min(bound);
        let mut waited = Duration::ZERO;
        while !wait.is_zero() {
            tracing::debug!(
                kind = admission.kind.as_str(),
                wait_ms = wait.as_millis() as u64,
                "pacing: ARM budget low, waiting for the refill"
            );
            tokio::time::sleep(wait).await;
            waited += wait;
            // Answers that came in meanwhile may have moved the estimate: look again, within
            // the bound.
            wait = self
                .recheck(admission, Instant::now())
                .min(bound.saturating_sub(waited));
        }
        // Its turn (or the bound) has come: from now on it spends a token, and no urgent
        // place admitted later goes before it.
        if let Some(key) = admission.key.as_ref()
            && let Some(est) = self.lock().get_mut(key)
        {
            est.grant(admission.seq);
        }
        waited
    }

    /// After a wait: how much longer `admission` should wait, by the estimate as it stands now
    /// (answers that came in meanwhile may have corrected it either way).
    pub fn recheck(&self, admission: &Admission, now: Instant) -> Duration {
        let Some(key) = admission.key.as_ref() else {
            return Duration::ZERO;
        };
        let spec = self.options.spec(key.1);
        let mut map = self.lock();
        match map.get_mut(key) {
            Some(est) => {
                est.refill(spec, now);
                est.wait_for(admission.seq, spec, &self.options)
            }
            None => Duration::ZERO,
        }
    }

    /// The estimated whole tokens left in a bucket now, requests in flight counted; `None`
    /// before any request of that kind to that subscription.
    pub fn estimate(&self, subscription: &str, kind: BudgetKind, now: Instant) -> Option<i64> {
        let spec = self.options.spec(kind);
        let mut map = self.lock();
        let est = map.get_mut(&(subscription.to_ascii_lowercase(), kind))?;
        est.refill(spec, now);
        Some((est.tokens - est.pending.len() as f64).floor() as i64)
    }

    /// What a request of `kind` to `path` could spend now without waiting: the estimate above
    /// the reserve, requests in flight counted. `None` when pacing is off, or before any request
    /// of that kind to that subscription (the bucket is then taken to be full).
    pub fn left_for(&self, path: &str, kind: BudgetKind, now: Instant) -> Option<BudgetLeft> {
        if !self.options.enabled {
            return None;
        }
        let spec = self.options.spec(kind);
        let tokens = self.estimate(&subscription_of(path), kind, now)?;
        let reserve = self.options.reserve_of(spec) as i64;
        Some(BudgetLeft {
            usable: tokens - reserve,
            full: i64::from(spec.burst) - reserve,
            spec,
        })
    }

    fn settle(&self, key: &Key, seq: u64, reported: Option<u64>, now: Instant) {
        let spec = self.options.spec(key.1);
        let mut map = self.lock();
        let Some(est) = map.get_mut(key) else {
            return;
        };
        est.refill(spec, now);
        est.pending.remove(&seq);
        match reported {
            // Azure's count replaces ours: it includes other clients of the principal.
            Some(n) if seq > est.applied_seq => {
                est.tokens = (n as f64).min(f64::from(spec.burst));
                est.applied_seq = seq;
            }
            // No (fresh) word from Azure: assume the request spent a token (bounded, so a long
            // run of headerless answers cannot stall us for more than one bucket's refill).
            _ => est.tokens = (est.tokens - 1.0).max(-f64::from(spec.burst)),
        }
    }
}

impl Admission {
    /// Never sent: it gives its place back without spending a token.
    pub fn cancel(mut self) {
        if let Some(key) = self.key.take() {
            let mut map = self.pacer.lock();
            if let Some(est) = map.get_mut(&key) {
                est.pending.remove(&self.seq);
            }
        }
    }

    /// The response arrived: take ARM's remaining count for this bucket, if it sent one.
    pub fn answered(mut self, headers: &Headers, now: Instant) {
        if let Some(key) = self.key.take() {
            let reported = remaining_budget(headers, key.1);
            self.pacer.settle(&key, self.seq, reported, now);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.pacer.settle(&key, self.seq, None, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(burst: u32, rate: f64, reserve: f64) -> PacingOptions {
        let spec = BucketSpec {
            burst,
            refill_per_sec: rate,
        };
        PacingOptions {
            enabled: true,
            read: spec,
            write: spec,
            delete: spec,
            reserve,
            max_wait: Duration::from_secs(10),
        }
    }

    const NSG: &str = "/subscriptions/SUB-1/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/n";

    #[test]
    fn remaining_budget_parses_and_ignores_garbage() {
        let mut h = Headers::new();
        assert_eq!(remaining_budget(&h, BudgetKind::Read), None, "missing");
        h.insert("x-ms-ratelimit-remaining-subscription-reads", "garbage");
        assert_eq!(remaining_budget(&h, BudgetKind::Read), None, "garbage");
        h.insert("x-ms-ratelimit-remaining-subscription-reads", "-3");
        assert_eq!(remaining_budget(&h, BudgetKind::Read), None, "negative");
        h.insert("x-ms-ratelimit-remaining-subscription-reads", " 249 ");
        assert_eq!(remaining_budget(&h, BudgetKind::Read), Some(249));
        assert_eq!(remaining_budget(&h, BudgetKind::Write), None, "other kind");
        h.insert("x-ms-ratelimit-remaining-tenant-reads", "12");
        assert_eq!(
            remaining_budget(&h, BudgetKind::Read),
            Some(12),
            "smaller wins"
        );
        h.insert("x-ms-ratelimit-remaining-subscription-deletes", "7");
        assert_eq!(remaining_budget(&h, BudgetKind::Delete), Some(7));
        h.insert("x-ms-ratelimit-remaining-subscription-writes", "1199");
        assert_eq!(remaining_budget(&h, BudgetKind::Write), Some(1199));
    }

    #[test]
    fn kinds_and_subscriptions() {
        assert_eq!(BudgetKind::of(&Method::Get), BudgetKind::Read);
        assert_eq!(BudgetKind::of(&Method::Put), BudgetKind::Write);
        assert_eq!(BudgetKind::of(&Method::Patch), BudgetKind::Write);
        assert_eq!(BudgetKind::of(&Method::Delete), BudgetKind::Delete);
        assert_eq!(subscription_of(NSG), "sub-1");
        assert_eq!(subscription_of("/SUBSCRIPTIONS/x/providers"), "x");
        assert_eq!(subscription_of("/oauth2/token"), "");
    }

    #[test]
    fn a_burst_beyond_the_bucket_is_spread_at_the_refill_rate() {
        let pacer = Pacer::new(opts(5, 2.0, 0.0));
        let t0 = Instant::now();
        let waits: Vec<Duration> = (0..8)
            .map(|_| {
                let a = pacer.admit(&Method::Put, NSG, t0);
                let w = a.wait;
                std::mem::forget(a); // still in flight
                w
            })
            .collect();
        assert_eq!(&waits[..5], &[Duration::ZERO; 5], "the burst goes at once");
        assert_eq!(waits[5], Duration::from_millis(500));
        assert_eq!(waits[6], Duration::from_millis(1000));
        assert_eq!(waits[7], Duration::from_millis(1500));
        // Reads have their own bucket.
        assert_eq!(pacer.admit(&Method::Get, NSG, t0).wait, Duration::ZERO);
    }

    #[test]
    fn a_place_taken_by_kind_queues_like_a_request_and_a_cancelled_one_spends_nothing() {
        let pacer = Pacer::new(opts(2, 2.0, 0.0));
        let t0 = Instant::now();
        let first = pacer.admit_kind(BudgetKind::Write, NSG, t0);
        let second = pacer.admit_kind(BudgetKind::Write, NSG, t0);
        assert_eq!((first.wait, second.wait), (Duration::ZERO, Duration::ZERO));
        let third = pacer.admit_kind(BudgetKind::Write, NSG, t0);
        assert_eq!(
            third.wait,
            Duration::from_millis(500),
            "behind the two places taken"
        );
        assert_eq!(
            pacer.admit_kind(BudgetKind::Delete, NSG, t0).wait,
            Duration::ZERO,
            "deletes have their own bucket"
        );
        third.cancel();
        second.cancel();
        assert_eq!(
            pacer.estimate("sub-1", BudgetKind::Write, t0),
            Some(1),
            "cancelled places spend no token; the first is still in flight"
        );
        drop(first);
        assert_eq!(
            pacer.estimate("sub-1", BudgetKind::Write, t0),
            Some(1),
            "dropped unanswered, a request counts as spent"
        );
    }

    #[test]
    fn an_urgent_place_goes_before_waiting_ones_but_not_before_those_whose_turn_came() {
        let pacer = Pacer::new(opts(2, 2.0, 0.0));
        let t0 = Instant::now();
        let first = pacer.admit_kind(BudgetKind::Write, NSG, t0);
        let second = pacer.admit_kind(BudgetKind::Write, NSG, t0);
        let third = pacer.admit_kind(BudgetKind::Write, NSG, t0);
        let fourth = pacer.admit_kind(BudgetKind::Write, NSG, t0);
        assert_eq!(
            [first.wait, second.wait, third.wait, fourth.wait],
            [
                Duration::ZERO,
                Duration::ZERO,
                Duration::from_millis(500),
                Duration::from_secs(1)
            ]
        );
        let close = pacer.admit_place(BudgetKind::Write, NSG, true, t0);
        assert_eq!(
            close.wait,
            Duration::from_millis(500),
            "behind the two in flight only"
        );
        assert_eq!(
            (pacer.recheck(&third, t0), pacer.recheck(&fourth, t0)),
            (Duration::from_secs(1), Duration::from_millis(1500)),
            "the waiting ones are one place further back"
        );
        let later_close = pacer.admit_place(BudgetKind::Write, NSG, true, t0);
        assert_eq!(
            later_close.wait,
            Duration::from_secs(1),
            "urgent places keep their order"
        );
    }

    #[test]
    fn what_is_left_counts_places_taken_and_keeps_the_reserve_out() {
        // 10 tokens, a reserve of 2.
        let pacer = Pacer::new(opts(10, 1.0, 0.2));
        let t0 = Instant::now();
        assert_eq!(
            pacer.left_for(NSG, BudgetKind::Write, t0),
            None,
            "nothing known before the first request: a full bucket"
        );
        let a = pacer.admit_kind(BudgetKind::Write, NSG, t0);
        let b = pacer.admit_kind(BudgetKind::Write, NSG, t0);
        let left = pacer.left_for(NSG, BudgetKind::Write, t0);
        assert_eq!(
            left.map(|l| (l.usable, l.full)),
            Some((10 - 2 - 2, 10 - 2)),
            "two in flight, two kept in reserve"
        );
        b.cancel();
        drop(a);
        let left = pacer.left_for(NSG, BudgetKind::Write, t0).map(|l| l.usable);
        assert_eq!(
            left,
            Some(9 - 2),
            "the cancelled place spent nothing, the other one"
        );
        let off = Pacer::new(PacingOptions {
            enabled: false,
            ..opts(10, 1.0, 0.2)
        });
        drop(off.admit_kind(BudgetKind::Write, NSG, t0));
        assert_eq!(
            off.left_for(NSG, BudgetKind::Write, t0),
            None,
            "pacing off: nothing is held back for the budget"
        );
    }

    #[test]
    fn the_reported_remaining_replaces_the_estimate() {
        let pacer = Pacer::new(opts(10, 1.0, 0.0));
        let t0 = Instant::now();
        let a = pacer.admit(&Method::Get, NSG, t0);
        assert_eq!(a.wait, Duration::ZERO);
        // Someone else spent the bucket: Azure says 0 left.
        let mut h = Headers::new();
        h.insert("x-ms-ratelimit-remaining-subscription-reads", "0");
        a.answered(&h, t0);
        assert_eq!(pacer.estimate("sub-1", BudgetKind::Read, t0), Some(0));
        let next = pacer.admit(&Method::Get, NSG, t0);
        assert_eq!(next.wait, Duration::from_secs(1));
        // A response without the header counts the request as spent.
        next.answered(&Headers::new(), t0 + Duration::from_secs(1));
        assert_eq!(
            pacer.estimate("sub-1", BudgetKind::Read, t0 + Duration::from_secs(1)),
            Some(0)
        );
        // A garbage header is no news either; the refill goes on.
        let a = pacer.admit(&Method::Get, NSG, t0 + Duration::from_secs(3));
        let mut h = Headers::new();
        h.insert("x-ms-ratelimit-remaining-subscription-reads", "lots");
        a.answered(&h, t0 + Duration::from_secs(3));
        assert_eq!(
            pacer.estimate("sub-1", BudgetKind::Read, t0 + Duration::from_secs(3)),
            Some(1)
        );
    }

    #[test]
    fn a_waiting_request_rechecks_against_fresh_answers() {
        let pacer = Pacer::new(opts(2, 1.0, 0.0));
        let t0 = Instant::now();
        let first = pacer.admit(&Method::Get, NSG, t0);
        let second = pacer.admit(&Method::Get, NSG, t0);
        let third = pacer.admit(&Method::Get, NSG, t0);
        assert_eq!(third.wait, Duration::from_secs(1));
        // Azure's bucket started later than our estimate's: after the first two it says 0 left.
        let mut h = Headers::new();
        h.insert("x-ms-ratelimit-remaining-subscription-reads", "0");
        first.answered(&h, t0 + Duration::from_millis(500));
        second.answered(&h, t0 + Duration::from_millis(500));
        // At the end of its wait the third still lacks half a token.
        assert_eq!(
            pacer.recheck(&third, t0 + Duration::from_secs(1)),
            Duration::from_millis(500)
        );
        assert_eq!(
            pacer.recheck(&third, t0 + Duration::from_millis(1500)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_stale_answer_does_not_raise_the_estimate() {
        let pacer = Pacer::new(opts(10, 0.0, 0.0));
        let t0 = Instant::now();
        let older = pacer.admit(&Method::Get, NSG, t0);
        let newer = pacer.admit(&Method::Get, NSG, t0);
        let mut h = Headers::new();
        h.insert("x-ms-ratelimit-remaining-subscription-reads", "2");
        newer.answered(&h, t0);
        // The older request's answer overtaken by the newer one: its 3 is out of date.
        h.insert("x-ms-ratelimit-remaining-subscription-reads", "3");
        older.answered(&h, t0);
        assert_eq!(pacer.estimate("sub-1", BudgetKind::Read, t0), Some(1));
    }

    #[test]
    fn the_reserve_is_kept_and_the_wait_is_bounded() {
        let mut o = opts(100, 1.0, 0.1);
        o.max_wait = Duration::from_secs(3);
        let pacer = Pacer::new(o);
        let t0 = Instant::now();
        let mut held = Vec::new();
        for i in 0..90 {
            let a = pacer.admit(&Method::Delete, NSG, t0);
            assert_eq!(a.wait, Duration::ZERO, "request {i}");
            held.push(a);
        }
        let a = pacer.admit(&Method::Delete, NSG, t0);
        assert_eq!(
            a.wait,
            Duration::from_secs(1),
            "the 91st would dip into the reserve"
        );
        let b = pacer.admit(&Method::Delete, NSG, t0);
        assert_eq!(b.wait, Duration::from_secs(2));
        held.push(a);
        held.push(b);
        let c = pacer.admit(&Method::Delete, NSG, t0);
        assert_eq!(c.wait, Duration::from_secs(3), "bounded by max_wait");
        // Dropped (cancelled) admissions give back their place but count as spent.
        drop(held);
        drop(c);
        assert_eq!(pacer.estimate("sub-1", BudgetKind::Delete, t0), Some(7));
    }

    #[test]
    fn off_never_waits() {
        let mut o = opts(1, 1.0, 0.0);
        o.enabled = false;
        let pacer = Pacer::new(o);
        let t0 = Instant::now();
        let _a = pacer.admit(&Method::Put, NSG, t0);
        assert_eq!(pacer.admit(&Method::Put, NSG, t0).wait, Duration::ZERO);
    }
}
