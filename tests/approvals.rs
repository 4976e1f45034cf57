//! Who asked and who approved, end to end: the operator's admission webhook (in-process, called
//! by the real API server over HTTPS), users through impersonation with RBAC, the operator, and
//! the Azure emulator. Each refusal the issue lists is tried, and every denial is checked to
//! have written nothing to Azure.

mod support;

use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use portcullis::api::condition::{self, READY};
use portcullis::api::{AccessApproval, AccessGrant, Decision, GrantPhase};
use serde_json::{Value, json};
use support::operator::{Env, grant_spec, standard_policy, vm_id};
use support::webhook::allow_user;

const T: Duration = Duration::from_secs(30);

/// The standard policy with `extra` merged into its spec.
fn policy_with(extra: Value) -> Value {
    let mut spec = standard_policy();
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    spec
}

fn grant_object(name: &str, spec: Value, annotations: Value) -> AccessGrant {
    serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": {"name": name, "annotations": annotations},
        "spec": spec,
    }))
    .expect("grant object")
}

/// A forged stamp, as a client could write it.
fn forged_stamp(user: &str) -> Value {
    json!({
        "portcullis.dev/stamp": json!({
            "username": user, "uid": "x", "groups": ["system:masters"],
            "at": "2026-11-26T00:00:00Z", "signature": "AAAA"
        }).to_string()
    })
}

async fn request(env: &Env, user: &str, groups: &[&str], name: &str) -> AccessGrant {
    env.grants_as(user, groups)
        .await
        .create(
            &PostParams::default(),
            &grant_object(
                name,
                grant_spec("vm1", &[22], "203.0.113.7/32", "PT10M"),
                json!({}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{user} requesting {name}: {e}"))
}

async fn decide(
    env: &Env,
    user: &str,
    groups: &[&str],
    grant: &str,
    decision: Decision,
) -> Result<AccessApproval, kube::Error> {
    let name = format!("{user}-{}-{grant}", decision.as_str().to_ascii_lowercase());
    let approval: AccessApproval = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessApproval",
        "metadata": {"name": name},
        "spec": {"grantRef": {"name": grant}, "decision": decision.as_str(), "comment": format!("{user} looked")},
    }))
    .expect("approval object");
    env.approvals_as(user, groups)
        .await
        .create(&PostParams::default(), &approval)
        .await
}

/// The webhook's refusal: an admission error whose message contains `needle`.
fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>, needle: &str) {
    match result {
        Err(kube::Error::Api(e)) => assert!(
            e.message.contains(needle),
            "{what}: refused, but for another reason: {}",
            e.message
        ),
        other => panic!("{what}: expected a refusal containing {needle:?}, got {other:?}"),
    }
}

/// An Env with the webhook, the operator, the users' RBAC and the policy `prod` Ready.
async fn ready(prefix: &str, policy: Value, users: &[&str]) -> Env {
    let mut env = Env::with_webhook(prefix).await;
    env.start_operator();
    for user in users {
        allow_user(&env.client, &env.ns, user).await;
    }
    env.create_policy("prod", policy).await;
    env.wait_policy_ready("prod", T).await;
    env
}

