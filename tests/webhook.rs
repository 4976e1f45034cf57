//! The admission webhook's edge against the real API server: the API server calls the
//! in-process server over HTTPS with the self-managed certificate; with the server down,
//! `failurePolicy: Fail` keeps grants out and nothing opens; the certificate Secret and the
//! stamp key Secret are shared by replicas and renewed; the CA bundle is patched into both
//! configurations.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use portcullis::admission::{Admission, StampKey};
use portcullis::api::{GRANT_FINALIZER, GrantPhase};
use portcullis::webhook::{
    self, CaBundlePatcher, CertStore, KubeLookup, SelfManaged, load_or_create_certificates,
    load_or_create_certificates_at, load_or_create_stamp_key,
};
use support::kube::{client, fresh_namespace};
use support::operator::{Env, grant_spec, prop, standard_policy};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_create_goes_through_both_webhooks_and_is_admitted() {
    let mut env = Env::with_webhook("wh-admit").await;
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let stats = env.webhook().stats.clone();
    let (mutate, validate) = (
        stats.mutate.load(Ordering::Relaxed),
        stats.validate.load(Ordering::Relaxed),
    );
    let created = env
        .create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT5M"))
        .await;
    assert_eq!(
        created.metadata.finalizers.as_deref(),
        Some(&[GRANT_FINALIZER.to_string()][..]),
        "the grant holds its finalizer from its creation (no patch by the controller needed)"
    );
    assert!(
        stats.mutate.load(Ordering::Relaxed) > mutate,
        "the API server called /mutate"
    );
    assert!(
        stats.validate.load(Ordering::Relaxed) > validate,
        "the API server called /validate"
    );
    assert_eq!(stats.invalid.load(Ordering::Relaxed), 0);
    let metrics = env.webhook().telemetry.encode().expect("metrics");
    for path in ["/mutate", "/validate"] {
        assert!(
            metrics.contains(&format!(
                "portcullis_webhook_admissions_total{{path=\"{path}\",result=\"allowed\"}}"
            )),
            "{path} counted: {metrics}"
        );
    }
    env.wait_grant_phase("alice", GrantPhase::Active, T).await;
    env.stop_operator().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_webhook_down_grants_cannot_be_created_and_nothing_opens() {
    let mut env = Env::with_webhook("wh-down").await;
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let writes = env.writes().await;
    env.webhook_mut().stop().await;

    let obj: portcullis::api::AccessGrant = serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": {"name": "mallory"},
        "spec": grant_spec("vm1", &[22], "203.0.113.7/32", "PT5M"),
    }))
    .expect("grant");
    let err = env
        .grants()
        .create(&Default::default(), &obj)
        .await
        .expect_err("a grant is refused while the webhook is down");
    let text = err.to_string();
    assert!(
        text.contains("failed calling webhook"),
        "refused by the webhook call failing: {text}"
    );
    assert!(
        env.grants()
            .get_opt("mallory")
            .await
            .expect("get")
            .is_none(),
        "nothing was stored"
    );
    // The operator is still running: were the grant anywhere, it would open. It is not, and
    // Azure saw no write since the policy's Deny rules.
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let allows: Vec<_> = env
            .owned_rules(nsg)
            .await
            .into_iter()
            .filter(|r| prop(r, "access") == "Allow")
            .collect();
        assert!(allows.is_empty(), "no Allow rule in {nsg}: {allows:?}");
    }
    assert_eq!(env.writes().await, writes, "no Azure write");
    env.assert_user_rules_untouched().await;
    env.stop_operator().await;
}

fn certs(ns: &str) -> SelfManaged {
    SelfManaged::new(
        ns,
        "webhook-cert",
        vec!["127.0.0.1".into(), "localhost".into()],
    )
}

