//! Production behaviour: leader election between replicas, metrics and health endpoints.

mod support;

use std::time::{Duration, Instant};

use jiff::Timestamp;
use portcullis::api::GrantPhase;
use portcullis::controller::Settings;
use portcullis::controller::leader::LeaseConfig;
use portcullis_azure_emulator::{EmulatorConfig, Faults};

use support::operator::{Env, demo_fixture, grant_spec, standard_policy};
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
    assert!(
        handover <= LEASE + Duration::from_secs(1),
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
    let metric = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing in:\n{body}"))
    };
    assert!(
        metric("portcullis_azure_requests_total{operation=\"put_rule\",status=\"429\"}") >= 1.0
    );
    assert!(
        metric("portcullis_azure_requests_total{operation=\"put_rule\",status=\"201\"}") >= 1.0
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
