//! The reconcile loops: a thin shell around the pure planner. Two kube-runtime `Controller`s
//! (JitPolicy, AccessGrant) share one view of the cluster and one NSG syncer.

pub mod audit;
pub mod context;
pub mod decode;
pub mod error;
pub mod events;
pub mod grant;
pub mod http;
pub mod inventory;
pub mod kube_client;
pub mod leader;
pub mod nsg;
pub mod policy;
pub mod quarantine;
pub mod resolve;
pub mod rounds;
pub mod startup;
pub mod status;
pub mod telemetry;
pub mod world;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{Instrument, info, warn};

pub use error::Error;

use crate::api::{AccessApproval, AccessGrant, JitPolicy, JitScope};
use crate::azure::NetworkApi;
use crate::locks::lock;
use crate::plan::{Bands, Naming};
use context::{Context, Ctx};
use decode::OnUndecodable;
use leader::{LeaderElector, LeaseConfig};
use nsg::NsgSyncer;
use telemetry::Telemetry;
use world::{GrantIndex, UndecodableMarks, WorldGeneration, WorldView};

#[derive(Clone, Debug)]
pub struct Settings {
    pub bands: Bands,
    /// This installation's id in rule names, and whether it adopts legacy-named rules.
    pub naming: Naming,
    /// How often every object is reconciled even when nothing changed: the bound on how long
    /// drift in Azure can stand.
    pub resync: Duration,
    /// Reconciles in flight per controller.
    pub concurrency: u16,
    /// Watch only these namespaces; empty watches all.
    pub namespaces: Vec<String>,
    /// Run only while holding this Lease; `None` runs unconditionally (a single replica).
    pub leader_election: Option<LeaseConfig>,
    /// Namespace of the inventory ConfigMap (the operator's own: the binary passes
    /// `--inventory-namespace` or `POD_NAMESPACE`); `None` uses the first watched namespace,
    /// else `default`.
    pub inventory_namespace: Option<String>,
    /// Name of the inventory ConfigMap.
    pub inventory_name: String,
    /// Opt-in: set `flushConnection` on every NSG written to, so closing a rule also cuts the
    /// connections it allowed (see SECURITY.md for the cost).
    pub flush_connections: bool,
    /// A sync with several changes for an NSG makes them in one conditional write of the whole
    /// NSG instead of one write per rule (the default). Azure gives every rule of the NSG a new
    /// etag on such a write, other people's included; `false` writes rule by rule.
    pub one_write_per_nsg: bool,
    /// The key that signs the admission webhook's stamps (who created a grant or an approval).
    /// `None`: no stamp can be verified, so no grant is attributed to anyone, and a policy that
    /// restricts requesters or needs approval denies every grant.
    pub stamp_key: Option<crate::admission::StampKey>,
    /// Where audit records go: a file of their own (one JSON object per line), or `None` for the
    /// log under the target `portcullis::audit`.
    pub audit_log: Option<std::path::PathBuf>,
    /// Open mode: a namespace that no JitScope names may name any VM in its policies. Off (the
    /// default), such a namespace's policies are refused (`OutOfScope`).
    pub allow_unscoped_namespaces: bool,
    /// Send notifications to the targets that Secrets labelled
    /// `portcullis.dev/notification-target` describe (needs read access to Secrets in the
    /// watched namespaces). Off: no Secret is read and nothing is sent.
    pub notifications: bool,
    /// Delete a grant this long after it finished (Expired, Revoked or Denied, with nothing
    /// left open), like a Job's `ttlSecondsAfterFinished`; its audit records keep its history.
    /// `None` (the default) never deletes one: the operator removes no user object unasked.
    pub finished_grant_ttl: Option<Duration>,
}

