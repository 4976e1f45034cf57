//! Azure scopes per namespace, against the real API server and the emulator: a policy naming a
//! VM outside its namespace's JitScopes is refused (`OutOfScope`) with zero Azure calls for that
//! VM, until a cluster administrator widens the scope; a namespace no JitScope names is closed.

mod support;

use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use portcullis::api::condition::{self, READY};
use portcullis::api::{GrantPhase, JitScope};
use portcullis_azure_emulator::{
    EmulatorConfig, FixtureIpConfig, FixtureNic, FixtureNsg, FixtureResourceGroup, FixtureSubnet,
    FixtureVnet,
};
use serde_json::{Value, json};
use support::operator::{Env, SUB, demo_fixture, grant_spec, standard_policy, vm_id};
use support::wait_for;

const T: Duration = Duration::from_secs(30);

fn web_vm() -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachines/web1"
    )
}

fn web_nsg() -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-web/providers/Microsoft.Network/networkSecurityGroups/nsg-web"
    )
}

/// The demo fixture plus a second resource group, `rg-web`, with VM `web1` behind `nsg-web`.
fn fixture_with_web() -> EmulatorConfig {
    let mut fixture = demo_fixture();
    fixture.subscriptions[0]
        .resource_groups
        .push(FixtureResourceGroup {
            name: "rg-web".into(),
            location: "westeurope".into(),
            network_security_groups: vec![FixtureNsg {
                name: "nsg-web".into(),
                ..Default::default()
            }],
            virtual_networks: vec![FixtureVnet {
                name: "vnet-web".into(),
                subnets: vec![FixtureSubnet {
                    name: "app".into(),
                    address_prefix: "10.1.1.0/24".into(),
                    network_security_group: None,
                }],
            }],
            network_interfaces: vec![FixtureNic {
                name: "web1-nic".into(),
                virtual_machine: Some("web1".into()),
                network_security_group: Some("nsg-web".into()),
                ip_configurations: vec![FixtureIpConfig {
                    name: "ipconfig1".into(),
                    private_ip_address: "10.1.1.4".into(),
                    private_ip_allocation_method: None,
                    subnet: "vnet-web/app".into(),
                    primary: None,
                }],
            }],
            ..Default::default()
        });
    EmulatorConfig {
        fixture,
        ..Default::default()
    }
}

