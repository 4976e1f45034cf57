//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas exactly one
//! writes to Azure. It follows client-go's leader election:
//!
//! - The holder renews every `retry_interval`. Each attempt runs under a timeout, and once it has
//!   not renewed within `renew_deadline` (local monotonic clock, counted from the start of its
//!   last successful attempt) it gives up, even while a request still hangs.
//! - A standby never compares the Lease's `renewTime` with its own wall clock (clock skew between
//!   nodes would make two leaders). It records the local monotonic time at which it last saw the
//!   record change and takes the Lease only once the record's `leaseDurationSeconds` have passed
//!   on its own clock without change (see [`may_acquire`]).
//! - On graceful shutdown the holder releases the Lease (empty holder, `leaseDurationSeconds: 1`,
//!   like client-go's `ReleaseOnCancel`) so a standby takes over at its next retry.
//!
//! Safety rests on `renew_deadline < lease_duration`: the holder stops writing before any standby
//! can have seen its last renewal age by a full lease duration.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

use super::Error;
use crate::locks::lock;

/// What client-go assumes when a Lease names a holder but no duration.
const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Written into the Lease (rounded up to whole seconds): how long standbys wait, on their
    /// own clocks, after the record last changed.
    pub lease_duration: Duration,
    /// The holder stops writing once it has not renewed for this long. Must be shorter than
    /// `lease_duration`.
    pub renew_deadline: Duration,
    pub retry_interval: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        LeaseConfig {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_interval: Duration::from_secs(2),
        }
    }

    /// The orderings election relies on: retry < renew deadline < lease duration.
    pub fn validate(&self) -> Result<(), Error> {
        if self.retry_interval.is_zero() || self.retry_interval >= self.renew_deadline {
            return Err(Error::Config(format!(
                "leader election: retry interval {:?} must be positive and shorter than the renew deadline {:?}",
                self.retry_interval, self.renew_deadline
            )));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(Error::Config(format!(
                "leader election: renew deadline {:?} must be shorter than the lease duration {:?}",
                self.renew_deadline, self.lease_duration
            )));
        }
        Ok(())
    }

    /// Bound on one get-and-update of the Lease: half the renew deadline, so a hung request
    /// leaves time for a second attempt on a fresh connection.
    fn attempt_timeout(&self) -> Duration {
        self.renew_deadline / 2
    }

    fn lease_duration_seconds(&self) -> i32 {
        let secs =
            self.lease_duration.as_secs() + u64::from(self.lease_duration.subsec_nanos() > 0);
        i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
    }
}

/// The fields of a Lease whose change shows that its holder is alive. Compared as a whole, as
/// client-go compares the whole record; the times are never compared with a clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `None` when empty: the Lease is free (released).
    pub holder: Option<String>,
    pub renew_time: Option<Timestamp>,
    pub acquire_time: Option<Timestamp>,
    pub transitions: Option<i32>,
    pub duration_seconds: Option<i32>,
}

impl LeaseRecord {
    pub fn from_spec(spec: &LeaseSpec) -> Self {
        LeaseRecord {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions,
            duration_seconds: spec.lease_duration_seconds,
        }
    }

    /// How long a standby must see this record unchanged before taking the Lease.
    pub fn lease_duration(&self) -> Duration {
        match self.duration_seconds {
            Some(s) if s > 0 => Duration::from_secs(s.unsigned_abs().into()),
            // A non-positive duration is as good as none; a zero wait would make two leaders.
            _ => DEFAULT_LEASE_DURATION,
        }
    }
}

/// Whether a standby may take a Lease it last saw change to `record` at `observed_at` (its own
/// monotonic clock): when it is free, or when the record's lease duration has passed since.
/// `renewTime` plays no part, so a holder whose clock is skewed keeps the Lease as long as it
/// keeps changing it.
pub fn may_acquire(record: &LeaseRecord, observed_at: Instant, now: Instant) -> bool {
    match record.holder {
        None => true,
        Some(_) => now.saturating_duration_since(observed_at) >= record.lease_duration(),
    }
}

