//! The inventory: a ConfigMap in the operator's namespace that lists every NSG this install has
//! ever written, and the sweep that syncs them all every resync, reading them by resource group.
//!
//! Without it an NSG is only synced while a live grant or policy names it, so rules orphaned by
//! a finalizer stripped by hand, a deleted namespace or deleted CRDs would stand forever. And
//! read one by one by the objects that name them, a steady state would cost one read per NSG
//! per resync; one list of a resource group's NSGs reads them all.
//!
//! Write-ahead: an NSG is recorded (and the API server has acknowledged it) before the first
//! Azure write to it; a failure to record refuses the write, so nothing is ever written where
//! the sweep cannot find it later. Data keys are `nsg-` and a hash of the lower-cased NSG id
//! (ARM ids are case-insensitive, and not valid ConfigMap keys); the value is the id itself.
//! Entries are only added or removed one at a time with JSON merge patches, so two writers
//! (an old and a new leader) never undo each other's additions. The ConfigMap is the operator's,
//! not Helm's: it outlives an uninstall on purpose, so a reinstall still sweeps.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::Error;
use super::context::Ctx;
use super::nsg::Listed;
use super::world::World;
use crate::azure::{AzureError, ResourceId};
use crate::plan::{nsgs_of_grant, nsgs_of_policy};

/// The ConfigMap's default name.
pub const DEFAULT_NAME: &str = "portcullis-inventory";

/// NSGs synced at once by one sweep.
const SWEEP_CONCURRENCY: usize = 4;

/// Checks that `name` can name a ConfigMap (a DNS subdomain), so a typo fails at start-up
/// rather than refusing every Azure write later.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "inventory ConfigMap name `{name}` is not a valid Kubernetes name"
        )))
    }
}

/// The data key of an NSG: stable across releases (it is stored), the same for every casing.
pub fn key(nsg_id: &str) -> String {
    let digest = Sha256::digest(nsg_id.trim().to_ascii_lowercase().as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("nsg-{hex}")
}

pub struct Inventory {
    api: Api<ConfigMap>,
    name: String,
    /// key -> NSG id, as known to be in the ConfigMap; `None` until first read. Held across
    /// each API call, so this process's own adds and removes never overtake each other.
    entries: tokio::sync::Mutex<Option<BTreeMap<String, String>>>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Inventory {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Inventory {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            entries: tokio::sync::Mutex::new(None),
        }
    }

    /// What the ConfigMap lists now (nothing if it does not exist yet).
    async fn read(&self) -> Result<BTreeMap<String, String>, kube::Error> {
        Ok(self
            .api
            .get_opt(&self.name)
            .await?
            .and_then(|cm| cm.data)
            .unwrap_or_default())
    }

    /// Adds (`Some`) or removes (`None`) entries by a merge patch, creating the ConfigMap if it
    /// does not exist. Returns once the API server has stored the change.
    async fn write(&self, changes: BTreeMap<String, Option<String>>) -> Result<(), kube::Error> {
        let patch = json!({ "data": changes });
        for _ in 0..3 {
            match self
                .api
                .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
            let data: BTreeMap<String, String> = changes
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
                .collect();
            if data.is_empty() {
                return Ok(()); // nothing to remove from a ConfigMap that does not exist
            }
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "portcullis".to_string(),
                    )])),
                    annotations: Some(BTreeMap::from([(
                        "portcullis.dev/inventory".to_string(),
                        "NSGs this operator has written; swept for orphaned rules. Keep it."
                            .to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            match self.api.create(&PostParams::default(), &cm).await {
                Ok(_) => return Ok(()),
                // Created meanwhile (another replica): patch it on the next round.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Err(kube::Error::Api(
            kube::core::Status::failure(
                &format!("inventory ConfigMap {} kept changing", self.name),
                "Conflict",
            )
            .with_code(409)
            .boxed(),
        ))
    }

    async fn loaded<'a>(
        &self,
        entries: &'a mut Option<BTreeMap<String, String>>,
    ) -> Result<&'a mut BTreeMap<String, String>, kube::Error> {
        if entries.is_none() {
            *entries = Some(self.read().await?);
        }
        Ok(entries.get_or_insert_with(BTreeMap::new))
    }

    /// Records the NSG before anything is written to it. Only a new NSG costs an API call.
    pub async fn record(&self, nsg_id: &str) -> Result<(), kube::Error> {
        let mut guard = self.entries.lock().await;
        let entries = self.loaded(&mut guard).await?;
        let key = key(nsg_id);
        if entries.contains_key(&key) {
            return Ok(());
        }
        info!(nsg = nsg_id, inventory = %self.name, "recording a new NSG in the inventory");
        self.write(BTreeMap::from([(key.clone(), Some(nsg_id.to_string()))]))
            .await?;
        entries.insert(key, nsg_id.to_string());
        Ok(())
    }

    /// Drops an NSG that no longer exists.
    pub async fn forget(&self, nsg_id: &str) -> Result<(), kube::Error> {
        let mut guard = self.entries.lock().await;
        let entries = self.loaded(&mut guard).await?;
        let key = key(nsg_id);
        self.write(BTreeMap::from([(key.clone(), None)])).await?;
        entries.remove(&key);
        Ok(())
    }

    /// Re-reads the ConfigMap and returns every NSG recorded. Entries another process added
    /// are taken in; entries this process recorded that are missing (the ConfigMap deleted or
    /// edited by hand) are written back, so a lost inventory heals within one sweep.
    pub async fn refresh(&self) -> Result<Vec<String>, kube::Error> {
        let mut guard = self.entries.lock().await;
        let stored = self.read().await?;
        let entries = guard.get_or_insert_with(BTreeMap::new);
        let missing: BTreeMap<String, Option<String>> = entries
            .iter()
            .filter(|(k, _)| !stored.contains_key(*k))
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        if !missing.is_empty() {
            warn!(count = missing.len(), inventory = %self.name, "inventory entries went missing; writing them back");
            self.write(missing).await?;
        }
        // Keep only well-formed entries: a value that is not the id its key names is noise.
        entries.extend(stored.into_iter().filter(|(k, v)| *k == key(v)));
        Ok(entries.values().cloned().collect())
    }
}

