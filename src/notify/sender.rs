//! The edge: a bounded queue the audit trail offers records to (never blocking the reconcile
//! loop: when it is full the record is dropped and counted), and the task that drains it,
//! chooses each record's targets, and posts the bodies with retries.
//!
//! Logs and Events name a target by its Secret (`namespace/name`), never by its URL (Slack's
//! and Teams' carry their token), and never show a signing key or a body.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::Client;
use kube::runtime::events::{Event as KubeEvent, EventType, Reporter};
use kube::runtime::reflector::Store;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use super::sign::{SIGNATURE_HEADER, TIMESTAMP_HEADER, signature};
use super::target::{Refusal, Selection, Target, select};
use super::{Event, message};
use crate::api::NotificationRef;
use crate::controller::audit::Record;
use crate::controller::events::EventPublisher;
use crate::controller::telemetry::Telemetry;
use crate::locks::lock;

/// Records waiting to be sent; past this, new ones are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 1024;
/// Deliveries in flight at once.
pub const CONCURRENT_DELIVERIES: usize = 8;

/// The sending end, held by the audit trail.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Record>,
    telemetry: Arc<Telemetry>,
}

/// A queue of `capacity` records and its receiving end (for [`Dispatcher::run`]).
pub fn queue(capacity: usize, telemetry: Arc<Telemetry>) -> (Queue, mpsc::Receiver<Record>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (Queue { tx, telemetry }, rx)
}

impl Queue {
    /// Offers a record: queued if it notifies and there is room, else dropped at once.
    pub fn offer(&self, record: &Record) {
        if Event::of(record).is_none() {
            return;
        }
        if let Err(e) = self.tx.try_send(record.clone()) {
            self.telemetry.notification("dropped");
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "sender stopped",
            };
            warn!(grant = %format!("{}/{}", record.namespace, record.grant), step = record.step.as_str(), why, "notification dropped");
        }
    }
}

/// How deliveries are retried: 5xx, 429 and connection errors, with exponential backoff and
/// jitter (or the `Retry-After` asked for, within a bound), up to `attempts` in all. Other
/// 4xx are not retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// The longest `Retry-After` honoured; a longer one is cut to this.
    pub max_retry_after: Duration,
    /// Per request, connection included.
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): `first_delay * 2^(attempt-1)`
    /// capped at `max_delay`, scaled by `jitter` (in [0, 1]) into its upper half, and never
    /// shorter than a `Retry-After` (itself capped at `max_retry_after`).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        let base = self
            .first_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay);
        let jittered = base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        match retry_after {
            Some(asked) => jittered.max(asked.min(self.max_retry_after)),
            None => jittered,
        }
    }
}

/// A `Retry-After` value: seconds, or an HTTP date.
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    Some(Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO))
}

/// Why a delivery failed for good.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the receiver refused it with HTTP {0} (not retried)")]
    Refused(u16),
    #[error("gave up after {attempts} attempt(s); last: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("could not build the body: {0}")]
    Body(#[from] serde_json::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("could not build the HTTP client: {0}")]
    Client(String),
}

/// Posts `body` to `target`, retrying per `policy`; returns the attempts it took. The body is
/// signed afresh on each attempt (its timestamp is the attempt's).
pub async fn deliver(
    client: &reqwest::Client,
    target: &Target,
    body: &[u8],
    policy: &RetryPolicy,
) -> Result<u32, DeliveryError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut request = client
            .post(target.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(
                USER_AGENT,
                concat!("portcullis/", env!("CARGO_PKG_VERSION")),
            )
            .timeout(policy.request_timeout)
            .body(body.to_vec());
        if let Some(key) = &target.signing_key {
            let now = Timestamp::now().as_second();
            request = request
                .header(TIMESTAMP_HEADER, now.to_string())
                .header(SIGNATURE_HEADER, signature(key, now, body));
        }
        let (last, retry_after) = match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(attempt),
            Ok(response) => {
                let status = response.status();
                if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
                    return Err(DeliveryError::Refused(status.as_u16()));
                }
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, Timestamp::now()));
                (format!("HTTP {}", status.as_u16()), retry_after)
            }
            // The error's text without the URL, which may carry a token.
            Err(e) => (e.without_url().to_string(), None),
        };
        if attempt >= policy.attempts {
            return Err(DeliveryError::GaveUp {
                attempts: attempt,
                last,
            });
        }
        let wait = policy.delay(attempt, retry_after, jitter());
        debug!(target_secret = %target.describe(), attempt, error = %last, retry_in_ms = wait.as_millis() as u64, "notification failed, retrying");
        tokio::time::sleep(wait).await;
    }
}

fn jitter() -> f64 {
    let mut bytes = [0u8; 4];
    match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX),
        Err(_) => 0.5,
    }
}

/// The names of the Secrets a policy names in `spec.notifications`, if the policy is known.
pub type PolicyTargets = Arc<dyn Fn(&str, &str) -> Option<Vec<NotificationRef>> + Send + Sync>;

/// Drains the queue: chooses each record's targets, reports refused ones, sends to the others.
pub struct Dispatcher {
    http: reqwest::Client,
    secrets: Vec<Store<Secret>>,
    policies: PolicyTargets,
    telemetry: Arc<Telemetry>,
    retry: RetryPolicy,
    events: EventPublisher,
    /// Refusals already published as Events (by object and message): one Event each per run.
    reported: Mutex<HashSet<String>>,
    slots: Arc<Semaphore>,
}