impl Settings {
    /// Where the inventory ConfigMap lives.
    pub fn inventory_namespace(&self) -> String {
        self.inventory_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| self.namespaces.first().cloned())
            .unwrap_or_else(|| "default".to_string())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bands: Bands::default(),
            naming: Naming::default(),
            resync: Duration::from_secs(300),
            concurrency: 256,
            namespaces: Vec::new(),
            leader_election: None,
            inventory_namespace: None,
            inventory_name: inventory::DEFAULT_NAME.to_string(),
            flush_connections: false,
            one_write_per_nsg: true,
            stamp_key: None,
            audit_log: None,
            allow_unscoped_namespaces: false,
            notifications: false,
            finished_grant_ttl: None,
        }
    }
}

/// How long to wait before retrying an object whose reconcile failed `attempt` times in a row.
/// A transient Azure failure (429, 5xx, a dropped connection) is retried soon, at most 1 s
/// apart, or when Azure's `Retry-After` says: a lapsed grant must close soon after Azure answers
/// again. A failure that retrying will not cure soon (403, 400, a lock, a bad object) backs off
/// exponentially to 5 minutes, per object, so it neither hammers Azure nor starves the rest.
pub fn retry_delay(error: &Error, attempt: u32) -> Duration {
    let exponential = |base: Duration, cap: Duration| {
        let doublings = attempt.saturating_sub(1).min(20);
        base.saturating_mul(1u32 << doublings).min(cap)
    };
    match error.azure() {
        Some(e) if e.is_retryable() => e.retry_after().map_or_else(
            || exponential(Duration::from_millis(500), Duration::from_secs(1)),
            |asked| asked.min(Duration::from_secs(60)),
        ),
        Some(_) => exponential(Duration::from_secs(1), Duration::from_secs(300)),
        // Kubernetes errors are mostly the API server being away for a moment: once it is back,
        // a lapsed grant must close and a new one open within seconds.
        None => exponential(Duration::from_millis(500), Duration::from_secs(5)),
    }
}

/// Retries of a failed watch: soon, and at most 2 s apart. kube-runtime's default grows to 30 s,
/// so a grant created right after the API server came back waited up to half a minute. The
/// controllers' trigger streams use it too: kube-runtime backs off the merged triggers once more
/// on every error, with that same default, and after an API-server restart the watches' 410s
/// (too old resource version) had paused every trigger of a controller for 20 to 60 s.
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(2);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (now * 2).min(Self::MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

fn error_policy<K: kube::Resource>(obj: Arc<K>, error: &Error, ctx: Ctx) -> Action {
    use crate::azure::AzureError as A;
    let azure = error.azure();
    if azure.is_some_and(|e| {
        matches!(
            e,
            A::Transport(_) | A::Unauthorized { .. } | A::Credential(_) | A::Timeout { .. }
        )
    }) {
        ctx.telemetry.set_azure_reachable(false);
    }
    let attempt = ctx.failed(&failure_key(obj.as_ref()));
    let delay = retry_delay(error, attempt);
    warn!(error = %error, category = error.category(), attempt, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
}

/// The key under which an object's consecutive failures are counted.
fn failure_key<K: kube::Resource>(obj: &K) -> String {
    let meta = obj.meta();
    meta.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        )
    })
}