/// The message of the grant's Ready condition.
fn ready_message(g: &AccessGrant) -> String {
    g.status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, READY))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn approvals_of(g: &AccessGrant) -> Vec<(String, Decision)> {
    g.status
        .as_ref()
        .map(|s| {
            s.approvals
                .iter()
                .map(|d| (d.approver.clone(), d.decision))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_requester_stamp_written_in_the_manifest_is_overwritten_and_cannot_be_changed() {
    let env = ready("stamp", standard_policy(), &["alice"]).await;
    let grants = env.grants_as("alice", &["devs"]).await;
    let forged = grant_object(
        "alice-ssh",
        grant_spec("vm1", &[22], "203.0.113.7/32", "PT10M"),
        forged_stamp("mallory"),
    );
    grants
        .create(&PostParams::default(), &forged)
        .await
        .expect("alice creates a grant carrying a forged stamp");
    let g = env
        .wait_grant_phase("alice-ssh", GrantPhase::Active, T)
        .await;
    let who = g.status.as_ref().and_then(|s| s.requested_by.clone());
    let who = who.expect("status.requestedBy");
    assert_eq!(who.username, "alice");
    assert!(who.groups.contains(&"devs".to_string()), "{who:?}");
    let stamp = g
        .annotations()
        .get("portcullis.dev/stamp")
        .cloned()
        .unwrap_or_default();
    assert!(
        stamp.contains("\"username\":\"alice\""),
        "the stamp is the webhook's: {stamp}"
    );
    // Nobody changes it afterwards: not alice, not a cluster admin.
    let patch = json!({"metadata": {"annotations": forged_stamp("alice-again")}});
    for (who, api) in [("alice", grants.clone()), ("the admin", env.grants())] {
        let result = api
            .patch("alice-ssh", &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        assert_refused(
            &format!("{who} changing the stamp"),
            result,
            "cannot be changed",
        );
    }
    // An apply that drops the annotation (server-side apply by a GitOps tool whose manager owns
    // it) keeps the stamp instead of failing.
    let dropped = json!({"metadata": {"annotations": {"portcullis.dev/stamp": null}}});
    let kept = grants
        .patch(
            "alice-ssh",
            &PatchParams::default(),
            &Patch::Merge(&dropped),
        )
        .await
        .expect("an update dropping the stamp is admitted");
    assert_eq!(
        kept.annotations().get("portcullis.dev/stamp"),
        Some(&stamp),
        "the stamp is put back"
    );
    // kubectl shows it.
    let out = std::process::Command::new("kubectl")
        .args(["get", "accessgrants", "-n", &env.ns, "alice-ssh"])
        .output()
        .expect("kubectl");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("REQUESTER") && table.contains("alice"),
        "{table}"
    );
}

#[tokio::test]
async fn two_of_n_approve_while_self_approval_strangers_and_second_decisions_are_refused() {
    let policy = policy_with(json!({
        "approval": {"required": 2, "approvers": {"users": ["alice", "carol"], "groups": ["leads"]}}
    }));
    let env = ready("approve", policy, &["alice", "carol", "erin", "mallory"]).await;
    let writes = env.writes().await;
    request(&env, "alice", &["devs"], "alice-ssh").await;
    let g = env
        .wait_grant_condition("alice-ssh", "Ready", "AwaitingApproval", T)
        .await;
    assert_eq!(
        g.status.as_ref().and_then(|s| s.phase),
        Some(GrantPhase::Pending)
    );

    // alice is an approver of the policy, but not of her own grant.
    assert_refused(
        "self-approval",
        decide(&env, "alice", &["devs"], "alice-ssh", Decision::Approve).await,
        "their own grant",
    );
    assert_refused(
        "a stranger",
        decide(&env, "mallory", &["devs"], "alice-ssh", Decision::Approve).await,
        "is not an approver",
    );
    decide(&env, "carol", &[], "alice-ssh", Decision::Approve)
        .await
        .expect("carol approves");
    let g = wait_approvals(&env, "alice-ssh", 1).await;
    assert_refused(
        "carol's second decision",
        decide(&env, "carol", &[], "alice-ssh", Decision::Reject).await,
        "already decided",
    );
    // One approval of two: nothing opened.
    assert_eq!(env.writes().await, writes, "a waiting grant writes nothing");
    let msg = ready_message(&g);
    assert!(msg.contains("1 more from"), "{msg}");

    // An approval cannot be edited.
    let edit = json!({"spec": {"comment": "changed my mind"}});
    let result = env
        .approvals_as("carol", &[])
        .await
        .patch(
            "carol-approve-alice-ssh",
            &PatchParams::default(),
            &Patch::Merge(&edit),
        )
        .await;
    assert_refused("editing an approval", result, "cannot be changed");

    // erin approves through the group: two distinct approvers, the grant opens.
    decide(&env, "erin", &["leads"], "alice-ssh", Decision::Approve)
        .await
        .expect("erin approves");
    let g = env
        .wait_grant_phase("alice-ssh", GrantPhase::Active, T)
        .await;
    env.wait_grant_condition("alice-ssh", "Ready", "Opened", T)
        .await;
    assert!(!env.grant_names_in_nsg("nsg-vm1", &g).await.is_empty());
    let decided = approvals_of(&env.grants().get("alice-ssh").await.expect("grant"));
    assert_eq!(
        decided,
        vec![
            ("carol".to_string(), Decision::Approve),
            ("erin".to_string(), Decision::Approve)
        ]
    );
    let note = env.wait_event("alice-ssh", "Activated", T).await;
    assert!(
        note.contains("requested by alice") && note.contains("approved by carol, erin"),
        "{note}"
    );
    // The grant no longer waits for a decision.
    assert_refused(
        "a decision on an active grant",
        decide(&env, "mallory", &["leads"], "alice-ssh", Decision::Reject).await,
        "not waiting",
    );
}

#[tokio::test]
async fn a_rejection_denies_with_zero_writes() {
    let policy = policy_with(json!({
        "approval": {"required": 1, "approvers": {"users": ["carol"]}}
    }));
    let env = ready("reject", policy, &["alice", "carol"]).await;
    let writes = env.writes().await;
    request(&env, "alice", &[], "alice-ssh").await;
    env.wait_grant_condition("alice-ssh", "Ready", "AwaitingApproval", T)
        .await;
    decide(&env, "carol", &[], "alice-ssh", Decision::Reject)
        .await
        .expect("carol rejects");
    let g = denied_without_writes(&env, "alice-ssh", "Rejected", writes).await;
    let msg = ready_message(&g);
    assert_eq!(msg, "rejected by carol: carol looked");
}

#[tokio::test]
async fn the_approval_timeout_denies() {
    let policy = policy_with(json!({
        "approval": {"required": 1, "approvers": {"users": ["carol"]}, "timeout": "PT3S"}
    }));
    let env = ready("timeout", policy, &["alice", "carol"]).await;
    let writes = env.writes().await;
    request(&env, "alice", &[], "alice-ssh").await;
    denied_without_writes(&env, "alice-ssh", "ApprovalTimedOut", writes).await;
    // Too late to decide now.
    assert_refused(
        "a decision after the timeout",
        decide(&env, "carol", &[], "alice-ssh", Decision::Approve).await,
        "not waiting",
    );
}

#[tokio::test]
async fn an_edit_of_the_grant_voids_its_approvals() {
    let policy = policy_with(json!({
        "approval": {"required": 2, "approvers": {"users": ["carol", "dave"]}}
    }));
    let env = ready("void", policy, &["alice", "carol", "dave"]).await;
    request(&env, "alice", &[], "alice-ssh").await;
    decide(&env, "carol", &[], "alice-ssh", Decision::Approve)
        .await
        .expect("carol approves");
    wait_approvals(&env, "alice-ssh", 1).await;
    // alice widens her request after carol looked at it.
    let wider = grant_spec("vm1", &[22, 3389], "203.0.113.7/32", "PT10M");
    env.grants_as("alice", &[])
        .await
        .patch(
            "alice-ssh",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": wider})),
        )
        .await
        .expect("alice edits her grant");
    wait_approvals(&env, "alice-ssh", 0).await;
    decide(&env, "dave", &[], "alice-ssh", Decision::Approve)
        .await
        .expect("dave approves the edited grant");
    let g = wait_approvals(&env, "alice-ssh", 1).await;
    assert_eq!(
        approvals_of(&g),
        vec![("dave".to_string(), Decision::Approve)]
    );
    assert_eq!(
        g.status.as_ref().and_then(|s| s.phase),
        Some(GrantPhase::Pending)
    );
    // carol's decision was for the grant before the edit: she may decide again.
    let again: AccessApproval = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessApproval",
        "metadata": {"name": "carol-again"},
        "spec": {"grantRef": {"name": "alice-ssh"}, "decision": "Approve"},
    }))
    .expect("approval");
    env.approvals_as("carol", &[])
        .await
        .create(&PostParams::default(), &again)
        .await
        .expect("carol approves the edited grant");
    env.wait_grant_phase("alice-ssh", GrantPhase::Active, T)
        .await;
}

