//! Notifications end to end: the real API server, the Azure emulator, the operator in-process
//! with `--notifications`, and HTTP receivers started here on 127.0.0.1 that record what they
//! get. Signatures are checked here independently (hmac + sha2), not with the operator's code.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use portcullis::api::{AccessApproval, GrantPhase};
use serde_json::{Value, json};
use sha2::Sha256;
use support::operator::{Env, grant_spec, standard_policy};
use support::wait_for;
use support::webhook::allow_user;

const T: Duration = Duration::from_secs(30);
const KEY: &str = "test-signing-key-0123456789abcdef";

/// One request a receiver got.
#[derive(Clone, Debug)]
struct Delivery {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// A scripted answer: status and `Retry-After`.
type Response = (u16, Option<&'static str>);

/// Answers each request with the next scripted response, then 200.
#[derive(Clone, Default)]
struct Script {
    responses: Arc<Mutex<Vec<Response>>>,
    got: Arc<Mutex<Vec<Delivery>>>,
}

struct Receiver {
    url: String,
    script: Script,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn record(
    State(script): State<Script>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    script.got.lock().expect("lock").push(Delivery {
        at: Instant::now(),
        headers,
        body,
    });
    let next = {
        let mut responses = script.responses.lock().expect("lock");
        (!responses.is_empty()).then(|| responses.remove(0))
    };
    let (status, retry_after) = next.unwrap_or((200, None));
    let mut headers = HeaderMap::new();
    if let Some(ra) = retry_after {
        headers.insert("retry-after", ra.parse().expect("header value"));
    }
    (StatusCode::from_u16(status).expect("status"), headers, "ok")
}

impl Receiver {
    async fn start(responses: Vec<Response>) -> Receiver {
        let script = Script::default();
        *script.responses.lock().expect("lock") = responses;
        let app = axum::Router::new()
            .route("/hook/{token}", axum::routing::post(record))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            // A path with a token in it, as Slack's and Teams' URLs have.
            url: format!("http://{addr}/hook/T0KEN-SECRET"),
            script,
            server,
        }
    }

    fn got(&self) -> Vec<Delivery> {
        self.script.got.lock().expect("lock").clone()
    }

    /// Waits for a request whose body satisfies `pred`.
    async fn wait(&self, what: &str, pred: impl Fn(&Delivery) -> bool) -> Delivery {
        wait_for(what, T, || async {
            self.got().into_iter().find(|d| pred(d))
        })
        .await
    }

    /// Waits for a generic (audit record) body of this step and grant.
    async fn wait_step(&self, step: &str, grant: &str) -> Delivery {
        self.wait(&format!("{step} of {grant}"), |d| {
            let v = d.json();
            v["step"] == step && v["grant"] == grant
        })
        .await
    }
}

/// A target Secret with this label value and data.
async fn target_secret(env: &Env, name: &str, label: &str, data: &[(&str, &str)]) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "labels": {"portcullis.dev/notification-target": label}},
        "stringData": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
    }))
    .expect("secret");
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|e| panic!("Secret {name}: {e}"));
}

/// Checks the signature as a receiver would, with its own HMAC: `sha256=` + hex of
/// HMAC-SHA256(key, "<X-Portcullis-Timestamp>.<body>"), and a timestamp close to now.
fn assert_signed(d: &Delivery, key: &str) {
    let ts = d
        .header("x-portcullis-timestamp")
        .expect("timestamp header");
    let sig = d
        .header("x-portcullis-signature")
        .expect("signature header");
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&d.body);
    assert_eq!(
        sig,
        format!("sha256={}", hmac_hex(key, &signed)),
        "signature"
    );
    let sent: i64 = ts.parse().expect("unix seconds");
    let now = jiff::Timestamp::now().as_second();
    assert!(
        (now - sent).abs() < 60,
        "timestamp {sent} is recent (now {now})"
    );
    // A body changed on the way does not verify.
    let tampered = format!(
        "{ts}.{}",
        String::from_utf8_lossy(&d.body).replace("vm1", "vm2")
    );
    assert_ne!(
        format!("sha256={}", hmac_hex(key, tampered.as_bytes())),
        sig,
        "a tampered body fails"
    );
}