/// The shape both reconcilers share: a span naming the object, a wait for the caches, the
/// finalizer (`handle` gets Apply or Cleanup), and an Azure failure reported in the object's
/// Ready condition.
async fn reconcile_with_finalizer<K, F, Fut>(
    kind: &'static str,
    finalizer_name: &'static str,
    obj: Arc<K>,
    ctx: Ctx,
    handle: F,
) -> Result<Action, Error>
where
    K: status::WithConditions
        + serde::Serialize
        + kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    F: FnOnce(kube::runtime::finalizer::Event<K>, Api<K>, Ctx) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    let ns = obj
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = obj.name_any();
    let span = tracing::info_span!("reconcile", kind, namespace = %ns, name = %name);
    async move {
        tracing::debug!("reconcile started");
        if !ctx.world.wait_ready().await {
            tracing::debug!("shutting down before the caches synced: nothing done");
            return Ok(Action::await_change());
        }
        tracing::debug!("world ready");
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
        let result = match with_finalizer(&api, finalizer_name, obj).await {
            Ok(obj) => {
                kube::runtime::finalizer::finalizer(&api, finalizer_name, obj, |event| {
                    handle(event, api.clone(), ctx.clone())
                })
                .await
            }
            Err(e) => Err(kube::runtime::finalizer::Error::AddFinalizer(e)),
        };
        let result = match result {
            Err(e) if behind_our_own_finalizer_patch(&e) => {
                tracing::debug!("the watch has not yet shown our finalizer patch: wait for it");
                Ok(Action::await_change())
            }
            other => other.map_err(|e| Error::Finalizer(Box::new(e))),
        };
        if let Err(e) = &result {
            status::report_azure_failure(&api, &name, e).await;
        }
        result
    }
    .instrument(span)
    .await
}