/// The NSGs some live policy or grant names: their own reconciles sync them every resync.
fn named_nsgs(world: &World) -> HashSet<String> {
    let mut named = HashSet::new();
    for policy in &world.policies {
        named.extend(
            nsgs_of_policy(policy)
                .iter()
                .map(|n| n.to_ascii_lowercase()),
        );
    }
    for grant in &world.grants {
        let policy = world.policy(
            grant.namespace().as_deref().unwrap_or_default(),
            grant.policy_name(),
        );
        named.extend(
            nsgs_of_grant(grant, policy)
                .iter()
                .map(|n| n.to_ascii_lowercase()),
        );
    }
    named
}

/// What one sweep did.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    /// NSGs synced because no live object names them.
    pub swept: usize,
    /// NSGs found in line in a list of their resource group's NSGs (named ones included).
    pub listed: usize,
    /// Rules deleted from the NSGs no live object names.
    pub deleted: usize,
    /// NSGs that no longer exist, dropped from the inventory.
    pub dropped: usize,
    /// NSGs that failed (logged and counted; retried next sweep).
    pub failed: usize,
}

/// Checks every inventoried NSG not read in the last half resync against one paged list of
/// NSGs per resource group, and syncs on its own each that the list shows out of line: the
/// normal sync plans it from the whole world, so in an NSG no live object names it deletes
/// exactly the rules of ours nobody explains, and in the others it heals drift. One list read
/// stands for every NSG it shows in line: a steady state reads each resource group's NSGs once
/// per sweep (every resync), not each NSG, and the objects' own periodic syncs find them in
/// line. A page is checked without waiting for anything and dropped before any sync. An NSG
/// the lists do not return (gone, or its list failed) is synced with a read of its own if no
/// live object names it, and left to the objects that do otherwise. Each NSG on its own: one
/// failing never stops the others.
pub async fn sweep(ctx: &Ctx, inventory: &Inventory) -> Result<SweepOutcome, kube::Error> {
    let recorded = inventory.refresh().await?;
    ctx.telemetry.set_inventory_nsgs(recorded.len());
    let named = named_nsgs(&ctx.world.snapshot());
    let mut outcome = SweepOutcome::default();
    let mut unlisted = Vec::new();
    let mut out_of_line = Vec::new();
    for ((subscription, resource_group), nsgs) in by_resource_group(recorded, &mut unlisted) {
        let checked = check_listed(ctx, &subscription, &resource_group, nsgs, &mut outcome).await;
        out_of_line.extend(checked.out_of_line);
        unlisted.extend(checked.unlisted);
    }
    let orphaned = |n: &String| !named.contains(&n.to_ascii_lowercase());
    let to_sync = out_of_line
        .into_iter()
        .map(|n| (n, true))
        .chain(unlisted.into_iter().filter(orphaned).map(|n| (n, false)));
    let mut results = futures::stream::iter(to_sync)
        .map(|(nsg, fresh)| async move {
            let world = || ctx.world.for_nsg(&nsg);
            let result = if fresh {
                ctx.nsgs.sync_fresh(&nsg, world, Timestamp::now()).await
            } else {
                ctx.nsgs.sync(&nsg, world, Timestamp::now()).await
            };
            (nsg, result)
        })
        .buffer_unordered(SWEEP_CONCURRENCY);
    while let Some((nsg, result)) = results.next().await {
        let is_orphaned = orphaned(&nsg);
        outcome.swept += usize::from(is_orphaned);
        record_result(inventory, ctx, &nsg, is_orphaned, result, &mut outcome).await;
    }
    Ok(outcome)
}

