//! The CRDs against the real API server: they install, `kubectl` accepts the examples, and the
//! server itself refuses malformed objects, naming the field.

mod support;

use std::process::Command;

use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;

use support::kube::{client, fresh_namespace, install_crds};

#[tokio::test]
async fn crds_install_and_become_established() {
    let client = client().await;
    install_crds(&client).await;
    let grants: Api<portcullis::api::AccessGrant> = Api::all(client.clone());
    grants
        .list(&Default::default())
        .await
        .expect("AccessGrants are served");
}

#[tokio::test]
async fn kubectl_explain_describes_the_grant_fields() {
    let client = client().await;
    install_crds(&client).await;
    // The API server publishes a new CRD's OpenAPI a moment after it is Established.
    let text = support::wait_for(
        "kubectl explain accessgrant.spec to succeed",
        std::time::Duration::from_secs(30),
        || async {
            let out = Command::new("kubectl")
                .args(["explain", "accessgrant.spec"])
                .output()
                .expect("kubectl runs");
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await;
    for field in [
        "policyRef",
        "virtualMachine",
        "ports",
        "sourceAddressPrefix",
        "duration",
        "notAfter",
        "justification",
    ] {
        assert!(
            text.contains(field),
            "`kubectl explain accessgrant.spec` lacks {field}:\n{text}"
        );
    }
    assert!(
        text.contains("Why access is needed"),
        "field descriptions come from the Rust doc comments"
    );
}

#[tokio::test]
async fn every_example_is_accepted_by_server_side_dry_run() {
    let client = client().await;
    install_crds(&client).await;
    let examples = support::repo_root().join("examples");
    let mut manifests: Vec<_> = std::fs::read_dir(&examples)
        .expect("examples/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    manifests.sort();
    assert!(
        manifests.len() >= 2,
        "examples/ holds at least a policy and a grant"
    );
    for path in manifests {
        let out = Command::new("kubectl")
            .args(["apply", "--dry-run=server", "-f"])
            .arg(&path)
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "{} refused: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("(server dry run)"));
    }
}

#[tokio::test]
async fn malformed_manifests_are_refused_by_the_api_server_naming_the_field() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "malformed").await;
    let dir = support::repo_root().join("tests/malformed");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/malformed exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    assert!(
        files.len() >= 12,
        "at least 12 malformed manifests, found {}",
        files.len()
    );
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable");
        let field = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# refused: "))
            .unwrap_or_else(|| panic!("{} must start with `# refused: <field>`", path.display()))
            .trim()
            .to_string();
        let obj: DynamicObject =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let kind = obj
            .types
            .as_ref()
            .map(|t| t.kind.clone())
            .unwrap_or_default();
        let resource = match kind.as_str() {
            "AccessGrant" => ApiResource::erase::<portcullis::api::AccessGrant>(&()),
            "JitPolicy" => ApiResource::erase::<portcullis::api::JitPolicy>(&()),
            other => panic!("{}: unexpected kind {other}", path.display()),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match api.create(&pp, &obj).await {
            Ok(_) => panic!(
                "{}: the API server accepted a malformed {kind}",
                path.display()
            ),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{}: {status:?}", path.display());
                assert!(
                    status.message.contains(&format!("{field}:")),
                    "{}: the refusal should name `{field}`, it says: {}",
                    path.display(),
                    status.message
                );
            }
            Err(e) => panic!("{}: unexpected error {e}", path.display()),
        }
    }
}

/// The Event publisher against the real API server: a repeat of the same Event on the same
/// object counts on the first one's series (with the latest note); another reason is its own.
#[tokio::test]
async fn a_repeated_event_is_counted_on_one_event_and_another_reason_is_its_own() {
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::runtime::events::{Event, EventType, Reporter};
    use portcullis::controller::events::EventPublisher;

    let client = client().await;
    let ns = fresh_namespace(&client, "events").await;
    let publisher = EventPublisher::new(
        client.clone(),
        Reporter {
            controller: "portcullis-test".into(),
            instance: None,
        },
    );
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        namespace: Some(ns.clone()),
        name: Some("subject".into()),
        uid: Some("0000-subject".into()),
        ..Default::default()
    };
    let warning = |reason: &str, note: &str| Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    for note in ["first failure", "second failure", "third failure"] {
        publisher
            .publish(&warning("AzureError", note), &regarding)
            .await
            .expect("publish");
    }
    publisher
        .publish(&warning("Denied", "out of policy"), &regarding)
        .await
        .expect("publish");

    let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
    let mut listed: Vec<(String, Option<i32>, String)> = events
        .list(&Default::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.series.map(|s| s.count),
                e.note.unwrap_or_default(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("AzureError".into(), Some(3), "third failure".into()),
            ("Denied".into(), None, "out of policy".into()),
        ]
    );
}