/// Waits for the grant to be `Denied` with `reason`; nothing was written to Azure since
/// `writes` were counted.
async fn denied_without_writes(env: &Env, name: &str, reason: &str, writes: u64) -> AccessGrant {
    let g = env.wait_grant_condition(name, "Ready", reason, T).await;
    assert_eq!(
        g.status.as_ref().and_then(|s| s.phase),
        Some(GrantPhase::Denied)
    );
    assert_eq!(
        env.writes().await,
        writes,
        "{name}: denied ({reason}) writes nothing"
    );
    g
}

async fn wait_approvals(env: &Env, name: &str, n: usize) -> AccessGrant {
    let api = env.grants();
    support::wait_for(&format!("{n} approval(s) counted on {name}"), T, || {
        let api = api.clone();
        async move {
            let g = api.get(name).await.ok()?;
            (approvals_of(&g).len() == n
                && g.status.as_ref()?.observed_generation == g.metadata.generation)
                .then_some(g)
        }
    })
    .await
}

#[tokio::test]
async fn requesters_outside_the_policy_and_unverified_requesters_are_denied() {
    let policy = policy_with(json!({"requesters": {"groups": ["oncall"]}}));
    let env = ready("requesters", policy, &["alice", "bob"]).await;
    let writes = env.writes().await;
    request(&env, "bob", &["devs"], "bob-ssh").await;
    denied_without_writes(&env, "bob-ssh", "RequesterNotAllowed", writes).await;
    request(&env, "alice", &["oncall"], "alice-ssh").await;
    env.wait_grant_phase("alice-ssh", GrantPhase::Active, T)
        .await;

    // With the webhook unregistered (a cluster admin bypassing it), a grant carrying a
    // hand-written stamp is attributed to nobody, and this policy denies it.
    env.webhook().unregister(&env.client).await;
    let forged = grant_object(
        "forged-ssh",
        grant_spec("vm1", &[22], "203.0.113.7/32", "PT10M"),
        forged_stamp("alice"),
    );
    let api: Api<AccessGrant> = env.grants();
    support::wait_for("a create that bypasses the webhook", T, || {
        let (api, forged) = (api.clone(), forged.clone());
        async move { api.create(&PostParams::default(), &forged).await.ok() }
    })
    .await;
    let g = env
        .wait_grant_condition("forged-ssh", "Ready", "RequesterUnverified", T)
        .await;
    assert!(
        g.status
            .as_ref()
            .and_then(|s| s.requested_by.clone())
            .is_none()
    );
    assert!(env.grant_names_in_nsg("nsg-vm1", &g).await.is_empty());
}

