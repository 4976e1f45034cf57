//! The reconcile loops: a thin shell around the pure planner. Two kube-runtime `Controller`s
//! (JitPolicy, AccessGrant) share one view of the cluster and one NSG syncer.

pub mod context;
pub mod error;
pub mod grant;
pub mod nsg;
pub mod policy;
pub mod startup;
pub mod status;
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
use tracing::{info, warn};

pub use error::Error;

use crate::api::{AccessGrant, JitPolicy};
use crate::azure::NetworkApi;
use crate::plan::Bands;
use context::{Context, Ctx};
use nsg::NsgSyncer;
use world::WorldView;

#[derive(Clone, Debug)]
pub struct Settings {
    pub bands: Bands,
    /// How often every object is reconciled even when nothing changed: the bound on how long
    /// drift in Azure can stand.
    pub resync: Duration,
    /// Reconciles in flight per controller.
    pub concurrency: u16,
    /// Watch one namespace only; `None` watches all.
    pub namespace: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bands: Bands::default(),
            resync: Duration::from_secs(300),
            concurrency: 4,
            namespace: None,
        }
    }
}

/// How long to wait after a failed reconcile: Azure's `Retry-After` when it gave one, else a
/// short fixed delay (a grant past its expiry must close soon after Azure answers again).
fn error_policy<K>(_obj: Arc<K>, error: &Error, _ctx: Ctx) -> Action {
    let delay = match error {
        Error::Azure(e) => e.retry_after().unwrap_or(Duration::from_millis(500)),
        Error::Finalizer(inner) => match inner.as_ref() {
            kube::runtime::finalizer::Error::ApplyFailed(Error::Azure(e))
            | kube::runtime::finalizer::Error::CleanupFailed(Error::Azure(e)) => {
                e.retry_after().unwrap_or(Duration::from_millis(500))
            }
            _ => Duration::from_secs(1),
        },
        _ => Duration::from_secs(1),
    };
    warn!(error = %error, category = error.category(), retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay.min(Duration::from_secs(30)))
}

/// Runs the operator until `shutdown` resolves: first closes lapsed grants, then runs both
/// controllers.
pub async fn run(
    client: Client,
    azure: Arc<dyn NetworkApi>,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let nsgs = NsgSyncer::new(azure, settings.bands.clone());
    let (policies_api, grants_api): (Api<JitPolicy>, Api<AccessGrant>) = match &settings.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    startup::close_lapsed_grants(&client, &policies_api, &grants_api, &nsgs).await?;

    let wc = watcher::Config::default().any_semantic();
    let policy_ctl = Controller::new(policies_api.clone(), wc.clone());
    let grant_ctl = Controller::new(grants_api, wc.clone());
    let grants_store = grant_ctl.store();
    let world = WorldView::new(policy_ctl.store(), grant_ctl.store());
    // A policy change re-plans every grant made under it.
    let grant_ctl = grant_ctl.watches(policies_api, wc, move |policy: JitPolicy| {
        let ns = policy.namespace();
        let name = policy.name_any();
        grants_store
            .state()
            .into_iter()
            .filter(|g| g.namespace() == ns && g.spec.policy_ref.name == name)
            .map(|g| ObjectRef::from_obj(g.as_ref()))
            .collect::<Vec<_>>()
    });

    let ctx: Ctx = Arc::new(Context::new(client, nsgs, world, settings.resync));
    let shutdown = shutdown.shared();
    let config = kube::runtime::controller::Config::default().concurrency(settings.concurrency);
    let policies = policy_ctl
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(policy::reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let grants = grant_ctl
        .with_config(config)
        .graceful_shutdown_on(shutdown)
        .run(grant::reconcile, error_policy, ctx)
        .for_each(|_| async {});
    info!("controllers running");
    futures::join!(policies, grants);
    info!("controllers stopped");
    Ok(())
}
