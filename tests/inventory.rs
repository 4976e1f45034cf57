//! Issue 8, defect 5: rules orphaned outside today's view (a finalizer stripped by hand, objects
//! gone while the operator was down, an NSG deleted under it) are swept through the durable
//! inventory of NSGs the operator has written. Real API server, real emulator over HTTP.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use portcullis::api::GrantPhase;
use portcullis::controller::inventory;
use portcullis::controller::telemetry::Telemetry;
use portcullis_azure_emulator::NsgFault;
use serde_json::{Value, json};

use support::operator::{Env, grant_spec, nsg_id, prop, standard_policy};
use support::wait_for;

const T: Duration = Duration::from_secs(30);
const NSGS: [&str; 2] = ["nsg-vm1", "nsg-subnet"];

/// A live grant open on vm1 (both its NSGs) under the standard policy, operator running.
async fn open_grant(prefix: &str) -> Env {
    let mut env = Env::new(prefix).await;
    env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    env.wait_policy_ready("prod", T).await;
    env.create_grant("alice", grant_spec("vm1", &[22], "203.0.113.7/32", "PT1H"))
        .await;
    // Active is recorded before the rules are written; Opened once they stand.
    let grant = env
        .wait_grant_condition("alice", "Ready", "Opened", T)
        .await;
    assert_eq!(
        grant.status.as_ref().and_then(|s| s.phase),
        Some(GrantPhase::Active)
    );
    for nsg in NSGS {
        assert!(
            !env.grant_names_in_nsg(nsg, &grant).await.is_empty(),
            "alice's Allow rule stands in {nsg}"
        );
    }
    env
}

/// Removes every finalizer by hand (as `kubectl patch --type merge` would), then deletes.
async fn strip_and_delete<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap_or_else(|e| panic!("strip finalizers of {name}: {e}"));
    api.delete(name, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    wait_for(&format!("{name} to be gone"), T, || async {
        matches!(api.get_opt(name).await, Ok(None)).then_some(())
    })
    .await;
}

async fn rules_with_access(env: &Env, nsg: &str, access: &str) -> Vec<Value> {
    env.owned_rules(nsg)
        .await
        .into_iter()
        .filter(|r| prop(r, "access") == access)
        .collect()
}

/// The NSG ids the inventory ConfigMap lists (lower-cased), checking each key names its id.
async fn inventoried(env: &Env) -> BTreeSet<String> {
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let Some(cm) = api
        .get_opt(inventory::DEFAULT_NAME)
        .await
        .unwrap_or_else(|e| panic!("get inventory: {e}"))
    else {
        return BTreeSet::new();
    };
    let data = cm.data.unwrap_or_default();
    for (key, id) in &data {
        assert_eq!(key, &inventory::key(id), "key of {id}");
    }
    data.values().map(|id| id.to_ascii_lowercase()).collect()
}

fn ids(names: &[&str]) -> BTreeSet<String> {
    names
        .iter()
        .map(|n| nsg_id(n).to_ascii_lowercase())
        .collect()
}

