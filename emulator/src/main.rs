//! `portcullis-azure-emulator`: run the ARM emulator as a process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use portcullis_azure_emulator::{EmulatorConfig, Fixture, spawn};
use tracing_subscriber::EnvFilter;

/// A loopback Azure Resource Manager emulator (NSGs, security rules, NICs, subnets, tokens).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "EMULATOR_LISTEN", default_value = "127.0.0.1:8480")]
    listen: SocketAddr,
    /// Fixture file (YAML or JSON) describing the starting world.
    #[arg(long, env = "EMULATOR_FIXTURE")]
    fixture: Option<PathBuf>,
    /// State file: loaded at start when present (instead of the fixture), saved after each change.
    #[arg(long, env = "EMULATOR_STATE_FILE")]
    state_file: Option<PathBuf>,
    /// How long async operations stay InProgress, in milliseconds.
    #[arg(long, default_value_t = 500)]
    async_delay_ms: u64,
    /// Retry-After seconds on async operations and per-NSG 429s.
    #[arg(long, default_value_t = 1)]
    retry_after_secs: u64,
    /// Page size of list operations.
    #[arg(long, default_value_t = 100)]
    page_size: usize,
    /// Subscription write throttling: burst size.
    #[arg(long, default_value_t = 200)]
    write_burst: u32,
    /// Subscription write throttling: writes per second refilled.
    #[arg(long, default_value_t = 10.0)]
    write_refill_per_sec: f64,
    /// Subscription delete throttling (its own bucket, as in ARM): burst size.
    #[arg(long, default_value_t = 200)]
    delete_burst: u32,
    /// Subscription delete throttling: deletes per second refilled.
    #[arg(long, default_value_t = 10.0)]
    delete_refill_per_sec: f64,
    /// Subscription read throttling (GETs, operation polls included): burst size.
    #[arg(long, default_value_t = 250)]
    read_burst: u32,
    /// Subscription read throttling: reads per second refilled.
    #[arg(long, default_value_t = 25.0)]
    read_refill_per_sec: f64,
    /// Only accept this client id at the token endpoint (requires --client-secret).
    #[arg(long, env = "EMULATOR_CLIENT_ID", requires = "client_secret")]
    client_id: Option<String>,
    /// Only accept this client secret at the token endpoint (requires --client-id).
    #[arg(long, env = "EMULATOR_CLIENT_SECRET", requires = "client_id")]
    client_secret: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "emulator failed");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), portcullis_azure_emulator::EmulatorError> {
    let fixture = match &args.fixture {
        Some(p) => Fixture::from_file(p)?,
        None => {
            tracing::warn!("no --fixture given: starting with an empty world");
            Fixture::default()
        }
    };
    let config = EmulatorConfig {
        fixture,
        async_delay: Duration::from_millis(args.async_delay_ms),
        retry_after_secs: args.retry_after_secs,
        page_size: args.page_size,
        write_burst: args.write_burst,
        write_refill_per_sec: args.write_refill_per_sec,
        delete_burst: args.delete_burst,
        delete_refill_per_sec: args.delete_refill_per_sec,
        read_burst: args.read_burst,
        read_refill_per_sec: args.read_refill_per_sec,
        state_file: args.state_file,
        credentials: args.client_id.zip(args.client_secret),
    };
    let emu = spawn(config, args.listen).await?;
    println!("listening on {}", emu.base_url());
    shutdown_signal().await;
    tracing::info!("shutting down");
    emu.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