fn hmac_hex(key: &str, message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("key");
    mac.update(message);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn env_with_notifications(prefix: &str, webhook: bool) -> Env {
    let mut env = if webhook {
        Env::with_webhook(prefix).await
    } else {
        Env::new(prefix).await
    };
    env.settings.notifications = true;
    env
}

#[tokio::test]
async fn a_generic_target_gets_signed_activated_and_expired_records() {
    let mut env = env_with_notifications("notify-generic", false).await;
    let rx = Receiver::start(vec![]).await;
    target_secret(
        &env,
        "siem",
        "true",
        &[("url", &rx.url), ("signingKey", KEY)],
    )
    .await;
    let telemetry = env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let grant = env
        .create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT4S"))
        .await;
    let uid = grant.metadata.uid.clone().expect("uid");

    let activated = rx.wait_step("activated", "alice").await;
    assert_signed(&activated, KEY);
    let body = activated.json();
    assert_eq!(body["schema"], "portcullis.dev/audit/v1");
    assert_eq!(body["namespace"], env.ns.as_str());
    assert_eq!(body["uid"], uid.as_str());
    assert_eq!(body["policy"], "prod");
    assert_eq!(body["ports"][0]["number"], 22);
    assert_eq!(body["sourceAddressPrefix"], "203.0.113.7/32");
    assert!(body["expiresAt"].is_string(), "{body}");
    assert_eq!(
        activated.header("content-type").as_deref(),
        Some("application/json")
    );

    let expired = rx.wait_step("expired", "alice").await;
    assert_signed(&expired, KEY);
    assert!(
        !expired.json()["rules"]
            .as_array()
            .expect("rules")
            .is_empty(),
        "the expired record lists the rules closed"
    );
    env.wait_grant_phase("alice", GrantPhase::Expired, T).await;
    wait_for("sent counted", T, || async {
        (telemetry.notifications("sent") >= 2).then_some(())
    })
    .await;
    // `requested` is not a notification.
    assert!(rx.got().iter().all(|d| d.json()["step"] != "requested"));
    env.stop_operator().await;
}

#[tokio::test]
async fn a_slack_target_hears_who_must_approve_and_who_did() {
    let mut env = env_with_notifications("notify-slack", true).await;
    let rx = Receiver::start(vec![]).await;
    target_secret(
        &env,
        "oncall-slack",
        "true",
        &[
            ("url", &rx.url),
            ("format", "slack"),
            ("events", "awaitingApproval, approved"),
        ],
    )
    .await;
    env.start_operator();
    for user in ["alice", "carol"] {
        allow_user(&env.client, &env.ns, user).await;
    }
    let mut policy = standard_policy();
    policy["approval"] =
        json!({"required": 1, "approvers": {"users": ["carol"], "groups": ["team-leads"]}});
    env.create_policy("prod", policy).await;
    env.wait_policy_ready("prod", T).await;
    let grant: portcullis::api::AccessGrant = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": {"name": "alice-ssh"},
        "spec": grant_spec("vm1", &[22], "203.0.113.7/32", "PT10M"),
    }))
    .expect("grant");
    env.grants_as("alice", &["devs"])
        .await
        .create(&PostParams::default(), &grant)
        .await
        .expect("alice asks");

    let waiting = rx
        .wait("the awaiting-approval message", |d| {
            d.json()["text"]
                .as_str()
                .is_some_and(|t| t.contains("waits for approval"))
        })
        .await;
    let text = waiting.json()["text"].as_str().expect("text").to_string();
    assert!(text.contains("alice-ssh"), "{text}");
    assert!(
        text.contains("Approvers: users carol; groups team-leads"),
        "{text}"
    );
    assert!(text.contains("Requested by: alice"), "{text}");
    assert!(
        waiting.header("x-portcullis-signature").is_none(),
        "no key, no signature"
    );

    let approval: AccessApproval = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessApproval",
        "metadata": {"name": "carol-ok"},
        "spec": {"grantRef": {"name": "alice-ssh"}, "decision": "Approve", "comment": "fine"},
    }))
    .expect("approval");
    env.approvals_as("carol", &[])
        .await
        .create(&PostParams::default(), &approval)
        .await
        .expect("carol approves");
    let approved = rx
        .wait("the approved message", |d| {
            d.json()["text"]
                .as_str()
                .is_some_and(|t| t.contains("alice-ssh approved"))
        })
        .await;
    let text = approved.json()["text"].as_str().expect("text").to_string();
    assert!(text.contains("approved by carol"), "{text}");
    assert!(approved.at >= waiting.at, "waiting was announced first");
    env.wait_grant_phase("alice-ssh", GrantPhase::Active, T)
        .await;
    env.stop_operator().await;
}