/// The number of PEM certificates in a bundle.
fn count_certs(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

/// Serves `cert` and calls it over HTTPS trusting only `ca_bundle_pem`: the chain verifies,
/// for 127.0.0.1, and a body that is not an AdmissionReview is answered as invalid.
async fn assert_served_and_trusted(cert: &webhook::ServingCert, ca_bundle_pem: &str) {
    let client = client().await;
    let store = CertStore::new();
    store
        .set_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
        .expect("certificate loads");
    let key = StampKey::generate().expect("key");
    let admission = Arc::new(Admission::new(key, Arc::new(KubeLookup::new(client))));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = webhook::serve(
        "127.0.0.1:0".parse().expect("address"),
        admission,
        store,
        None,
        async move {
            let _ = rx.await;
        },
    )
    .await
    .expect("server binds");
    let addr = server.addr;
    let task = tokio::spawn(server.run());
    let mut http = reqwest::Client::builder().tls_built_in_root_certs(false);
    for pem in pem_blocks(ca_bundle_pem) {
        http = http
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("CA PEM"));
    }
    let http = http.build().expect("client");
    let response = http
        .post(format!("https://{addr}/validate"))
        .body("{\"not\": \"a review\"}")
        .send()
        .await
        .expect("TLS handshake with the CA bundle as the only trust");
    assert!(response.status().is_success());
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["kind"], "AdmissionReview");
    assert_eq!(
        body["response"]["allowed"], false,
        "invalid body refused: {body}"
    );
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("server stops")
        .expect("server task");
}

/// Verifies `cert` for 127.0.0.1 against `ca_bundle_pem` as of `at`, as a TLS client would
/// then (certificates renewed in the tests' future are not valid yet today).
fn assert_chains(cert: &webhook::ServingCert, ca_bundle_pem: &str, at: Timestamp) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_bundle_pem.as_bytes()) {
        roots.add(ca.expect("CA PEM")).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
    let chain: Vec<_> = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("certificate PEM");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let now = UnixTime::since_unix_epoch(Duration::from_secs(at.as_second() as u64));
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        &chain[0],
        &chain[1..],
        &name,
        &[],
        now,
    )
    .unwrap_or_else(|e| panic!("certificate does not verify against the bundle: {e}"));
}

fn pem_blocks(bundle: &str) -> Vec<String> {
    bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .map(|b| b.trim().to_string())
        .collect()
}

#[tokio::test]
async fn self_managed_certificates_are_shared_by_replicas_and_renewed_before_expiry() {
    let client = client().await;
    let ns = fresh_namespace(&client, "wh-certs").await;
    let cfg = certs(&ns);
    // Two replicas starting at once agree on one certificate.
    let (a, b) = tokio::join!(
        load_or_create_certificates(&client, &cfg),
        load_or_create_certificates(&client, &cfg)
    );
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_eq!(a, b, "both replicas serve the same certificate and key");
    assert_eq!(
        load_or_create_certificates(&client, &cfg)
            .await
            .expect("again"),
        a,
        "a restart reads it back"
    );
    assert_eq!(count_certs(&a.ca_bundle_pem), 1);
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("webhook-cert")
        .await
        .expect("the Secret exists");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_served_and_trusted(&a, &a.ca_bundle_pem).await;

    // Past two thirds of its year: a new serving certificate from the same CA.
    let now = Timestamp::now();
    assert!(a.renew_at > now + SignedDuration::from_hours(200 * 24));
    assert!(a.renew_at < now + SignedDuration::from_hours(250 * 24));
    let later = now + SignedDuration::from_hours(300 * 24);
    let renewed = load_or_create_certificates_at(&client, &cfg, later)
        .await
        .expect("renewal");
    assert_ne!(renewed.cert_pem, a.cert_pem, "renewed");
    assert_ne!(renewed.key_pem, a.key_pem, "with a new key");
    assert_eq!(renewed.ca_bundle_pem, a.ca_bundle_pem, "under the same CA");
    assert!(renewed.serving_not_after > a.serving_not_after);
    assert_eq!(
        load_or_create_certificates_at(&client, &cfg, later)
            .await
            .expect("read back"),
        renewed,
        "the other replica picks up the renewal"
    );
    // The renewed certificate chains to the CA the webhook configurations already trust.
    assert_chains(&renewed, &a.ca_bundle_pem, later);

    // Past two thirds of the CA's ten years: a new CA, the old one still in the bundle.
    let much_later = now + SignedDuration::from_hours(7 * 365 * 24);
    let new_ca = load_or_create_certificates_at(&client, &cfg, much_later)
        .await
        .expect("CA renewal");
    assert_eq!(count_certs(&new_ca.ca_bundle_pem), 2, "new and previous CA");
    assert!(new_ca.ca_bundle_pem.ends_with(&a.ca_bundle_pem));
    assert_chains(&new_ca, &new_ca.ca_bundle_pem, much_later);
    assert!(
        std::panic::catch_unwind(|| assert_chains(&new_ca, &a.ca_bundle_pem, much_later)).is_err(),
        "the new certificate is from the new CA"
    );

    // Other names: reissued for them.
    let mut other = cfg.clone();
    other
        .dns_names
        .push("portcullis-webhook.portcullis.svc".into());
    let reissued = load_or_create_certificates_at(&client, &other, much_later)
        .await
        .expect("reissue");
    assert_ne!(reissued.cert_pem, new_ca.cert_pem);
    assert_eq!(reissued.ca_bundle_pem, new_ca.ca_bundle_pem);
}

