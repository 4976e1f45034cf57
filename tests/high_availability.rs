//! Production behaviour: leader election between replicas, metrics and health endpoints.

mod support;

use std::time::{Duration, Instant};

use jiff::Timestamp;
use portcullis::api::GrantPhase;
use portcullis::controller::Settings;
use portcullis::controller::leader::LeaseConfig;
use portcullis_azure_emulator::{EmulatorConfig, Faults};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use support::operator::{Env, Replica, demo_fixture, grant_spec, standard_policy};
use support::wait_for;

const T: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(3);

fn replica_settings(env: &Env, identity: &str) -> Settings {
    Settings {
        leader_election: Some(LeaseConfig {
            lease_duration: LEASE,
            renew_deadline: Duration::from_secs(2),
            retry_interval: Duration::from_millis(300),
            ..LeaseConfig::new(env.ns.clone(), "portcullis-leader".into(), identity.into())
        }),
        ..env.settings.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_replica_writes_and_the_standby_takes_over_when_the_leader_dies() {
    let env = Env::new("ha").await;
    let a = env.spawn_replica(replica_settings(&env, "replica-a"));
    wait_for("replica-a to lead", T, || async {
        a.telemetry.is_leader().then_some(())
    })
    .await;
    let b = env.spawn_replica(replica_settings(&env, "replica-b"));

    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT8S"))
        .await;
    let alice = env.wait_grant_phase("alice", GrantPhase::Active, T).await;
    wait_for("alice's rules", T, || async {
        (env.grant_names_in_nsg("nsg-vm1", &alice).await.len() == 1).then_some(())
    })
    .await;
    let expires_at = alice
        .status
        .as_ref()
        .and_then(|s| s.expires_at.clone())
        .expect("expiresAt")
        .0;

    assert!(!b.telemetry.is_leader(), "replica-b must be standing by");
    // The emulator counts a write when it accepts it, the leader when its operation ends: a
    // write to the subnet's NSG may still be in flight when alice's rule shows in nsg-vm1.
    wait_for("the leader's writes to end", T, || async {
        (env.writes().await == a.writes()).then_some(())
    })
    .await;
    assert_eq!(b.writes(), 0, "the standby must not write to Azure");
    assert!(a.writes() > 0);
    assert_eq!(
        env.writes().await,
        a.writes(),
        "every write the emulator saw came from the leader"
    );

    // The leader dies without releasing its Lease.
    a.task.abort();
    let killed = Instant::now();
    wait_for("replica-b to take over", T, || async {
        b.telemetry.is_leader().then_some(())
    })
    .await;
    let handover = killed.elapsed();
    // Judged on the standby's clock: it sees the last renewal up to one retry late, then
    // notices the expiry up to one retry late.
    assert!(
        handover <= LEASE + Duration::from_millis(1500),
        "hand-over took {handover:?}"
    );

    let closed = wait_for("alice's rules closed by the new leader", T, || async {
        (env.grant_names_in_nsg("nsg-vm1", &alice).await.is_empty()
            && env
                .grant_names_in_nsg("nsg-subnet", &alice)
                .await
                .is_empty())
        .then(Timestamp::now)
    })
    .await;
    let late = closed.duration_since(expires_at).as_secs_f64();
    assert!(
        late <= LEASE.as_secs_f64(),
        "closed {late:.1}s after expiry, more than the lease duration"
    );
    env.wait_grant_phase("alice", GrantPhase::Expired, T).await;
    assert!(b.writes() > 0, "the new leader did the closing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_its_lease_stops_writing() {
    let env = Env::new("lost").await;
    let a = env.spawn_replica(replica_settings(&env, "replica-a"));
    wait_for("replica-a to lead", T, || async {
        a.telemetry.is_leader().then_some(())
    })
    .await;
    // Another holder takes the Lease behind its back.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), &env.ns);
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now());
    let patch = serde_json::json!({"spec": {"holderIdentity": "usurper", "renewTime": now}});
    leases
        .patch(
            "portcullis-leader",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("take the lease");
    let result = tokio::time::timeout(T, a.task)
        .await
        .expect("replica-a stops")
        .expect("no panic");
    match result {
        Err(portcullis::controller::Error::LeadershipLost(why)) => {
            assert!(why.contains("another replica"), "{why}")
        }
        other => panic!("expected LeadershipLost, got {other:?}"),
    }
    assert!(!a.telemetry.is_leader());
}

const LEASE_NAME: &str = "portcullis-leader";

fn leases(env: &Env) -> Api<Lease> {
    Api::namespaced(env.client.clone(), &env.ns)
}

/// Writes the Lease as another holder would: `holder`, `renewTime` = `renewed`, the test's
/// lease duration.
async fn put_foreign_lease(env: &Env, holder: &str, renewed: Timestamp) {
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": LEASE_NAME, "namespace": env.ns},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": LEASE.as_secs(),
            "acquireTime": MicroTime(renewed),
            "renewTime": MicroTime(renewed),
            "leaseTransitions": 0,
        }
    }))
    .expect("lease object");
    leases(env)
        .create(&PostParams::default(), &lease)
        .await
        .expect("create the lease");
}

