//! The scale benchmark (issue 10): the real operator binary (release, as `cargo bench` builds it)
//! against the real local API server and the Azure emulator as its own process, with the
//! emulator's default settings. Prints one markdown table per scenario with the floor computed
//! from those settings and the measured/floor ratio. See BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p portcullis-azure-emulator --bin portcullis-azure-emulator
//! cargo bench --bench scale -- --grants 100 --vms 20
//! ```
//!
//! `KUBECONFIG` names the API server to use; without it, `scripts/local-cluster.sh` starts a
//! private one for the run and stops it afterwards.

#[path = "../tests/scale/mod.rs"]
mod scale;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::Parser;

/// Scale benchmark of the operator (issue 10).
#[derive(Debug, Parser)]
struct Args {
    /// N: grants opened in one burst.
    #[arg(long, default_value_t = 100)]
    grants: usize,
    /// V: VMs (each behind its NIC's NSG and a subnet NSG shared by --vms-per-subnet VMs).
    #[arg(long, default_value_t = 20)]
    vms: usize,
    #[arg(long, default_value_t = 4)]
    vms_per_subnet: usize,
    /// Whether each VM's NIC has an NSG of its own (`--nic-nsgs false`: subnet NSGs only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    nic_nsgs: bool,
    /// K: grants expiring at one instant, then K spread over --spread-secs, then K at one instant
    /// while K more are created, then K lapsing while the operator is down (default min(N, 100)).
    #[arg(long)]
    close: Option<usize>,
    #[arg(long, default_value_t = 60)]
    spread_secs: u64,
    /// The operator's resync period: the steady-state window.
    #[arg(long, default_value_t = 30)]
    resync_secs: u64,
    #[arg(long, default_value_t = 2)]
    steady_windows: u32,
    /// Emulator state reads while closing, in ms (the close lag's resolution).
    #[arg(long, default_value_t = 100)]
    sample_ms: u64,
    /// Deadline of each phase, in seconds.
    #[arg(long, default_value_t = 900)]
    phase_timeout_secs: u64,
    /// Emulator settings (the binary's defaults).
    #[arg(long, default_value_t = 500)]
    async_delay_ms: u64,
    #[arg(long, default_value_t = 200)]
    write_burst: u32,
    #[arg(long, default_value_t = 10.0)]
    write_refill_per_sec: f64,
    /// The operator binary (default: the one `cargo bench` built, release).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
    /// The emulator binary (default: beside the operator binary).
    #[arg(long)]
    emulator_bin: Option<PathBuf>,
    /// More `portcullis run` flags, e.g. `--operator-arg=--one-write-per-nsg=true`.
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
    /// Grants go through the operator's admission webhooks, as in the chart's default install
    /// (`--webhook false`: the operator adds each grant's finalizer itself, as before 2026-11-27).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    webhook: bool,
    /// Also append the tables to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A private local API server, stopped on drop.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-bench-cluster-")
            .tempdir()
            .expect("cluster dir");
        let ok = Command::new(support::repo_root().join("scripts/local-cluster.sh"))
            .arg("start")
            .env("PORTCULLIS_CLUSTER_DIR", dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "scripts/local-cluster.sh start failed");
        Cluster { dir }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(support::repo_root().join("scripts/local-cluster.sh"))
            .arg("stop")
            .env("PORTCULLIS_CLUSTER_DIR", self.dir.path())
            .status();
    }
}

fn main() {
    let args = Args::parse();
    let (cluster, kubeconfig) = match std::env::var_os("KUBECONFIG") {
        Some(k) => (None, PathBuf::from(k)),
        None => {
            let c = Cluster::start();
            let k = c.dir.path().join("kubeconfig");
            (Some(c), k)
        }
    };
    let operator = args
        .operator_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_portcullis")));
    let emulator_bin = args.emulator_bin.clone().or_else(|| {
        operator
            .parent()
            .map(|d| d.join("portcullis-azure-emulator"))
    });
    let logs = tempfile::Builder::new()
        .prefix("portcullis-bench-")
        .tempdir()
        .expect("log dir")
        .keep();
    let cfg = scale::ScaleConfig {
        kubeconfig,
        grants: args.grants,
        vms: args.vms,
        vms_per_subnet: args.vms_per_subnet,
        nic_nsgs: args.nic_nsgs,
        close_grants: args.close.unwrap_or(args.grants.min(100)),
        spread: Duration::from_secs(args.spread_secs),
        resync: Duration::from_secs(args.resync_secs),
        steady_windows: args.steady_windows,
        sample_every: Duration::from_millis(args.sample_ms),
        min_lead: Duration::from_secs(15),
        phase_timeout: Duration::from_secs(args.phase_timeout_secs),
        emulator: scale::EmuSettings {
            async_delay: Duration::from_millis(args.async_delay_ms),
            write_burst: args.write_burst,
            write_refill_per_sec: args.write_refill_per_sec,
            ..Default::default()
        },
        emulator_bin,
        operator_bin: Some(operator.clone()),
        operator_args: args.operator_args,
        webhook: args.webhook,
        log_dir: logs.clone(),
        live: true,
    };
    eprintln!("logs: {}", logs.display());
    // Cargo puts release (and bench) builds under target/release.
    let build = if operator.components().any(|c| c.as_os_str() == "release") {
        format!("release ({})", operator.display())
    } else {
        format!("debug ({})", operator.display())
    };
    let emulator_mode = match &cfg.emulator_bin {
        Some(b) if b.exists() => format!("its own process ({})", b.display()),
        _ => "in the harness's process (no emulator binary beside the operator's)".to_string(),
    };
    let settings = scale::settings_table(&cfg, &build, &emulator_mode).markdown();
    println!("{settings}");
    // Each table is printed as its phase ends.
    let report = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(scale::run(&cfg));
    eprintln!("the emulator ran in {}", report.emulator_mode);
    if let Some(out) = args.out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        let _ = writeln!(f, "{settings}\n{}", report.markdown());
    }
    drop(cluster);
}
