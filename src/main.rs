use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::{error, info};

use futures::FutureExt;
use portcullis::azure::client::{AzureClientOptions, AzureNetworkClient};
use portcullis::azure::credential::{CredentialConfig, authority_host_from_env, build_credential};
use portcullis::azure::{BucketSpec, PacingOptions};
use portcullis::controller::leader::LeaseConfig;
use portcullis::controller::telemetry::Telemetry;
use portcullis::controller::{self, Settings, http};
use portcullis::plan::{Bands, Installation, Naming};
use portcullis::{defender, webhook};

// jemalloc, not the C library's allocator: at 10,000 grants glibc's malloc kept a third of the
// peak RSS as freed memory (the scale benchmark without webhooks: 146 to 158 MiB, against 134
// with jemalloc; BENCHMARKS.md). The image's musl build gets the same allocator. Tunable at run
// time with `_RJEM_MALLOC_CONF`.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// Freed pages go back to the system after about 1 s, not jemalloc's default 10 s: a burst of
// deletions (a teardown of 10,000 grants) frees faster than it allocates, and kept pages were
// what took the peak RSS at 10,000 grants past 150 MiB (146 to 151 MiB; 141 with this, at about
// the same CPU: BENCHMARKS.md). `_RJEM_MALLOC_CONF` still overrides it.
#[cfg(not(target_env = "msvc"))]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&std::ffi::c_char> =
    // SAFETY: the pointer is to a static C string literal, valid and unchanged forever.
    Some(unsafe { &*c"dirty_decay_ms:1000".as_ptr() });

/// Portcullis: just-in-time network access to Azure VMs, as a Kubernetes operator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (JitPolicy, AccessGrant) as YAML.
    Crd,
    /// Run the operator (kubeconfig from KUBECONFIG or in-cluster; Azure credential from the
    /// SDK's usual AZURE_* variables).
    Run(Box<RunArgs>),
    /// Turn another system's JIT policies into JitPolicy manifests.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Turn JitPolicy manifests into another system's JIT policies.
    #[command(subcommand)]
    Export(ExportCommand),
}

#[derive(Subcommand)]
enum ImportCommand {
    /// Read Defender for Cloud `jitNetworkAccessPolicies` JSON (one policy, a list, or a
    /// `{"value": [...]}` page, as the REST API or `az security jit-policy list -o json`
    /// returns it) and print one JitPolicy manifest per policy as YAML. What Portcullis does
    /// not serve is reported on stderr and in each manifest's comments and annotations.
    Defender(ImportDefenderArgs),
}

#[derive(Args)]
struct ImportDefenderArgs {
    /// The JSON file, or `-` for stdin.
    file: String,
    /// `metadata.namespace` of every manifest.
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// Fail (printing no manifest) when anything in the input is not carried.
    #[arg(long)]
    strict: bool,
}

#[derive(Subcommand)]
enum ExportCommand {
    /// Read JitPolicy manifests (YAML, one or many documents) and print Defender for Cloud
    /// `jitNetworkAccessPolicies` PUT bodies (api-version 2020-01-01): one JSON object, or an
    /// array of them for several manifests. Each body's PUT path is printed on stderr.
    Defender(ExportDefenderArgs),
}