async fn lease_spec(env: &Env) -> LeaseSpec {
    leases(env)
        .get(LEASE_NAME)
        .await
        .expect("read the lease")
        .spec
        .unwrap_or_default()
}

/// Until `until`, checks that `replica` stands by and `holder` still holds the Lease.
async fn assert_stands_by(env: &Env, replica: &Replica, holder: &str, until: Instant) {
    while Instant::now() < until {
        assert!(
            !replica.telemetry.is_leader(),
            "the standby took a Lease that {holder} keeps renewing"
        );
        assert_eq!(
            lease_spec(env).await.holder_identity.as_deref(),
            Some(holder)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A holder whose clock is an hour slow keeps renewing: every `renewTime` it writes is an hour
/// in the past, yet it changes. Comparing `renewTime` with the local clock would make a second
/// leader at once; judging by the local time of the last change never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_never_takes_a_lease_renewed_by_a_holder_whose_clock_is_an_hour_slow() {
    let env = Env::new("skew").await;
    let hour = jiff::SignedDuration::from_hours(1);
    put_foreign_lease(&env, "skewed-leader", Timestamp::now() - hour).await;
    let api = leases(&env);
    let skewed = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let renewed = MicroTime(Timestamp::now() - hour);
            let patch = serde_json::json!({"spec": {"renewTime": renewed}});
            api.patch(LEASE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("renew the skewed lease");
        }
    });
    let b = env.spawn_replica(replica_settings(&env, "replica-b"));
    assert_stands_by(&env, &b, "skewed-leader", Instant::now() + 3 * LEASE).await;

    // The skewed holder dies: now the record stops changing, and the standby takes over one
    // lease duration later (so it was alive and watching all along).
    skewed.abort();
    let _ = skewed.await;
    let stopped = Instant::now();
    wait_for("replica-b to take the abandoned lease", T, || async {
        b.telemetry.is_leader().then_some(())
    })
    .await;
    let handover = stopped.elapsed();
    assert!(
        handover <= LEASE + Duration::from_secs(2),
        "hand-over took {handover:?}"
    );
    assert_eq!(
        lease_spec(&env).await.holder_identity.as_deref(),
        Some("replica-b")
    );
}

/// A holder whose clock is an hour fast, then dies: its last `renewTime` lies in the future,
/// but the record stops changing, so a standby takes over after one lease duration on its own
/// clock, not an hour later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewed_into_the_future_is_taken_once_it_stops_changing() {
    let env = Env::new("future").await;
    put_foreign_lease(
        &env,
        "fast-clock-leader",
        Timestamp::now() + jiff::SignedDuration::from_hours(1),
    )
    .await;
    let started = Instant::now();
    let b = env.spawn_replica(replica_settings(&env, "replica-b"));
    wait_for("replica-b to take the stale lease", T, || async {
        b.telemetry.is_leader().then_some(())
    })
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= LEASE,
        "took the lease after {waited:?}, before a full lease duration without change"
    );
    assert!(
        waited <= LEASE + Duration::from_secs(2),
        "took the lease only after {waited:?}"
    );
    let spec = lease_spec(&env).await;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

