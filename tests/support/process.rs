//! The operator as a child process (the real `portcullis` binary, as a pod runs it) against an
//! in-process Azure emulator and the real API server, for suites that SIGKILL it. Also a
//! sampler that watches the emulator continuously, to time how long rules stand.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use portcullis::api::{AccessGrant, JitPolicy};
use portcullis_azure_emulator::{AdminClient, EmulatorConfig, RunningEmulator, spawn};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::invariants::{self, Baseline, Checker, Violation};

/// How to start the operator binary.
#[derive(Debug, Clone)]
pub struct OperatorCmd {
    pub kubeconfig: PathBuf,
    /// The emulator's base URL: ARM endpoint and Entra ID authority.
    pub azure: String,
    pub namespaces: Vec<String>,
    /// More `portcullis run` flags.
    pub extra_args: Vec<String>,
    /// stdout and stderr of every incarnation are appended here.
    pub log: PathBuf,
    /// The operator binary; `None`: the one cargo built with this test.
    pub binary: Option<PathBuf>,
    /// Where the admission webhook listens; `None`: a port of its own choosing (nothing calls
    /// it). A fixed address for a webhook that is registered and must come back on a restart.
    pub webhook_listen: Option<std::net::SocketAddr>,
}

/// One incarnation of the operator process.
pub struct OperatorProcess {
    child: Child,
    pub spawned: Timestamp,
    /// Where it serves `/healthz`, once [`OperatorProcess::wait_up`] has read it from its log.
    pub http: Option<std::net::SocketAddr>,
    log: PathBuf,
}

/// The line each incarnation starts its part of the log with.
fn spawn_marker(spawned: Timestamp) -> String {
    format!("===== operator spawned at {spawned} =====")
}

/// The address this incarnation's HTTP server bound (it logs it once listening), from the log.
/// The operator binds port 0 itself: a port picked by the test and freed before the operator
/// bound it could be taken in between, by another test's operator whose `/healthz` then answered
/// for a process that had exited.
fn bound_http_address(log: &Path, spawned: Timestamp) -> Option<std::net::SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    let ours = &text[text.find(&spawn_marker(spawned))?..];
    let line = ours.lines().find(|l| l.contains("serving /metrics"))?;
    let plain = strip_ansi(line);
    let at = plain.find("local=")? + "local=".len();
    plain[at..].split_whitespace().next()?.parse().ok()
}