#[tokio::test]
async fn the_audit_trail_records_one_grant_life_field_by_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    let mut env = Env::with_webhook("audit").await;
    env.settings.audit_log = Some(log.clone());
    env.start_operator();
    for user in ["alice", "carol"] {
        allow_user(&env.client, &env.ns, user).await;
    }
    let policy = policy_with(json!({
        "approval": {"required": 1, "approvers": {"users": ["carol"]}}
    }));
    env.create_policy("prod", policy).await;
    env.wait_policy_ready("prod", T).await;
    env.grants_as("alice", &["devs"])
        .await
        .create(
            &PostParams::default(),
            &grant_object(
                "alice-ssh",
                grant_spec("vm1", &[22], "203.0.113.7/32", "PT4S"),
                json!({}),
            ),
        )
        .await
        .expect("alice requests");
    env.wait_grant_condition("alice-ssh", "Ready", "AwaitingApproval", T)
        .await;
    decide(&env, "carol", &[], "alice-ssh", Decision::Approve)
        .await
        .expect("carol approves");
    env.wait_grant_phase("alice-ssh", GrantPhase::Expired, T)
        .await;

    let records: Vec<Value> = support::wait_for("the expired record", T, || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).ok()?;
            let records: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
                .filter(|r: &Value| r["grant"] == "alice-ssh")
                .collect();
            records
                .iter()
                .any(|r| r["step"] == "expired")
                .then_some(records)
        }
    })
    .await;
    let steps: Vec<&str> = records.iter().filter_map(|r| r["step"].as_str()).collect();
    let first = |step: &str| -> &Value {
        records
            .iter()
            .find(|r| r["step"] == step)
            .unwrap_or_else(|| panic!("no {step} record in {steps:?}"))
    };
    let order: Vec<usize> = ["requested", "approved", "activated", "expired"]
        .iter()
        .map(|s| {
            steps
                .iter()
                .position(|x| x == s)
                .unwrap_or_else(|| panic!("{s} in {steps:?}"))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "order of {steps:?}");
    for r in &records {
        assert_eq!(r["schema"], "portcullis.dev/audit/v1");
        assert_eq!(r["namespace"], env.ns.as_str());
        assert_eq!(r["policy"], "prod");
        assert_eq!(r["requestedBy"]["username"], "alice", "{r}");
        assert_eq!(r["justification"], "INC-42: integration test");
        assert_eq!(r["sourceAddressPrefix"], "203.0.113.7/32");
    }
    let requested = first("requested");
    assert_eq!(requested["approvals"], json!([]));
    let approved = first("approved");
    assert_eq!(approved["approvals"][0]["approver"], "carol");
    assert_eq!(approved["approvals"][0]["decision"], "Approve");
    assert_eq!(approved["message"], "approved by carol");
    let activated = first("activated");
    assert_eq!(activated["virtualMachine"], vm_id("vm1").as_str());
    assert_eq!(
        activated["ports"],
        json!([{"number": 22, "protocol": "TCP"}])
    );
    assert_eq!(activated["sourceAddressPrefix"], "203.0.113.7/32");
    assert!(activated["activatedAt"].is_string() && activated["expiresAt"].is_string());
    let rules = activated["rules"].as_array().expect("rules");
    assert!(
        !rules.is_empty(),
        "the activated record names the rules: {activated}"
    );
    assert!(rules.iter().all(|r| {
        r["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("portcullis-"))
    }));
    let expired = first("expired");
    assert_eq!(
        expired["rules"], activated["rules"],
        "the expired record names the rules closed"
    );
    assert_eq!(expired["expiresAt"], activated["expiresAt"]);
    assert_eq!(expired["approvals"], activated["approvals"]);
}

/// Runs `kubectl portcullis` (the plugin binary) in the Env's namespace as `user`. Off the
/// runtime's thread: the webhook the API server calls meanwhile is served in this process.
async fn plugin(env: &Env, user: &str, args: &[&str]) -> (bool, String) {
    let mut argv: Vec<String> = vec!["-n".into(), env.ns.clone(), "--as".into(), user.into()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-portcullis"))
            .args(&argv)
            .output()
            .expect("run kubectl-portcullis")
    })
    .await
    .expect("plugin thread");
    (out.status.success(), support::output_text(&out))
}