/// A one-off list (the start-up's) reads page by page and misses nothing.
#[tokio::test]
async fn a_list_in_pages_returns_every_object() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use portcullis::controller::decode;

    let client = client().await;
    let ns = fresh_namespace(&client, "pages").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    for i in 0..5 {
        let map: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("map-{i}")}
        }))
        .expect("a ConfigMap");
        maps.create(&PostParams::default(), &map)
            .await
            .expect("create");
    }
    let raw = decode::raw_api::<ConfigMap>(client.clone(), Some(&ns));
    let (listed, undecodable) = decode::list_in_pages::<ConfigMap>(&raw, 2)
        .await
        .expect("list");
    let mut names: Vec<String> = listed
        .iter()
        .filter_map(|m| m.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["map-0", "map-1", "map-2", "map-3", "map-4"]);
    assert!(undecodable.is_empty());
}

/// The operator's client speaks HTTP/2 to the API server: every request a stream of one
/// connection, not a connection each. Lists, a watch and concurrent requests work over it.
#[tokio::test]
async fn the_operators_client_speaks_http2_to_the_api_server() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{WatchStreamExt, watcher};

    let config = kube::Config::infer().await.expect("a kubeconfig");
    let client = portcullis::controller::kube_client::client(config).expect("a client");
    let response = client
        .send(
            http::Request::get("/version")
                .body(kube::client::Body::empty())
                .expect("a request"),
        )
        .await
        .expect("GET /version");
    assert_eq!(response.version(), http::Version::HTTP_2);

    let ns = fresh_namespace(&support::kube::client().await, "h2").await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut watch = Box::pin(watcher(maps.clone(), watcher::Config::default()).applied_objects());
    let creates = (0..20).map(|i| {
        let maps = maps.clone();
        async move {
            let map: ConfigMap = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("map-{i}")}
            }))
            .expect("a ConfigMap");
            maps.create(&PostParams::default(), &map).await
        }
    });
    for created in futures::future::join_all(creates).await {
        created.expect("create over HTTP/2");
    }
    assert_eq!(
        maps.list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        20
    );
    let seen = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        futures::StreamExt::next(&mut watch),
    )
    .await
    .expect("the watch shows a ConfigMap within 30 s")
    .expect("the watch goes on")
    .expect("a watch event");
    assert!(seen.metadata.name.is_some_and(|n| n.starts_with("map-")));
}

/// A status write conditioned on the copy it was decided from (an activation) is refused when
/// that copy is stale, as a reconcile handed a copy older than our own last write would have
/// it, and changes nothing; from the current copy it goes through.
#[tokio::test]
async fn a_status_write_from_a_stale_copy_is_refused_and_changes_nothing() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use portcullis::api::{AccessGrant, AccessGrantStatus, GrantPhase};
    use portcullis::controller::status::apply_status_if_unchanged;

    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "stale").await;
    let grants: Api<AccessGrant> = Api::namespaced(client.clone(), &ns);
    let grant: AccessGrant = serde_json::from_value(serde_json::json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": {"name": "g"},
        "spec": support::operator::grant_spec("vm1", &[22], "203.0.113.7", "PT1H"),
    }))
    .expect("a grant");
    let created = grants
        .create(&PostParams::default(), &grant)
        .await
        .expect("create");
    let at = |secs: i64| Time(jiff::Timestamp::from_second(secs).expect("a time"));
    let first = AccessGrantStatus {
        phase: Some(GrantPhase::Active),
        expires_at: Some(at(2_000_000_000)),
        ..Default::default()
    };
    let written = apply_status_if_unchanged(&grants, &created, &first)
        .await
        .expect("the API server answers")
        .expect("the copy is current: written");
    let later = AccessGrantStatus {
        expires_at: Some(at(2_000_003_600)),
        ..first.clone()
    };
    let refused = apply_status_if_unchanged(&grants, &created, &later)
        .await
        .expect("the API server answers");
    assert!(refused.is_none(), "a write from the stale copy is refused");
    let now = grants.get("g").await.expect("get");
    assert_eq!(
        now.status.and_then(|s| s.expires_at),
        Some(at(2_000_000_000)),
        "the first write stands"
    );
    let moved = apply_status_if_unchanged(&grants, &written, &later)
        .await
        .expect("the API server answers");
    assert!(
        moved.is_some(),
        "from the current copy the write goes through"
    );
}
