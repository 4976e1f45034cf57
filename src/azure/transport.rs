//! The last policy of the azure_core pipeline: sends the request through the HTTP client,
//! counts it in [`AzureStats`], and turns a non-2xx answer into an error that still carries the
//! status, the ARM error body and the `Retry-After` header (azure_core's own `HttpError` drops
//! the headers, and with them the wait Azure asked for).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::headers::{HeaderName, Headers};
use azure_core::{Context, HttpClient, Policy, PolicyResult, Request};

use super::error::AzureError;
use super::pacing::{Admission, BudgetKind, Pacer};

tokio::task_local! {
    /// The logical operation the current task is performing (for stats labels).
    static OPERATION: &'static str;
    /// A place in the budget's queue taken, and waited for, before the request was made up.
    static RESERVED: std::cell::RefCell<Option<Admission>>;
}

/// Runs `fut` with `reserved` as the admission of its first request of the same kind: that
/// request goes out at once, its wait already done.
pub async fn with_reserved<F: std::future::Future>(reserved: Admission, fut: F) -> F::Output {
    RESERVED
        .scope(std::cell::RefCell::new(Some(reserved)), fut)
        .await
}

/// Waits for `admission`'s turn in its bucket (at most `bound`) and counts the wait in `stats`;
/// returns how long it waited.
pub(super) async fn wait_paced(
    pacer: &Pacer,
    stats: &AzureStats,
    admission: &Admission,
    bound: Duration,
) -> Duration {
    let waited = pacer.wait_turn(admission, bound).await;
    if !waited.is_zero() {
        stats.record_paced(admission.kind, waited);
    }
    waited
}

/// The reserved admission, if there is one for a request of `kind`.
fn take_reserved(kind: BudgetKind) -> Option<Admission> {
    RESERVED
        .try_with(|r| {
            let mut r = r.borrow_mut();
            if r.as_ref().is_some_and(|a| a.kind == kind) {
                r.take()
            } else {
                None
            }
        })
        .ok()
        .flatten()
}

/// Runs `fut` with `op` as the operation label of every request it sends.
pub(crate) async fn with_operation<F: std::future::Future>(op: &'static str, fut: F) -> F::Output {
    OPERATION.scope(op, fut).await
}

fn current_operation() -> &'static str {
    OPERATION.try_with(|op| *op).unwrap_or("other")
}

/// Request counters by (operation, status). Status is the HTTP status code as text, or
/// `"transport_error"` when no response arrived. Also the time spent pacing, by budget kind.
/// Cheap to clone; all clones share the counters.
#[derive(Clone, Debug, Default)]
pub struct AzureStats {
    inner: Arc<Mutex<BTreeMap<(String, String), u64>>>,
    paced: Arc<Mutex<BTreeMap<BudgetKind, Paced>>>,
}

/// Requests held back to stay inside ARM's budget, and for how long in total.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Paced {
    pub requests: u64,
    pub seconds: f64,
}

impl AzureStats {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn record_paced(&self, kind: BudgetKind, wait: Duration) {
        if let Ok(mut map) = self.paced.lock() {
            let p = map.entry(kind).or_default();
            p.requests += 1;
            p.seconds += wait.as_secs_f64();
        }
    }

    /// Pacing so far, by kind (kinds never paced are absent).
    pub fn paced(&self) -> BTreeMap<BudgetKind, Paced> {
        self.paced.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub(crate) fn record(&self, operation: &str, status: &str) {
        if let Ok(mut map) = self.inner.lock() {
            *map.entry((operation.to_string(), status.to_string()))
                .or_insert(0) += 1;
        }
    }

    /// A copy of all counters: (operation, status) -> count.
    pub fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.inner.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The count for one (operation, status) pair.
    pub fn count(&self, operation: &str, status: &str) -> u64 {
        self.inner
            .lock()
            .ok()
            .and_then(|m| m.get(&(operation.to_string(), status.to_string())).copied())
            .unwrap_or(0)
    }

    /// Total requests answered with `status`, over all operations.
    pub fn count_status(&self, status: &str) -> u64 {
        self.inner
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|((_, s), _)| s == status)
                    .map(|(_, n)| *n)
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// A non-2xx response, kept whole enough to classify.
#[derive(Debug)]
pub(crate) struct HttpFailure {
    pub status: u16,
    pub header_code: Option<String>,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

impl HttpFailure {
    pub fn to_azure_error(&self) -> AzureError {
        AzureError::from_http(
            self.status,
            &self.body,
            self.header_code.as_deref(),
            self.retry_after,
        )
    }
}

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_azure_error())
    }
}