/// The recorded NSGs by (subscription, resource group), lower-cased; ids that do not parse go
/// to `unparsed`.
fn by_resource_group(
    recorded: Vec<String>,
    unparsed: &mut Vec<String>,
) -> BTreeMap<(String, String), Vec<String>> {
    let mut groups: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for nsg in recorded {
        match ResourceId::parse_typed(&nsg, "Microsoft.Network", &["networkSecurityGroups"]) {
            Ok(id) => groups
                .entry((
                    id.subscription.to_ascii_lowercase(),
                    id.resource_group.to_ascii_lowercase(),
                ))
                .or_default()
                .push(nsg),
            Err(_) => unparsed.push(nsg),
        }
    }
    groups
}

/// What the lists of one resource group left to sync.
struct Checked {
    /// Shown out of line: to sync with a read of their own.
    out_of_line: Vec<String>,
    /// Due, but returned by no page.
    unlisted: Vec<String>,
}

/// Lists the resource group's NSGs page by page and checks each of `nsgs` that is due against
/// its page (see [`super::nsg::NsgSyncer::check_listed`]), one page held at a time. An NSG read
/// less than half a resync ago is not due (in a burst the rounds read every NSG all the time),
/// and a resource group with none due is not listed.
async fn check_listed(
    ctx: &Ctx,
    subscription: &str,
    resource_group: &str,
    nsgs: Vec<String>,
    outcome: &mut SweepOutcome,
) -> Checked {
    let due = |nsg: &String| {
        ctx.nsgs
            .last_read(nsg)
            .is_none_or(|read| read.elapsed() >= ctx.resync / 2)
    };
    let mut left: BTreeMap<String, String> = nsgs
        .into_iter()
        .filter(due)
        .map(|n| (n.to_ascii_lowercase(), n))
        .collect();
    let mut out_of_line = Vec::new();
    let mut next: Option<String> = None;
    while !left.is_empty() {
        let listed_at = std::time::Instant::now();
        let page = match ctx
            .nsgs
            .azure()
            .list_nsgs_page(subscription, resource_group, next.as_deref())
            .await
        {
            Ok(page) => page,
            Err(e) => {
                warn!(subscription, resource_group, error = %e, "sweep: could not list the resource group's NSGs; the next sweep retries");
                ctx.telemetry.sweep_failed();
                break;
            }
        };
        let listed = match page.nsgs() {
            Ok(listed) => listed,
            Err(e) => {
                warn!(subscription, resource_group, error = %e, "sweep: a page of the resource group's NSGs does not parse; the next sweep retries");
                ctx.telemetry.sweep_failed();
                break;
            }
        };
        for listed in listed {
            let Some(nsg) = left.remove(&listed.nsg_id.to_ascii_lowercase()) else {
                continue;
            };
            // An NSG whose rules do not parse here is read on its own, which says why.
            let in_line = listed.rules().map(|rules| {
                let world = || ctx.world.for_nsg(&nsg);
                ctx.nsgs
                    .check_listed(&nsg, world, Timestamp::now(), &rules, listed_at)
            });
            match in_line.unwrap_or(Listed::OutOfLine) {
                Listed::InLine => outcome.listed += 1,
                Listed::Busy => {}
                Listed::OutOfLine => out_of_line.push(nsg),
            }
        }
        match page.next {
            Some(link) => next = Some(link),
            None => break,
        }
    }
    Checked {
        out_of_line,
        unlisted: left.into_values().collect(),
    }
}