#[derive(Args)]
struct ExportDefenderArgs {
    /// The YAML file, or `-` for stdin.
    file: String,
    /// Fail (printing no JSON) when anything in the manifests is not carried.
    #[arg(long)]
    strict: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// Azure Resource Manager endpoint.
    #[arg(
        long,
        env = "PORTCULLIS_AZURE_ENDPOINT",
        default_value = "https://management.azure.com"
    )]
    azure_endpoint: url::Url,
    /// Priority band for Allow rules (grants), as FIRST-LAST.
    #[arg(long, env = "PORTCULLIS_ALLOW_BAND", default_value = "100-199", value_parser = parse_band)]
    allow_band: (u16, u16),
    /// Priority band for Deny rules (policies), as FIRST-LAST.
    #[arg(long, env = "PORTCULLIS_DENY_BAND", default_value = "4000-4096", value_parser = parse_band)]
    deny_band: (u16, u16),
    /// This installation's id, carried in every rule name it writes (1-8 lowercase letters or
    /// digits). Installations that share NSGs must use different ids: each owns only the rules
    /// named with its own id.
    #[arg(long, env = "PORTCULLIS_INSTALLATION", default_value = portcullis::plan::naming::DEFAULT_INSTALLATION)]
    installation: Installation,
    /// Treat rules named the way they were before installation ids (`portcullis-a-...`,
    /// `portcullis-d-...`) as this installation's: they are replaced by rules under the new
    /// names, or deleted as orphans. Turn it off on all but one installation when several share
    /// NSGs.
    #[arg(long, env = "PORTCULLIS_ADOPT_LEGACY_RULES", default_value_t = true, action = clap::ArgAction::Set)]
    adopt_legacy_rules: bool,
    /// Opt-in: set `flushConnection` on every NSG the operator writes to, so that closing a
    /// grant's rule also cuts the connections it allowed (Azure NSGs are stateful). Every rule
    /// change in such an NSG, by anyone, then re-evaluates every flow through it: see SECURITY.md.
    #[arg(long, env = "PORTCULLIS_FLUSH_CONNECTIONS", default_value_t = false, action = clap::ArgAction::Set)]
    flush_connections: bool,
    /// Make several changes to an NSG in one conditional write of the whole NSG (If-Match,
    /// re-planned on 412) instead of one write per rule: one ARM write and one long-running
    /// operation per round, so expiries due together close together. Every rule of the NSG,
    /// other people's included, gets a new etag on each such write; `false` writes rule by rule.
    #[arg(long, env = "PORTCULLIS_ONE_WRITE_PER_NSG", default_value_t = true, action = clap::ArgAction::Set)]
    one_write_per_nsg: bool,
    /// DANGEROUS opt-in: a namespace that no JitScope names may name ANY VM the operator's Azure
    /// identity reaches in its policies. Off (the default), such a namespace's policies are
    /// refused (`OutOfScope`). `--allow-unscoped-namespaces` alone means true.
    #[arg(long, env = "PORTCULLIS_ALLOW_UNSCOPED_NAMESPACES", default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    allow_unscoped_namespaces: bool,
    /// Delete a grant this long after it finished (Expired, Revoked or Denied, with nothing left
    /// open in Azure), like a Job's `ttlSecondsAfterFinished`: `24h`, `30m`, `1h30m`, `7d`, `0s`
    /// or seconds. Its audit records keep its history. Unset (the default): never deleted.
    #[arg(long, env = "PORTCULLIS_FINISHED_GRANT_TTL", value_parser = parse_ttl)]
    finished_grant_ttl: Option<Duration>,
    /// Seconds between reconciles of an unchanged object (bounds how long drift can stand).
    #[arg(long, env = "PORTCULLIS_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Reconciles in flight per controller. They mostly wait on Azure's long-running operations
    /// (writes to one NSG are serialised and shared by every reconcile waiting on it), so many:
    /// with 16, a burst of 1,000 grants took 3x as long and 100 grants expiring at one instant
    /// closed 3x later (BENCHMARKS.md).
    #[arg(long, env = "PORTCULLIS_CONCURRENCY", default_value_t = 256)]
    concurrency: u16,
    /// Overall deadline for one Azure write, long-running operation included, in seconds.
    #[arg(
        long,
        env = "PORTCULLIS_AZURE_OPERATION_DEADLINE_SECONDS",
        default_value_t = 120
    )]
    azure_operation_deadline_seconds: u64,
    /// Pace Azure requests against ARM's subscription budget (token buckets per operation type,
    /// tracked from the x-ms-ratelimit-remaining-* headers): a request that would dip into the
    /// reserve waits for the refill (at most 10 s) instead of drawing a 429.
    #[arg(long, env = "PORTCULLIS_AZURE_PACING", default_value_t = true, action = clap::ArgAction::Set)]
    azure_pacing: bool,
    /// ARM's read bucket for this principal: burst size (Azure's default 250).
    #[arg(long, env = "PORTCULLIS_AZURE_READ_BURST", default_value_t = 250)]
    azure_read_burst: u32,
    /// ARM's read bucket: tokens refilled per second (Azure's default 25).
    #[arg(
        long,
        env = "PORTCULLIS_AZURE_READ_REFILL_PER_SEC",
        default_value_t = 25.0
    )]
    azure_read_refill_per_sec: f64,
    /// ARM's write bucket, and its delete bucket (the same size in Azure): burst size (200).
    #[arg(long, env = "PORTCULLIS_AZURE_WRITE_BURST", default_value_t = 200)]
    azure_write_burst: u32,
    /// ARM's write and delete buckets: tokens refilled per second (Azure's default 10).
    #[arg(
        long,
        env = "PORTCULLIS_AZURE_WRITE_REFILL_PER_SEC",
        default_value_t = 10.0
    )]
    azure_write_refill_per_sec: f64,
    /// Share of each bucket kept in reserve (0-1): pacing starts when a request would leave less.
    #[arg(long, env = "PORTCULLIS_AZURE_BUDGET_RESERVE", default_value_t = 0.05)]
    azure_budget_reserve: f64,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "PORTCULLIS_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    http_listen: std::net::SocketAddr,
    /// Run only while holding a coordination.k8s.io Lease (for more than one replica).
    #[arg(long, env = "PORTCULLIS_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set)]
    leader_election: bool,
    #[arg(
        long,
        env = "PORTCULLIS_LEASE_NAME",
        default_value = "portcullis-leader"
    )]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, from POD_NAMESPACE).
    #[arg(long, env = "PORTCULLIS_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Seconds a Lease holder may go without renewing before a standby takes over.
    #[arg(long, env = "PORTCULLIS_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Namespace of the inventory ConfigMap, the list of every NSG this install has written
    /// (default: the pod's namespace from POD_NAMESPACE, else the first watched namespace,
    /// else `default`).
    #[arg(long, env = "PORTCULLIS_INVENTORY_NAMESPACE")]
    inventory_namespace: Option<String>,
    /// Name of the inventory ConfigMap.
    #[arg(
        long,
        env = "PORTCULLIS_INVENTORY_NAME",
        default_value = controller::inventory::DEFAULT_NAME
    )]
    inventory_name: String,
    /// Watch only these namespaces, comma-separated (default: all namespaces).
    #[arg(long, env = "PORTCULLIS_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Write audit records (one JSON object per line: requested, approved, activated, expired,
    /// ...) to this file, e.g. /dev/stderr to keep them apart from the logs on stdout. Default:
    /// into the log, under the target `portcullis::audit`.
    #[arg(long, env = "PORTCULLIS_AUDIT_LOG")]
    audit_log: Option<std::path::PathBuf>,
    /// Send notifications (Slack, Teams, signed generic JSON webhooks) about grants, to the
    /// targets described by Secrets labelled `portcullis.dev/notification-target` in the
    /// watched namespaces. Off by default: it needs read access (get/list/watch) to Secrets
    /// there. `--notifications` alone means true.
    #[arg(long, env = "PORTCULLIS_NOTIFICATIONS", default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    notifications: bool,
    /// Serve the admission webhooks (turn off only for installs without the webhook
    /// configurations; grants then carry no verified requester).
    #[arg(long, env = "PORTCULLIS_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    webhook: bool,
    /// Address of the HTTPS admission webhook server.
    #[arg(
        long,
        env = "PORTCULLIS_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:9443"
    )]
    webhook_listen: std::net::SocketAddr,
    /// Directory with `tls.crt` and `tls.key` (cert-manager's Secret mount), reloaded when they
    /// change. Unset: the operator generates and renews its own CA and certificate.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<std::path::PathBuf>,
    /// Secret (in the operator's namespace) holding the self-managed CA and certificate.
    #[arg(
        long,
        env = "PORTCULLIS_WEBHOOK_CERT_SECRET",
        default_value = "portcullis-webhook-cert"
    )]
    webhook_cert_secret: String,
    /// The webhook's Service, for the certificate's default names
    /// (`<service>.<namespace>.svc`, `<service>.<namespace>.svc.cluster.local`).
    #[arg(
        long,
        env = "PORTCULLIS_WEBHOOK_SERVICE_NAME",
        default_value = "portcullis-webhook"
    )]
    webhook_service_name: String,
    /// Names (and IP addresses) the self-managed certificate is issued for, comma-separated
    /// (default: the Service's names, localhost and 127.0.0.1).
    #[arg(long, env = "PORTCULLIS_WEBHOOK_DNS_NAMES", value_delimiter = ',')]
    webhook_dns_names: Vec<String>,
    /// Name of the Mutating- and ValidatingWebhookConfiguration whose `caBundle` the operator
    /// patches with its self-managed CA (empty: patch nothing).
    #[arg(
        long,
        env = "PORTCULLIS_WEBHOOK_CONFIGURATION_NAME",
        default_value = "portcullis"
    )]
    webhook_configuration_name: String,
    /// Secret (in the operator's namespace) holding the key that signs the webhook's stamps;
    /// created with a random key when absent.
    #[arg(
        long,
        env = "PORTCULLIS_STAMP_KEY_SECRET",
        default_value = "portcullis-stamp-key"
    )]
    stamp_key_secret: String,
    #[arg(
        long,
        env = "PORTCULLIS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

