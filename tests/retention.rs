//! The finished-grant TTL (`--finished-grant-ttl`) end to end: the real API server, the Azure
//! emulator over HTTP, the operator in-process. Finished grants (Expired, Revoked, Denied) are
//! deleted once the TTL has passed since they finished, not before; without a TTL nothing is;
//! and a grant whose close failed is never deleted while its rules stand.

mod support;

use std::path::Path;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use portcullis::api::{AccessGrant, GrantPhase};
use portcullis_azure_emulator::NsgFault;
use serde_json::{Value, json};

use support::operator::{Env, grant_spec, nsg_id, standard_policy};
use support::wait_for;

const T: Duration = Duration::from_secs(30);
/// The TTL of the deleting test; the test without a TTL waits at least this long too.
const TTL: Duration = Duration::from_secs(8);
/// How late past its due moment a deletion may come: the reconcile is requeued for it, so
/// well under a resync (set to a minute in these tests to prove that).
const LATE: SignedDuration = SignedDuration::from_secs(4);

/// When the grant finished, once it has: its final phase with `finishedAt` recorded.
async fn wait_finished(env: &Env, name: &str, phase: GrantPhase) -> Timestamp {
    let api = env.grants();
    wait_for(
        &format!("{name} {} with finishedAt", phase.as_str()),
        T,
        || {
            let api = api.clone();
            async move {
                let g = api.get(name).await.ok()?;
                let s = g.status?;
                (s.phase == Some(phase) && s.rules.is_empty())
                    .then_some(s.finished_at)
                    .flatten()
                    .map(|t| t.0)
            }
        },
    )
    .await
}

