//! [`AzureNetworkClient`]: [`NetworkApi`] on `azure_mgmt_network` (and `azure_mgmt_compute`
//! for the one read of a VM's NIC list).
//!
//! - Requests go through an azure_core pipeline with retries OFF and our own transport policy
//!   ([`ArmTransport`]), so a 429 reaches us at once with its `Retry-After`.
//! - Writes (`put_rule`, `delete_rule`, `put_nsg`) take a per-NSG async lock for the whole
//!   operation, including polling, so this process never has two writes in flight on one NSG.
//! - `read_nsg`/`put_nsg` are raw requests on the same pipeline (the crate has no `If-Match`
//!   builder): the NSG's JSON is round-tripped whole, so fields the typed model lacks survive.
//! - Writes are sent with `.send()` and their long-running operation is polled here
//!   (`Azure-AsyncOperation`, else `Location`, else the resource's `provisioningState`),
//!   honouring `Retry-After` between `poll_floor` and `max_wait`.
//! - Every request is paced against ARM's subscription budget ([`super::pacing`]): read from
//!   the `x-ms-ratelimit-remaining-*` headers, it holds a request back before Azure would
//!   throttle it.
//! - 429s, `RetryableErrorDueToAnotherOperation`, 5xx and transport errors are retried after
//!   `Retry-After` or an exponential backoff, until the operation deadline. 400/401/403/404/409
//!   fail at once.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::auth::TokenCredential;
use azure_core::headers::{HeaderName, Headers};
use azure_core::{
    ClientOptions, Context, HttpClient, Method, Pipeline, Request, RetryOptions, StatusCode,
    TransportOptions, Url,
};
use futures::StreamExt;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::convert::{from_model, to_model};
use super::error::{AzureError, error_chain};
use super::nsg_json;
use super::pacing::{BudgetKind, BudgetLeft, Pacer, PacingOptions};
use super::transport::{ArmTransport, AzureStats, parse_retry_after, wait_paced, with_operation};
use super::{
    IpConfigView, NetworkApi, NicView, NsgPage, NsgSnapshot, Reserved, ResourceId, SubnetView,
    VmNics, VmTargets,
};
use crate::locks::lock;
use crate::plan::rule::NsgRule;

pub const DEFAULT_ENDPOINT: &str = "https://management.azure.com";
pub const MANAGEMENT_SCOPE: &str = "https://management.azure.com/.default";

/// Tuning for [`AzureNetworkClient`].
#[derive(Clone, Debug)]
pub struct AzureClientOptions {
    /// Upper bound for one whole operation: lock wait, every attempt, every poll.
    pub operation_deadline: Duration,
    /// Upper bound for one HTTP request.
    pub request_timeout: Duration,
    /// Shortest wait between polls (used when `Retry-After` is 0 or absent).
    pub poll_floor: Duration,
    /// Longest wait we accept from a `Retry-After` header.
    pub max_wait: Duration,
    /// First backoff after a retryable error without `Retry-After`.
    pub backoff_initial: Duration,
    /// Largest backoff.
    pub backoff_max: Duration,
    /// How long one call may spend retrying a failed request (429, 5xx, a dropped connection)
    /// before it returns the error. Short, so that a reconcile is never held for long by a
    /// failing request: the controller retries with a fresh plan soon after, and a grant that
    /// expired meanwhile is closed instead of opened. Polling an accepted operation is bounded
    /// by `operation_deadline` alone.
    pub retry_budget: Duration,
    /// OAuth scopes requested for ARM.
    pub scopes: Vec<String>,
    /// The HTTP client (default: azure_core's reqwest client with rustls).
    pub http_client: Option<Arc<dyn HttpClient>>,
    /// Pacing against ARM's subscription budget (on by default, with ARM's bucket sizes).
    pub pacing: PacingOptions,
}

impl Default for AzureClientOptions {
    fn default() -> Self {
        Self {
            operation_deadline: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            poll_floor: Duration::from_millis(50),
            max_wait: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            retry_budget: Duration::from_millis(1500),
            scopes: vec![MANAGEMENT_SCOPE.to_string()],
            http_client: None,
            pacing: PacingOptions::default(),
        }
    }
}