#[tokio::test]
async fn the_ca_bundle_is_patched_into_both_configurations_once_they_exist() {
    let client = client().await;
    let ns = fresh_namespace(&client, "wh-bundle").await;
    let cert = load_or_create_certificates(&client, &certs(&ns))
        .await
        .expect("certificate");
    let patcher = CaBundlePatcher::new(client.clone(), &ns);
    // Not installed yet (the chart may come after the operator): nothing to patch, no error.
    let p = patcher.patch(&cert.ca_bundle_pem).await.expect("patch");
    assert!(!p.mutating && !p.validating);

    // Registered without a bundle, as the chart does in self-managed mode; two webhooks in the
    // validating one, to see that every webhook gets it.
    let (mutating, mut validating) =
        support::webhook::configurations(&ns, "127.0.0.1:1".parse().expect("address"), None);
    let mut second = validating["webhooks"][0].clone();
    second["name"] = serde_json::json!("validate-too.portcullis.dev");
    validating["webhooks"]
        .as_array_mut()
        .expect("webhooks")
        .push(second);
    let pp = PatchParams::apply("portcullis-tests").force();
    let m: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let v: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    m.patch(&ns, &pp, &Patch::Apply(&mutating))
        .await
        .expect("mutating");
    v.patch(&ns, &pp, &Patch::Apply(&validating))
        .await
        .expect("validating");
    let guard = Cleanup(ns.clone());

    let p = patcher.patch(&cert.ca_bundle_pem).await.expect("patch");
    assert!(p.both(), "{p:?}");
    let want = Some(cert.ca_bundle_pem.as_bytes().to_vec());
    let mc = m.get(&ns).await.expect("get");
    let hooks = mc.webhooks.expect("webhooks");
    assert_eq!(hooks.len(), 1);
    for h in &hooks {
        assert_eq!(
            h.client_config.ca_bundle.as_ref().map(|b| b.0.clone()),
            want,
            "{}",
            h.name
        );
    }
    let vc = v.get(&ns).await.expect("get");
    let hooks = vc.webhooks.expect("webhooks");
    assert_eq!(hooks.len(), 2, "no webhook lost or added by the patch");
    for h in &hooks {
        assert_eq!(
            h.client_config.ca_bundle.as_ref().map(|b| b.0.clone()),
            want,
            "{}",
            h.name
        );
        assert_eq!(
            h.failure_policy.as_deref(),
            Some("Fail"),
            "the rest of it untouched"
        );
    }
    // Patched already: the next pass writes nothing.
    let rv = vc.metadata.resource_version.clone();
    assert!(
        patcher
            .patch(&cert.ca_bundle_pem)
            .await
            .expect("patch")
            .both()
    );
    assert_eq!(v.get(&ns).await.expect("get").metadata.resource_version, rv);
    drop(guard);
}