/// The record as last seen, and when it was first seen in that state.
#[derive(Clone, Debug)]
struct Observed {
    record: LeaseRecord,
    at: Instant,
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observed: Mutex<Option<Observed>>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: Mutex::new(None),
        }
    }

    /// Waits until this replica holds the Lease; returns when the successful attempt started,
    /// the instant from which the renew deadline counts.
    pub async fn acquire(&self) -> Result<Instant, Error> {
        loop {
            let started = Instant::now();
            match tokio::time::timeout(self.cfg.attempt_timeout(), self.try_acquire_or_renew())
                .await
            {
                Ok(Ok(true)) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
                    return Ok(started);
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "leader election: could not read or take the lease")
                }
                Err(_) => warn!(
                    timeout_ms = self.cfg.attempt_timeout().as_millis() as u64,
                    "leader election: reading or taking the lease timed out"
                ),
            }
            tokio::time::sleep(self.cfg.retry_interval).await;
        }
    }

    /// Renews the Lease, acquired by an attempt that started at `renewed_at`, until it is lost;
    /// returns then, at the latest `renew_deadline` after the start of the last successful
    /// renewal even if a request hangs. The caller must stop writing at once.
    pub async fn hold(&self, renewed_at: Instant) -> Error {
        let mut renewed_at = renewed_at;
        loop {
            let deadline = renewed_at + self.cfg.renew_deadline;
            let next = (Instant::now() + self.cfg.retry_interval).min(deadline);
            tokio::time::sleep_until(next.into()).await;
            let started = Instant::now();
            if started >= deadline {
                return Error::LeadershipLost(format!(
                    "lease not renewed for {:?} (renew deadline {:?})",
                    started - renewed_at,
                    self.cfg.renew_deadline
                ));
            }
            let attempt_deadline = deadline.min(started + self.cfg.attempt_timeout());
            match tokio::time::timeout_at(attempt_deadline.into(), self.try_acquire_or_renew())
                .await
            {
                Ok(Ok(true)) => renewed_at = started,
                Ok(Ok(false)) => {
                    return Error::LeadershipLost("another replica holds the lease".into());
                }
                Ok(Err(e)) => warn!(error = %e, "leader election: renewal failed"),
                Err(_) => warn!(
                    waited_ms = (Instant::now() - started).as_millis() as u64,
                    "leader election: renewal timed out"
                ),
            }
        }
    }

    /// Gives the Lease up if this replica still holds it: empty holder, a one-second duration,
    /// `renewTime` kept (client-go's ReleaseOnCancel). Call only once writes have stopped.
    pub async fn release(&self) -> Result<(), Error> {
        match tokio::time::timeout(self.cfg.renew_deadline, self.release_once()).await {
            Ok(Ok(true)) => {
                info!(lease = %self.cfg.name, "released the lease");
                Ok(())
            }
            Ok(Ok(false)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::LeadershipLost(format!(
                "releasing the lease timed out after {:?}",
                self.cfg.renew_deadline
            ))),
        }
    }

    /// True when the Lease was ours and is now released.
    async fn release_once(&self) -> Result<bool, Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(false);
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote it since: it is not ours to release any more.
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Notes `record` as seen now; returns when it was first seen in this state.
    fn observe(&self, record: LeaseRecord) -> Instant {
        let mut observed = lock(&self.observed);
        match observed.as_ref() {
            Some(o) if o.record == record => o.at,
            _ => {
                let at = Instant::now();
                *observed = Some(Observed { record, at });
                at
            }
        }
    }

    /// Takes the Lease if it is free, expired by [`may_acquire`] or ours; true when we hold it
    /// afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, Error> {
        // Written for people and other tools to read; never compared with a clock here.
        let now = MicroTime(Timestamp::now());
        let duration_secs = self.cfg.lease_duration_seconds();
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe_written(&created);
                    Ok(true)
                }
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = LeaseRecord::from_spec(&spec);
        let observed_at = self.observe(record.clone());
        let ours = record.holder.as_deref() == Some(self.cfg.identity.as_str());
        if !ours && !may_acquire(&record, observed_at, Instant::now()) {
            return Ok(false);
        }
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(self.cfg.identity.clone());
        new_spec.lease_duration_seconds = Some(duration_secs);
        new_spec.renew_time = Some(now.clone());
        if !ours {
            new_spec.acquire_time = Some(now);
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec = Some(new_spec);
        // `replace` carries the resourceVersion we read: a concurrent taker gets a conflict.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe_written(&written);
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Our own write, as the API server stored it, is the latest record seen.
    fn observe_written(&self, lease: &Lease) {
        let record = LeaseRecord::from_spec(&lease.spec.clone().unwrap_or_default());
        self.observe(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, renewed: Timestamp, secs: i32) -> LeaseRecord {
        LeaseRecord {
            holder: Some(by.into()),
            renew_time: Some(renewed),
            acquire_time: Some(renewed),
            transitions: Some(3),
            duration_seconds: Some(secs),
        }
    }

    fn hours(h: i64) -> jiff::SignedDuration {
        jiff::SignedDuration::from_hours(h)
    }

    #[test]
    fn a_held_lease_is_taken_only_after_its_duration_on_the_local_clock() {
        let seen = Instant::now();
        let record = held("a", Timestamp::now(), 15);
        assert!(!may_acquire(&record, seen, seen));
        assert!(!may_acquire(
            &record,
            seen,
            seen + Duration::from_millis(14_999)
        ));
        assert!(may_acquire(&record, seen, seen + Duration::from_secs(15)));
    }

    #[test]
    fn renew_time_in_the_past_or_future_does_not_matter() {
        let seen = Instant::now();
        // A holder whose clock is an hour slow: still held while fresh on our clock.
        let slow = held("a", Timestamp::now() - hours(1), 15);
        assert!(!may_acquire(&slow, seen, seen + Duration::from_secs(1)));
        // A holder whose clock is an hour fast: free once it stops changing for 15 s.
        let fast = held("a", Timestamp::now() + hours(1), 15);
        assert!(may_acquire(&fast, seen, seen + Duration::from_secs(15)));
    }

    #[test]
    fn a_released_lease_is_free_at_once() {
        let seen = Instant::now();
        let released = LeaseRecord {
            holder: None,
            duration_seconds: Some(1),
            ..held("a", Timestamp::now(), 15)
        };
        assert!(may_acquire(&released, seen, seen));
        let from_spec = LeaseRecord::from_spec(&LeaseSpec {
            holder_identity: Some(String::new()),
            ..Default::default()
        });
        assert_eq!(from_spec.holder, None, "an empty holder is no holder");
        assert!(may_acquire(&from_spec, seen, seen));
    }

    #[test]
    fn the_record_duration_counts_and_a_missing_one_falls_back_to_fifteen_seconds() {
        let seen = Instant::now();
        let short = held("a", Timestamp::now(), 1);
        assert!(may_acquire(&short, seen, seen + Duration::from_secs(1)));
        for bad in [None, Some(0), Some(-5)] {
            let record = LeaseRecord {
                duration_seconds: bad,
                ..held("a", Timestamp::now(), 15)
            };
            assert!(!may_acquire(&record, seen, seen + Duration::from_secs(14)));
            assert!(may_acquire(&record, seen, seen + Duration::from_secs(15)));
        }
    }

    #[test]
    fn an_observation_in_the_future_never_expires_early() {
        let now = Instant::now();
        let record = held("a", Timestamp::now(), 15);
        assert!(!may_acquire(&record, now + Duration::from_secs(60), now));
    }

    #[test]
    fn config_orderings_are_checked_and_durations_round_up() {
        let cfg = LeaseConfig::new("ns".into(), "l".into(), "me".into());
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.lease_duration_seconds(), 15);
        let bad = LeaseConfig {
            renew_deadline: Duration::from_secs(15),
            ..cfg.clone()
        };
        assert!(bad.validate().is_err());
        let bad = LeaseConfig {
            retry_interval: Duration::from_secs(10),
            ..cfg.clone()
        };
        assert!(bad.validate().is_err());
        let frac = LeaseConfig {
            lease_duration: Duration::from_millis(3_500),
            ..cfg
        };
        assert_eq!(frac.lease_duration_seconds(), 4);
    }
}