impl std::error::Error for HttpFailure {}

/// Parses `Retry-After` (seconds, or an HTTP date), `retry-after-ms` and `x-ms-retry-after-ms`.
pub(crate) fn parse_retry_after(headers: &Headers) -> Option<Duration> {
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(v) = headers.get_optional_str(&HeaderName::from_static(name))
            && let Ok(ms) = v.trim().parse::<u64>()
        {
            return Some(Duration::from_millis(ms));
        }
    }
    let v = headers.get_optional_str(&HeaderName::from_static("retry-after"))?;
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = v.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(Duration::from_secs_f64(secs));
    }
    // HTTP-date form.
    let when =
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let delta = when - time::OffsetDateTime::now_utc();
    Some(Duration::try_from(delta).unwrap_or(Duration::ZERO))
}

#[derive(Debug)]
pub(crate) struct ArmTransport {
    http: Arc<dyn HttpClient>,
    stats: AzureStats,
    pacer: Arc<Pacer>,
}

impl ArmTransport {
    pub fn new(http: Arc<dyn HttpClient>, stats: AzureStats, pacer: Arc<Pacer>) -> Self {
        Self { http, stats, pacer }
    }
}

#[async_trait::async_trait]
impl Policy for ArmTransport {
    async fn send(
        &self,
        _ctx: &Context,
        request: &mut Request,
        _next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let op = current_operation();
        // Every ARM request is charged to a bucket; wait here when ours is running low (unless
        // its place was taken and waited for before it was made up).
        let kind = BudgetKind::of(request.method());
        let admission = match take_reserved(kind) {
            Some(reserved) => reserved,
            None => {
                let admission =
                    self.pacer
                        .admit_kind(kind, request.url().path(), std::time::Instant::now());
                let bound = self.pacer.options().max_wait;
                let waited = wait_paced(&self.pacer, &self.stats, &admission, bound).await;
                if !waited.is_zero() {
                    tracing::debug!(op, url = %request.url().path(), waited_ms = waited.as_millis() as u64, "paced");
                }
                admission
            }
        };
        // On error or cancellation the admission's drop counts the request as spent.
        let response = match self.http.execute_request(request).await {
            Ok(r) => r,
            Err(e) => {
                self.stats.record(op, "transport_error");
                return Err(e);
            }
        };
        admission.answered(response.headers(), std::time::Instant::now());
        let status = u16::from(response.status());
        self.stats.record(op, &status.to_string());
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let (status_code, headers, body) = response.deconstruct();
        let body = body.collect().await.map(|b| b.to_vec()).unwrap_or_default();
        let failure = HttpFailure {
            status,
            header_code: headers.get_optional_string(&HeaderName::from_static("x-ms-error-code")),
            retry_after: parse_retry_after(&headers),
            body,
        };
        let code = failure.to_azure_error().code().map(str::to_string);
        Err(azure_core::Error::new(
            azure_core::error::ErrorKind::HttpResponse {
                status: status_code,
                error_code: code,
            },
            failure,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = Headers::new();
        assert_eq!(parse_retry_after(&h), None);
        h.insert("retry-after", "7");
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after", "0");
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", "garbage");
        assert_eq!(parse_retry_after(&h), None);
        h.insert("retry-after-ms", "250");
        assert_eq!(parse_retry_after(&h), Some(Duration::from_millis(250)));
    }

    #[test]
    fn stats_count() {
        let s = AzureStats::new();
        s.record("put_rule", "429");
        s.record("put_rule", "429");
        s.record("delete_rule", "429");
        s.record("put_rule", "200");
        assert_eq!(s.count("put_rule", "429"), 2);
        assert_eq!(s.count_status("429"), 3);
        assert_eq!(s.snapshot().len(), 3);
    }
}