impl Dispatcher {
    pub fn new(
        client: Client,
        secrets: Vec<Store<Secret>>,
        policies: PolicyTargets,
        telemetry: Arc<Telemetry>,
        retry: RetryPolicy,
    ) -> Result<Dispatcher, SetupError> {
        // No redirects: a redirect would carry the body (and its signature) to another host.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(retry.request_timeout)
            .build()
            .map_err(|e| SetupError::Client(e.without_url().to_string()))?;
        let reporter = Reporter {
            controller: "portcullis".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Ok(Dispatcher {
            http,
            secrets,
            policies,
            telemetry,
            retry,
            events: EventPublisher::new(client, reporter),
            reported: Mutex::new(HashSet::new()),
            slots: Arc::new(Semaphore::new(CONCURRENT_DELIVERIES)),
        })
    }

    /// Runs until the queue's senders are gone. Waits for the Secret caches first (records
    /// queue up meanwhile).
    pub async fn run(self, mut rx: mpsc::Receiver<Record>) {
        for store in &self.secrets {
            if store.wait_until_ready().await.is_err() {
                warn!("notification targets: the Secret watch stopped before it synced");
                return;
            }
        }
        let this = Arc::new(self);
        while let Some(record) = rx.recv().await {
            let Some(event) = Event::of(&record) else {
                continue;
            };
            let selection = this.select(event, &record);
            for refusal in &selection.refused {
                this.refused(refusal).await;
            }
            let record = Arc::new(record);
            for target in selection.targets {
                let Ok(permit) = this.slots.clone().acquire_owned().await else {
                    return;
                };
                let this = this.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    this.send(event, &record, &target).await;
                    drop(permit);
                });
            }
        }
    }

    fn select(&self, event: Event, record: &Record) -> Selection {
        let secrets: Vec<Arc<Secret>> = self.secrets.iter().flat_map(Store::state).collect();
        let secrets: Vec<&Secret> = secrets.iter().map(Arc::as_ref).collect();
        let refs = (self.policies)(&record.namespace, &record.policy);
        let policy = refs
            .as_deref()
            .filter(|r| !r.is_empty())
            .map(|r| (record.policy.as_str(), r));
        select(event, &record.namespace, &secrets, policy)
    }

    async fn send(&self, event: Event, record: &Record, target: &Target) {
        let grant = format!("{}/{}", record.namespace, record.grant);
        let body = match message::body(target.format, event, record) {
            Ok(body) => body,
            Err(e) => {
                self.telemetry.notification("failed");
                warn!(target_secret = %target.describe(), %grant, error = %e, "notification not built");
                return;
            }
        };
        match deliver(&self.http, target, &body, &self.retry).await {
            Ok(attempts) => {
                self.telemetry.notification("sent");
                info!(target_secret = %target.describe(), %grant, event = event.as_str(), attempts, "notification sent");
            }
            Err(e) => {
                self.telemetry.notification("failed");
                warn!(target_secret = %target.describe(), %grant, event = event.as_str(), error = %e, "notification failed");
            }
        }
    }

    /// A target that cannot be used: logged, counted, and a Warning Event on the Secret (or
    /// the policy that names a missing one), once per distinct problem.
    async fn refused(&self, refusal: &Refusal) {
        self.telemetry.notification("refused");
        let key = format!(
            "{}/{}/{}: {}",
            refusal.kind, refusal.namespace, refusal.name, refusal.error
        );
        warn!(kind = refusal.kind, object = %format!("{}/{}", refusal.namespace, refusal.name), error = %refusal.error, "notification target refused: nothing sent to it");
        let first = lock(&self.reported).insert(key);
        if !first {
            return;
        }
        let api_version = match refusal.kind {
            "Secret" => "v1".to_string(),
            _ => format!("{}/v1alpha1", crate::api::GROUP),
        };
        let reference = ObjectReference {
            api_version: Some(api_version),
            kind: Some(refusal.kind.to_string()),
            namespace: Some(refusal.namespace.clone()),
            name: Some(refusal.name.clone()),
            uid: self.uid_of(refusal),
            ..Default::default()
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "NotificationTargetInvalid".into(),
            note: Some(format!("not sent: {}", refusal.error)),
            action: "Notify".into(),
            secondary: None,
        };
        if let Err(e) = self.events.publish(&event, &reference).await {
            warn!(error = %e, "could not publish an Event");
        }
    }

    fn uid_of(&self, refusal: &Refusal) -> Option<String> {
        if refusal.kind != "Secret" {
            return None;
        }
        self.secrets.iter().flat_map(Store::state).find_map(|s| {
            (s.metadata.namespace.as_deref() == Some(refusal.namespace.as_str())
                && s.metadata.name.as_deref() == Some(refusal.name.as_str()))
            .then(|| s.metadata.uid.clone())
            .flatten()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_its_cap_with_jitter_in_the_upper_half() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1, None, 1.0), Duration::from_millis(500));
        assert_eq!(p.delay(1, None, 0.0), Duration::from_millis(250));
        assert_eq!(p.delay(3, None, 1.0), Duration::from_secs(2));
        assert_eq!(p.delay(30, None, 1.0), p.max_delay);
        for attempt in 1..10 {
            let d = p.delay(attempt, None, 0.3);
            assert!(d <= p.max_delay && d >= p.delay(attempt, None, 0.0));
        }
    }

    #[test]
    fn retry_after_is_honoured_within_its_bound() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(7)), 1.0),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600)), 1.0),
            p.max_retry_after
        );
        // Never shorter than the backoff.
        assert_eq!(
            p.delay(3, Some(Duration::ZERO), 1.0),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now: Timestamp = "2015-10-21T07:28:00Z".parse().expect("time");
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