/// On shutdown the leader stops its controllers, then releases the Lease: the standby takes
/// over at its next retry instead of waiting out the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_releases_the_lease_and_the_standby_takes_over_at_once() {
    let env = Env::new("release").await;
    // A long lease, so that a hand-over by expiry could not pass for one by release.
    let settings = |identity: &str| {
        let mut s = replica_settings(&env, identity);
        if let Some(le) = s.leader_election.as_mut() {
            le.lease_duration = Duration::from_secs(8);
            le.renew_deadline = Duration::from_secs(5);
        }
        s
    };
    let a = env.spawn_replica(settings("replica-a"));
    wait_for("replica-a to lead", T, || async {
        a.telemetry.is_leader().then_some(())
    })
    .await;
    let b = env.spawn_replica(settings("replica-b"));
    wait_for("replica-b to stand by", T, || async {
        b.telemetry.ready().is_ok().then_some(())
    })
    .await;
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    assert_eq!(b.writes(), 0);

    let _ = a.shutdown.send(());
    let result = tokio::time::timeout(T, a.task)
        .await
        .expect("replica-a stops")
        .expect("no panic");
    assert!(result.is_ok(), "graceful shutdown: {result:?}");
    let stopped = Instant::now();
    assert!(!a.telemetry.is_leader());
    assert_ne!(
        lease_spec(&env).await.holder_identity.as_deref(),
        Some("replica-a"),
        "the stopped leader released its lease"
    );
    wait_for("replica-b to take the released lease", T, || async {
        b.telemetry.is_leader().then_some(())
    })
    .await;
    let handover = stopped.elapsed();
    assert!(
        handover <= Duration::from_secs(2),
        "hand-over took {handover:?}: the lease was not released"
    );

    // The released record, as client-go's ReleaseOnCancel leaves it. Stopped once its caches
    // are synced: a shutdown before that can hang today (a reconcile waits for a cache whose
    // watch kube-runtime no longer polls), which is not what this test is about.
    wait_for("replica-b's caches", T, || async {
        b.telemetry.ready().is_ok().then_some(())
    })
    .await;
    let before = lease_spec(&env).await;
    let _ = b.shutdown.send(());
    let result = tokio::time::timeout(T, b.task)
        .await
        .expect("replica-b stops")
        .expect("no panic");
    assert!(result.is_ok(), "graceful shutdown: {result:?}");
    let released = lease_spec(&env).await;
    assert_eq!(released.holder_identity, None);
    assert_eq!(released.lease_duration_seconds, Some(1));
    assert!(released.renew_time.is_some(), "renewTime is kept");
    assert_eq!(released.lease_transitions, before.lease_transitions);
}

/// A TCP proxy in front of the API server that can stop forwarding: connections are still
/// accepted, but no byte crosses in either direction while paused (a hung API server, a
/// black-holed network path).
struct PausableProxy {
    addr: std::net::SocketAddr,
    paused: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl PausableProxy {
    async fn start(upstream: String) -> PausableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (paused, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (upstream, rx) = (upstream.clone(), rx.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(forward(ri, wo, rx.clone()), forward(ro, wi, rx));
                });
            }
        });
        PausableProxy { addr, paused, task }
    }

    fn pause(&self) {
        self.paused.send_replace(true);
    }
}