/// The object with our finalizer added, if a live object lacks it. kube-runtime's own step adds
/// it and waits for the watch to bring the object back, one round trip through the API server
/// per new object before anything else happens; the patch's answer is already that object.
/// The same JSON patch (a `test` of the list seen, so a concurrent edit fails rather than
/// doubling the entry).
async fn with_finalizer<K>(
    api: &Api<K>,
    finalizer_name: &str,
    obj: Arc<K>,
) -> Result<Arc<K>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let has_it = obj.finalizers().iter().any(|f| f == finalizer_name);
    if has_it || obj.meta().deletion_timestamp.is_some() {
        return Ok(obj);
    }
    let seen = obj.finalizers();
    let ops = if seen.is_empty() {
        serde_json::json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [finalizer_name] },
        ])
    } else {
        serde_json::json!([
            { "op": "test", "path": "/metadata/finalizers", "value": seen },
            { "op": "add", "path": "/metadata/finalizers/-", "value": finalizer_name },
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
    let patched = api
        .patch(
            &obj.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Json::<()>(patch),
        )
        .await?;
    Ok(Arc::new(patched))
}

/// kube-runtime patches the finalizers with a JSON-patch `test` of the list the reconcile saw.
/// When the watch lags behind our own last patch, that copy is stale and the API server answers
/// 422 with no cause: the change is already made (or someone else's is), and the newer copy's
/// event brings the object back. Not a failure: no backoff, nothing in status. An object the
/// server finds invalid is also a 422, but names its causes: that stays an error.
fn behind_our_own_finalizer_patch(e: &kube::runtime::finalizer::Error<Error>) -> bool {
    use kube::runtime::finalizer::Error as F;
    let (F::AddFinalizer(kube::Error::Api(status)) | F::RemoveFinalizer(kube::Error::Api(status))) =
        e
    else {
        return false;
    };
    status.code == 422 && status.details.as_ref().is_none_or(|d| d.causes.is_empty())
}

/// Runs one reconcile, counting it and its duration by controller and result. A success
/// means Azure (if it was called) answered, and clears the object's failure count.
async fn measured<K: kube::Resource>(
    controller: &'static str,
    obj: Arc<K>,
    ctx: Ctx,
    reconcile: impl Future<Output = Result<Action, Error>>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile.await;
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.category(),
    };
    ctx.telemetry
        .reconciled(controller, label, started.elapsed().as_secs_f64());
    let key = failure_key(obj.as_ref());
    // A reconcile that only asked for NSG rounds has not reached Azure yet: its failure count
    // (the backoff of a grant whose NSG keeps refusing) stands until the rounds answer.
    if result.is_ok() && !ctx.rounds.is_waiting(&key) {
        ctx.telemetry.set_azure_reachable(true);
        ctx.succeeded(&key);
    }
    result
}

async fn log_stream_error<T, E: std::fmt::Display>(item: Result<T, E>) {
    if let Err(e) = item {
        warn!(error = %e, "controller stream error");
    }
}

/// A controller's stream error, logged. A grant woken by its NSG rounds after it was deleted
/// is not in the store any more: expected, not worth a warning.
async fn log_controller_error<T, E: std::fmt::Display, W: std::fmt::Display>(
    item: Result<T, kube::runtime::controller::Error<E, W>>,
) {
    match item {
        Err(kube::runtime::controller::Error::ObjectNotFound(gone)) => {
            tracing::debug!(object = %gone, "woken after it was deleted: nothing to do");
        }
        other => log_stream_error(other).await,
    }
}

/// Runs the operator until `shutdown` resolves: waits for leadership when configured, closes
/// lapsed grants, then runs both controllers. Returns `Error::LeadershipLost` if the Lease is
/// lost; the process should then exit and start over as a standby. When the controllers stop
/// (shutdown), the Lease is released so a standby takes over at once.
pub async fn run(
    client: Client,
    azure: Arc<dyn NetworkApi>,
    settings: Settings,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let shutdown = shutdown.shared();
    if let Some(cfg) = &settings.leader_election {
        cfg.validate()?;
    }
    inventory::validate_name(&settings.inventory_name)?;
    let audit = match &settings.audit_log {
        None => audit::AuditLog::to_log(),
        Some(path) => audit::AuditLog::to_file(path)
            .map_err(|e| Error::Config(format!("audit log {}: {e}", path.display())))?,
    };
    let elector = settings
        .leader_election
        .clone()
        .map(|cfg| LeaderElector::new(client.clone(), cfg));
    let mut acquired_at = None;
    if let Some(elector) = &elector {
        telemetry.set_leader(false);
        tokio::select! {
            acquired = elector.acquire() => acquired_at = Some(acquired?),
            _ = shutdown.clone() => return Ok(()),
        }
    }
    telemetry.set_leader(true);
    let nsgs = NsgSyncer::new(azure, settings.bands.clone(), settings.naming.clone())
        .with_flush_connections(settings.flush_connections)
        .with_one_write_per_nsg(settings.one_write_per_nsg)
        .with_telemetry(telemetry.clone())
        // The sweep reads every inventoried NSG once per resync (a list per resource group):
        // what it found in line is trusted a little longer than that, so the objects' own
        // periodic syncs between two sweeps do not read the NSG again.
        .with_read_sharing(settings.resync + settings.resync / 2);
    let controllers = run_controllers(
        client,
        nsgs,
        settings,
        audit,
        telemetry.clone(),
        shutdown.clone(),
    );
    let (Some(elector), Some(acquired_at)) = (elector, acquired_at) else {
        return controllers.await;
    };
    // Lose the lease -> stop everything. `run_controllers` stops writing first (see below).
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let lost = async {
        let why = elector.hold(acquired_at).await;
        let _ = lost_tx.send(());
        why
    };
    let controllers = run_controllers_until(controllers, lost_rx);
    let result = tokio::select! {
        result = controllers => result,
        why = lost => {
            telemetry.set_leader(false);
            warn!(error = %why, "leadership lost: Azure writes stopped");
            return Err(why);
        }
    };
    // The controllers have returned, so no write is in flight or can start: hand over now
    // rather than make a standby wait out the lease.
    telemetry.set_leader(false);
    if let Err(e) = elector.release().await {
        warn!(error = %e, "could not release the lease; a standby takes over when it expires");
    }
    result
}

async fn run_controllers_until(
    controllers: impl Future<Output = Result<(), Error>>,
    lost: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), Error> {
    tokio::select! {
        r = controllers => r,
        _ = lost => std::future::pending().await,
    }
}

async fn run_controllers(
    client: Client,
    nsgs: NsgSyncer,
    settings: Settings,
    audit: audit::AuditLog,
    telemetry: Arc<Telemetry>,
    shutdown: futures::future::Shared<impl Future<Output = ()> + Send + 'static>,
) -> Result<(), Error> {
    // One scope per watched namespace (or one cluster-wide scope).
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    // Every NSG is recorded before its first write, from start-up on.
    let inventory = Arc::new(inventory::Inventory::new(
        client.clone(),
        &settings.inventory_namespace(),
        &settings.inventory_name,
    ));
    let nsgs = nsgs.with_inventory(inventory.clone());
    if settings.allow_unscoped_namespaces {
        warn!(
            "--allow-unscoped-namespaces is on: the policies of a namespace that no JitScope names may name ANY VM the operator's Azure identity reaches"
        );
    }
    startup::close_lapsed_grants(
        &client,
        &scopes,
        &nsgs,
        &telemetry,
        settings.allow_unscoped_namespaces,
    )
    .await;

    // A pair of controllers per scope; one world view over all their stores, since an NSG can
    // carry rules of objects from several namespaces. Every watch decodes object by object.
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    // Advanced after every policy, grant or JitScope event has reached its store, and whenever
    // an object is marked undecodable or readable again.
    let undecodable = UndecodableMarks::default();
    let generation = undecodable.generation().clone();
    let seen_tx = decode::Reports::new(seen_tx, undecodable.clone());
    // The most recent list semantic (not `any`): after an API server restart an `any` list can
    // come from a stale watch cache whose resourceVersion the new watch refuses with 410, again
    // and again.
    let wc = watcher::Config::default();
    let raw_watch = |api: Api<kube::api::DynamicObject>| {
        watcher(api, wc.clone()).backoff(WatchBackoff::default())
    };
    let mut policy_ctls = Vec::new();
    let mut grant_ctls = Vec::new();
    let (mut policy_stores, mut grant_stores, mut approval_stores) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut grant_indexes = Vec::new();
    // Per scope, where the NSG rounds wake the grants they answered.
    let mut wakes = Vec::new();
    // JitScopes are cluster-scoped: one store, fed by the first policy controller's watch of
    // them (an undecodable scope allows nothing).
    let (scope_store, scope_writer) = reflector::store::<JitScope>();
    let mut scope_writer = Some(scope_writer);
    for ns in &scopes {
        let ns = ns.as_deref();
        let (policies_store, policies_writer) = reflector::store::<JitPolicy>();
        let (grants_store, grants_writer) = reflector::store::<AccessGrant>();
        let grants_index = GrantIndex::default();
        let policies = decode::typed_events::<JitPolicy>(
            raw_watch(decode::raw_api::<JitPolicy>(client.clone(), ns)),
            OnUndecodable::KeepLast,
            seen_tx.clone(),
            policies_store.clone(),
        )
        .reflect(policies_writer)
        .inspect(advancing(&generation))
        .applied_objects();
        let grants = decode::typed_events::<AccessGrant>(
            raw_watch(decode::raw_api::<AccessGrant>(client.clone(), ns)),
            OnUndecodable::Drop,
            seen_tx.clone(),
            grants_store.clone(),
        )
        .reflect(grants_writer)
        .inspect(indexing(&grants_index))
        .inspect(advancing(&generation))
        .applied_objects();
        // A policy change re-plans every grant made under it (a second watch, decoded alike).
        let policy_changes = decode::typed_events::<JitPolicy>(
            raw_watch(decode::raw_api::<JitPolicy>(client.clone(), ns)),
            OnUndecodable::KeepLast,
            seen_tx.clone(),
            policies_store.clone(),
        )
        .applied_objects();
        // A decision wakes the grant it names.
        let (approvals_store, approvals_writer) = reflector::store::<AccessApproval>();
        let approvals = decode::typed_events::<AccessApproval>(
            raw_watch(decode::raw_api::<AccessApproval>(client.clone(), ns)),
            OnUndecodable::Drop,
            seen_tx.clone(),
            approvals_store.clone(),
        )
        .reflect(approvals_writer)
        .applied_objects();
        let grants_of = grants_store.clone();
        let (wake, woken) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<AccessGrant>>();
        wakes.push((ns.map(str::to_string), wake));
        let woken = futures::stream::unfold(woken, |mut woken| async move {
            woken.recv().await.map(|grant| (grant, woken))
        });
        let grant_ctl = Controller::for_stream(grants, grants_store.clone())
            .trigger_backoff(WatchBackoff::default())
            .reconcile_on(woken)
            .watches_stream(approvals, |approval: AccessApproval| {
                let ns = approval.namespace()?;
                Some(ObjectRef::<AccessGrant>::new(&approval.spec.grant_ref.name).within(&ns))
            })
            .watches_stream(policy_changes, move |policy: JitPolicy| {
                let ns = policy.namespace();
                let name = policy.name_any();
                grants_of
                    .state()
                    .into_iter()
                    .filter(|g| g.namespace() == ns && g.policy_name() == name)
                    .map(|g| ObjectRef::from_obj(g.as_ref()))
                    .collect::<Vec<_>>()
            });
        // A JitScope change re-reconciles the policies of the namespaces it names (deleted
        // scopes included: `touched_objects`).
        let jit_scopes = decode::typed_events::<JitScope>(
            raw_watch(decode::raw_api::<JitScope>(client.clone(), None)),
            OnUndecodable::Drop,
            seen_tx.clone(),
            scope_store.clone(),
        );
        let jit_scopes = match scope_writer.take() {
            Some(writer) => jit_scopes
                .reflect(writer)
                .inspect(advancing(&generation))
                .touched_objects()
                .boxed(),
            None => jit_scopes.touched_objects().boxed(),
        };
        let policies_of = policies_store.clone();
        // The namespaces each scope named when last seen: an edit that drops a namespace
        // concerns that namespace too.
        let named_before =
            std::sync::Mutex::new(std::collections::HashMap::<String, Vec<String>>::new());
        policy_ctls.push(
            Controller::for_stream(policies, policies_store.clone())
                .trigger_backoff(WatchBackoff::default())
                .watches_stream(jit_scopes, move |scope: JitScope| {
                    let mut named = scope.spec.namespaces.clone();
                    if let Some(uid) = scope.uid() {
                        let mut before = lock(&named_before);
                        if let Some(old) = before.insert(uid, scope.spec.namespaces.clone()) {
                            named.extend(old);
                        }
                    }
                    policies_of
                        .state()
                        .into_iter()
                        .filter(|p| p.namespace().is_some_and(|ns| named.contains(&ns)))
                        .map(|p| ObjectRef::from_obj(p.as_ref()))
                        .collect::<Vec<_>>()
                }),
        );
        grant_ctls.push(grant_ctl);
        policy_stores.push(policies_store);
        grant_stores.push(grants_store);
        grant_indexes.push(grants_index);
        approval_stores.push(approvals_store);
    }
    drop(seen_tx);
    let (audit, notifications) = if settings.notifications {
        let (queue, rx) =
            crate::notify::sender::queue(crate::notify::sender::QUEUE_CAPACITY, telemetry.clone());
        let (stores, watches) = notification_target_watches(&client, &scopes);
        (audit.with_notifications(queue), Some((rx, stores, watches)))
    } else {
        (audit, None)
    };
    let world = WorldView::new(policy_stores, grant_stores, approval_stores)
        .with_grant_indexes(grant_indexes)
        .with_scopes(scope_store, settings.allow_unscoped_namespaces)
        .with_undecodable_marks(undecodable);
    let nsgs = nsgs.with_world_generation(generation);
    let wake: rounds::Wake = Box::new(move |grant: ObjectRef<AccessGrant>| {
        let scope = wakes
            .iter()
            .find(|(ns, _)| ns.is_none() || ns.as_deref() == grant.namespace.as_deref());
        if let Some((_, wake)) = scope {
            // A closed channel: that controller has stopped, so has everything.
            let _ = wake.send(grant);
        }
    });
    let rounds =
        rounds::Rounds::new(rounds::NSGS_AT_ONCE, Some(wake)).with_telemetry(telemetry.clone());

    let ctx: Ctx = Arc::new(
        Context::new(
            client,
            nsgs,
            world,
            settings.resync,
            telemetry,
            settings.stamp_key.clone(),
            audit,
        )
        .with_finished_grant_ttl(settings.finished_grant_ttl)
        .with_rounds(rounds),
    );
    let reporter = tokio::spawn(quarantine::run(seen_rx, ctx.clone()));
    let (dispatcher, target_watches) = match notifications {
        None => (None, futures::future::pending().boxed()),
        Some((rx, stores, watches)) => {
            // A weak reference: the dispatcher must not keep the context (and its queue) alive.
            let weak = Arc::downgrade(&ctx);
            let policies: crate::notify::sender::PolicyTargets = Arc::new(move |ns, name| {
                let ctx = weak.upgrade()?;
                let world = ctx.world.snapshot();
                let policy = world.policy(ns, name)?;
                Some(policy.spec.notifications.clone().unwrap_or_default())
            });
            let dispatcher = crate::notify::Dispatcher::new(
                ctx.client.clone(),
                stores,
                policies,
                ctx.telemetry.clone(),
                crate::notify::RetryPolicy::default(),
            )
            .map_err(|e| Error::Config(e.to_string()))?;
            info!("notifications on");
            let watches = async {
                futures::future::join_all(watches).await;
                std::future::pending::<()>().await
            };
            (Some(tokio::spawn(dispatcher.run(rx))), watches.boxed())
        }
    };
    let config = kube::runtime::controller::Config::default().concurrency(settings.concurrency);
    let policies = policy_ctls.into_iter().map(|ctl| {
        ctl.with_config(config.clone())
            .graceful_shutdown_on(shutdown.clone())
            .run(
                |obj, ctx: Ctx| {
                    measured(
                        "jitpolicy",
                        obj.clone(),
                        ctx.clone(),
                        policy::reconcile(obj, ctx),
                    )
                },
                error_policy,
                ctx.clone(),
            )
            .for_each(log_controller_error)
            .boxed()
    });
    let grants = grant_ctls.into_iter().map(|ctl| {
        ctl.with_config(config.clone())
            .graceful_shutdown_on(shutdown.clone())
            .run(
                |obj, ctx: Ctx| async move {
                    measured(
                        "accessgrant",
                        obj.clone(),
                        ctx.clone(),
                        grant::reconcile(obj, ctx.clone()),
                    )
                    .await
                },
                error_policy,
                ctx.clone(),
            )
            .for_each(log_controller_error)
            .boxed()
    });
    let controllers = futures::future::join_all(policies.chain(grants));
    let synced = async {
        if ctx.world.wait_ready().await {
            ctx.telemetry.set_caches_synced(true);
        }
    };
    let stop_waiting_on_shutdown = async {
        shutdown.clone().await;
        ctx.world.stop();
    };
    // Gauges that must move while no reconcile runs (a grant turning overdue, for one).
    let observe = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let world = ctx.world.snapshot();
            ctx.telemetry.observe_world(&world);
            grant::record_overdue(&ctx, &world, jiff::Timestamp::now());
        }
    };
    // Every inventoried NSG, read by one list per resource group: orphans in NSGs no live
    // object names swept, drift in the others healed; once the caches are synced, then every
    // resync, beside the controllers (never before them).
    let sweeps = inventory::run_sweeps(ctx.clone(), inventory, settings.resync);
    info!("controllers running");
    let stop_writes_on_drop = StopWrites(&ctx);
    tokio::select! {
        _ = async { futures::join!(controllers, synced) } => {}
        _ = observe => {}
        _ = sweeps => {}
        _ = ctx.rounds.run(&ctx.nsgs, &ctx.world) => {}
        _ = target_watches => {}
        _ = async { stop_waiting_on_shutdown.await; std::future::pending::<()>().await } => {}
    }
    drop(stop_writes_on_drop);
    reporter.abort();
    if let Some(dispatcher) = dispatcher {
        dispatcher.abort();
    }
    info!("controllers stopped");
    Ok(())
}