/// Deletes the configurations named `.0` when the test ends, however it ends.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kubectl")
            .args([
                "delete",
                "mutatingwebhookconfiguration,validatingwebhookconfiguration",
                &self.0,
                "--ignore-not-found",
                "--wait=false",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[tokio::test]
async fn the_stamp_key_is_created_once_and_read_back() {
    let client = client().await;
    let ns = fresh_namespace(&client, "wh-key").await;
    let (a, b) = tokio::join!(
        load_or_create_stamp_key(&client, &ns, "stamp"),
        load_or_create_stamp_key(&client, &ns, "stamp")
    );
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_eq!(a.as_bytes(), b.as_bytes(), "racing replicas share one key");
    let c = load_or_create_stamp_key(&client, &ns, "stamp")
        .await
        .expect("third");
    assert_eq!(a.as_bytes(), c.as_bytes(), "a restart reads it back");
    assert_eq!(a.as_bytes().len(), 32);
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("stamp")
        .await
        .expect("the Secret exists");
    let stored = secret.data.expect("data")["key"].0.clone();
    assert_eq!(stored, a.as_bytes());
    assert!(
        !format!("{a:?}").contains(&format!("{:?}", &a.as_bytes()[..4])),
        "Debug does not show the key"
    );
    // Another name: another key.
    let other = load_or_create_stamp_key(&client, &ns, "stamp-2")
        .await
        .expect("other");
    assert_ne!(other.as_bytes(), a.as_bytes());
}

/// A CA and a certificate it issued for 127.0.0.1, as PEM: (ca, cert, key).
fn issue_for_localhost(ca_name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, ca_name.to_string());
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("certificate");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

fn https_trusting(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_files_are_served_and_reloaded_when_they_change() {
    let client = client().await;
    let ns = fresh_namespace(&client, "wh-certdir").await;
    let dir = tempfile::tempdir().expect("dir");
    let (ca1, cert1, key1) = issue_for_localhost("first CA");
    let (ca2, cert2, key2) = issue_for_localhost("second CA");
    std::fs::write(dir.path().join("tls.crt"), &cert1).expect("write");
    std::fs::write(dir.path().join("tls.key"), &key1).expect("write");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = futures::FutureExt::shared(async move {
        let _ = rx.await;
    });
    let key = load_or_create_stamp_key(&client, &ns, "stamp")
        .await
        .expect("key");
    let telemetry = portcullis::controller::telemetry::Telemetry::new(None);
    let running = webhook::start(
        client.clone(),
        key,
        webhook::WebhookConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            certs: webhook::CertSource::Dir(dir.path().to_path_buf()),
            telemetry: Some(telemetry.clone()),
        },
        shutdown,
    )
    .await
    .expect("webhook starts");
    let url = format!("https://{}/mutate", running.addr);
    let call = |ca: String| {
        let url = url.clone();
        async move {
            https_trusting(&ca)
                .post(&url)
                .body("not a review")
                .send()
                .await
        }
    };
    let answer = call(ca1.clone())
        .await
        .expect("the mounted certificate is served");
    let review: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(
        review["response"]["allowed"], false,
        "not a review: refused"
    );
    assert!(call(ca2.clone()).await.is_err(), "not yet the second one");
    assert_eq!(running.stats.invalid.load(Ordering::Relaxed), 1);
    let metrics = telemetry.encode().expect("metrics");
    assert!(
        metrics
            .contains("portcullis_webhook_admissions_total{path=\"/mutate\",result=\"invalid\"} 1"),
        "{metrics}"
    );

    assert!(
        CertStore::new()
            .set_pem(cert1.as_bytes(), key2.as_bytes())
            .is_err(),
        "a key that does not match its certificate is refused"
    );
    // cert-manager renews (the files may be caught between the two writes: a mismatched pair
    // is refused and the previous one kept).
    std::fs::write(dir.path().join("tls.key"), &key2).expect("write");
    std::fs::write(dir.path().join("tls.crt"), &cert2).expect("write");
    support::wait_for(
        "the renewed certificate to be served",
        Duration::from_secs(30),
        || {
            let call = call(ca2.clone());
            async move { call.await.ok() }
        },
    )
    .await;
    assert!(call(ca1).await.is_err(), "the old one is no longer served");
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), running.task)
        .await
        .expect("stops on shutdown")
        .expect("task");
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_admission() {
    let client = client().await;
    let ns = fresh_namespace(&client, "wh-limits").await;
    let cert = load_or_create_certificates(&client, &certs(&ns))
        .await
        .expect("certificate");
    let store = CertStore::new();
    store
        .set_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
        .expect("certificate loads");
    let admission = Arc::new(Admission::new(
        StampKey::generate().expect("key"),
        Arc::new(KubeLookup::new(client)),
    ));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = webhook::serve(
        "127.0.0.1:0".parse().expect("address"),
        admission,
        store,
        None,
        async move {
            let _ = rx.await;
        },
    )
    .await
    .expect("binds");
    let (addr, stats) = (server.addr, server.stats.clone());
    let task = tokio::spawn(server.run());
    let http = https_trusting(&cert.ca_bundle_pem);
    let big = vec![b' '; webhook::server::MAX_BODY_BYTES + 1];
    let response = http
        .post(format!("https://{addr}/validate"))
        .body(big)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(stats.requests(), 0, "never reached admission");
    assert_eq!(stats.invalid.load(Ordering::Relaxed), 0);
    let response = http
        .get(format!("https://{addr}/validate"))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), reqwest::StatusCode::METHOD_NOT_ALLOWED);
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("stops")
        .expect("task");
}

