//! The HTTPS admission server: `POST /mutate` and `POST /validate`, each an AdmissionReview in
//! and an AdmissionReview out. Logs name the request (kind, namespace, name, operation, user),
//! never the object's contents.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower_http::timeout::TimeoutLayer;
use tracing::{Instrument, debug, info, info_span, warn};

use super::WebhookError;
use super::tls::CertStore;
use crate::admission::Admission;
use crate::controller::telemetry::Telemetry;

/// Largest AdmissionReview accepted: an object and its old version, each at most the API
/// server's 3 MiB request limit, plus the envelope.
pub const MAX_BODY_BYTES: usize = 7 * 1024 * 1024;
/// Whole-request deadline (the API server gives up at the webhook's `timeoutSeconds`, 10 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(9);
/// Deadline for the TLS handshake and for reading a request's headers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long in-flight requests may finish after shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Counters of what the server answered (tests observe them; refusals are also logged).
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub mutate: AtomicU64,
    pub validate: AtomicU64,
    pub refused: AtomicU64,
    pub invalid: AtomicU64,
}

impl WebhookStats {
    /// Admission requests answered, both paths.
    pub fn requests(&self) -> u64 {
        self.mutate.load(Ordering::Relaxed) + self.validate.load(Ordering::Relaxed)
    }
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Copy, Debug)]
enum Path {
    Mutate,
    Validate,
}

impl Path {
    fn as_str(self) -> &'static str {
        match self {
            Path::Mutate => "/mutate",
            Path::Validate => "/validate",
        }
    }
}

struct Shared {
    admission: Arc<Admission>,
    stats: Arc<WebhookStats>,
    telemetry: Option<Arc<Telemetry>>,
}

impl Shared {
    fn count(&self, path: Path, result: &'static str) {
        if let Some(t) = &self.telemetry {
            t.webhook_admission(path.as_str(), result);
        }
    }
}

/// A bound webhook server, not yet running: [`WebhookServer::run`] serves until shutdown.
pub struct WebhookServer {
    /// The address it listens on (the actual port when asked for port 0).
    pub addr: SocketAddr,
    pub stats: Arc<WebhookStats>,
    server: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl WebhookServer {
    /// Serves until the shutdown future resolves, then lets in-flight requests finish
    /// (at most [`SHUTDOWN_GRACE`]).
    pub async fn run(self) {
        self.server.await
    }
}

/// Binds `listen` and prepares the server; TLS with whatever certificate `certs` holds at each
/// handshake. Answers are counted in `telemetry` (`portcullis_webhook_admissions_total`) when
/// given.
pub async fn serve(
    listen: SocketAddr,
    admission: Arc<Admission>,
    certs: Arc<CertStore>,
    telemetry: Option<Arc<Telemetry>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<WebhookServer, WebhookError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| WebhookError::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| WebhookError::Listen {
            addr: listen,
            source,
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let stats = Arc::new(WebhookStats::default());
    let app = Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(Arc::new(Shared {
            admission,
            stats: stats.clone(),
            telemetry,
        }));
    info!(%addr, "serving admission webhooks (/mutate, /validate)");
    let server = accept_loop(listener, acceptor, app, shutdown);
    Ok(WebhookServer {
        addr,
        stats,
        server: Box::pin(server),
    })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("webhook requests still in flight at shutdown were cut off");
    }
    info!("webhook server stopped");
}

async fn mutate(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Json<AdmissionReview<DynamicObject>> {
    Json(handle(&shared, Path::Mutate, &body).await)
}

async fn validate(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Json<AdmissionReview<DynamicObject>> {
    Json(handle(&shared, Path::Validate, &body).await)
}

async fn handle(shared: &Shared, path: Path, body: &[u8]) -> AdmissionReview<DynamicObject> {
    let request = match parse(body) {
        Ok(request) => request,
        Err(problem) => {
            shared.stats.invalid.fetch_add(1, Ordering::Relaxed);
            shared.count(path, "invalid");
            warn!(path = path.as_str(), %problem, "not an AdmissionReview");
            return AdmissionResponse::invalid(problem).into_review();
        }
    };
    let span = info_span!(
        "admission",
        path = path.as_str(),
        uid = %request.uid,
        kind = %request.kind.kind,
        namespace = request.namespace.as_deref().unwrap_or(""),
        name = %request.name,
        operation = ?request.operation,
        user = %request.user_info.username.as_deref().unwrap_or(""),
        dry_run = request.dry_run,
    );
    async {
        let counter = match path {
            Path::Mutate => &shared.stats.mutate,
            Path::Validate => &shared.stats.validate,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let response = match path {
            Path::Mutate => shared.admission.mutate(&request).await,
            Path::Validate => shared.admission.validate(&request).await,
        };
        if response.allowed {
            shared.count(path, "allowed");
            debug!("admitted");
        } else {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            shared.count(path, "refused");
            info!(reason = %response.result.reason, message = %response.result.message, "refused");
        }
        response.into_review()
    }
    .instrument(span)
    .await
}

fn parse(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("cannot parse the body: {e}"))?;
    review
        .try_into()
        .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| e.to_string())
}