// Cached copies of deleted objects: a grant whose finalizer is stripped and which is then
// deleted closes within seconds, not at its old expiry (an hour away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_deleted_after_its_finalizer_was_stripped_closes_within_seconds() {
    let env = open_grant("inv-strip").await;
    let grant = env.grants().get("alice").await.expect("alice");
    strip_and_delete(&env.grants(), "alice").await;

    wait_for(
        "alice's Allow rules to be removed",
        Duration::from_secs(10),
        || async {
            for nsg in NSGS {
                if !env.grant_names_in_nsg(nsg, &grant).await.is_empty() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    for nsg in NSGS {
        assert!(
            !rules_with_access(&env, nsg, "Deny").await.is_empty(),
            "the live policy's Deny rules stay in {nsg}"
        );
    }
    env.assert_user_rules_untouched().await;
}

// Orphans outside today's view: the grant and the policy are deleted with their finalizers
// stripped while the operator is down, so no live object names either NSG any more. Started
// again, the operator sweeps the NSGs its inventory lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_no_live_object_names_are_swept_after_a_restart() {
    let mut env = open_grant("inv-sweep").await;
    env.stop_operator().await;
    strip_and_delete(&env.grants(), "alice").await;
    strip_and_delete(&env.policies(), "prod").await;
    for nsg in NSGS {
        assert!(!rules_with_access(&env, nsg, "Allow").await.is_empty());
        assert!(!rules_with_access(&env, nsg, "Deny").await.is_empty());
    }

    env.start_operator();
    wait_for("every orphaned rule to be swept", T, || async {
        for nsg in NSGS {
            if !env.owned_rules(nsg).await.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;
    env.assert_user_rules_untouched().await;
}

// The inventory lists what was written; an NSG failing does not stop the sweep of the other;
// an NSG deleted out of band is dropped from the inventory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_lists_written_nsgs_and_drops_one_deleted_out_of_band() {
    let mut env = open_grant("inv-list").await;
    assert_eq!(inventoried(&env).await, ids(&NSGS));
    env.stop_operator().await;
    strip_and_delete(&env.grants(), "alice").await;
    strip_and_delete(&env.policies(), "prod").await;

    // The NSG the sweep reaches first (inventory order) fails every request: a sweep that
    // stopped at the first failure would never reach the other.
    let mut by_key = NSGS;
    by_key.sort_by_key(|n| inventory::key(&nsg_id(n)));
    let [broken, healthy] = by_key;
    env.admin
        .set_nsg_fault(&NsgFault {
            nsg: nsg_id(broken),
            status: 403,
            code: None,
            message: None,
            writes_only: false,
        })
        .await
        .expect("set fault");
    let telemetry: std::sync::Arc<Telemetry> = env.start_operator();
    wait_for(&format!("{healthy} to be swept"), T, || async {
        env.owned_rules(healthy).await.is_empty().then_some(())
    })
    .await;
    wait_for("the failing NSG to be counted", T, || async {
        (telemetry.sweep_failures() >= 1).then_some(())
    })
    .await;
    assert_eq!(
        inventoried(&env).await,
        ids(&NSGS),
        "a failing NSG stays inventoried"
    );

    env.admin
        .clear_nsg_fault(&nsg_id(broken))
        .await
        .expect("clear");
    wait_for(
        &format!("{broken}'s band usage, once it is swept"),
        T,
        || async { (band_series(&telemetry, broken) == 2).then_some(()) },
    )
    .await;
    env.admin
        .delete_nsg_directly(&nsg_id(broken))
        .await
        .expect("delete NSG");
    wait_for(&format!("{broken} to leave the inventory"), T, || async {
        (inventoried(&env).await == ids(&[healthy])).then_some(())
    })
    .await;
    assert_eq!(
        band_series(&telemetry, broken),
        0,
        "a deleted NSG's band usage is no longer reported"
    );
    assert_eq!(band_series(&telemetry, healthy), 2);
    let foreign_healthy: Vec<Value> = env
        .user_rules_at_start
        .iter()
        .filter(|r| {
            r["id"]
                .as_str()
                .is_some_and(|id| id.contains(&format!("/{healthy}/")))
        })
        .cloned()
        .collect();
    let now: Vec<Value> = env
        .rules(healthy)
        .await
        .into_iter()
        .filter(|r| !support::operator::rule_name(r).starts_with("portcullis-"))
        .collect();
    assert!(!foreign_healthy.is_empty());
    assert_eq!(
        support::invariants::content_of_rules(&now),
        support::invariants::content_of_rules(&foreign_healthy),
        "user rules of {healthy} untouched (but for etags: the sweep wrote the NSG as a whole)"
    );
}

/// How many `band_usage_ratio` series the operator reports for `nsg` (one per band).
fn band_series(telemetry: &Telemetry, nsg: &str) -> usize {
    let body = telemetry.encode().expect("metrics");
    let nsg = format!("nsg=\"{}\"", nsg_id(nsg).to_ascii_lowercase());
    body.lines()
        .filter(|l| l.starts_with("portcullis_band_usage_ratio{") && l.contains(&nsg))
        .count()
}

/// Successful-or-not reconciles of `controller` with `result`, from the operator's metrics.
fn reconciles(telemetry: &Telemetry, controller: &str, result: &str) -> f64 {
    let body = telemetry.encode().expect("metrics");
    let key =
        format!("portcullis_reconciles_total{{controller=\"{controller}\",result=\"{result}\"}}");
    body.lines()
        .find(|l| l.starts_with(&key))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// Write-ahead, fail closed: while the inventory cannot be written (its namespace does not
// exist), nothing is written to Azure at all; once it can, the NSGs are recorded and written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_written_to_an_nsg_the_inventory_cannot_record() {
    let mut env = Env::new("inv-closed").await;
    let inventory_ns = format!("{}-inv", env.ns);
    env.settings.inventory_namespace = Some(inventory_ns.clone());
    let telemetry = env.start_operator();
    env.create_policy("prod", standard_policy()).await;
    wait_for("policy reconciles to fail on the inventory", T, || async {
        (reconciles(&telemetry, "jitpolicy", "InventoryError") >= 2.0).then_some(())
    })
    .await;
    assert_eq!(
        env.writes().await,
        0,
        "no Azure write without the inventory"
    );
    for nsg in NSGS {
        assert!(env.owned_rules(nsg).await.is_empty());
    }

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
    namespaces
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": inventory_ns}}))
                .expect("namespace"),
        )
        .await
        .expect("create the inventory namespace");
    env.wait_policy_ready("prod", T).await;
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &inventory_ns);
    let cm = api.get(inventory::DEFAULT_NAME).await.expect("inventory");
    let listed: BTreeSet<String> = cm
        .data
        .unwrap_or_default()
        .values()
        .map(|v| v.to_ascii_lowercase())
        .collect();
    assert_eq!(listed, ids(&NSGS));
    env.assert_user_rules_untouched().await;
}
