//! Before the controllers start: close every grant whose expiry passed while the operator was
//! down, so a lapsed grant is not left open for one more moment than it must.

use std::time::Instant;

use jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tracing::info;

use super::Error;
use super::grant::closed_status;
use super::nsg::NsgSyncer;
use super::status::apply_status;
use super::telemetry::Telemetry;
use super::world::World;
use crate::api::{AccessGrant, GrantPhase, JitPolicy};
use crate::plan::nsgs_of_grant;

/// Returns how many grants it closed.
/// `scopes`: the watched namespaces' APIs (or one cluster-wide pair). The world is read from all
/// of them, so that an NSG synced here keeps the rules of every live grant it carries.
pub async fn close_lapsed_grants(
    client: &Client,
    scopes: &[(Api<JitPolicy>, Api<AccessGrant>)],
    nsgs: &NsgSyncer,
    telemetry: &Telemetry,
) -> Result<usize, Error> {
    let started = Instant::now();
    let now = Timestamp::now();
    let mut world = World::default();
    for (policies, grants) in scopes {
        world
            .policies
            .extend(policies.list(&ListParams::default()).await?.items);
        world
            .grants
            .extend(grants.list(&ListParams::default()).await?.items);
    }
    let lapsed: Vec<&AccessGrant> = world
        .grants
        .iter()
        .filter(|g| {
            let status = g.status.as_ref();
            status.and_then(|s| s.phase) == Some(GrantPhase::Active)
                && status
                    .and_then(|s| s.expires_at.as_ref())
                    .is_some_and(|e| e.0 <= now)
        })
        .collect();
    let mut nsg_ids: Vec<String> = Vec::new();
    for grant in &lapsed {
        let policy = world.policy(
            &grant.namespace().unwrap_or_default(),
            &grant.spec.policy_ref.name,
        );
        for nsg in nsgs_of_grant(grant, policy) {
            if !nsg_ids.iter().any(|n| n.eq_ignore_ascii_case(&nsg)) {
                nsg_ids.push(nsg);
            }
        }
    }
    // One sync per NSG closes every lapsed grant in it: they are not live at `now`.
    for nsg in &nsg_ids {
        nsgs.sync(nsg, || world.clone(), now).await?;
    }
    for grant in &lapsed {
        let api: Api<AccessGrant> =
            Api::namespaced(client.clone(), &grant.namespace().unwrap_or_default());
        let msg = "access ended while the operator was down; closed at start-up";
        let status = closed_status(grant, GrantPhase::Expired, "Expired", msg, now);
        apply_status(&api, *grant, &status).await?;
        if let Some(expired) = &status.expires_at {
            telemetry.grant_closed_at_expiry(now.duration_since(expired.0).as_secs_f64());
        }
    }
    info!(
        closed = lapsed.len(),
        nsgs = nsg_ids.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "start-up: lapsed grants closed"
    );
    Ok(lapsed.len())
}