/// A watch stream's `inspect` step that advances `generation` once the event has reached its
/// store (it is placed after `reflect`).
fn advancing<K>(
    generation: &WorldGeneration,
) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
    let generation = generation.clone();
    move |_| generation.advance()
}

/// Keeps a grant index in step with its store: applied after the reflector, before the world's
/// generation moves.
fn indexing(
    index: &GrantIndex,
) -> impl FnMut(&Result<watcher::Event<AccessGrant>, watcher::Error>) + use<> {
    let index = index.clone();
    move |event| {
        if let Ok(event) = event {
            index.apply(event);
        }
    }
}

/// The label-selected watches of notification target Secrets, one per watched scope, and the
/// stores they fill.
fn notification_target_watches(
    client: &Client,
    scopes: &[Option<String>],
) -> (
    Vec<reflector::Store<k8s_openapi::api::core::v1::Secret>>,
    Vec<futures::future::BoxFuture<'static, ()>>,
) {
    use k8s_openapi::api::core::v1::Secret;
    let mut stores = Vec::new();
    let mut watches = Vec::new();
    for ns in scopes {
        let api: Api<Secret> = match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (store, writer) = reflector::store::<Secret>();
        let config = watcher::Config::default().labels(crate::notify::target::SELECTOR);
        let watch = watcher(api, config)
            .backoff(WatchBackoff::default())
            .reflect(writer)
            .applied_objects()
            .for_each(log_stream_error)
            .boxed();
        stores.push(store);
        watches.push(watch);
    }
    (stores, watches)
}