#[tokio::test]
async fn the_plugin_requests_approves_explains_and_revokes() {
    let policy = policy_with(json!({
        "approval": {"required": 1, "approvers": {"users": ["carol"]}}
    }));
    let env = ready("plugin", policy, &["alice", "carol"]).await;
    let (ok, out) = plugin(
        &env,
        "alice",
        &[
            "request",
            "--policy",
            "prod",
            "--vm",
            "vm1",
            "--port",
            "22",
            "--source",
            "203.0.113.7/32",
            "--duration",
            "PT10M",
            "--justification",
            "INC-7: plugin",
            "--name",
            "alice-plugin",
            "--wait",
            "30",
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("alice-plugin is waiting for approval"),
        "{out}"
    );
    let (ok, out) = plugin(&env, "carol", &["pending"]).await;
    assert!(
        ok && out.contains("alice-plugin") && out.contains("AwaitingApproval"),
        "{out}"
    );
    // alice may not decide on her own grant: it is not pending for her.
    let (ok, out) = plugin(&env, "alice", &["pending"]).await;
    assert!(ok && !out.contains("alice-plugin"), "{out}");
    let (ok, out) = plugin(
        &env,
        "alice",
        &["approve", "alice-plugin", "--comment", "me"],
    )
    .await;
    assert!(
        !ok && out.contains("their own grant"),
        "self-approval refused: {out}"
    );
    let (ok, out) = plugin(
        &env,
        "carol",
        &["approve", "alice-plugin", "--comment", "INC-7 ok"],
    )
    .await;
    assert!(ok, "{out}");
    let g = env
        .wait_grant_phase("alice-plugin", GrantPhase::Active, T)
        .await;
    env.wait_grant_condition("alice-plugin", "Ready", "Opened", T)
        .await;
    let (ok, out) = plugin(&env, "alice", &["why", "alice-plugin"]).await;
    assert!(ok, "{out}");
    for needle in [
        "alice-plugin is open",
        "requested by alice",
        "approved by carol",
        "INC-7 ok",
        "Activated:",
    ] {
        assert!(out.contains(needle), "why lacks {needle:?}:\n{out}");
    }
    let (ok, out) = plugin(&env, "alice", &["list", "-o", "json"]).await;
    assert!(ok, "{out}");
    let listed: Vec<AccessGrant> = serde_json::from_str(&out).expect("list -o json");
    assert!(listed.iter().any(|l| l.name_any() == "alice-plugin"));
    let (ok, out) = plugin(&env, "alice", &["revoke", "alice-plugin"]).await;
    assert!(ok, "{out}");
    env.wait_gone_grant("alice-plugin", T).await;
    env.wait_rules_gone(&g, T).await;
}