fn web_policy() -> Value {
    json!({
        "virtualMachines": [
            {"id": web_vm(), "ports": [
                {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefixes": ["203.0.113.0/24"], "maxRequestAccessDuration": "PT1H"}
            ]}
        ]
    })
}

fn ready_message(policy: &portcullis::api::JitPolicy) -> String {
    policy
        .status
        .as_ref()
        .and_then(|s| condition::find(&s.conditions, READY))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Every ARM request the emulator saw that concerns resource group `rg-web`, reads included.
async fn requests_for_rg_web(env: &Env) -> Vec<String> {
    env.admin
        .requests()
        .await
        .expect("emulator requests")
        .into_iter()
        .filter(|r| {
            r.path
                .to_ascii_lowercase()
                .contains("/resourcegroups/rg-web/")
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

async fn rules_in(env: &Env, nsg: &str) -> Vec<Value> {
    env.admin
        .rules(nsg)
        .await
        .unwrap_or_else(|e| panic!("emulator rules of {nsg}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_outside_its_namespace_scope_is_refused_until_a_cluster_admin_widens_it() {
    let mut env = Env::with(
        "scope-rg",
        fixture_with_web(),
        portcullis::controller::Settings {
            resync: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    // The cluster administrator allows this namespace resource group rg-demo only.
    let scopes: Api<JitScope> = Api::all(env.client.clone());
    let scope_name = support::kube::scope_name(&env.ns);
    let rg_demo = format!("/subscriptions/{SUB}/resourceGroups/rg-demo");
    scopes
        .patch(
            &scope_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"subscriptions": null, "resourceGroups": [rg_demo]}})),
        )
        .await
        .expect("narrow the scope");
    env.start_operator();

    env.create_policy("web", web_policy()).await;
    let mut alice = grant_spec("web1", &[22], "203.0.113.7/32", "PT1H");
    alice["policyRef"]["name"] = json!("web");
    env.create_grant("alice", alice).await;

    let refused = env.wait_policy_condition("web", "OutOfScope", T).await;
    let message = ready_message(&refused);
    assert!(message.contains(&web_vm()), "names the VM: {message}");
    assert!(
        !message.contains("rg-demo"),
        "does not disclose what the scope allows: {message}"
    );
    let status = refused.status.clone().expect("status");
    assert!(
        status.targets.is_empty() && status.enforced_spec.is_none(),
        "the VM was neither resolved nor enforced: {status:?}"
    );
    let note = env.wait_event("web", "OutOfScope", T).await;
    assert!(note.contains(&web_vm()), "{note}");
    let waiting = env
        .wait_grant_condition("alice", "Ready", "OutOfScope", T)
        .await;
    assert_eq!(
        waiting.status.and_then(|s| s.phase),
        Some(GrantPhase::Pending)
    );

    // An in-scope policy in the same namespace is enforced: the operator is working, and what
    // it planned since never touched rg-web.
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let mut bob = grant_spec("vm1", &[22], "203.0.113.8/32", "PT1H");
    bob["policyRef"]["name"] = json!("prod");
    env.create_grant("bob", bob).await;
    env.wait_grant_condition("bob", "Ready", "Opened", T).await;
    assert_eq!(
        requests_for_rg_web(&env).await,
        Vec::<String>::new(),
        "no Azure call at all for the out-of-scope VM"
    );
    assert!(rules_in(&env, &web_nsg()).await.is_empty());
    let still = env.grants().get("alice").await.expect("alice");
    assert_eq!(
        still.status.and_then(|s| s.phase),
        Some(GrantPhase::Pending),
        "no grant activates under an out-of-scope policy"
    );

    // The cluster administrator widens the scope: the same policy is enforced, its Deny rule
    // stands in nsg-web, and the waiting grant opens.
    let rg_web = format!("/subscriptions/{SUB}/resourceGroups/rg-web");
    scopes
        .patch(
            &scope_name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"resourceGroups": [format!("/subscriptions/{SUB}/resourceGroups/rg-demo"), rg_web]}}),
            ),
        )
        .await
        .expect("widen the scope");
    let enforced = env.wait_policy_ready("web", T).await;
    let uid = enforced.uid().expect("uid");
    let naming = env.settings.naming.clone();
    let deny = wait_for("web's Deny rule in nsg-web", T, || async {
        let rules = rules_in(&env, &web_nsg()).await;
        let mine: Vec<Value> = rules
            .into_iter()
            .filter(|r| naming.is_policy_rule_of(r["name"].as_str().unwrap_or_default(), &uid))
            .collect();
        (!mine.is_empty()).then_some(mine)
    })
    .await;
    assert_eq!(deny[0]["properties"]["access"], "Deny");
    assert_eq!(deny[0]["properties"]["destinationPortRange"], "22");
    let alice = env
        .wait_grant_condition("alice", "Ready", "Opened", T)
        .await;
    let alice_uid = alice.uid().expect("uid");
    assert!(
        rules_in(&env, &web_nsg())
            .await
            .iter()
            .any(|r| naming.is_grant_rule_of(r["name"].as_str().unwrap_or_default(), &alice_uid)),
        "alice's Allow rule stands in nsg-web"
    );

    // Narrowed again: the active grant on a VM no longer in scope is revoked and its rule closed
    // at once, not at its expiry an hour from now.
    scopes
        .patch(
            &scope_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resourceGroups": [rg_demo_again()]}})),
        )
        .await
        .expect("narrow the scope again");
    let revoked = env
        .wait_grant_condition("alice", "Ready", "OutOfScope", T)
        .await;
    assert_eq!(
        revoked.status.as_ref().and_then(|s| s.phase),
        Some(GrantPhase::Revoked)
    );
    wait_for("alice's rule gone from nsg-web", T, || async {
        let standing = rules_in(&env, &web_nsg())
            .await
            .into_iter()
            .any(|r| naming.is_grant_rule_of(r["name"].as_str().unwrap_or_default(), &alice_uid));
        (!standing).then_some(())
    })
    .await;
    // bob's grant, in scope, stays open.
    env.wait_grant_condition("bob", "Ready", "Opened", T).await;
}

fn rg_demo_again() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/rg-demo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_out_of_scope_keeps_the_enforced_deny_rules_and_opens_nothing() {
    let mut env = Env::with(
        "scope-edit",
        fixture_with_web(),
        portcullis::controller::Settings {
            resync: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    let scopes: Api<JitScope> = Api::all(env.client.clone());
    scopes
        .patch(
            &support::kube::scope_name(&env.ns),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"subscriptions": null, "resourceGroups": [format!("/subscriptions/{SUB}/resourceGroups/rg-demo")]}})),
        )
        .await
        .expect("narrow the scope");
    env.start_operator();
    let policy = env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    let uid = policy.uid().expect("uid");
    let naming = env.settings.naming.clone();
    let deny_names = || async {
        let mut names: Vec<String> = Vec::new();
        for nsg in ["nsg-vm1", "nsg-subnet"] {
            names.extend(
                env.rules(nsg)
                    .await
                    .iter()
                    .map(|r| r["name"].as_str().unwrap_or_default().to_string())
                    .filter(|n| naming.is_policy_rule_of(n, &uid)),
            );
        }
        names.sort();
        names
    };
    let before = deny_names().await;
    assert!(!before.is_empty(), "the in-scope policy has Deny rules");

    // The edit adds a VM of rg-web: refused, and nothing of it reaches Azure.
    let mut edited = standard_policy();
    edited["virtualMachines"]
        .as_array_mut()
        .expect("VMs")
        .extend(
            web_policy()["virtualMachines"]
                .as_array()
                .expect("VMs")
                .clone(),
        );
    env.patch_policy_spec("prod", edited).await;
    let refused = env.wait_policy_condition("prod", "OutOfScope", T).await;
    let message = ready_message(&refused);
    assert!(
        message.contains(&web_vm()) && message.contains("Deny rules of the last valid spec stay"),
        "{message}"
    );
    assert_eq!(
        refused.status.and_then(|s| s.enforced_spec),
        Some(serde_json::from_value(standard_policy()).expect("spec")),
        "the enforced spec is still the in-scope one"
    );
    // A grant under it, even for an in-scope VM, waits.
    env.create_grant("carol", grant_spec("vm1", &[22], "203.0.113.9/32", "PT1H"))
        .await;
    env.wait_grant_condition("carol", "Ready", "OutOfScope", T)
        .await;
    assert_eq!(
        deny_names().await,
        before,
        "the enforced Deny rules stay as they were"
    );
    assert_eq!(requests_for_rg_web(&env).await, Vec::<String>::new());
    assert!(rules_in(&env, &web_nsg()).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_no_scope_names_is_refused_by_default() {
    let mut env = Env::new("scope-none").await;
    let unscoped = support::kube::fresh_namespace(&env.client, "scope-none-b").await;
    env.settings.namespaces.push(unscoped.clone());
    env.start_operator();
    let policies: Api<portcullis::api::JitPolicy> = Api::namespaced(env.client.clone(), &unscoped);
    let policy: portcullis::api::JitPolicy = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "JitPolicy",
        "metadata": {"name": "prod", "namespace": unscoped}, "spec": standard_policy()
    }))
    .expect("policy");
    let created = policies
        .create(&Default::default(), &policy)
        .await
        .expect("create");
    let uid = created.uid().expect("uid");
    let refused = wait_for("the unscoped policy OutOfScope", T, || async {
        let p = policies.get("prod").await.ok()?;
        let c = condition::find(&p.status.as_ref()?.conditions, READY)?;
        (c.reason == "OutOfScope").then(|| c.message.clone())
    })
    .await;
    assert!(
        refused.contains("no JitScope names namespace") && refused.contains(&vm_id("vm1")),
        "{refused}"
    );
    // The same policy in the scoped namespace is enforced; the unscoped one never got a rule.
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    for nsg in ["nsg-vm1", "nsg-subnet"] {
        let theirs: Vec<String> = env
            .rules(nsg)
            .await
            .iter()
            .map(|r| r["name"].as_str().unwrap_or_default().to_string())
            .filter(|n| env.settings.naming.is_policy_rule_of(n, &uid))
            .collect();
        assert!(theirs.is_empty(), "{nsg}: {theirs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_unscoped_namespaces_opens_only_namespaces_no_scope_names() {
    let mut env = Env::new("scope-open").await;
    env.settings.allow_unscoped_namespaces = true;
    // The Env's own namespace is scoped (the demo subscription); give it rg-web only, which
    // the flag must not widen.
    let scopes: Api<JitScope> = Api::all(env.client.clone());
    scopes
        .patch(
            &support::kube::scope_name(&env.ns),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"subscriptions": null, "resourceGroups": [format!("/subscriptions/{SUB}/resourceGroups/rg-web")]}})),
        )
        .await
        .expect("narrow the scope");
    let unscoped = support::kube::fresh_namespace(&env.client, "scope-open-b").await;
    env.settings.namespaces.push(unscoped.clone());
    env.start_operator();
    let policies: Api<portcullis::api::JitPolicy> = Api::namespaced(env.client.clone(), &unscoped);
    let policy: portcullis::api::JitPolicy = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "JitPolicy",
        "metadata": {"name": "prod", "namespace": unscoped}, "spec": standard_policy()
    }))
    .expect("policy");
    policies
        .create(&Default::default(), &policy)
        .await
        .expect("create");
    wait_for("the unscoped policy Ready (open mode)", T, || async {
        let p = policies.get("prod").await.ok()?;
        let c = condition::find(&p.status.as_ref()?.conditions, READY)?;
        (c.status == "True").then_some(())
    })
    .await;
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_condition("prod", "OutOfScope", T).await;
}