/// `s` without ANSI colour sequences (the operator's log is coloured).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl OperatorProcess {
    pub fn spawn(cmd: &OperatorCmd) -> OperatorProcess {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cmd.log)
            .unwrap_or_else(|e| panic!("{}: {e}", cmd.log.display()));
        let spawned = Timestamp::now();
        let _ = writeln!(log, "{}", spawn_marker(spawned));
        let err = log.try_clone().expect("clone log handle");
        let binary = cmd
            .binary
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_portcullis")));
        let child = Command::new(binary)
            .arg("run")
            .arg("--azure-endpoint")
            .arg(&cmd.azure)
            .arg("--namespaces")
            .arg(cmd.namespaces.join(","))
            // Tests run operators side by side: each binds ports of its own choosing.
            .arg("--http-listen")
            .arg("127.0.0.1:0")
            .arg("--webhook-listen")
            .arg(
                cmd.webhook_listen
                    .map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string()),
            )
            .args(&cmd.extra_args)
            .env("KUBECONFIG", &cmd.kubeconfig)
            .env("AZURE_TENANT_ID", "crash-tenant")
            .env("AZURE_CLIENT_ID", "portcullis-crash")
            .env("AZURE_CLIENT_SECRET", "crash-secret")
            .env("AZURE_AUTHORITY_HOST", format!("{}/", cmd.azure))
            // The bound address is read from the log, whatever else is logged.
            .env(
                "RUST_LOG",
                format!(
                    "{},portcullis::controller::http=info",
                    std::env::var("PORTCULLIS_CHILD_LOG")
                        .unwrap_or_else(|_| "info,kube=warn".into())
                ),
            )
            .env_remove("AZURE_FEDERATED_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning the operator binary: {e}"));
        OperatorProcess {
            child,
            spawned,
            http: None,
            log: cmd.log.clone(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `/healthz` answers at the address this process logged: it is up. Panics if
    /// it exits or `timeout` passes.
    pub async fn wait_up(&mut self, timeout: Duration) -> Timestamp {
        let http = reqwest::Client::new();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.http.is_none() {
                self.http = bound_http_address(&self.log, self.spawned);
            }
            if let Some(addr) = self.http
                && let Ok(r) = http
                    .get(format!("http://{addr}/healthz"))
                    .timeout(Duration::from_millis(500))
                    .send()
                    .await
                && r.status().is_success()
            {
                return Timestamp::now();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the operator exited during start-up: {status}");
            }
            if std::time::Instant::now() > deadline {
                panic!("the operator's /healthz did not answer within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL (no shutdown path runs), then reaps the process.
    pub fn kill(&mut self) -> Timestamp {
        let _ = self.child.kill();
        let at = Timestamp::now();
        let _ = self.child.wait();
        at
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a log file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A kube client for a kubeconfig file (the test's API server, or a private one).
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("{}: {e}", kubeconfig.display()));
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", kubeconfig.display()));
    Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e}"))
}

/// One suite's world: a namespace on the API server, an emulator, the operator binary as a
/// child process, and the invariant checker with the baseline taken before the operator ran.
pub struct ProcEnv {
    pub client: Client,
    pub kubeconfig: PathBuf,
    pub ns: String,
    pub emu: RunningEmulator,
    pub admin: AdminClient,
    pub checker: Checker,
    pub cmd: OperatorCmd,
    pub operator: Option<OperatorProcess>,
    /// The log directory: removed when the test passes, kept when it fails.
    pub logs: tempfile::TempDir,
}

impl Drop for ProcEnv {
    fn drop(&mut self) {
        super::kube::forget_namespaces(&self.client, std::slice::from_ref(&self.ns));
        if std::thread::panicking() {
            self.logs.disable_cleanup(true);
            eprintln!("operator log kept: {}", self.cmd.log.display());
        }
    }
}

impl ProcEnv {
    /// `kubeconfig`: `None` for the test command's API server (`KUBECONFIG`).
    pub async fn new(
        prefix: &str,
        emulator: EmulatorConfig,
        kubeconfig: Option<PathBuf>,
        extra_args: &[&str],
    ) -> ProcEnv {
        super::init_tracing();
        let kubeconfig = kubeconfig.unwrap_or_else(|| {
            PathBuf::from(std::env::var("KUBECONFIG").unwrap_or_else(|_| {
                panic!(
                    "KUBECONFIG is not set: these tests need the local control plane (scripts/test.sh)"
                )
            }))
        });
        let client = client_for(&kubeconfig).await;
        super::kube::install_crds(&client).await;
        let ns = super::kube::fresh_namespace(&client, prefix).await;
        super::kube::allow_namespace(&client, &ns).await;
        let emu = spawn(emulator, "127.0.0.1:0".parse().expect("literal address"))
            .await
            .unwrap_or_else(|e| panic!("emulator: {e}"));
        let admin = emu.admin();
        let baseline = Baseline::of(&invariants::observe_azure(&admin).await);
        assert!(baseline.len() > 0, "the fixture has user rules");
        let logs = tempfile::Builder::new()
            .prefix(&format!("portcullis-{prefix}-"))
            .tempdir()
            .expect("log dir");
        let cmd = OperatorCmd {
            kubeconfig: kubeconfig.clone(),
            azure: emu.base_url(),
            namespaces: vec![ns.clone()],
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            log: logs.path().join("operator.log"),
            binary: None,
            webhook_listen: None,
        };
        ProcEnv {
            client,
            kubeconfig,
            ns,
            emu,
            admin,
            checker: Checker::new(baseline),
            cmd,
            operator: None,
            logs,
        }
    }

    /// Starts the operator and waits until it is up; returns when it was.
    pub async fn start_operator(&mut self) -> Timestamp {
        assert!(self.operator.is_none(), "operator already running");
        let mut p = OperatorProcess::spawn(&self.cmd);
        let up = p.wait_up(Duration::from_secs(30)).await;
        self.operator = Some(p);
        up
    }

    /// SIGKILLs the operator; returns when.
    pub fn kill_operator(&mut self) -> Timestamp {
        let mut p = self.operator.take().expect("operator running");
        p.kill()
    }

    /// The operator's log so far (last `n` lines).
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "operator log {} (last {n} lines):\n{}",
            self.cmd.log.display(),
            tail(&self.cmd.log, n)
        )
    }

    pub fn namespaces(&self) -> Vec<String> {
        vec![self.ns.clone()]
    }

    pub fn grants(&self) -> Api<AccessGrant> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn policies(&self) -> Api<JitPolicy> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn create_policy(&self, name: &str, spec: Value) -> JitPolicy {
        let obj: JitPolicy = serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "JitPolicy",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec
        }))
        .unwrap_or_else(|e| panic!("policy {name}: {e}"));
        self.policies()
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("create policy {name}: {e}"))
    }

    pub async fn create_grant(&self, name: &str, spec: Value) -> AccessGrant {
        let obj: AccessGrant = serde_json::from_value(json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec
        }))
        .unwrap_or_else(|e| panic!("grant {name}: {e}"));
        self.grants()
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("create grant {name}: {e}"))
    }

    pub async fn delete_grant(&self, name: &str) {
        self.grants()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete grant {name}: {e}"));
    }

    pub async fn wait_grant_phase(
        &self,
        name: &str,
        phase: portcullis::api::GrantPhase,
        timeout: Duration,
    ) -> AccessGrant {
        let api = self.grants();
        let what = format!("grant {name} to be {}", phase.as_str());
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Ok(g) = api.get(name).await
                    && invariants::phase(&g) == Some(phase)
                {
                    return g;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.log_tail(40)
            )
        })
    }

    pub async fn wait_policy_ready(&self, name: &str, timeout: Duration) {
        let api = self.policies();
        let ready = tokio::time::timeout(timeout, async {
            loop {
                if let Ok(p) = api.get(name).await
                    && p.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    })
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if ready.is_err() {
            let status = api
                .get(name)
                .await
                .map(|p| serde_json::to_string(&p.status).unwrap_or_default())
                .unwrap_or_else(|e| format!("(not read: {e})"));
            panic!(
                "timed out after {timeout:?} waiting for policy {name} Ready; its status: {status}\n{}",
                self.log_tail(60)
            );
        }
    }

    /// I1 alone, with a deadline: within `budget` from now (call it when Azure became
    /// reachable again, or at a grant's expiry when it always was), no Allow rule of a grant
    /// past its `expiresAt`, closed or deleted may stand.
    pub async fn assert_i1_within(&self, budget: Duration) {
        let deadline = std::time::Instant::now() + budget;
        let strict = Checker {
            close_grace: Duration::ZERO,
            ..self.checker.clone()
        };
        loop {
            let obs = invariants::observe(&self.admin, &self.client, &self.namespaces()).await;
            let v = strict.i1(&obs);
            if v.is_empty() {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "I1: rules still stand {budget:?} after Azure was reachable again:\n{}\n{}",
                    invariants::format_violations(&v),
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until I1-I4 hold; panics listing the violations (and the operator's log) if they
    /// still do not after `timeout`.
    pub async fn assert_invariants(&self, timeout: Duration) -> invariants::Observed {
        match invariants::converges(
            &self.checker,
            &self.admin,
            &self.client,
            &self.namespaces(),
            timeout,
        )
        .await
        {
            Ok(obs) => obs,
            Err(v) => panic!(
                "invariants still violated {timeout:?} after the scenario:\n{}\n{}",
                invariants::format_violations(&v),
                self.log_tail(60)
            ),
        }
    }
}

/// What the sampler saw at one instant: the operator's Allow rules standing (lowercase names).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Timestamp,
    pub allow_rules: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub struct SamplerLog {
    pub samples: Vec<Sample>,
    /// I3/I4 violations seen at any instant (deduplicated), with when first seen.
    pub always_violations: Vec<(Timestamp, Violation)>,
}

/// Reads the emulator every `every`, records the Allow rules standing and checks I3 and I4 at
/// every instant, until stopped.
pub struct Sampler {
    pub log: Arc<Mutex<SamplerLog>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Sampler {
    pub fn start(admin: AdminClient, checker: Checker, every: Duration) -> Sampler {
        let log = Arc::new(Mutex::new(SamplerLog::default()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let l = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let obs = invariants::observe_azure(&admin).await;
                let allow_rules = obs
                    .nsgs
                    .values()
                    .flat_map(|n| n.rules.iter())
                    .filter(|r| invariants::is_operator_allow(r))
                    .map(|r| invariants::name(r).to_ascii_lowercase())
                    .collect();
                let v = checker.check_always(&obs);
                {
                    let mut g = l.lock().expect("sampler log");
                    for x in v {
                        if !g.always_violations.iter().any(|(_, y)| *y == x) {
                            g.always_violations.push((obs.at, x));
                        }
                    }
                    g.samples.push(Sample {
                        at: obs.at,
                        allow_rules,
                    });
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => break,
                }
            }
        });
        Sampler { log, stop, task }
    }

    pub async fn stop(self) -> SamplerLog {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        Arc::try_unwrap(self.log)
            .map(|m| m.into_inner().expect("sampler log"))
            .unwrap_or_else(|arc| std::mem::take(&mut *arc.lock().expect("sampler log")))
    }
}

impl SamplerLog {
    /// When the rules of the grant with `uid` were last gone for good after `deadline`: the
    /// first sample with none of them after the last sample that had one. `None` when no rule
    /// of it stood at or after `deadline` (closed in time), or when it never closed.
    pub fn closed_after(&self, uid: &str, deadline: Timestamp) -> Closing {
        let has = |s: &Sample| {
            s.allow_rules
                .iter()
                .any(|n| portcullis::plan::naming::Naming::default().is_grant_rule_of(n, uid))
        };
        let last_present = self.samples.iter().rposition(has);
        match last_present {
            None => Closing::NeverOpen,
            Some(i) if self.samples[i].at < deadline => Closing::InTime,
            Some(i) => match self.samples.get(i + 1) {
                Some(s) => Closing::At(s.at),
                None => Closing::StillOpen,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Closing {
    /// No rule of it was ever seen.
    NeverOpen,
    /// Its last rule was gone before the deadline.
    InTime,
    /// Its last rule was first seen gone at this instant.
    At(Timestamp),
    /// A rule of it still stood at the last sample.
    StillOpen,
}