/// Logs and counts one NSG's sync; an NSG that no longer exists leaves the inventory.
async fn record_result(
    inventory: &Inventory,
    ctx: &Ctx,
    nsg: &str,
    orphaned: bool,
    result: Result<super::nsg::NsgOutcome, Error>,
    outcome: &mut SweepOutcome,
) {
    match result {
        Ok(synced) => {
            if orphaned {
                if !synced.deleted.is_empty() {
                    info!(nsg, rules = ?synced.deleted, "sweep: deleted rules no live object explains");
                }
                outcome.deleted += synced.deleted.len();
            }
        }
        Err(Error::Azure(AzureError::NotFound { .. })) => {
            info!(
                nsg,
                "sweep: the NSG no longer exists; dropping it from the inventory"
            );
            match inventory.forget(nsg).await {
                Ok(()) => {
                    ctx.telemetry.forget_nsg(nsg);
                    outcome.dropped += 1;
                }
                Err(e) => {
                    warn!(nsg, error = %e, "sweep: could not drop a deleted NSG from the inventory");
                    ctx.telemetry.sweep_failed();
                    outcome.failed += 1;
                }
            }
        }
        Err(e) => {
            warn!(nsg, error = %e, "sweep: could not sync this NSG; the next sweep retries");
            ctx.telemetry.sweep_failed();
            outcome.failed += 1;
        }
    }
}

/// Sweeps once the caches are synced (the world must be whole, or live rules would look
/// orphaned), then every `every`. Never returns while the controllers run.
pub async fn run_sweeps(ctx: Ctx, inventory: Arc<Inventory>, every: Duration) {
    if !ctx.world.wait_ready().await {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match sweep(&ctx, &inventory).await {
            Ok(outcome) => debug!(?outcome, "sweep done"),
            Err(e) => {
                warn!(error = %e, "sweep: cannot read the inventory; the next sweep retries");
                ctx.telemetry.sweep_failed();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_configmap_keys_and_ignore_case() {
        let id = "/subscriptions/S/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/Nsg_1";
        let k = key(id);
        assert_eq!(k, key(&id.to_ascii_lowercase()));
        assert_ne!(k, key(&format!("{id}2")));
        assert!(k.len() <= 253);
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        );
    }

    #[test]
    fn key_is_stable_across_releases() {
        // Stored in the cluster: changing the hash would orphan every recorded entry's key.
        assert_eq!(key("abc"), "nsg-ba7816bf8f01cfea414140de5dae2223");
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name(DEFAULT_NAME).is_ok());
        assert!(validate_name("a.b-c").is_ok());
        for bad in ["", "Upper", "-x", "x-", "a_b", &"a".repeat(254)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