#[tokio::test]
async fn failures_are_retried_with_backoff_and_retry_after_but_a_400_is_not() {
    let mut env = env_with_notifications("notify-retry", false).await;
    // 500, then 429 asking for 2 s, then 200.
    let flaky = Receiver::start(vec![(500, None), (429, Some("2"))]).await;
    let refusing = Receiver::start(vec![(400, None), (400, None), (400, None)]).await;
    for (name, rx) in [("flaky", &flaky), ("refusing", &refusing)] {
        target_secret(
            &env,
            name,
            "true",
            &[
                ("url", &rx.url),
                ("signingKey", KEY),
                ("events", "activated"),
            ],
        )
        .await;
    }
    let telemetry = env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT10M"))
        .await;

    wait_for("three attempts at the flaky receiver", T, || async {
        (flaky.got().len() >= 3).then_some(())
    })
    .await;
    wait_for("the delivery counted as sent", T, || async {
        (telemetry.notifications("sent") >= 1).then_some(())
    })
    .await;
    let got = flaky.got();
    assert_eq!(got.len(), 3, "no attempt after the 200");
    for d in &got {
        assert_eq!(d.json()["step"], "activated");
        assert_signed(d, KEY);
        assert_eq!(d.json()["uid"], got[0].json()["uid"], "the same record");
    }
    assert!(
        got[2].at.duration_since(got[1].at) >= Duration::from_millis(1900),
        "Retry-After: 2 honoured ({:?})",
        got[2].at.duration_since(got[1].at)
    );
    // The 400 is final: counted failed, never retried.
    wait_for("the refused delivery counted as failed", T, || async {
        (telemetry.notifications("failed") >= 1).then_some(())
    })
    .await;
    assert_eq!(refusing.got().len(), 1, "a 400 is not retried");
    env.stop_operator().await;
}

#[tokio::test]
async fn an_unsigned_generic_target_or_a_missing_named_one_is_refused_never_sent_unsigned() {
    let mut env = env_with_notifications("notify-refused", false).await;
    let unsigned = Receiver::start(vec![]).await;
    let named = Receiver::start(vec![]).await;
    let plain = Receiver::start(vec![]).await;
    // Generic without a signing key: refused.
    target_secret(&env, "unsigned", "true", &[("url", &unsigned.url)]).await;
    // Only where a policy names it.
    target_secret(
        &env,
        "policy-hook",
        "policy",
        &[("url", &named.url), ("signingKey", KEY)],
    )
    .await;
    // Labelled `policy` but named by no policy: never used.
    target_secret(
        &env,
        "unnamed",
        "policy",
        &[("url", &plain.url), ("signingKey", KEY)],
    )
    .await;
    let telemetry = env.start_operator();
    let mut policy = standard_policy();
    policy["notifications"] = json!([{"secretName": "policy-hook"}, {"secretName": "absent"}]);
    env.create_policy("prod", policy).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT10M"))
        .await;

    let d = named.wait_step("activated", "alice").await;
    assert_signed(&d, KEY);
    let note = env
        .wait_event("unsigned", "NotificationTargetInvalid", T)
        .await;
    assert!(note.contains("signingKey"), "{note}");
    assert!(
        !note.contains("T0KEN"),
        "the Event never shows the URL: {note}"
    );
    let note = env.wait_event("prod", "NotificationTargetInvalid", T).await;
    assert!(note.contains("absent"), "{note}");
    // Targets are chosen before any is sent to: by now the refusals were made.
    assert!(unsigned.got().is_empty(), "nothing sent unsigned");
    assert!(
        plain.got().is_empty(),
        "a policy-only target no policy names"
    );
    assert!(telemetry.notifications("refused") >= 2);
    env.stop_operator().await;
}
