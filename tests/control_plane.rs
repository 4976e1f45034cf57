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