/// The real [`NetworkApi`].
pub struct AzureNetworkClient {
    sdk: azure_mgmt_network::Client,
    /// Compute (2024-07-01), for reading a VM's NIC list; same pipeline policies as `sdk`.
    compute: azure_mgmt_compute::package_2024_07_01::Client,
    /// Same policies as the SDK client's; used to poll operation URLs.
    pipeline: Pipeline,
    credential: Arc<dyn TokenCredential>,
    endpoint: Url,
    options: AzureClientOptions,
    stats: AzureStats,
    /// ARM budget estimates, shared with the transport policy.
    pacer: Arc<Pacer>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for AzureNetworkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureNetworkClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What a write is, for logs and LRO handling.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WriteKind {
    Put,
    Delete,
}

/// A collected HTTP response.
struct Collected {
    status: StatusCode,
    headers: Headers,
    body: bytes::Bytes,
}

impl AzureNetworkClient {
    /// `endpoint`: ARM (`https://management.azure.com`, or an emulator).
    pub fn new(
        endpoint: Url,
        credential: Arc<dyn TokenCredential>,
        options: AzureClientOptions,
    ) -> Result<Self, AzureError> {
        let stats = AzureStats::new();
        let http = options
            .http_client
            .clone()
            .unwrap_or_else(azure_core::new_http_client);
        let pacer = Pacer::new(options.pacing.clone());
        let transport = TransportOptions::new_custom_policy(Arc::new(ArmTransport::new(
            http,
            stats.clone(),
            Arc::clone(&pacer),
        )));
        let scopes: Vec<&str> = options.scopes.iter().map(String::as_str).collect();
        let sdk = azure_mgmt_network::Client::builder(credential.clone())
            .endpoint(endpoint.clone())
            .scopes(&scopes)
            .retry(RetryOptions::none())
            .transport(transport.clone())
            .build()
            .map_err(AzureError::from)?;
        let compute = azure_mgmt_compute::package_2024_07_01::Client::builder(credential.clone())
            .endpoint(endpoint.clone())
            .scopes(&scopes)
            .retry(RetryOptions::none())
            .transport(transport.clone())
            .build()
            .map_err(AzureError::from)?;
        let pipeline = Pipeline::new(
            Some("portcullis"),
            Some(env!("CARGO_PKG_VERSION")),
            ClientOptions::new(transport).retry(RetryOptions::none()),
            Vec::new(),
            Vec::new(),
        );
        Ok(Self {
            sdk,
            compute,
            pipeline,
            credential,
            endpoint,
            options,
            stats,
            pacer,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// Request counters by (operation, status); shared with every clone of the returned value.
    pub fn stats(&self) -> AzureStats {
        self.stats.clone()
    }

    /// The estimated whole tokens left now in ARM's `kind` bucket for `subscription` (requests
    /// in flight counted); `None` before the first such request.
    pub fn budget_estimate(&self, subscription: &str, kind: BudgetKind) -> Option<i64> {
        self.pacer
            .estimate(subscription, kind, std::time::Instant::now())
    }

    pub fn options(&self) -> &AzureClientOptions {
        &self.options
    }

    fn nsg_lock(&self, nsg_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let key = nsg_id.trim_end_matches('/').to_ascii_lowercase();
        let mut locks = lock(&self.locks);
        // Forget locks nobody holds or waits for, so the map stays small.
        if locks.len() > 256 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key).or_default().clone()
    }

    fn timeout_error(&self, what: &str) -> AzureError {
        AzureError::Timeout {
            what: what.to_string(),
            after: self.options.operation_deadline,
        }
    }

    /// Runs one HTTP exchange with the per-request timeout, capped by the deadline.
    async fn timed<T, F>(&self, what: &str, deadline: Instant, fut: F) -> Result<T, AzureError>
    where
        F: Future<Output = Result<T, AzureError>>,
    {
        let now = Instant::now();
        if now >= deadline {
            return Err(self.timeout_error(what));
        }
        let limit = self.options.request_timeout.min(deadline - now);
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) if Instant::now() >= deadline => Err(self.timeout_error(what)),
            Err(_) => Err(AzureError::Transport(format!(
                "{what}: request timed out after {limit:?}"
            ))),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(16);
        let base = self
            .options
            .backoff_initial
            .saturating_mul(1u32 << exp)
            .min(self.options.backoff_max);
        jitter(base)
    }

    /// How long to wait before retrying after `err` (the server's wait, clamped; else backoff).
    fn retry_wait(&self, err: &AzureError, attempt: u32) -> Duration {
        match err.retry_after() {
            Some(ra) => ra.clamp(self.options.poll_floor, self.options.max_wait),
            None => self.backoff(attempt),
        }
    }

    /// Calls `f` until it succeeds, fails for good, or the deadline would pass. When retries run
    /// out, the last error is returned (a `Throttled` keeps its `retry_after` for the caller).
    async fn with_retries<T, F, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        mut f: F,
    ) -> Result<T, AzureError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, AzureError>>,
    {
        let give_up = deadline.min(Instant::now() + self.options.retry_budget);
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let err = match f(attempt).await {
                Ok(v) => return Ok(v),
                Err(e @ AzureError::Timeout { .. }) => return Err(e),
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => e,
            };
            let wait = self.retry_wait(&err, attempt);
            if Instant::now() + wait >= give_up {
                warn!(what, attempt, error = %err, category = err.category(), "giving up: retry budget spent");
                return Err(err);
            }
            info!(what, attempt, error = %err, category = err.category(), wait_ms = wait.as_millis() as u64, "retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// A request to `url` carrying our bearer token.
    async fn authed_request(&self, url: Url, method: Method) -> Result<Request, AzureError> {
        let scopes: Vec<&str> = self.options.scopes.iter().map(String::as_str).collect();
        let token = self.credential.get_token(&scopes).await?;
        let mut req = Request::new(url, method);
        req.insert_header(
            azure_core::headers::AUTHORIZATION,
            format!("Bearer {}", token.token.secret()),
        );
        Ok(req)
    }

    /// Sends `req` through the pipeline under the stats label `op` and collects the response.
    async fn send_raw(&self, mut req: Request, op: &'static str) -> Result<Collected, AzureError> {
        let rsp = with_operation(op, self.pipeline.send(&Context::new(), &mut req)).await?;
        collect(rsp).await
    }

    /// GET `url` through the pipeline, authenticated, and collect the response.
    async fn get_url(&self, url: Url, op: &'static str) -> Result<Collected, AzureError> {
        let mut req = self.authed_request(url, Method::Get).await?;
        req.set_body(azure_core::EMPTY_BODY);
        self.send_raw(req, op).await
    }

    /// Only follow operation URLs on ARM's own origin: they carry our bearer token.
    fn check_origin(&self, url: &Url) -> Result<(), AzureError> {
        if url.origin() == self.endpoint.origin() {
            Ok(())
        } else {
            Err(AzureError::InvalidResponse(format!(
                "operation URL {url} is not on the ARM endpoint {}",
                self.endpoint
            )))
        }
    }

    /// The URL of the NSG, or of something under it (`["securityRules", name]`).
    fn nsg_url(&self, nsg: &ResourceId, under: &[&str]) -> Result<Url, AzureError> {
        let mut path = vec!["networkSecurityGroups", nsg.name()];
        path.extend(under);
        self.network_url(&nsg.subscription, &nsg.resource_group, &path)
    }

    /// The URL of `path` under the resource group's `Microsoft.Network` provider.
    fn network_url(
        &self,
        subscription: &str,
        resource_group: &str,
        path: &[&str],
    ) -> Result<Url, AzureError> {
        let mut url = self.endpoint.clone();
        {
            let mut segs = url.path_segments_mut().map_err(|_| {
                AzureError::InvalidInput(format!("invalid ARM endpoint {}", self.endpoint))
            })?;
            segs.pop_if_empty()
                .extend([
                    "subscriptions",
                    subscription,
                    "resourceGroups",
                    resource_group,
                    "providers",
                    "Microsoft.Network",
                ])
                .extend(path);
        }
        url.query_pairs_mut()
            .append_pair("api-version", "2024-03-01");
        Ok(url)
    }

    /// One page of a list of NSGs at `url`, checked and kept as text.
    async fn list_nsgs_page_once(&self, url: Url) -> Result<NsgPage, AzureError> {
        let rsp = self.get_url(url, "list_nsgs").await?;
        nsg_json::page_of_nsgs(rsp.body)
    }

    fn rule_url(&self, nsg: &ResourceId, rule_name: &str) -> Result<Url, AzureError> {
        self.nsg_url(nsg, &["securityRules", rule_name])
    }

    async fn read_nsg_once(
        &self,
        nsg_id: &str,
        nsg: &ResourceId,
    ) -> Result<NsgSnapshot, AzureError> {
        let rsp = self.get_url(self.nsg_url(nsg, &[])?, "get_nsg").await?;
        let raw: Box<RawValue> = serde_json::from_slice(&rsp.body)
            .map_err(|e| AzureError::InvalidResponse(format!("NSG {nsg_id} is not JSON: {e}")))?;
        let (body_etag, rules) = nsg_json::etag_and_rules(&raw, nsg_id)?;
        let etag = body_etag.or_else(|| {
            rsp.headers
                .get_optional_str(&HeaderName::from_static("etag"))
                .map(str::to_string)
        });
        Ok(NsgSnapshot {
            nsg_id: nsg_id.to_string(),
            etag,
            rules,
            raw,
        })
    }

    async fn put_nsg_once(
        &self,
        nsg: &ResourceId,
        body: &azure_core::Body,
        if_match: &str,
        ctx: &LogCtx<'_>,
        deadline: Instant,
    ) -> Result<(), AzureError> {
        let what = ctx.what();
        let url = self.nsg_url(nsg, &[])?;
        let first = self
            .timed(&what, deadline, async {
                let mut req = self.authed_request(url.clone(), Method::Put).await?;
                req.insert_header(azure_core::headers::CONTENT_TYPE, "application/json");
                req.insert_header(azure_core::headers::IF_MATCH, if_match.to_string());
                // A shared buffer: the body is not copied per attempt.
                req.set_body(body.clone());
                self.send_raw(req, "put_nsg").await
            })
            .await?;
        debug!(nsg = ctx.nsg, status = %first.status, "NSG PUT accepted");
        self.finish_write(WriteKind::Put, first, url, ctx, deadline)
            .await
    }

    /// Drives a write's long-running operation to a terminal state.
    async fn finish_write(
        &self,
        kind: WriteKind,
        first: Collected,
        resource_url: Url,
        ctx: &LogCtx<'_>,
        deadline: Instant,
    ) -> Result<(), AzureError> {
        let first_wait = parse_retry_after(&first.headers);
        // Decided, and the response dropped, before polling: a PUT's response echoes the whole
        // NSG, and a burst has an operation running on every NSG at once.
        let Some((mode, url)) = next_poll(kind, first, resource_url)? else {
            return Ok(());
        };
        if matches!(mode, Poll::AsyncOperation | Poll::Location) {
            self.check_origin(&url)?;
        }
        self.poll(mode, url, first_wait, ctx, deadline).await
    }

    async fn poll(
        &self,
        mode: Poll,
        url: Url,
        first_wait: Option<Duration>,
        ctx: &LogCtx<'_>,
        deadline: Instant,
    ) -> Result<(), AzureError> {
        let what = ctx.what();
        let mut wait = self.clamp_wait(first_wait);
        let mut attempt: u32 = 0;
        loop {
            if Instant::now() + wait >= deadline {
                warn!(
                    nsg = ctx.nsg,
                    rule = ctx.rule,
                    ?mode,
                    "operation deadline reached while polling"
                );
                return Err(self.timeout_error(&what));
            }
            tokio::time::sleep(wait).await;
            attempt += 1;
            let result = self
                .timed(&what, deadline, self.get_url(url.clone(), "poll_operation"))
                .await;
            let rsp = match (mode, result) {
                (_, Ok(rsp)) => rsp,
                (Poll::ResourceGone, Err(AzureError::NotFound { .. })) => return Ok(()),
                (_, Err(e @ AzureError::Timeout { .. })) => return Err(e),
                (_, Err(e)) if e.is_retryable() => {
                    debug!(nsg = ctx.nsg, rule = ctx.rule, attempt, error = %e, "poll failed; retrying");
                    wait = self.retry_wait(&e, attempt);
                    continue;
                }
                (_, Err(e)) => return Err(e),
            };
            let state: Option<String> = match mode {
                Poll::AsyncOperation => Some(operation_status(&rsp.body).ok_or_else(|| {
                    AzureError::InvalidResponse(format!(
                        "operation status without 'status': {}",
                        String::from_utf8_lossy(&rsp.body)
                    ))
                })?),
                Poll::Location => (rsp.status != StatusCode::Accepted).then(|| "Succeeded".into()),
                Poll::ResourceState => {
                    Some(provisioning_state(&rsp.body).unwrap_or_else(|| "Succeeded".into()))
                }
                Poll::ResourceGone => None,
            };
            debug!(nsg = ctx.nsg, rule = ctx.rule, attempt, status = ?state, "polled operation");
            match state.as_deref() {
                Some("Succeeded") => return Ok(()),
                Some(s @ ("Failed" | "Canceled" | "Cancelled")) => {
                    return Err(operation_failed(s, &rsp.body));
                }
                _ => {}
            }
            wait = self.clamp_wait(parse_retry_after(&rsp.headers));
        }
    }

    fn clamp_wait(&self, retry_after: Option<Duration>) -> Duration {
        retry_after.unwrap_or(self.options.poll_floor).clamp(
            self.options.poll_floor,
            self.options.max_wait.max(self.options.poll_floor),
        )
    }

    async fn put_once(
        &self,
        nsg: &ResourceId,
        rule: &NsgRule,
        ctx: &LogCtx<'_>,
        deadline: Instant,
    ) -> Result<(), AzureError> {
        let what = ctx.what();
        let send = self.sdk.security_rules_client().create_or_update(
            nsg.resource_group.clone(),
            nsg.name(),
            rule.name.clone(),
            to_model(rule),
            nsg.subscription.clone(),
        );
        let first = self
            .timed(&what, deadline, async {
                let rsp = with_operation("put_rule", send.send()).await?;
                collect(rsp.into_raw_response()).await
            })
            .await?;
        debug!(nsg = ctx.nsg, rule = ctx.rule, status = %first.status, "PUT accepted");
        let url = self.rule_url(nsg, &rule.name)?;
        self.finish_write(WriteKind::Put, first, url, ctx, deadline)
            .await
    }

    async fn delete_once(
        &self,
        nsg: &ResourceId,
        rule_name: &str,
        ctx: &LogCtx<'_>,
        deadline: Instant,
    ) -> Result<(), AzureError> {
        let what = ctx.what();
        let send = self.sdk.security_rules_client().delete(
            nsg.resource_group.clone(),
            nsg.name(),
            rule_name,
            nsg.subscription.clone(),
        );
        let first = self
            .timed(&what, deadline, async {
                let rsp = with_operation("delete_rule", send.send()).await?;
                collect(rsp.into_raw_response()).await
            })
            .await;
        let first = match first {
            Ok(f) => f,
            Err(AzureError::NotFound { .. }) => {
                debug!(nsg = ctx.nsg, rule = ctx.rule, "rule already gone");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        debug!(nsg = ctx.nsg, rule = ctx.rule, status = %first.status, "DELETE accepted");
        if first.status == StatusCode::NoContent {
            return Ok(());
        }
        let url = self.rule_url(nsg, rule_name)?;
        self.finish_write(WriteKind::Delete, first, url, ctx, deadline)
            .await
    }

    /// Runs a write under the NSG's lock, with retries, within the operation deadline.
    async fn write<F, Fut>(&self, ctx: LogCtx<'_>, once: F) -> Result<(), AzureError>
    where
        F: Fn(Instant, u32) -> Fut,
        Fut: Future<Output = Result<(), AzureError>>,
    {
        let started = Instant::now();
        let deadline = started + self.options.operation_deadline;
        let what = ctx.what();
        let lock = self.nsg_lock(ctx.nsg);
        let _guard = tokio::time::timeout_at(deadline, lock.lock())
            .await
            .map_err(|_| self.timeout_error(&what))?;
        let result = self
            .with_retries(&what, deadline, |attempt| {
                debug!(
                    nsg = ctx.nsg,
                    rule = ctx.rule,
                    attempt,
                    op = ctx.op,
                    "sending"
                );
                once(deadline, attempt)
            })
            .await;
        match &result {
            Ok(()) => info!(
                nsg = ctx.nsg,
                rule = ctx.rule,
                op = ctx.op,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "write done"
            ),
            Err(e) => warn!(
                nsg = ctx.nsg,
                rule = ctx.rule,
                op = ctx.op,
                error = %e,
                category = e.category(),
                "write failed"
            ),
        }
        result
    }

    /// The ids of the NICs a VM lists in `properties.networkProfile.networkInterfaces` (they may
    /// live in another resource group or subscription). A missing VM is [`AzureError::NotFound`].
    async fn vm_nic_ids(&self, vm: &ResourceId) -> Result<Vec<String>, AzureError> {
        let rsp = with_operation(
            "get_vm",
            self.compute
                .virtual_machines_client()
                .get(
                    vm.resource_group.clone(),
                    vm.name(),
                    vm.subscription.clone(),
                )
                .send(),
        )
        .await?;
        let model = rsp.into_body().await?;
        Ok(model
            .properties
            .and_then(|p| p.network_profile)
            .map(|n| n.network_interfaces)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|nic| nic.sub_resource.id)
            .collect())
    }

    /// One NIC, by the id its VM gave. A NIC the VM lists but ARM does not know is not a missing
    /// VM: that would drop the VM's Deny rules, so it is an error the caller retries.
    async fn get_nic(
        &self,
        vm_id: &str,
        nic_id: &str,
    ) -> Result<azure_mgmt_network::models::NetworkInterface, AzureError> {
        let nic = ResourceId::parse_typed(nic_id, "Microsoft.Network", &["networkInterfaces"])
            .map_err(|e| {
                AzureError::InvalidResponse(format!("VM {vm_id} lists a NIC with a bad id: {e}"))
            })?;
        let sent = with_operation(
            "get_nic",
            self.sdk
                .network_interfaces_client()
                .get(
                    nic.resource_group.clone(),
                    nic.name(),
                    nic.subscription.clone(),
                )
                .send(),
        )
        .await;
        match sent {
            Ok(rsp) => Ok(rsp.into_body().await?),
            Err(e) => match AzureError::from(e) {
                AzureError::NotFound { what } => Err(AzureError::InvalidResponse(format!(
                    "VM {vm_id} lists NIC {nic_id}, which ARM does not find ({what})"
                ))),
                other => Err(other),
            },
        }
    }

    async fn subnet_nsg(&self, subnet_id: &str) -> Result<Option<String>, AzureError> {
        let sn = ResourceId::parse_typed(
            subnet_id,
            "Microsoft.Network",
            &["virtualNetworks", "subnets"],
        )?;
        let vnet = sn.name_at(0).unwrap_or_default().to_string();
        let rsp = with_operation(
            "get_subnet",
            self.sdk
                .subnets_client()
                .get(
                    sn.resource_group.clone(),
                    vnet,
                    sn.name(),
                    sn.subscription.clone(),
                )
                .send(),
        )
        .await?;
        let subnet = rsp.into_body().await?;
        Ok(subnet
            .properties
            .and_then(|p| p.network_security_group)
            .and_then(|n| n.resource.id))
    }

    async fn resolve_once(&self, vm_id: &str, vm: &ResourceId) -> Result<VmTargets, AzureError> {
        let mut nic_ids = self.vm_nic_ids(vm).await?;
        if nic_ids.is_empty() {
            return Err(AzureError::NotFound {
                what: format!("VM {vm_id} has no network interface"),
            });
        }
        nic_ids.sort_by_key(|id| id.to_ascii_lowercase());
        nic_ids.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        let mut nics = Vec::with_capacity(nic_ids.len());
        for nic_id in &nic_ids {
            nics.push(nic_view(nic_id.clone(), self.get_nic(vm_id, nic_id).await?));
        }
        // Each subnet read once, in the order the NICs name them.
        let mut subnet_nsgs: HashMap<String, Option<String>> = HashMap::new();
        for subnet_id in nics
            .iter()
            .flat_map(|n| &n.ip_configurations)
            .filter_map(|c| c.subnet_id.as_deref())
        {
            let key = subnet_id.to_ascii_lowercase();
            if let std::collections::hash_map::Entry::Vacant(slot) = subnet_nsgs.entry(key) {
                slot.insert(self.subnet_nsg(subnet_id).await?);
            }
        }
        VmTargets::assemble(vm_id, &nics, |subnet_id| {
            subnet_nsgs.get(&subnet_id.to_ascii_lowercase()).cloned()
        })
        .ok_or_else(|| {
            AzureError::InvalidResponse(format!("VM {vm_id}: a subnet of its NICs was not read"))
        })
    }

    async fn list_vms_once(&self, rg: &ResourceGroupRef<'_>) -> Result<Vec<VmNics>, AzureError> {
        let pages = self
            .compute
            .virtual_machines_client()
            .list(rg.resource_group, rg.subscription)
            .into_stream();
        collect_pages("list_vms", pages, |page, out| {
            for vm in page.value {
                let Some(vm_id) = vm.resource.id else {
                    continue;
                };
                let nic_ids = vm
                    .properties
                    .and_then(|p| p.network_profile)
                    .map(|n| n.network_interfaces)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|nic| nic.sub_resource.id)
                    .collect();
                out.push(VmNics { vm_id, nic_ids });
            }
            Ok(())
        })
        .await
    }

    async fn list_nics_once(&self, rg: &ResourceGroupRef<'_>) -> Result<Vec<NicView>, AzureError> {
        let pages = self
            .sdk
            .network_interfaces_client()
            .list(rg.resource_group, rg.subscription)
            .into_stream();
        collect_pages("list_nics", pages, |page, out| {
            for nic in page.value {
                if let Some(id) = nic.resource.id.clone() {
                    out.push(nic_view(id, nic));
                }
            }
            Ok(())
        })
        .await
    }

    async fn list_subnets_once(
        &self,
        rg: &ResourceGroupRef<'_>,
        vnet: &str,
    ) -> Result<Vec<SubnetView>, AzureError> {
        let pages = self
            .sdk
            .subnets_client()
            .list(rg.resource_group, vnet, rg.subscription)
            .into_stream();
        collect_pages("list_subnets", pages, |page, out| {
            for subnet in page.value {
                let Some(id) = subnet.sub_resource.id else {
                    continue;
                };
                let nsg_id = subnet
                    .properties
                    .and_then(|p| p.network_security_group)
                    .and_then(|n| n.resource.id);
                out.push(SubnetView { id, nsg_id });
            }
            Ok(())
        })
        .await
    }

    /// Runs one read (`once`) with the read retries and deadline of every other read.
    async fn read_with_retries<T, F, Fut>(&self, what: &str, once: F) -> Result<T, AzureError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, AzureError>>,
    {
        let deadline = Instant::now() + self.options.operation_deadline;
        self.with_retries(what, deadline, |_| self.timed(what, deadline, once()))
            .await
    }

    async fn list_once(&self, nsg: &ResourceId) -> Result<Vec<NsgRule>, AzureError> {
        let pages = self
            .sdk
            .security_rules_client()
            .list(
                nsg.resource_group.clone(),
                nsg.name(),
                nsg.subscription.clone(),
            )
            .into_stream();
        collect_pages("list_rules", pages, |page, out| {
            for model in page.value {
                let is_default =
                    model.sub_resource.id.as_deref().is_some_and(|id| {
                        id.to_ascii_lowercase().contains("/defaultsecurityrules/")
                    });
                if !is_default {
                    out.push(from_model(&model)?);
                }
            }
            Ok(())
        })
        .await
    }
}

/// Every item of a paged list, read page by page (following `nextLink`) under `operation`'s
/// name in the request counters; `add` takes what it keeps of each page.
async fn collect_pages<P, T>(
    operation: &'static str,
    mut pages: impl futures::Stream<Item = azure_core::Result<P>> + Unpin,
    mut add: impl FnMut(P, &mut Vec<T>) -> Result<(), AzureError>,
) -> Result<Vec<T>, AzureError> {
    let mut out = Vec::new();
    while let Some(page) = with_operation(operation, pages.next()).await {
        add(page?, &mut out)?;
    }
    Ok(out)
}

/// A resource group, for the list calls.
struct ResourceGroupRef<'a> {
    subscription: &'a str,
    resource_group: &'a str,
}

/// What resolution needs of a NIC read whole; `id` is the id it was asked by (or listed under).
fn nic_view(id: String, nic: azure_mgmt_network::models::NetworkInterface) -> NicView {
    let Some(props) = nic.properties else {
        return NicView {
            id,
            ..NicView::default()
        };
    };
    NicView {
        id,
        nsg_id: props.network_security_group.and_then(|n| n.resource.id),
        ip_configurations: props
            .ip_configurations
            .into_iter()
            .filter_map(|c| c.properties)
            .map(|p| IpConfigView {
                private_ip: p.private_ip_address,
                subnet_id: p.subnet.and_then(|s| s.sub_resource.id),
            })
            .collect(),
    }
}

#[async_trait::async_trait]
impl NetworkApi for AzureNetworkClient {
    async fn resolve_vm(&self, vm_id: &str) -> Result<VmTargets, AzureError> {
        let vm = ResourceId::parse_typed(vm_id, "Microsoft.Compute", &["virtualMachines"])?;
        let what = format!("resolve VM {vm_id}");
        let deadline = Instant::now() + self.options.operation_deadline;
        let targets = self
            .with_retries(&what, deadline, |_| {
                self.timed(&what, deadline, self.resolve_once(vm_id, &vm))
            })
            .await?;
        debug!(vm = vm_id, nsgs = ?targets.nsg_ids, ips = ?targets.private_ips, "resolved VM");
        Ok(targets)
    }

    async fn list_vms(
        &self,
        subscription: &str,
        resource_group: &str,
    ) -> Result<Vec<VmNics>, AzureError> {
        let rg = ResourceGroupRef {
            subscription,
            resource_group,
        };
        let what = format!("list VMs of resource group {resource_group}");
        let vms = self
            .read_with_retries(&what, || self.list_vms_once(&rg))
            .await?;
        debug!(subscription, resource_group, vms = vms.len(), "listed VMs");
        Ok(vms)
    }

    async fn list_nics(
        &self,
        subscription: &str,
        resource_group: &str,
    ) -> Result<Vec<NicView>, AzureError> {
        let rg = ResourceGroupRef {
            subscription,
            resource_group,
        };
        let what = format!("list NICs of resource group {resource_group}");
        let nics = self
            .read_with_retries(&what, || self.list_nics_once(&rg))
            .await?;
        debug!(
            subscription,
            resource_group,
            nics = nics.len(),
            "listed NICs"
        );
        Ok(nics)
    }

    async fn list_subnets(
        &self,
        subscription: &str,
        resource_group: &str,
        virtual_network: &str,
    ) -> Result<Vec<SubnetView>, AzureError> {
        let rg = ResourceGroupRef {
            subscription,
            resource_group,
        };
        let what = format!("list subnets of virtual network {virtual_network}");
        let subnets = self
            .read_with_retries(&what, || self.list_subnets_once(&rg, virtual_network))
            .await?;
        debug!(
            subscription,
            resource_group,
            virtual_network,
            subnets = subnets.len(),
            "listed subnets"
        );
        Ok(subnets)
    }

    async fn list_rules(&self, nsg_id: &str) -> Result<Vec<NsgRule>, AzureError> {
        let nsg = ResourceId::parse_typed(nsg_id, "Microsoft.Network", &["networkSecurityGroups"])?;
        let what = format!("list rules of {nsg_id}");
        let deadline = Instant::now() + self.options.operation_deadline;
        self.with_retries(&what, deadline, |_| {
            self.timed(&what, deadline, self.list_once(&nsg))
        })
        .await
    }

    async fn put_rule(&self, nsg_id: &str, rule: &NsgRule) -> Result<(), AzureError> {
        let nsg = ResourceId::parse_typed(nsg_id, "Microsoft.Network", &["networkSecurityGroups"])?;
        let ctx = LogCtx {
            op: "put_rule",
            nsg: nsg_id,
            rule: &rule.name,
        };
        self.write(ctx, |deadline, _| self.put_once(&nsg, rule, &ctx, deadline))
            .await
    }

    async fn delete_rule(&self, nsg_id: &str, rule_name: &str) -> Result<(), AzureError> {
        let nsg = ResourceId::parse_typed(nsg_id, "Microsoft.Network", &["networkSecurityGroups"])?;
        let ctx = LogCtx {
            op: "delete_rule",
            nsg: nsg_id,
            rule: rule_name,
        };
        self.write(ctx, |deadline, _| {
            self.delete_once(&nsg, rule_name, &ctx, deadline)
        })
        .await
    }

    async fn read_nsg(&self, nsg_id: &str) -> Result<NsgSnapshot, AzureError> {
        let nsg = ResourceId::parse_typed(nsg_id, "Microsoft.Network", &["networkSecurityGroups"])?;
        let what = format!("read NSG {nsg_id}");
        let deadline = Instant::now() + self.options.operation_deadline;
        self.with_retries(&what, deadline, |_| {
            self.timed(&what, deadline, self.read_nsg_once(nsg_id, &nsg))
        })
        .await
    }

    async fn list_nsgs_page(
        &self,
        subscription: &str,
        resource_group: &str,
        next: Option<&str>,
    ) -> Result<NsgPage, AzureError> {
        let url = match next {
            // The link carries our bearer token's audience: only ever on ARM's own origin.
            Some(link) => {
                let url = Url::parse(link).map_err(|e| {
                    AzureError::InvalidResponse(format!("nextLink {link} is not a URL: {e}"))
                })?;
                self.check_origin(&url)?;
                url
            }
            None => self.network_url(subscription, resource_group, &["networkSecurityGroups"])?,
        };
        let what = format!("list the NSGs of {subscription}/{resource_group}");
        let deadline = Instant::now() + self.options.operation_deadline;
        self.with_retries(&what, deadline, |_| {
            self.timed(&what, deadline, self.list_nsgs_page_once(url.clone()))
        })
        .await
    }

    async fn reserve_budget(
        &self,
        nsg_id: &str,
        kind: BudgetKind,
        urgent: bool,
        bound: Duration,
    ) -> Option<Reserved> {
        let admission = self
            .pacer
            .admit_place(kind, nsg_id, urgent, std::time::Instant::now());
        let waited = wait_paced(&self.pacer, &self.stats, &admission, bound).await;
        Some(Reserved { admission, waited })
    }

    fn budget_left(&self, nsg_id: &str, kind: BudgetKind) -> Option<BudgetLeft> {
        self.pacer.left_for(nsg_id, kind, std::time::Instant::now())
    }

    async fn put_nsg(
        &self,
        snapshot: NsgSnapshot,
        deletes: &[String],
        puts: &[NsgRule],
    ) -> Result<(), AzureError> {
        let nsg = ResourceId::parse_typed(
            &snapshot.nsg_id,
            "Microsoft.Network",
            &["networkSecurityGroups"],
        )?;
        let NsgSnapshot {
            nsg_id,
            etag,
            raw,
            rules,
        } = snapshot;
        drop(rules);
        let body = azure_core::Body::from(nsg_json::put_body(&raw, deletes, puts)?);
        drop(raw);
        // Without an etag, `*` still refuses to recreate an NSG deleted since the read.
        let if_match = etag.as_deref().unwrap_or("*");
        if etag.is_none() {
            warn!(nsg = %nsg_id, "NSG read without an etag; writing it with If-Match: *");
        }
        let summary = format!("{} deletes, {} puts", deletes.len(), puts.len());
        let ctx = LogCtx {
            op: "put_nsg",
            nsg: &nsg_id,
            rule: &summary,
        };
        // A retry after a 429/5xx resends the same If-Match: if the first attempt did land, the
        // etag moved and the retry answers 412, which sends the caller back to a fresh read.
        self.write(ctx, |deadline, _| {
            self.put_nsg_once(&nsg, &body, if_match, &ctx, deadline)
        })
        .await
    }
}

#[derive(Clone, Copy)]
struct LogCtx<'a> {
    op: &'static str,
    nsg: &'a str,
    rule: &'a str,
}

impl LogCtx<'_> {
    fn what(&self) -> String {
        format!("{} {} on {}", self.op, self.rule, self.nsg)
    }
}

/// What a write's first response leaves to poll, if anything.
fn next_poll(
    kind: WriteKind,
    first: Collected,
    resource_url: Url,
) -> Result<Option<(Poll, Url)>, AzureError> {
    if let Some(url) = header_url(&first.headers, "azure-asyncoperation")? {
        return Ok(Some((Poll::AsyncOperation, url)));
    }
    if first.status == StatusCode::Accepted
        && let Some(url) = header_url(&first.headers, "location")?
    {
        return Ok(Some((Poll::Location, url)));
    }
    match kind {
        // Accepted without a URL: watch the resource until it is gone.
        WriteKind::Delete if first.status == StatusCode::Accepted => {
            Ok(Some((Poll::ResourceGone, resource_url)))
        }
        WriteKind::Delete => Ok(None),
        WriteKind::Put => match provisioning_state(&first.body).as_deref() {
            None | Some("Succeeded") => Ok(None),
            Some(s @ ("Failed" | "Canceled" | "Cancelled")) => {
                Err(operation_failed(s, &first.body))
            }
            Some(_) => Ok(Some((Poll::ResourceState, resource_url))),
        },
    }
}

#[derive(Clone, Copy, Debug)]
enum Poll {
    /// GET the `Azure-AsyncOperation` URL until its `status` is terminal.
    AsyncOperation,
    /// GET the `Location` URL until it stops answering 202.
    Location,
    /// GET the resource until its `provisioningState` is terminal.
    ResourceState,
    /// GET the resource until it answers 404.
    ResourceGone,
}

async fn collect(rsp: azure_core::Response) -> Result<Collected, AzureError> {
    let (status, headers, body) = rsp.deconstruct();
    let body = body.collect().await.map_err(|e| {
        AzureError::Transport(format!("reading response body: {}", error_chain(&e)))
    })?;
    Ok(Collected {
        status,
        headers,
        body,
    })
}

fn header_url(headers: &Headers, name: &'static str) -> Result<Option<Url>, AzureError> {
    match headers.get_optional_str(&HeaderName::from_static(name)) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => Url::parse(v.trim())
            .map(Some)
            .map_err(|e| AzureError::InvalidResponse(format!("bad {name} header {v:?}: {e}"))),
    }
}