/// Clears the write permission when the controllers stop for any reason, including being
/// dropped mid-flight because the Lease was lost: no Azure write may start after that.
struct StopWrites<'a>(&'a Ctx);

impl Drop for StopWrites<'_> {
    fn drop(&mut self) {
        self.0.nsgs.allow_writes(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::finalizer::Error as F;

    fn api_error(body: serde_json::Value) -> kube::Error {
        match serde_json::from_value(body) {
            Ok(status) => kube::Error::Api(status),
            Err(e) => panic!("a Status body: {e}"),
        }
    }

    #[test]
    fn a_failed_test_of_a_stale_finalizer_list_is_not_an_error_but_an_invalid_object_is() {
        // As the API server answers a JSON-patch `test` that fails (checked against a real one).
        let stale = || {
            api_error(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "the server rejected our request due to an error in our request",
                "reason": "Invalid", "details": {}, "code": 422
            }))
        };
        let invalid = || {
            api_error(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "AccessGrant.portcullis.dev \"g\" is invalid: spec.ports: Required value",
                "reason": "Invalid", "code": 422,
                "details": {"name": "g", "group": "portcullis.dev", "kind": "AccessGrant",
                    "causes": [{"reason": "FieldValueRequired", "message": "Required value",
                        "field": "spec.ports"}]}
            }))
        };
        assert!(behind_our_own_finalizer_patch(&F::AddFinalizer(stale())));
        assert!(behind_our_own_finalizer_patch(&F::RemoveFinalizer(stale())));
        assert!(!behind_our_own_finalizer_patch(&F::AddFinalizer(invalid())));
        let forbidden = api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "forbidden", "reason": "Forbidden", "details": {}, "code": 403
        }));
        assert!(!behind_our_own_finalizer_patch(&F::AddFinalizer(forbidden)));
    }
}