fn parse_band(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("`{s}` is not FIRST-LAST"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("`{a}`: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("`{b}`: {e}"))?;
    Ok((a, b))
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    portcullis::api::duration::parse_setting(s).map_err(|e| e.to_string())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,azure_core=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                // Kubernetes stops pods with SIGTERM: without it, only Ctrl-C shuts down cleanly.
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    info!("shutdown signal received");
}

fn leader_election(args: &RunArgs) -> Result<Option<LeaseConfig>, String> {
    if !args.leader_election {
        return Ok(None);
    }
    let namespace = args
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|n| !n.is_empty())
        .ok_or("leader election needs --lease-namespace or POD_NAMESPACE")?;
    let identity = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .ok_or("leader election needs POD_NAME (the downward API) as this replica's identity")?;
    let duration = Duration::from_secs(args.lease_duration_seconds.max(3));
    Ok(Some(LeaseConfig {
        lease_duration: duration,
        renew_deadline: duration * 2 / 3,
        retry_interval: duration / 7,
        ..LeaseConfig::new(namespace, args.lease_name.clone(), identity)
    }))
}

async fn run(args: RunArgs) -> Result<(), String> {
    let bands = Bands {
        allow: args.allow_band.0..=args.allow_band.1,
        deny: args.deny_band.0..=args.deny_band.1,
    };
    bands
        .validate()
        .map_err(|e| format!("priority bands: {e}"))?;
    let mut settings = Settings {
        bands,
        naming: Naming::new(args.installation.clone(), args.adopt_legacy_rules),
        flush_connections: args.flush_connections,
        one_write_per_nsg: args.one_write_per_nsg,
        allow_unscoped_namespaces: args.allow_unscoped_namespaces,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        concurrency: args.concurrency.max(1),
        namespaces: args
            .namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect(),
        leader_election: leader_election(&args)?,
        inventory_namespace: args
            .inventory_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .filter(|n| !n.is_empty()),
        inventory_name: args.inventory_name.clone(),
        // Loaded below, once there is a client.
        stamp_key: None,
        audit_log: args.audit_log.clone(),
        notifications: args.notifications,
        finished_grant_ttl: args.finished_grant_ttl,
    };
    let credential_config =
        CredentialConfig::from_env().map_err(|e| format!("Azure credential: {e}"))?;
    let authority = authority_host_from_env().map_err(|e| e.to_string())?;
    let credential = build_credential(
        &credential_config,
        &authority,
        azure_core::new_http_client(),
    )
    .map_err(|e| format!("Azure credential: {e}"))?;
    let write_bucket = BucketSpec {
        burst: args.azure_write_burst.max(1),
        refill_per_sec: args.azure_write_refill_per_sec.max(0.0),
    };
    let options = AzureClientOptions {
        operation_deadline: Duration::from_secs(args.azure_operation_deadline_seconds.max(1)),
        pacing: PacingOptions {
            enabled: args.azure_pacing,
            read: BucketSpec {
                burst: args.azure_read_burst.max(1),
                refill_per_sec: args.azure_read_refill_per_sec.max(0.0),
            },
            write: write_bucket,
            delete: write_bucket,
            reserve: args.azure_budget_reserve.clamp(0.0, 1.0),
            ..PacingOptions::default()
        },
        ..Default::default()
    };
    let azure = AzureNetworkClient::new(args.azure_endpoint.clone(), credential, options)
        .map_err(|e| format!("Azure client: {e}"))?;
    let telemetry = Telemetry::new(Some(azure.stats()));
    let shutdown = shutdown_signal().shared();
    let (addr, http) = http::serve(args.http_listen, telemetry.clone(), shutdown.clone())
        .await
        .map_err(|e| e.to_string())?;
    info!(%addr, "health and metrics endpoint");
    let http = tokio::spawn(http);
    let client = kube::Config::infer()
        .await
        .map_err(|e| format!("Kubernetes client configuration: {e}"))
        .and_then(|config| {
            controller::kube_client::client(config).map_err(|e| format!("Kubernetes client: {e}"))
        })?;
    info!(azure_endpoint = %args.azure_endpoint, credential = ?credential_config, installation = %args.installation, adopt_legacy_rules = args.adopt_legacy_rules, finished_grant_ttl = ?args.finished_grant_ttl, "starting");
    // The operator's own namespace: the inventory's, which holds its Secrets too.
    let own_namespace = settings.inventory_namespace();
    let key = webhook::load_or_create_stamp_key(&client, &own_namespace, &args.stamp_key_secret)
        .await
        .map_err(|e| format!("stamp key: {e}"))?;
    info!(secret = %format!("{own_namespace}/{}", args.stamp_key_secret), "stamp key loaded");
    settings.stamp_key = Some(key.clone());
    let webhook = if args.webhook {
        let config = webhook_config(&args, &own_namespace, telemetry.clone());
        let running = webhook::start(client.clone(), key, config, shutdown.clone())
            .await
            .map_err(|e| format!("admission webhook: {e}"))?;
        Some(running.task)
    } else {
        info!("admission webhook turned off (--webhook=false)");
        None
    };
    let result = controller::run(client, Arc::new(azure), settings, telemetry, shutdown)
        .await
        .map_err(|e| e.to_string());
    if let Some(task) = webhook {
        // The shutdown future has resolved: the server is draining its last requests.
        let _ = task.await;
    }
    http.abort();
    result
}

fn webhook_config(
    args: &RunArgs,
    namespace: &str,
    telemetry: Arc<Telemetry>,
) -> webhook::WebhookConfig {
    let certs = match &args.webhook_cert_dir {
        Some(dir) => webhook::CertSource::Dir(dir.clone()),
        None => {
            let names: Vec<String> = args
                .webhook_dns_names
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            let names = if names.is_empty() {
                webhook::default_dns_names(&args.webhook_service_name, namespace)
            } else {
                names
            };
            let configuration_name =
                Some(args.webhook_configuration_name.trim().to_string()).filter(|n| !n.is_empty());
            webhook::CertSource::SelfManaged {
                certs: webhook::SelfManaged::new(namespace, &args.webhook_cert_secret, names),
                configuration_name,
            }
        }
    };
    webhook::WebhookConfig {
        listen: args.webhook_listen,
        certs,
        telemetry: Some(telemetry),
    }
}

/// The text of FILE, or of stdin for `-`.
fn read_input(file: &str) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    if file == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("reading stdin: {e}"))?;
    } else {
        text = std::fs::read_to_string(file).map_err(|e| format!("reading {file}: {e}"))?;
    }
    Ok(text)
}