/// `status` of an Azure-AsyncOperation body.
fn operation_status(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("status")?.as_str().map(str::to_string)
}

/// `properties.provisioningState` of a resource body.
fn provisioning_state(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("properties")?
        .get("provisioningState")?
        .as_str()
        .map(str::to_string)
}

fn operation_failed(status: &str, body: &[u8]) -> AzureError {
    let parsed = super::error::ArmError::parse(body).unwrap_or_default();
    let code = parsed.code.unwrap_or_else(|| "OperationFailed".into());
    let message = parsed.message.unwrap_or_default();
    AzureError::OperationFailed {
        status: status.to_string(),
        code,
        message,
    }
}

/// +-20% jitter, so that clients backing off together do not retry together.
fn jitter(d: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let factor = 0.8 + (r % 401) as f64 / 1000.0;
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operation_bodies() {
        assert_eq!(
            operation_status(br#"{"status":"InProgress"}"#).as_deref(),
            Some("InProgress")
        );
        assert_eq!(operation_status(b"{}"), None);
        assert_eq!(
            provisioning_state(br#"{"properties":{"provisioningState":"Updating"}}"#).as_deref(),
            Some("Updating")
        );
        let e = operation_failed(
            "Failed",
            br#"{"status":"Failed","error":{"code":"InternalServerError","message":"boom"}}"#,
        );
        assert!(
            matches!(&e, AzureError::OperationFailed { code, .. } if code == "InternalServerError")
        );
    }

    #[test]
    fn jitter_stays_in_band() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(800) && d <= Duration::from_millis(1200));
        }
    }
}
