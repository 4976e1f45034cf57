//! Before the controllers start: close every grant whose expiry passed while the operator was
//! down, so a lapsed grant is not left open for one more moment than it must. Best effort and
//! bounded: every NSG is closed on its own and at once, whatever fails is logged and left to the
//! controllers (which close lapsed grants first thing anyway), and the controllers start
//! regardless, so one broken NSG or object never keeps every other grant from closing.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::api::Api;
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use super::decode;
use super::grant::closed_status;
use super::nsg::NsgSyncer;
use super::status::apply_status;
use super::telemetry::Telemetry;
use super::world::World;
use crate::api::{AccessGrant, GrantPhase, JitPolicy, JitScope};
use crate::plan::{Scopes, nsgs_of_grant};

/// How long start-up may spend closing before the controllers take over.
const STARTUP_BUDGET: Duration = Duration::from_secs(10);

/// Reads every policy and grant of the watched scopes, object by object. A scope that cannot be
/// listed is skipped: planning from a partial world would delete live grants' rules, so NSGs
/// are only synced when every scope was read. Policies are restricted to their namespaces'
/// JitScopes as in the controllers' view (a policy outside them never gets its new rules).
async fn read_world(
    client: &Client,
    scopes: &[Option<String>],
    allow_unscoped: bool,
) -> Option<World> {
    let mut world = World {
        allow_unscoped,
        ..World::default()
    };
    match decode::list::<JitScope>(&decode::raw_api::<JitScope>(client.clone(), None)).await {
        // An undecodable scope allows nothing.
        Ok((jit_scopes, _)) => {
            world.scopes = jit_scopes;
            world.scopes_listed = true;
        }
        Err(e) => {
            warn!(error = %e, "start-up: could not list JitScopes; the controllers will close lapsed grants");
            return None;
        }
    }
    for ns in scopes {
        let policies_api = decode::raw_api::<JitPolicy>(client.clone(), ns.as_deref());
        let grants_api = decode::raw_api::<AccessGrant>(client.clone(), ns.as_deref());
        let policies = decode::list::<JitPolicy>(&policies_api).await;
        let grants = decode::list::<AccessGrant>(&grants_api).await;
        match (policies, grants) {
            // Undecodable grants are left out of the world: the watch reports each and syncs
            // its NSGs, which closes what it opened.
            (Ok((policies, bad_policies)), Ok((grants, _))) => {
                world
                    .policies
                    .extend(policies.into_iter().map(std::sync::Arc::new));
                world
                    .grants
                    .extend(grants.into_iter().map(std::sync::Arc::new));
                world
                    .quarantined_policies
                    .extend(bad_policies.into_iter().filter_map(|u| u.reference.uid));
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!(namespace = ns.as_deref().unwrap_or("*"), error = %e, "start-up: could not list; the controllers will close lapsed grants");
                return None;
            }
        }
    }
    world.policies = Scopes {
        scopes: &world.scopes,
        allow_unscoped,
    }
    .restrict(std::mem::take(&mut world.policies));
    // Once, not for each NSG planned.
    world.index_policies();
    Some(world)
}

/// Returns how many lapsed grants it closed completely.
pub async fn close_lapsed_grants(
    client: &Client,
    scopes: &[Option<String>],
    nsgs: &NsgSyncer,
    telemetry: &Telemetry,
    allow_unscoped: bool,
) -> usize {
    let started = Instant::now();
    let work = async {
        let world = read_world(client, scopes, allow_unscoped).await?;
        Some(close_in(client, &world, nsgs, telemetry).await)
    };
    let closed = match tokio::time::timeout(STARTUP_BUDGET, work).await {
        Ok(Some(closed)) => closed,
        Ok(None) => 0,
        Err(_) => {
            warn!(
                budget_s = STARTUP_BUDGET.as_secs(),
                "start-up: closing took too long; the controllers take over"
            );
            0
        }
    };
    info!(
        closed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "start-up: lapsed grants closed"
    );
    closed
}

async fn close_in(
    client: &Client,
    world: &World,
    nsgs: &NsgSyncer,
    telemetry: &Telemetry,
) -> usize {
    let now = Timestamp::now();
    let lapsed: Vec<&AccessGrant> = world
        .grants
        .iter()
        .map(std::sync::Arc::as_ref)
        .filter(|g| {
            let status = g.status.as_ref();
            status.and_then(|s| s.phase) == Some(GrantPhase::Active)
                && status
                    .and_then(|s| s.expires_at.as_ref())
                    .is_some_and(|e| e.0 <= now)
        })
        .collect();
    let nsgs_of = |grant: &AccessGrant| {
        let policy = world.policy(&grant.namespace().unwrap_or_default(), grant.policy_name());
        nsgs_of_grant(grant, policy)
    };
    let mut nsg_ids: Vec<String> = Vec::new();
    for grant in &lapsed {
        for nsg in nsgs_of(grant) {
            if !nsg_ids.iter().any(|n| n.eq_ignore_ascii_case(&nsg)) {
                nsg_ids.push(nsg);
            }
        }
    }
    // One sync per NSG closes every lapsed grant in it (they are not live at `now`); all NSGs
    // at once, each on its own.
    let by_key = world.grants_by_key();
    let syncs = nsg_ids.iter().map(|nsg| async {
        let result = nsgs.sync(nsg, || world.behind(nsg, &by_key), now).await;
        (nsg.clone(), result)
    });
    let mut failed: Vec<String> = Vec::new();
    for (nsg, result) in futures::future::join_all(syncs).await {
        match result {
            Ok(_) | Err(super::Error::Azure(crate::azure::AzureError::NotFound { .. })) => {}
            Err(e) => {
                warn!(nsg, error = %e, "start-up: could not close rules in this NSG");
                failed.push(nsg);
            }
        }
    }
    let mut closed = 0;
    for grant in lapsed {
        if nsgs_of(grant)
            .iter()
            .any(|n| failed.iter().any(|f| f.eq_ignore_ascii_case(n)))
        {
            continue; // its reconcile reports the failure in status, with backoff
        }
        let api: Api<AccessGrant> =
            Api::namespaced(client.clone(), &grant.namespace().unwrap_or_default());
        let msg = "access ended while the operator was down; closed at start-up";
        let status = closed_status(grant, GrantPhase::Expired, "Expired", msg, now);
        if let Err(e) = apply_status(&api, grant, &status).await {
            warn!(grant = %grant.name_any(), error = %e, "start-up: rules closed, status not written; the controller retries");
            continue;
        }
        if let Some(expired) = &status.expires_at {
            telemetry.grant_closed_at_expiry(now.duration_since(expired.0).as_secs_f64());
        }
        closed += 1;
    }
    closed
}