/// Prints the findings on stderr; under `strict`, any that is not a note fails the command.
fn report<'a>(
    findings: impl Iterator<Item = &'a defender::Finding>,
    strict: bool,
) -> Result<(), String> {
    let mut not_carried = 0;
    for f in findings {
        if f.severity == defender::Severity::NotCarried {
            not_carried += 1;
        }
        eprintln!("{f}");
    }
    if not_carried > 0 {
        eprintln!(
            "{not_carried} field(s) NOT CARRIED: read the lines above before relying on the result"
        );
        if strict {
            return Err(format!("--strict: {not_carried} field(s) not carried"));
        }
    }
    Ok(())
}

fn import_defender(args: &ImportDefenderArgs) -> Result<String, String> {
    let text = read_input(&args.file)?;
    let options = defender::ImportOptions {
        namespace: args.namespace.clone(),
    };
    let imported = defender::import(&text, &options).map_err(|e| e.to_string())?;
    report(imported.all_findings(), args.strict)?;
    imported.to_yaml().map_err(|e| e.to_string())
}

fn export_defender(args: &ExportDefenderArgs) -> Result<String, String> {
    let text = read_input(&args.file)?;
    let exported = defender::export(&text).map_err(|e| e.to_string())?;
    report(exported.all_findings(), args.strict)?;
    for p in &exported.policies {
        eprintln!("{}: PUT {}", p.source, p.target);
    }
    exported.to_json().map_err(|e| e.to_string())
}

/// Prints a command's output, or its error on stderr with a failing exit code.
fn print_result(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match portcullis::api::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: could not render the CRDs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Import(ImportCommand::Defender(args)) => print_result(import_defender(&args)),
        Command::Export(ExportCommand::Defender(args)) => print_result(export_defender(&args)),
        Command::Run(args) => {
            let args = *args;
            init_logging(args.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = %e, "portcullis stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
