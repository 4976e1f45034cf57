//! An Azure Resource Manager emulator for Portcullis tests.
//!
//! It speaks ARM's wire protocol (api-version 2024-03-01) over plain HTTP on loopback for the
//! resources Portcullis uses: network security groups and their security rules, network
//! interfaces and subnets; plus the Entra ID token endpoint and a managed identity endpoint,
//! so the real `azure_mgmt_network` client and `azure_identity` credentials can drive it.
//! An admin API under `/_emulator/` controls faults, records requests and exposes counters.
//!
//! ```no_run
//! # async fn demo() -> Result<(), portcullis_azure_emulator::EmulatorError> {
//! use portcullis_azure_emulator::{EmulatorConfig, Fixture, spawn};
//! let fixture = Fixture::from_file(std::path::Path::new("emulator/fixtures/demo.yaml"))?;
//! let emu = spawn(EmulatorConfig { fixture, ..Default::default() }, "127.0.0.1:0".parse().unwrap()).await?;
//! println!("ARM endpoint: {}", emu.base_url());
//! let stats = emu.admin().stats().await?;
//! assert_eq!(stats.writes, 0);
//! emu.shutdown().await;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod admin;
mod arm;
mod auth;
mod client;
mod error;
mod faults;
mod fixture;
mod locks;
mod model;
mod scenario;
mod server;
mod state;
mod throttle;
pub mod validate;

pub use client::AdminClient;
pub use error::{ArmError, EmulatorError};
pub use faults::{Faults, NsgFault};
pub use fixture::{
    Fixture, FixtureIpConfig, FixtureNic, FixtureNsg, FixtureResourceGroup, FixtureSubnet,
    FixtureSubscription, FixtureVm, FixtureVnet,
};
pub use locks::{Lock, LockLevel};
pub use model::RuleProps;
pub use state::{ConfigUpdate, RequestRecord, Stats};

/// The api-version the emulator serves for `Microsoft.Network`.
pub const API_VERSION: &str = "2024-03-01";

/// The api-version the emulator serves for `Microsoft.Compute` (VM GET), as in the
/// `ComputeRP/stable/2024-07-01` spec.
pub const COMPUTE_API_VERSION: &str = "2024-07-01";

/// How to start an emulator.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The starting world (ignored when `state_file` exists).
    pub fixture: Fixture,
    /// How long async operations (rule/NSG PUT and DELETE) stay `InProgress`.
    pub async_delay: Duration,
    /// `Retry-After` seconds on async operation responses and per-NSG 429s.
    pub retry_after_secs: u64,
    /// Page size of list operations (`nextLink` paging).
    pub page_size: usize,
    /// Subscription write (PUT, PATCH) throttling: bucket size.
    pub write_burst: u32,
    /// Subscription write throttling: tokens added per second.
    pub write_refill_per_sec: f64,
    /// Subscription delete throttling (its own bucket, as in ARM): bucket size.
    pub delete_burst: u32,
    /// Subscription delete throttling: tokens added per second.
    pub delete_refill_per_sec: f64,
    /// Subscription read (GET, operation polls included) throttling: bucket size.
    pub read_burst: u32,
    /// Subscription read throttling: tokens added per second.
    pub read_refill_per_sec: f64,
    /// Load the world from here at start if present; save it after each change.
    pub state_file: Option<PathBuf>,
    /// Restrict the token endpoint to this (client id, client secret); `None` accepts any.
    pub credentials: Option<(String, String)>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            fixture: Fixture::default(),
            async_delay: Duration::from_millis(20),
            retry_after_secs: 0,
            page_size: 100,
            write_burst: 200,
            write_refill_per_sec: 10.0,
            delete_burst: 200,
            delete_refill_per_sec: 10.0,
            read_burst: 250,
            read_refill_per_sec: 25.0,
            state_file: None,
            credentials: None,
        }
    }
}

/// State shared by every handler.
pub(crate) struct Shared {
    pub inner: parking_lot::Mutex<state::Inner>,
    /// `http://ip:port` the emulator listens on (used when a request has no Host header).
    pub base_url: String,
}

pub(crate) type App = Arc<Shared>;

/// A running emulator. Dropping it stops the server too (without waiting).
pub struct RunningEmulator {
    base_url: String,
    addr: SocketAddr,
    shutdown_tx: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl RunningEmulator {
    /// `http://127.0.0.1:PORT`, no trailing slash: the ARM endpoint and the authority host.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// The bound socket address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client for the admin API.
    pub fn admin(&self) -> AdminClient {
        AdminClient::new(&self.base_url)
    }

    /// Stops accepting connections, drains open ones (at most 5 s) and waits for the server.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take()
            && let Err(e) = handle.await
        {
            tracing::warn!(error = %e, "emulator server task failed");
        }
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
    }
}

/// Builds the world (from the state file when present, else the fixture) and the router.
fn build(config: &EmulatorConfig, base_url: String) -> Result<App, EmulatorError> {
    let world = match &config.state_file {
        Some(path) => match state::load_state_file(path)? {
            Some(world) => {
                tracing::info!(path = %path.display(), "loaded state file");
                world
            }
            None => state::world_from_fixture(&config.fixture)?,
        },
        None => state::world_from_fixture(&config.fixture)?,
    };
    let runtime = state::RuntimeConfig {
        async_delay: config.async_delay,
        retry_after_secs: config.retry_after_secs,
        page_size: config.page_size.max(1),
        write_burst: config.write_burst,
        write_refill_per_sec: config.write_refill_per_sec,
        delete_burst: config.delete_burst,
        delete_refill_per_sec: config.delete_refill_per_sec,
        read_burst: config.read_burst,
        read_refill_per_sec: config.read_refill_per_sec,
    };
    let inner = state::Inner::new(
        world,
        runtime,
        config.credentials.clone(),
        config.state_file.clone(),
    );
    inner.save()?;
    Ok(Arc::new(Shared {
        inner: parking_lot::Mutex::new(inner),
        base_url,
    }))
}

/// The full router: token endpoints, admin API, and ARM as the fallback.
fn router(app: App) -> Router {
    Router::new()
        .merge(auth::routes())
        .merge(admin::routes())
        .merge(scenario::routes())
        .fallback(arm::handle)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            arm::record,
        ))
        .with_state(app)
}

/// Starts an emulator on `listen` (use `127.0.0.1:0` for an ephemeral port).
pub async fn spawn(
    config: EmulatorConfig,
    listen: SocketAddr,
) -> Result<RunningEmulator, EmulatorError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| EmulatorError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| EmulatorError::Bind {
            addr: listen,
            source,
        })?;
    let shown = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let base_url = format!("http://{shown}");
    let app = build(&config, base_url.clone())?;
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(server::serve(listener, router(app), async move {
        let _ = rx.await;
    }));
    tracing::info!(%base_url, "emulator started");
    Ok(RunningEmulator {
        base_url,
        addr,
        shutdown_tx: Some(tx),
        handle: Some(handle),
    })
}
