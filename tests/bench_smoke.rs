//! The scale benchmark (benches/scale.rs) in a small case, so the test command keeps it working:
//! every phase runs against the real operator binary, API server and emulator, and its counts
//! must be sane (every grant opened, every close seen, the steady windows measured). Nothing is
//! timed here: the benchmark reports times, tests never assert them.

mod scale;
mod support;

use std::path::PathBuf;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scale_benchmark_runs_every_phase_in_a_small_case() {
    let kubeconfig = PathBuf::from(std::env::var("KUBECONFIG").unwrap_or_else(|_| {
        panic!("KUBECONFIG is not set: this test needs the local control plane (scripts/test.sh)")
    }));
    let logs = tempfile::Builder::new()
        .prefix("portcullis-bench-smoke-")
        .tempdir()
        .expect("log dir");
    let operator = PathBuf::from(env!("CARGO_BIN_EXE_portcullis"));
    let cfg = scale::ScaleConfig {
        kubeconfig,
        grants: 5,
        vms: 2,
        vms_per_subnet: 2,
        nic_nsgs: true,
        close_grants: 4,
        spread: Duration::from_secs(3),
        resync: Duration::from_secs(3),
        steady_windows: 1,
        sample_every: Duration::from_millis(100),
        min_lead: Duration::from_secs(4),
        phase_timeout: Duration::from_secs(40),
        emulator: scale::EmuSettings {
            async_delay: Duration::from_millis(100),
            ..Default::default()
        },
        // The emulator binary when the workspace built it, else in this process.
        emulator_bin: operator
            .parent()
            .map(|d| d.join("portcullis-azure-emulator")),
        operator_bin: None,
        operator_args: Vec::new(),
        webhook: true,
        log_dir: logs.path().to_path_buf(),
        live: false,
    };
    let report = scale::run(&cfg).await;
    let text = format!(
        "{}\n{}",
        scale::settings_table(&cfg, "debug", &report.emulator_mode).markdown(),
        report.markdown()
    );
    println!("{text}");
    let finite = !text.contains("NaN") && !text.contains("inf");
    let sane = report.policy_ready
        && report.opened == 5
        // Through the operator's mutating webhook, as `webhook: true` asks.
        && report.created_with_finalizer == 5
        && report.closed == 16
        && report.mixed_burst_closed == 4
        && report.still_open == 0
        && report.never_open == 0
        && report.teardown_left == 0
        && report.steady_windows == 1
        && report.writes > 0
        && report.cpu_seconds > 0.0
        && report.peak_rss_kib > 0
        && report.tables.len() == 6;
    if !(sane && finite) {
        let mut logs = logs;
        logs.disable_cleanup(true);
        panic!(
            "the small case did not complete sanely ({report:?})\n{text}\nlogs kept in {}",
            logs.path().display()
        );
    }
}