use support::kubectl;

fn outcome(out: &std::process::Output) -> (bool, String) {
    (out.status.success(), support::output_text(out))
}

#[tokio::test]
async fn only_cluster_admins_and_bound_scope_admins_write_jitscopes() {
    let client = support::kube::client().await;
    support::kube::install_crds(&client).await;
    let ns = support::kube::fresh_namespace(&client, "scope-rbac").await;
    let rbac = support::repo_root().join("examples/rbac");
    for (file, in_ns) in [("policy-admin.yaml", true), ("scope-admin.yaml", false)] {
        let path = rbac.join(file).display().to_string();
        let mut args = vec!["apply", "--server-side", "--force-conflicts", "-f", &path];
        if in_ns {
            args.extend(["-n", &ns]);
        }
        let (ok, text) = outcome(&kubectl(&args, None));
        assert!(ok, "apply {file}: {text}");
    }
    // Even the scope-admin ClusterRole, bound in the namespace, grants nothing on JitScopes.
    let (ok, text) = outcome(&kubectl(
        &[
            "-n",
            &ns,
            "create",
            "rolebinding",
            "scope-admin-in-namespace",
            "--clusterrole=portcullis-scope-admin",
            "--group=team-a-security",
        ],
        None,
    ));
    assert!(ok, "{text}");
    let name = format!("rbac-{ns}");
    let manifest = format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: JitScope\nmetadata: {{ name: {name} }}\nspec:\n  namespaces: [{ns}]\n  subscriptions: [\"{SUB}\"]\n"
    );
    let policy_admin = ["--as", "bob", "--as-group", "team-a-security"];
    let scope_admin = ["--as", "carol", "--as-group", "platform-security"];
    let as_ = |who: &[&str], args: &[&str], stdin: Option<&str>| {
        let all: Vec<&str> = who.iter().chain(args).copied().collect();
        outcome(&kubectl(&all, stdin))
    };
    let (ok, text) = as_(&policy_admin, &["create", "-f", "-"], Some(&manifest));
    assert!(
        !ok && text.contains("forbidden"),
        "policy admin created a JitScope: {text}"
    );
    let (ok, text) = as_(&scope_admin, &["create", "-f", "-"], Some(&manifest));
    assert!(ok, "scope admin: {text}");
    let patch = r#"{"spec":{"subscriptions":["99999999-0000-0000-0000-000000000000"]}}"#;
    let (ok, text) = as_(
        &policy_admin,
        &["patch", "jitscope", &name, "--type=merge", "-p", patch],
        None,
    );
    assert!(
        !ok && text.contains("forbidden"),
        "policy admin widened a JitScope: {text}"
    );
    let (ok, text) = as_(&policy_admin, &["delete", "jitscope", &name], None);
    assert!(
        !ok && text.contains("forbidden"),
        "policy admin deleted a JitScope: {text}"
    );
    let (ok, text) = as_(&scope_admin, &["delete", "jitscope", &name], None);
    assert!(ok, "scope admin delete: {text}");
}