#[tokio::test]
async fn the_lookup_reads_grants_policies_and_the_approvals_naming_a_grant() {
    use portcullis::admission::Lookup;
    let client = client().await;
    support::kube::install_these_crds(
        &client,
        [<portcullis::api::AccessApproval as kube::CustomResourceExt>::crd()],
    )
    .await;
    let ns = fresh_namespace(&client, "wh-lookup").await;
    let apply = |kind: &str, name: &str, spec: serde_json::Value| {
        let client = client.clone();
        let ns = ns.clone();
        let (kind, name) = (kind.to_string(), name.to_string());
        async move {
            let obj: kube::core::DynamicObject = serde_json::from_value(serde_json::json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": kind,
                "metadata": {"name": name, "namespace": ns}, "spec": spec,
            }))
            .expect("object");
            let plural = format!("{}s", kind.to_ascii_lowercase());
            let ar = kube::core::ApiResource {
                group: "portcullis.dev".into(),
                version: "v1alpha1".into(),
                api_version: "portcullis.dev/v1alpha1".into(),
                kind: kind.clone(),
                plural: if kind == "JitPolicy" {
                    "jitpolicies".into()
                } else {
                    plural
                },
            };
            Api::<kube::core::DynamicObject>::namespaced_with(client, &ns, &ar)
                .create(&Default::default(), &obj)
                .await
                .unwrap_or_else(|e| panic!("create {kind} {name}: {e}"));
        }
    };
    apply("JitPolicy", "prod", standard_policy()).await;
    apply(
        "AccessGrant",
        "alice",
        grant_spec("vm1", &[22], "203.0.113.7/32", "PT5M"),
    )
    .await;
    for (name, grant, decision) in [
        ("bob-on-alice", "alice", "Approve"),
        ("carol-on-alice", "alice", "Reject"),
        ("bob-on-dave", "dave", "Approve"),
    ] {
        apply(
            "AccessApproval",
            name,
            serde_json::json!({"grantRef": {"name": grant}, "decision": decision}),
        )
        .await;
    }
    let lookup = KubeLookup::new(client.clone());
    let grant = lookup
        .grant(&ns, "alice")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(grant.spec.virtual_machine, "vm1");
    assert!(lookup.grant(&ns, "nobody").await.expect("read").is_none());
    assert!(lookup.policy(&ns, "prod").await.expect("read").is_some());
    assert!(lookup.policy(&ns, "other").await.expect("read").is_none());
    let mut names: Vec<String> = lookup
        .approvals(&ns, "alice")
        .await
        .expect("list")
        .into_iter()
        .map(|a| kube::ResourceExt::name_any(&a))
        .collect();
    names.sort();
    assert_eq!(names, ["bob-on-alice", "carol-on-alice"]);
    assert!(
        lookup
            .approvals(&ns, "nobody")
            .await
            .expect("list")
            .is_empty()
    );
    // An error is an error, not "absent": a client that may read nothing.
    let denied = KubeLookup::new(support::webhook::client_as("nobody", &[]).await);
    let err = denied.grant(&ns, "alice").await.expect_err("forbidden");
    assert!(err.to_string().contains("AccessGrant"), "{err}");
    assert!(denied.approvals(&ns, "alice").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurations_installed_after_the_operator_get_its_ca_and_then_reach_it() {
    let client = client().await;
    support::kube::install_crds(&client).await;
    let ns = fresh_namespace(&client, "wh-late").await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = futures::FutureExt::shared(async move {
        let _ = rx.await;
    });
    let running = webhook::start(
        client.clone(),
        StampKey::generate().expect("key"),
        webhook::WebhookConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            certs: webhook::CertSource::SelfManaged {
                certs: certs(&ns),
                configuration_name: Some(ns.clone()),
            },
            telemetry: None,
        },
        shutdown,
    )
    .await
    .expect("webhook starts");
    // As `helm install` after the operator is up, or the demo: registered without a bundle.
    support::webhook::register(&client, &ns, running.addr, None).await;
    let _cleanup = Cleanup(ns.clone());
    let bundle = load_or_create_certificates(&client, &certs(&ns))
        .await
        .expect("the operator's certificate")
        .ca_bundle_pem;
    let m: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let v: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    support::wait_for("the operator to patch both bundles", T, || {
        let (m, v, ns, bundle) = (m.clone(), v.clone(), ns.clone(), bundle.clone());
        async move {
            let has =
                |b: Option<&k8s_openapi::ByteString>| b.is_some_and(|b| b.0 == bundle.as_bytes());
            let mc = m.get(&ns).await.ok()?;
            let vc = v.get(&ns).await.ok()?;
            (mc.webhooks?
                .iter()
                .all(|w| has(w.client_config.ca_bundle.as_ref()))
                && vc
                    .webhooks?
                    .iter()
                    .all(|w| has(w.client_config.ca_bundle.as_ref())))
            .then_some(())
        }
    })
    .await;
    // The API server now trusts it: a server-side dry run goes through both.
    let grants: Api<portcullis::api::AccessGrant> = Api::namespaced(client.clone(), &ns);
    let probe: portcullis::api::AccessGrant = serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": {"name": "probe"},
        "spec": grant_spec("vm1", &[22], "203.0.113.7/32", "PT5M"),
    }))
    .expect("grant");
    let dry = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    support::wait_for("a dry run through both webhooks", T, || {
        let (grants, probe, dry) = (grants.clone(), probe.clone(), dry.clone());
        let stats = running.stats.clone();
        async move {
            grants.create(&dry, &probe).await.ok()?;
            (stats.mutate.load(Ordering::Relaxed) > 0 && stats.validate.load(Ordering::Relaxed) > 0)
                .then_some(())
        }
    })
    .await;
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), running.task)
        .await
        .expect("stops")
        .expect("task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonated_users_create_through_the_webhook_as_rbac_allows() {
    let env = Env::with_webhook("wh-users").await;
    support::webhook::allow_user(&env.client, &env.ns, "alice").await;
    support::webhook::allow_group(&env.client, &env.ns, "approvers").await;
    let grant = |name: &str| -> portcullis::api::AccessGrant {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": name},
            "spec": grant_spec("vm1", &[22], "203.0.113.7/32", "PT5M"),
        }))
        .expect("grant")
    };
    let before = env.webhook().stats.requests();
    env.grants_as("alice", &["devs"])
        .await
        .create(&Default::default(), &grant("by-alice"))
        .await
        .expect("alice may create grants");
    assert!(
        env.webhook().stats.requests() > before,
        "through the webhook"
    );
    env.grants_as("bob", &["approvers"])
        .await
        .create(&Default::default(), &grant("by-bob"))
        .await
        .expect("a member of approvers may too");
    let err = env
        .grants_as("mallory", &["devs"])
        .await
        .create(&Default::default(), &grant("by-mallory"))
        .await
        .expect_err("mallory has no RBAC");
    assert!(err.to_string().contains("forbidden"), "{err}");
    let approval: portcullis::api::AccessApproval = serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessApproval",
        "metadata": {"name": "bob-on-alice"},
        "spec": {"grantRef": {"name": "by-alice"}, "decision": "Approve"},
    }))
    .expect("approval");
    let before = env.webhook().stats.requests();
    // RBAC lets bob decide; the webhook refuses the decision (the policy needs no approval),
    // which shows that approvals reach it.
    let refused = env
        .approvals_as("bob", &["approvers"])
        .await
        .create(&Default::default(), &approval)
        .await
        .expect_err("no decision on a grant that is not waiting for one");
    assert!(
        refused.to_string().contains("not waiting for a decision"),
        "{refused}"
    );
    assert!(
        env.webhook().stats.requests() > before,
        "through the webhook"
    );
}