/// Watches the grants until each is gone: each must exist whenever it is looked at before its
/// due moment (`due`), and be gone within [`LATE`] after it.
async fn assert_deleted_when_due(env: &Env, due: &[(&str, Timestamp)]) {
    let api = env.grants();
    loop {
        let mut left = 0;
        for (name, due) in due {
            let asked = Timestamp::now();
            let found = api.get_opt(name).await.expect("get grant");
            if asked < *due {
                assert!(
                    found.is_some(),
                    "{name} was deleted before its TTL was due at {due} (looked at {asked})"
                );
            }
            if found.is_some() {
                left += 1;
                assert!(
                    asked < due.checked_add(LATE).expect("in range"),
                    "{name} still exists {LATE:?} after its TTL was due at {due}"
                );
            }
        }
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The audit records of `grant` in the JSON-lines log.
fn audit_records(log: &Path, grant: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["grant"] == grant)
        .collect()
}

fn record_time(record: &Value) -> Timestamp {
    record["time"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("record time: {record}"))
}

/// The `deleted` record of a grant: reason `FinishedTtl`, written once its TTL was due.
fn assert_deleted_record(log: &Path, grant: &str, due: Timestamp) {
    let records = audit_records(log, grant);
    let deleted: Vec<&Value> = records.iter().filter(|r| r["step"] == "deleted").collect();
    assert_eq!(deleted.len(), 1, "{grant}: {records:#?}");
    assert_eq!(deleted[0]["reason"], "FinishedTtl", "{:#}", deleted[0]);
    assert!(
        record_time(deleted[0]) >= due,
        "{grant} deleted at {} before its TTL was due at {due}",
        deleted[0]["time"]
    );
}

fn vm1_only_policy() -> Value {
    let mut policy = standard_policy();
    let vm1 = policy["virtualMachines"][0].clone();
    policy["virtualMachines"] = json!([vm1]);
    policy
}

fn due(finished_at: Timestamp) -> Timestamp {
    finished_at
        .checked_add(SignedDuration::try_from(TTL).expect("small"))
        .expect("in range")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_revoked_and_denied_grants_are_deleted_when_their_ttl_has_passed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    let mut env = Env::new("ttl").await;
    env.settings.finished_grant_ttl = Some(TTL);
    env.settings.audit_log = Some(log.clone());
    // A long resync: deletion must come from the requeue for the TTL, not from a resync.
    env.settings.resync = Duration::from_secs(60);
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;

    let expired = env
        .create_grant(
            "expires",
            grant_spec("vm1", &[22], "203.0.113.7/32", "PT3S"),
        )
        .await;
    let revoked = env
        .create_grant(
            "revoked",
            grant_spec("vm2", &[22], "198.51.100.7/32", "PT1H"),
        )
        .await;
    env.wait_grant_condition("revoked", "Ready", "Opened", T)
        .await;
    // The policy stops naming vm2: the grant on it is revoked.
    env.patch_policy_spec("prod", vm1_only_policy()).await;
    let expired_at = wait_finished(&env, "expires", GrantPhase::Expired).await;
    let revoked_at = wait_finished(&env, "revoked", GrantPhase::Revoked).await;
    env.create_grant(
        "denied",
        grant_spec("vm1", &[8080], "203.0.113.7/32", "PT1H"),
    )
    .await;
    let denied_at = wait_finished(&env, "denied", GrantPhase::Denied).await;

    let dues = [
        ("expires", due(expired_at)),
        ("revoked", due(revoked_at)),
        ("denied", due(denied_at)),
    ];
    assert_deleted_when_due(&env, &dues).await;

    for (name, due) in dues {
        assert_deleted_record(&log, name, due);
        let note = env.wait_event(name, "FinishedTtl", T).await;
        assert!(note.contains("finished-grant TTL"), "{name}: {note}");
    }
    // History survives the objects: each life is in the trail up to its deletion.
    let steps = |name| -> Vec<String> {
        audit_records(&log, name)
            .iter()
            .map(|r| r["step"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(steps("expires").last().map(String::as_str), Some("deleted"));
    assert!(steps("expires").contains(&"expired".to_string()));
    assert!(steps("revoked").contains(&"revoked".to_string()));
    assert!(steps("denied").contains(&"denied".to_string()));
    // Nothing of theirs stands in Azure, and nobody else's rule was touched.
    env.wait_rules_gone(&expired, T).await;
    env.wait_rules_gone(&revoked, T).await;
    env.assert_user_rules_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ttl_finished_grants_are_never_deleted() {
    let mut env = Env::new("nottl").await;
    assert_eq!(env.settings.finished_grant_ttl, None, "off by default");
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant(
        "expires",
        grant_spec("vm1", &[22], "203.0.113.7/32", "PT2S"),
    )
    .await;
    env.create_grant(
        "denied",
        grant_spec("vm1", &[8080], "203.0.113.7/32", "PT1H"),
    )
    .await;
    let expired_at = wait_finished(&env, "expires", GrantPhase::Expired).await;
    let denied_at = wait_finished(&env, "denied", GrantPhase::Denied).await;
    // Past the other test's TTL, with room to spare, both are still there.
    let until = due(expired_at.max(denied_at))
        .checked_add(SignedDuration::from_secs(3))
        .expect("in range");
    let api = env.grants();
    while Timestamp::now() < until {
        for name in ["expires", "denied"] {
            let g: Option<AccessGrant> = api.get_opt(name).await.expect("get grant");
            let g = g.unwrap_or_else(|| panic!("{name} was deleted with no TTL set"));
            assert!(
                g.metadata.deletion_timestamp.is_none(),
                "{name} is being deleted"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_whose_close_failed_is_not_deleted_while_its_rules_stand() {
    const SHORT: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    let mut env = Env::new("ttlfault").await;
    env.settings.finished_grant_ttl = Some(SHORT);
    env.settings.audit_log = Some(log.clone());
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let grant = env
        .create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT3S"))
        .await;
    env.wait_grant_condition("alice", "Ready", "Opened", T)
        .await;
    // The NIC's NSG refuses every write (a transient-looking 503, retried about every second).
    env.admin
        .set_nsg_fault(&NsgFault {
            nsg: nsg_id("nsg-vm1"),
            status: 503,
            code: None,
            message: None,
            writes_only: true,
        })
        .await
        .expect("fault");
    env.wait_grant_condition("alice", "Ready", "CloseFailed", T)
        .await;
    // Well past the TTL counted from the expiry, the grant stays, its standing rule listed.
    let watch_until = Timestamp::now()
        .checked_add(SignedDuration::try_from(SHORT * 3).expect("small"))
        .expect("in range");
    while Timestamp::now() < watch_until {
        let g = env
            .grants()
            .get_opt("alice")
            .await
            .expect("get grant")
            .expect("alice must not be deleted while a rule of hers stands");
        let status = g.status.expect("status");
        assert_eq!(status.phase, Some(GrantPhase::Expired));
        assert_eq!(status.rules.len(), 1, "{:?}", status.rules);
        assert!(status.finished_at.is_none(), "not finished: {status:?}");
        assert!(g.metadata.deletion_timestamp.is_none());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(env.grant_names_in_nsg("nsg-vm1", &grant).await.len(), 1);

    // Azure answers again: the close completes, and only then does the TTL start.
    env.admin
        .clear_nsg_fault(&nsg_id("nsg-vm1"))
        .await
        .expect("clear");
    let finished_at = wait_finished(&env, "alice", GrantPhase::Expired).await;
    env.wait_rules_gone(&grant, T).await;
    let due = finished_at
        .checked_add(SignedDuration::try_from(SHORT).expect("small"))
        .expect("in range");
    env.wait_gone_grant("alice", T).await;
    assert_deleted_record(&log, "alice", due);
    env.assert_user_rules_untouched().await;
}