impl Drop for PausableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, holding every chunk while the proxy is paused.
async fn forward(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The leader's connection to the API server hangs (requests are accepted, never answered).
/// Its renewals time out, and once the renew deadline has passed since its last renewal it
/// stops writing and returns LeadershipLost, without waiting for the hung request; a standby
/// takes over only after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewal_hangs_stops_writing_within_the_renew_deadline() {
    let env = Env::new("hang").await;
    // The tests' own kubeconfig, pointed at the proxy (the serving certificate names 127.0.0.1).
    let mut config = kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    let upstream = config
        .cluster_url
        .authority()
        .expect("the API server URL has host:port")
        .to_string();
    let proxy = PausableProxy::start(upstream).await;
    config.cluster_url = format!("https://{}/", proxy.addr)
        .parse()
        .expect("proxy URL");
    let client = kube::Client::try_from(config).expect("client through the proxy");
    let settings = replica_settings(&env, "replica-a");
    let renew_deadline = settings
        .leader_election
        .as_ref()
        .map(|le| le.renew_deadline)
        .expect("election configured");
    let a = env.spawn_replica_with_client(client, settings);
    wait_for("replica-a to lead", T, || async {
        a.telemetry.is_leader().then_some(())
    })
    .await;
    let b = env.spawn_replica(replica_settings(&env, "replica-b"));
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    assert!(a.writes() > 0, "replica-a wrote the policy's rules");

    proxy.pause();
    let paused = Instant::now();
    let result = tokio::time::timeout(T, a.task)
        .await
        .expect("replica-a gives up instead of waiting on the hung request")
        .expect("no panic");
    let stopped = paused.elapsed();
    match result {
        Err(portcullis::controller::Error::LeadershipLost(why)) => {
            assert!(why.contains("not renewed"), "{why}")
        }
        other => panic!("expected LeadershipLost, got {other:?}"),
    }
    assert!(!a.telemetry.is_leader(), "portcullis_leader is 0");
    // Its last renewal started before the pause, so the deadline fell at most renew_deadline
    // after it; the margin is for scheduling on a loaded machine.
    assert!(
        stopped <= renew_deadline + Duration::from_millis(1500),
        "stopped writing {stopped:?} after the API server stopped answering"
    );

    assert!(
        !b.telemetry.is_leader(),
        "two writers: replica-b led before replica-a stopped"
    );
    wait_for("replica-b to take over", T, || async {
        b.telemetry.is_leader().then_some(())
    })
    .await;
    assert_eq!(
        lease_spec(&env).await.holder_identity.as_deref(),
        Some("replica-b")
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_reconciles_429s_and_expiry_lag_and_health_reports_ready() {
    let mut env = Env::with(
        "metrics",
        EmulatorConfig {
            fixture: demo_fixture(),
            ..Default::default()
        },
        Settings {
            resync: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    let telemetry = env.start_operator();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = portcullis::controller::http::serve(
        "127.0.0.1:0".parse().expect("addr"),
        telemetry.clone(),
        async move {
            let _ = rx.await;
        },
    )
    .await
    .expect("serve");
    let server = tokio::spawn(server);
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();

    env.admin
        .set_faults(&Faults {
            throttle_count: 3,
            throttle_retry_after_secs: 0,
            writes_only: true,
            ..Default::default()
        })
        .await
        .expect("faults");
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT3S"))
        .await;
    env.wait_grant_phase("alice", GrantPhase::Expired, T).await;

    let body = wait_for("metrics to show the closed grant", T, || async {
        let body = get(&http, &format!("{base}/metrics")).await?;
        (body.contains("portcullis_expiry_lag_seconds_count 1")
            // The phase gauges are refreshed when the closing reconcile returns, a moment later.
            && body.contains("portcullis_grants{phase=\"Expired\"} 1"))
        .then_some(body)
    })
    .await;
    let value = |name: &str| -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let metric = |name: &str| -> f64 {
        value(name).unwrap_or_else(|| panic!("metric {name} missing in:\n{body}"))
    };
    // Writes are per rule, or one per NSG for a round of several changes (the policy's Deny
    // rules): count both.
    let writes = |status: &str| -> f64 {
        ["put_rule", "put_nsg"]
            .iter()
            .filter_map(|op| {
                value(&format!(
                    "portcullis_azure_requests_total{{operation=\"{op}\",status=\"{status}\"}}"
                ))
            })
            .sum()
    };
    assert!(writes("429") >= 1.0, "throttled writes counted:\n{body}");
    assert!(
        writes("200") + writes("201") >= 1.0,
        "accepted writes counted:\n{body}"
    );
    assert!(metric("portcullis_reconciles_total{controller=\"accessgrant\",result=\"ok\"}") >= 1.0);
    assert!(metric("portcullis_reconciles_total{controller=\"jitpolicy\",result=\"ok\"}") >= 1.0);
    assert_eq!(metric("portcullis_grants{phase=\"Expired\"}"), 1.0);
    assert_eq!(metric("portcullis_leader"), 1.0);
    // The lag is well under the 2 s the loop promises.
    assert!(
        metric("portcullis_expiry_lag_seconds_bucket{le=\"2.0\"}") >= 1.0,
        "{body}"
    );

    assert_eq!(
        get(&http, &format!("{base}/healthz")).await.as_deref(),
        Some("ok")
    );
    assert_eq!(
        get(&http, &format!("{base}/readyz")).await.as_deref(),
        Some("ok")
    );
    let _ = tx.send(());
    server.await.expect("server task");
    env.stop_operator().await;
}

async fn get(http: &reqwest::Client, url: &str) -> Option<String> {
    let response = http.get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}
