//! Shared test support. Each integration test binary compiles this and uses part of it.
#![allow(dead_code)]

pub mod invariants;
pub mod kube;
pub mod operator;
pub mod process;
pub mod rng;
pub mod webhook;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it yields `Some`, or fails the test after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a request in the emulator's log wrote NSG `nsg` (by name): a PUT of the whole NSG, or
/// a PUT or DELETE of one of its rules. Any status; callers that count accepted writes add that.
pub fn is_write_to_nsg(r: &portcullis_azure_emulator::RequestRecord, nsg: &str) -> bool {
    r.method != "GET"
        && (r.path.contains(&format!("/networkSecurityGroups/{nsg}?"))
            || r.path
                .contains(&format!("/networkSecurityGroups/{nsg}/securityRules/")))
}

/// Logs of the code under test, shown for failing tests (libtest captures them). `RUST_LOG`
/// overrides the default level.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,azure_core=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The repository root (where Cargo.toml, crds/ and examples/ live).
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `kubectl` (KUBECONFIG from the environment) with `stdin` fed in.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("kubectl finishes")
}

/// A command's stdout and stderr, as one text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
