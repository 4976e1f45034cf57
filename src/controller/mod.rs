//! The reconcile loops: a thin shell around the pure planner. Two kube-runtime `Controller`s
//! (JitPolicy, AccessGrant) share one view of the cluster and one NSG syncer.

pub mod context;
pub mod error;
pub mod grant;
pub mod http;
pub mod leader;
pub mod nsg;
pub mod policy;
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
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tracing::{Instrument, info, warn};

pub use error::Error;

use crate::api::{AccessGrant, JitPolicy};
use crate::azure::NetworkApi;
use crate::plan::Bands;
use context::{Context, Ctx};
use leader::{LeaderElector, LeaseConfig};
use nsg::NsgSyncer;
use telemetry::Telemetry;
use world::WorldView;

#[derive(Clone, Debug)]
pub struct Settings {
    pub bands: Bands,
    /// How often every object is reconciled even when nothing changed: the bound on how long
    /// drift in Azure can stand.
    pub resync: Duration,
    /// Reconciles in flight per controller.
    pub concurrency: u16,
    /// Watch only these namespaces; empty watches all.
    pub namespaces: Vec<String>,
    /// Run only while holding this Lease; `None` runs unconditionally (a single replica).
    pub leader_election: Option<LeaseConfig>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bands: Bands::default(),
            resync: Duration::from_secs(300),
            concurrency: 4,
            namespaces: Vec::new(),
            leader_election: None,
        }
    }
}

/// How long to wait after a failed reconcile: Azure's `Retry-After` when it gave one, else a
/// short fixed delay (a grant past its expiry must close soon after Azure answers again).
fn error_policy<K>(_obj: Arc<K>, error: &Error, ctx: Ctx) -> Action {
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
    let delay = match azure {
        Some(e) => e.retry_after().unwrap_or(Duration::from_millis(500)),
        None => Duration::from_secs(1),
    };
    warn!(error = %error, category = error.category(), retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay.min(Duration::from_secs(30)))
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
        ctx.world.wait_ready().await;
        tracing::debug!("world ready");
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
        let result = kube::runtime::finalizer::finalizer(&api, finalizer_name, obj, |event| {
            handle(event, api.clone(), ctx.clone())
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)));
        if let Err(e) = &result {
            status::report_azure_failure(&api, &name, e).await;
        }
        result
    }
    .instrument(span)
    .await
}

/// Runs one reconcile, counting it and its duration by controller and result. A success
/// means Azure (if it was called) answered.
async fn measured(
    controller: &'static str,
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
    if result.is_ok() {
        ctx.telemetry.set_azure_reachable(true);
    }
    result
}

async fn log_stream_error<T, E: std::fmt::Display>(item: Result<T, E>) {
    if let Err(e) = item {
        warn!(error = %e, "controller stream error");
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
    let nsgs = NsgSyncer::new(azure, settings.bands.clone());
    let controllers = run_controllers(client, nsgs, settings, telemetry.clone(), shutdown.clone());
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
    telemetry: Arc<Telemetry>,
    shutdown: futures::future::Shared<impl Future<Output = ()> + Send + 'static>,
) -> Result<(), Error> {
    // One API scope per watched namespace (or one cluster-wide scope).
    let scopes: Vec<(Api<JitPolicy>, Api<AccessGrant>)> = if settings.namespaces.is_empty() {
        vec![(Api::all(client.clone()), Api::all(client.clone()))]
    } else {
        settings
            .namespaces
            .iter()
            .map(|ns| {
                (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                )
            })
            .collect()
    };
    startup::close_lapsed_grants(&client, &scopes, &nsgs, &telemetry).await?;

    // A pair of controllers per scope; one world view over all their stores, since an NSG can
    // carry rules of objects from several namespaces.
    let wc = watcher::Config::default().any_semantic();
    let mut policy_ctls = Vec::new();
    let mut grant_ctls = Vec::new();
    let (mut policy_stores, mut grant_stores) = (Vec::new(), Vec::new());
    for (policies_api, grants_api) in scopes {
        let policy_ctl = Controller::new(policies_api.clone(), wc.clone());
        let grant_ctl = Controller::new(grants_api, wc.clone());
        let grants_store = grant_ctl.store();
        policy_stores.push(policy_ctl.store());
        grant_stores.push(grant_ctl.store());
        // A policy change re-plans every grant made under it.
        let grant_ctl = grant_ctl.watches(policies_api, wc.clone(), move |policy: JitPolicy| {
            let ns = policy.namespace();
            let name = policy.name_any();
            grants_store
                .state()
                .into_iter()
                .filter(|g| g.namespace() == ns && g.spec.policy_ref.name == name)
                .map(|g| ObjectRef::from_obj(g.as_ref()))
                .collect::<Vec<_>>()
        });
        policy_ctls.push(policy_ctl);
        grant_ctls.push(grant_ctl);
    }
    let world = WorldView::new(policy_stores, grant_stores);

    let ctx: Ctx = Arc::new(Context::new(
        client,
        nsgs,
        world,
        settings.resync,
        telemetry,
    ));
    let config = kube::runtime::controller::Config::default().concurrency(settings.concurrency);
    let policies = policy_ctls.into_iter().map(|ctl| {
        ctl.with_config(config.clone())
            .graceful_shutdown_on(shutdown.clone())
            .run(
                |obj, ctx: Ctx| measured("jitpolicy", ctx.clone(), policy::reconcile(obj, ctx)),
                error_policy,
                ctx.clone(),
            )
            .for_each(log_stream_error)
            .boxed()
    });
    let grants = grant_ctls.into_iter().map(|ctl| {
        ctl.with_config(config.clone())
            .graceful_shutdown_on(shutdown.clone())
            .run(
                |obj, ctx: Ctx| async move {
                    let result = measured(
                        "accessgrant",
                        ctx.clone(),
                        grant::reconcile(obj, ctx.clone()),
                    )
                    .await;
                    ctx.telemetry.observe_world(&ctx.world.snapshot());
                    result
                },
                error_policy,
                ctx.clone(),
            )
            .for_each(log_stream_error)
            .boxed()
    });
    let controllers = futures::future::join_all(policies.chain(grants));
    let synced = async {
        ctx.world.wait_ready().await;
        ctx.telemetry.set_caches_synced(true);
    };
    info!("controllers running");
    let stop_writes_on_drop = StopWrites(&ctx);
    futures::join!(controllers, synced);
    drop(stop_writes_on_drop);
    info!("controllers stopped");
    Ok(())
}

/// Clears the write permission when the controllers stop for any reason, including being
/// dropped mid-flight because the Lease was lost: no Azure write may start after that.
struct StopWrites<'a>(&'a Ctx);

impl Drop for StopWrites<'_> {
    fn drop(&mut self) {
        self.0.nsgs.allow_writes(false);
    }
}
