//! The controller's view of the cluster: the reflector stores, corrected by what this process
//! itself wrote a moment ago and the store has not caught up with yet. Every NSG is planned from
//! this whole view, since one NSG can carry rules of many policies and grants.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::decode::strip_bookkeeping;
use crate::api::{AccessApproval, AccessGrant, JitPolicy, JitScope};
use crate::locks::lock;
use crate::plan::desired::{
    Indexed, PolicyIndex, RuleIntent, desired_rules_indexed, grant_keys_behind_indexed,
    with_indexes,
};
use crate::plan::{GrantKey, Naming, PolicyCheck, Scopes};

/// A consistent snapshot of policies and grants.
#[derive(Clone, Default)]
pub struct World {
    /// Shared with the reflector stores: a snapshot copies pointers, never objects.
    pub policies: Vec<Arc<JitPolicy>>,
    pub grants: Vec<Arc<AccessGrant>>,
    /// Policies that exist but do not decode: their rules are kept as they stand in Azure.
    pub quarantined_policies: Vec<String>,
    pub approvals: Vec<Arc<AccessApproval>>,
    /// The cluster's JitScopes. `policies` above are already restricted by them (see
    /// [`Scopes::restrict`]).
    pub scopes: Vec<JitScope>,
    /// Whether a namespace no JitScope names may name any VM (`--allow-unscoped-namespaces`).
    pub allow_unscoped: bool,
    /// Beside `policies`, each one's index (see [`PolicyIndex`]) as the view keeps it per
    /// version; empty when none is kept, and then made when needed.
    pub policy_indexes: Vec<Arc<PolicyIndex>>,
    /// Whether the JitScopes have been listed. Until then every namespace looks unscoped:
    /// nothing may be refused, activated or revoked for its scope (the controllers wait). The
    /// start does not wait for them, so that an install whose JitScope CRD is missing (Helm
    /// does not upgrade CRDs) still closes what is due.
    pub scopes_listed: bool,
}

impl World {
    pub fn policy(&self, namespace: &str, name: &str) -> Option<&JitPolicy> {
        self.policies
            .iter()
            .find(|p| p.namespace().as_deref() == Some(namespace) && p.name_any() == name)
            .map(Arc::as_ref)
    }

    /// The approvals (unverified: the caller checks their stamps) naming a grant.
    pub fn approvals_for(&self, namespace: &str, grant: &str) -> Vec<AccessApproval> {
        self.approvals
            .iter()
            .filter(|a| {
                a.namespace().as_deref() == Some(namespace) && a.spec.grant_ref.name == grant
            })
            .map(|a| a.as_ref().clone())
            .collect()
    }

    /// Makes each policy's index, unless they are kept already.
    pub fn index_policies(&mut self) {
        if self.policy_indexes.len() != self.policies.len() {
            self.policy_indexes = self
                .policies
                .iter()
                .map(|p| Arc::new(PolicyIndex::of(p)))
                .collect();
        }
    }

    /// Calls `f` with each policy and its index (see [`with_indexes`]).
    fn with_indexed<R>(&self, f: impl FnOnce(&[Indexed]) -> R) -> R {
        with_indexes(&self.policies, &self.policy_indexes, f)
    }

    /// Every rule this world asks of NSG `nsg_id` at `now` (see [`desired_rules_indexed`]).
    pub fn desired_rules(
        &self,
        nsg_id: &str,
        now: jiff::Timestamp,
        names: &Naming,
    ) -> Vec<RuleIntent> {
        self.with_indexed(|policies| {
            desired_rules_indexed(nsg_id, policies, &self.grants, now, names)
        })
    }

    /// The world's grants by [`GrantKey`], for [`World::behind`].
    pub fn grants_by_key(&self) -> HashMap<GrantKey, Vec<Arc<AccessGrant>>> {
        let mut by_key: HashMap<GrantKey, Vec<Arc<AccessGrant>>> = HashMap::new();
        for grant in &self.grants {
            by_key
                .entry(GrantKey::of(grant))
                .or_default()
                .push(grant.clone());
        }
        by_key
    }

    /// This world with, of its grants, those that may have rules in `nsg_id` (`by_key` is
    /// [`World::grants_by_key`]): the NSG's plan from it is its plan from the whole world.
    pub fn behind(&self, nsg_id: &str, by_key: &HashMap<GrantKey, Vec<Arc<AccessGrant>>>) -> World {
        let grants = self
            .with_indexed(|policies| grant_keys_behind_indexed(nsg_id, policies))
            .iter()
            .filter_map(|key| by_key.get(key))
            .flatten()
            .cloned()
            .collect();
        World {
            policies: self.policies.clone(),
            policy_indexes: self.policy_indexes.clone(),
            grants,
            quarantined_policies: self.quarantined_policies.clone(),
            approvals: self.approvals.clone(),
            scopes: self.scopes.clone(),
            allow_unscoped: self.allow_unscoped,
            scopes_listed: self.scopes_listed,
        }
    }

    /// The scopes, as the pure checks take them.
    pub fn scopes(&self) -> Scopes<'_> {
        Scopes {
            scopes: &self.scopes,
            allow_unscoped: self.allow_unscoped,
        }
    }
}

/// How long a deleted object's tombstone keeps a lagging store from reviving it.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Overlay {
    policies: HashMap<String, Arc<JitPolicy>>,
    grants: HashMap<String, Arc<AccessGrant>>,
    /// The key of each grant in `grants` (and of some it no longer holds, until pruned): an
    /// NSG's snapshot picks our writes behind it without working out thousands of keys.
    grant_keys: HashMap<String, GrantKey>,
    tombstones: HashMap<String, Instant>,
}

/// The grants of one store by [`GrantKey`], kept from the same watch events that fill the store
/// (applied after the store, before the world's generation moves). An NSG is then planned from
/// the grants behind it, not from every grant in the cluster: at 10,000 grants that was the
/// whole cost of a round.
#[derive(Clone, Default)]
pub struct GrantIndex(Arc<Mutex<IndexEntries>>);

#[derive(Default)]
struct IndexEntries {
    by_key: HashMap<GrantKey, HashSet<ObjectRef<AccessGrant>>>,
    key_of: HashMap<ObjectRef<AccessGrant>, GrantKey>,
    /// During a relist: the grants it has listed so far (the others are gone at its end).
    relisted: Option<HashSet<ObjectRef<AccessGrant>>>,
}

/// Where a grant sits in its store, without the version and uid a store lookup does not use
/// (for references kept per grant: two here, one per NSG in the rounds).
pub fn index_ref(grant: &AccessGrant) -> ObjectRef<AccessGrant> {
    let mut at = ObjectRef::from_obj(grant);
    at.extra = Default::default();
    at
}

impl IndexEntries {
    fn insert(&mut self, grant: &AccessGrant) {
        let at = index_ref(grant);
        let key = GrantKey::of(grant);
        if let Some(relisted) = &mut self.relisted {
            relisted.insert(at.clone());
        }
        if self.key_of.get(&at) == Some(&key) {
            return;
        }
        self.remove(&at);
        self.by_key
            .entry(key.clone())
            .or_default()
            .insert(at.clone());
        self.key_of.insert(at, key);
    }

    fn remove(&mut self, at: &ObjectRef<AccessGrant>) {
        let Some(key) = self.key_of.remove(at) else {
            return;
        };
        if let Some(refs) = self.by_key.get_mut(&key) {
            refs.remove(at);
            if refs.is_empty() {
                self.by_key.remove(&key);
            }
        }
    }
}

impl GrantIndex {
    fn entries(&self) -> std::sync::MutexGuard<'_, IndexEntries> {
        lock(&self.0)
    }

    /// Follows one watch event, as the reflector applies it to the store.
    pub fn apply(&self, event: &watcher::Event<AccessGrant>) {
        let mut entries = self.entries();
        match event {
            watcher::Event::Apply(grant) | watcher::Event::InitApply(grant) => {
                entries.insert(grant)
            }
            watcher::Event::Delete(grant) => entries.remove(&index_ref(grant)),
            watcher::Event::Init => entries.relisted = Some(HashSet::new()),
            watcher::Event::InitDone => {
                if let Some(listed) = entries.relisted.take() {
                    let gone: Vec<_> = entries
                        .key_of
                        .keys()
                        .filter(|at| !listed.contains(*at))
                        .cloned()
                        .collect();
                    for at in &gone {
                        entries.remove(at);
                    }
                }
            }
        }
    }

    /// The grants under any of `keys`, as `store` holds them now.
    fn grants(
        &self,
        keys: &HashSet<GrantKey>,
        store: &Store<AccessGrant>,
    ) -> Vec<Arc<AccessGrant>> {
        let entries = self.entries();
        keys.iter()
            .filter_map(|key| entries.by_key.get(key))
            .flatten()
            .filter_map(|at| store.get(at))
            .collect()
    }
}

/// Which grants a snapshot holds.
#[derive(Clone, Copy)]
enum Grants<'a> {
    None,
    All,
    /// Those that may have rules in this NSG (see [`WorldView::for_nsg`]).
    Behind(&'a str),
}

/// Policies as restricted by the JitScopes (see [`Scopes::restrict`]), per uid at the
/// resourceVersion they were restricted at, all under the JitScopes as `scopes` lists them
/// (uid, resourceVersion): restricting checks every VM of a policy against the scopes, and a
/// snapshot is taken for every reconcile and every NSG round.
#[derive(Default)]
struct Restricted {
    scopes: Vec<(Option<String>, Option<String>)>,
    policies: HashMap<String, RestrictedPolicy>,
}

impl Restricted {
    /// The policy's index, kept with its restriction when `policy` is the very object kept (so
    /// the index is of what the caller sees), else made now.
    fn index_of(&mut self, policy: &JitPolicy) -> Arc<PolicyIndex> {
        let uid = policy.metadata.uid.as_deref().unwrap_or_default();
        match self
            .policies
            .get_mut(uid)
            .filter(|kept| std::ptr::eq(kept.policy.as_ref(), policy))
        {
            Some(kept) => kept
                .index
                .get_or_insert_with(|| Arc::new(PolicyIndex::of(policy)))
                .clone(),
            None => Arc::new(PolicyIndex::of(policy)),
        }
    }
}

struct RestrictedPolicy {
    version: String,
    policy: Arc<JitPolicy>,
    /// Its validation and index, once asked for (see [`WorldView::policy_check`]).
    index: Option<Arc<PolicyIndex>>,
}

/// Stores plus the overlay of our own recent writes.
pub struct WorldView {
    /// One store per watched scope (namespace, or the whole cluster).
    policies: Vec<Store<JitPolicy>>,
    grants: Vec<Store<AccessGrant>>,
    /// Beside each grant store, its index; without them an NSG is planned from every grant.
    grant_indexes: Vec<GrantIndex>,
    approvals: Vec<Store<AccessApproval>>,
    /// The JitScopes (cluster-wide), and the default for namespaces none of them names.
    scopes: Option<Store<JitScope>>,
    allow_unscoped: bool,
    overlay: Mutex<Overlay>,
    restricted: Mutex<Restricted>,
    /// Also holds the world's generation (see [`WorldGeneration`]), which overlay writes advance.
    undecodable: UndecodableMarks,
    /// Set when the controllers are shutting down: the stores stop filling then.
    stopping: std::sync::atomic::AtomicBool,
}

/// Objects that exist but do not decode, by uid: true for a policy, false for anything else.
/// Shared by the decoding streams, which mark them, and the world view, which plans with them.
#[derive(Clone, Default)]
pub struct UndecodableMarks {
    marks: Arc<Mutex<HashMap<String, bool>>>,
    generation: WorldGeneration,
}

impl UndecodableMarks {
    /// The counter these marks advance, and the world with them.
    pub fn generation(&self) -> &WorldGeneration {
        &self.generation
    }

    /// Marks `uid` (`Some(is_policy)`) or clears it (`None`); the world's generation moves when
    /// that changes anything.
    pub fn mark(&self, uid: &str, policy: Option<bool>) {
        let changed = {
            let mut marks = self.lock();
            match policy {
                Some(is_policy) => marks.insert(uid.to_string(), is_policy) != Some(is_policy),
                None => marks.remove(uid).is_some(),
            }
        };
        if changed {
            self.generation.advance();
        }
    }

    pub fn is_marked(&self, uid: &str) -> bool {
        self.lock().contains_key(uid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, bool>> {
        lock(&self.marks)
    }
}

/// A counter that moves whenever the world may have changed: after a watch event reached a
/// store, and on every change to the overlay or the set of undecodable objects. A result computed
/// from a snapshot taken after reading the counter stays right while the counter has not moved
/// (plans are cached on it, so an unchanged world is not planned again at every resync).
#[derive(Clone, Default)]
pub struct WorldGeneration(Arc<std::sync::atomic::AtomicU64>);

impl WorldGeneration {
    pub fn current(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Called after a change is visible in the stores, never before.
    pub fn advance(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether our copy is ahead of the store's. The same version is not: the store has caught up
/// with our write, and the copy must go (kept, it held a second copy of every grant whose last
/// write was ours, and every NSG's snapshot walked them all).
fn newer<K: ResourceExt>(candidate: &K, than: &K) -> bool {
    let rv = |k: &K| k.resource_version().and_then(|v| v.parse::<u64>().ok());
    match (rv(candidate), rv(than)) {
        (Some(a), Some(b)) => a > b,
        _ => true,
    }
}

/// The stored objects with our own newer writes in their place, without the deleted ones; plus
/// our writes the stores do not hold yet, of those `wanted`.
fn merge<K: ResourceExt>(
    stored: Vec<Arc<K>>,
    overlay: &mut HashMap<String, Arc<K>>,
    tombstones: &HashMap<String, Instant>,
    wanted: impl Fn(&K) -> bool,
) -> Vec<Arc<K>> {
    let mut out = Vec::with_capacity(stored.len() + overlay.len());
    // Most syncs find no overlay and no tombstone: then the store's pointers are the answer.
    if overlay.is_empty() && tombstones.is_empty() {
        out.extend(stored);
        return out;
    }
    // Only the overlay's objects the stores also hold: the overlay is small, the stores are not.
    let mut seen = std::collections::HashSet::new();
    for obj in stored {
        let uid = obj.meta().uid.as_deref().unwrap_or_default();
        if tombstones.contains_key(uid) {
            continue;
        }
        let mine = overlay
            .get(uid)
            .map(|mine| newer(mine.as_ref(), obj.as_ref()));
        if mine.is_some() {
            seen.insert(uid.to_string());
        }
        match mine {
            Some(true) => out.extend(overlay.get(uid).cloned()),
            Some(false) => {
                // The store caught up: our copy is no longer needed.
                overlay.remove(uid);
                out.push(obj);
            }
            None => out.push(obj),
        }
    }
    for (uid, mine) in overlay.iter() {
        if !seen.contains(uid) && !tombstones.contains_key(uid) && wanted(mine) {
            out.push(mine.clone());
        }
    }
    out
}

impl WorldView {
    pub fn new(
        policies: Vec<Store<JitPolicy>>,
        grants: Vec<Store<AccessGrant>>,
        approvals: Vec<Store<AccessApproval>>,
    ) -> Self {
        WorldView {
            policies,
            grants,
            grant_indexes: Vec::new(),
            approvals,
            scopes: None,
            allow_unscoped: false,
            overlay: Mutex::new(Overlay::default()),
            restricted: Mutex::new(Restricted::default()),
            undecodable: UndecodableMarks::default(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Shares `undecodable` (marked by the decoding streams, see `decode::Reports`) and its
    /// generation (also advanced by the watch streams after each event reaches a store).
    pub fn with_undecodable_marks(mut self, undecodable: UndecodableMarks) -> Self {
        self.undecodable = undecodable;
        self
    }

    /// The index kept beside each grant store (in the same order), fed by the same watch.
    pub fn with_grant_indexes(mut self, indexes: Vec<GrantIndex>) -> Self {
        self.grant_indexes = indexes;
        self
    }

    /// Restricts every policy to its namespace's JitScopes from `store`; a namespace no scope
    /// names may name any VM only with `allow_unscoped`. Without this call there are no scopes:
    /// every namespace is unscoped.
    pub fn with_scopes(mut self, store: Store<JitScope>, allow_unscoped: bool) -> Self {
        self.scopes = Some(store);
        self.allow_unscoped = allow_unscoped;
        self
    }

    /// The controllers are stopping: nobody waits for the stores any more.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn undecodable(&self) -> std::sync::MutexGuard<'_, HashMap<String, bool>> {
        self.undecodable.lock()
    }

    /// Marks an object as not decoding (or, with `None`, as fine again). A grant that does not
    /// decode leaves the world, so what it opened closes; a policy that does not decode keeps
    /// its rules in Azure as they stand (fail closed either way).
    pub fn set_undecodable(&self, uid: &str, policy: Option<bool>) {
        self.undecodable.mark(uid, policy);
    }

    /// Waits until the policy and grant stores hold their initial listing: planning an NSG from
    /// a partial view would delete rules of objects not seen yet. Approvals are not waited for:
    /// a decision seen late only delays an activation (fail closed), and an install whose
    /// AccessApproval CRD is missing must still close what is due. Returns false if the controllers began to
    /// stop first: once graceful shutdown starts the watches are no longer polled, so the stores
    /// may never fill, and a reconcile waiting for them would hold the shutdown forever.
    pub async fn wait_ready(&self) -> bool {
        // Re-poll with fresh futures: a waiter registered while the other store's readiness is
        // being signalled was seen to miss the wake-up (kube-runtime 5's DelayedInit), which
        // stalled the first reconcile forever.
        loop {
            let both = async {
                // Err means the writer is gone, i.e. the controller is shutting down.
                for store in &self.policies {
                    let _ = store.wait_until_ready().await;
                }
                for store in &self.grants {
                    let _ = store.wait_until_ready().await;
                }
            };
            if tokio::time::timeout(Duration::from_millis(200), both)
                .await
                .is_ok()
            {
                return true;
            }
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
        }
    }

    fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        lock(&self.overlay)
    }

    pub fn snapshot(&self) -> World {
        self.snapshot_of(Grants::All)
    }

    /// A snapshot without the grants: what one grant's reconcile needs (its policy, the scopes,
    /// the approvals), without merging every grant of the cluster with the overlay.
    pub fn snapshot_without_grants(&self) -> World {
        self.snapshot_of(Grants::None)
    }

    /// A snapshot for planning NSG `nsg_id`: every policy, and of the grants those that may have
    /// rules there (by the grant indexes, plus our own recent writes). The NSG's plan from it is
    /// the plan from the whole world.
    pub fn for_nsg(&self, nsg_id: &str) -> World {
        self.snapshot_of(Grants::Behind(nsg_id))
    }

    fn snapshot_of(&self, which: Grants<'_>) -> World {
        let mut overlay = self.overlay();
        let now = Instant::now();
        overlay
            .tombstones
            .retain(|_, at| now.duration_since(*at) < TOMBSTONE_TTL);
        let Overlay {
            policies,
            grants: my_grants,
            grant_keys,
            tombstones,
        } = &mut *overlay;
        let undecodable = self.undecodable();
        let scopes: Vec<JitScope> = self
            .scopes
            .iter()
            .flat_map(Store::state)
            .map(|s| s.as_ref().clone())
            .collect();
        let policies = merge(
            self.policies.iter().flat_map(Store::state).collect(),
            policies,
            tombstones,
            |_| true,
        );
        let policies = self.restrict(policies, &scopes);
        let policy_indexes = self.indexes_of(&policies);
        let stored = match which {
            Grants::None => None,
            Grants::Behind(nsg_id) if self.grant_indexes.len() == self.grants.len() => {
                let keys = with_indexes(&policies, &policy_indexes, |indexed| {
                    grant_keys_behind_indexed(nsg_id, indexed)
                });
                let mut behind: Vec<Arc<AccessGrant>> = self
                    .grants
                    .iter()
                    .zip(&self.grant_indexes)
                    .flat_map(|(store, index)| index.grants(&keys, store))
                    .collect();
                // The stored copy of each of our recent writes behind the NSG too, so `merge`
                // picks the newer as a whole snapshot does (a grant edited since may no longer
                // be behind it).
                let held: HashSet<&str> = behind
                    .iter()
                    .filter_map(|g| g.meta().uid.as_deref())
                    .collect();
                let missing: Vec<ObjectRef<AccessGrant>> = grant_keys
                    .iter()
                    .filter(|(uid, key)| keys.contains(*key) && !held.contains(uid.as_str()))
                    .filter_map(|(uid, _)| my_grants.get(uid))
                    .map(|mine| ObjectRef::from_obj(mine.as_ref()))
                    .collect();
                for at in &missing {
                    behind.extend(self.grants.iter().find_map(|store| store.get(at)));
                }
                Some((behind, Some(keys)))
            }
            Grants::All | Grants::Behind(_) => {
                Some((self.grants.iter().flat_map(Store::state).collect(), None))
            }
        };
        let behind = |g: &AccessGrant, keys: &HashSet<GrantKey>| {
            let uid = g.meta().uid.as_deref().unwrap_or_default();
            grant_keys.get(uid).is_some_and(|key| keys.contains(key))
        };
        let mut grants = stored
            .map(|(stored, keys)| {
                merge(stored, my_grants, tombstones, |g| {
                    keys.as_ref().is_none_or(|keys| behind(g, keys))
                })
            })
            .unwrap_or_default();
        if grant_keys.len() > my_grants.len() {
            grant_keys.retain(|uid, _| my_grants.contains_key(uid));
        }
        if !undecodable.is_empty() {
            grants.retain(|g| {
                !g.meta()
                    .uid
                    .as_deref()
                    .is_some_and(|uid| undecodable.contains_key(uid))
            });
        }
        World {
            policies,
            policy_indexes,
            grants,
            quarantined_policies: undecodable
                .iter()
                .filter(|(_, is_policy)| **is_policy)
                .map(|(uid, _)| uid.clone())
                .collect(),
            approvals: self.approvals.iter().flat_map(Store::state).collect(),
            scopes,
            allow_unscoped: self.allow_unscoped,
            scopes_listed: self.scopes.as_ref().is_none_or(|store| {
                futures::FutureExt::now_or_never(store.wait_until_ready()).is_some()
            }),
        }
    }

    /// `policies` restricted by `scopes`, each restricted again only when it or the scopes
    /// changed.
    fn restrict(&self, policies: Vec<Arc<JitPolicy>>, scopes: &[JitScope]) -> Vec<Arc<JitPolicy>> {
        let view = Scopes {
            scopes,
            allow_unscoped: self.allow_unscoped,
        };
        let mut cache = self.restricted_cache();
        let scopes_now: Vec<_> = scopes
            .iter()
            .map(|s| (s.metadata.uid.clone(), s.metadata.resource_version.clone()))
            .collect();
        if cache.scopes != scopes_now {
            cache.policies.clear();
            cache.scopes = scopes_now;
        }
        let mut out = Vec::with_capacity(policies.len());
        for policy in policies {
            let (Some(uid), Some(version)) = (policy.uid(), policy.resource_version()) else {
                out.extend(view.restrict(vec![policy]));
                continue;
            };
            match cache.policies.get(&uid) {
                Some(kept) if kept.version == version => out.push(kept.policy.clone()),
                _ => {
                    let restricted = view.restrict(vec![policy]);
                    if let Some(r) = restricted.first() {
                        let kept = RestrictedPolicy {
                            version,
                            policy: r.clone(),
                            index: None,
                        };
                        cache.policies.insert(uid, kept);
                    }
                    out.extend(restricted);
                }
            }
        }
        if cache.policies.len() > out.len() {
            let present: HashSet<String> = out.iter().filter_map(|p| p.uid()).collect();
            cache.policies.retain(|uid, _| present.contains(uid));
        }
        out
    }

    /// The validation of `policy`, a policy of one of this view's snapshots: made once per
    /// version of the policy (and of the scopes), not at every reconcile of each of its grants.
    pub fn policy_check(&self, policy: &JitPolicy) -> PolicyCheck {
        self.restricted_cache().index_of(policy).check.clone()
    }

    /// Each policy's index (see [`Restricted::index_of`]).
    fn indexes_of(&self, policies: &[Arc<JitPolicy>]) -> Vec<Arc<PolicyIndex>> {
        let mut cache = self.restricted_cache();
        policies.iter().map(|p| cache.index_of(p)).collect()
    }

    fn restricted_cache(&self) -> std::sync::MutexGuard<'_, Restricted> {
        lock(&self.restricted)
    }

    pub fn record_policy(&self, policy: &JitPolicy) {
        if let Some(uid) = policy.uid() {
            let mut policy = policy.clone();
            strip_bookkeeping(&mut policy.metadata);
            self.overlay().policies.insert(uid, Arc::new(policy));
            self.undecodable.generation().advance();
        }
    }

    pub fn record_grant(&self, grant: &AccessGrant) {
        if let Some(uid) = grant.uid() {
            let mut grant = grant.clone();
            strip_bookkeeping(&mut grant.metadata);
            let mut overlay = self.overlay();
            overlay.grant_keys.insert(uid.clone(), GrantKey::of(&grant));
            overlay.grants.insert(uid, Arc::new(grant));
            drop(overlay);
            self.undecodable.generation().advance();
        }
    }

    /// Our own last write of `grant`, when it is newer than this copy (the watch has not shown
    /// it yet): what a reconcile handed this copy should decide from.
    pub fn newer_write_of(&self, grant: &AccessGrant) -> Option<Arc<AccessGrant>> {
        let uid = grant.uid()?;
        self.overlay()
            .grants
            .get(&uid)
            .filter(|mine| newer(mine.as_ref(), grant))
            .cloned()
    }

    /// The object is gone (its finalizer removed): never let a lagging store bring it back.
    pub fn forget(&self, uid: &str) {
        let mut overlay = self.overlay();
        overlay.policies.remove(uid);
        overlay.grants.remove(uid);
        overlay.grant_keys.remove(uid);
        overlay.tombstones.insert(uid.to_string(), Instant::now());
        drop(overlay);
        self.undecodable.generation().advance();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::desired::tests::mk_grant;
    use crate::plan::validate::tests::grant as grant_spec;
    use kube::runtime::{reflector, watcher};

    fn grant(name: &str, uid: &str, rv: &str) -> AccessGrant {
        let spec = grant_spec("vm1", &[22], "203.0.113.7", "PT1H");
        let mut g = mk_grant("team-a", name, uid, spec, None);
        g.metadata.resource_version = Some(rv.into());
        g
    }

    fn view_of(grants: &[AccessGrant]) -> (WorldView, Store<AccessGrant>) {
        let (store, mut writer) = reflector::store::<AccessGrant>();
        writer.apply_watcher_event(&watcher::Event::Init);
        for g in grants {
            writer.apply_watcher_event(&watcher::Event::InitApply(g.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        (
            WorldView::new(Vec::new(), vec![store.clone()], Vec::new()),
            store,
        )
    }

    /// A snapshot is taken for every NSG sync: it must share the stores' objects, never copy
    /// them (a copy per sync made the cost grow with the square of the grants).
    #[test]
    fn snapshots_share_the_stored_objects() {
        let (view, store) = view_of(&[grant("a", "u1", "5"), grant("b", "u2", "6")]);
        let world = view.snapshot();
        assert_eq!(world.grants.len(), 2);
        for g in &world.grants {
            let stored = store
                .get(&reflector::ObjectRef::from_obj(g.as_ref()))
                .expect("stored");
            assert!(Arc::ptr_eq(g, &stored), "{} was copied", g.name_any());
        }
    }

    fn names_behind(view: &WorldView, nsg: &str) -> Vec<String> {
        let mut names: Vec<String> = view
            .for_nsg(nsg)
            .grants
            .iter()
            .map(|g| g.name_any())
            .collect();
        names.sort();
        names
    }

    /// An NSG's snapshot holds the grants behind it, and the index follows every watch event as
    /// the store does: applies, deletes, and a relist that no longer lists a grant.
    #[test]
    fn an_nsg_is_planned_from_the_grants_behind_it_as_the_index_follows_the_watch() {
        use crate::plan::desired::tests::{NSG_A, NSG_B, example_policy};
        let (policies, mut policy_writer) = reflector::store::<JitPolicy>();
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(example_policy()),
            watcher::Event::InitDone,
        ] {
            policy_writer.apply_watcher_event(&event);
        }
        let (grants, mut grant_writer) = reflector::store::<AccessGrant>();
        let index = GrantIndex::default();
        let mut feed = |event: watcher::Event<AccessGrant>| {
            grant_writer.apply_watcher_event(&event);
            index.apply(&event);
        };
        let on = |name: &str, vm: &str| {
            let spec = grant_spec(vm, &[22], "203.0.113.7", "PT1H");
            mk_grant("team-a", name, &format!("uid-{name}"), spec, Some(600))
        };
        feed(watcher::Event::Init);
        feed(watcher::Event::InitApply(on("g1", "vm1")));
        feed(watcher::Event::InitApply(on("g2", "vm2")));
        feed(watcher::Event::InitDone);
        let view = WorldView::new(vec![policies], vec![grants], Vec::new())
            .with_grant_indexes(vec![index.clone()]);
        // vm1 is behind both NSGs, vm2 behind nsg-b only.
        assert_eq!(names_behind(&view, NSG_A), ["g1"]);
        assert_eq!(names_behind(&view, NSG_B), ["g1", "g2"]);
        feed(watcher::Event::Apply(on("g3", "vm1")));
        feed(watcher::Event::Delete(on("g1", "vm1")));
        assert_eq!(names_behind(&view, NSG_A), ["g3"]);
        // A relist that misses g2 (deleted while the watch was away) drops it.
        feed(watcher::Event::Init);
        feed(watcher::Event::InitApply(on("g3", "vm1")));
        feed(watcher::Event::InitDone);
        assert_eq!(names_behind(&view, NSG_B), ["g3"]);
        assert_eq!(index.entries().key_of.len(), 1, "the index forgets g2 too");
        // Our own recent write counts before the store has it.
        view.record_grant(&on("g4", "vm2"));
        assert_eq!(names_behind(&view, NSG_B), ["g3", "g4"]);
    }

    /// A policy's restriction by the JitScopes is kept while neither changes, and made again
    /// when a scope changes (the policy's resourceVersion stays the same).
    #[test]
    fn a_scope_change_restricts_the_policies_again() {
        use crate::api::JitScopeSpec;
        use crate::plan::desired::tests::example_policy;
        use crate::plan::validate::tests::vm_id;
        let mut policy = example_policy();
        policy.metadata.resource_version = Some("1".into());
        let (policies, mut policy_writer) = reflector::store::<JitPolicy>();
        policy_writer.apply_watcher_event(&watcher::Event::Apply(policy));
        let (scopes, mut scope_writer) = reflector::store::<JitScope>();
        let scope = |rv: &str, vms: Vec<String>| {
            let mut s = JitScope::new(
                "team-a",
                JitScopeSpec {
                    namespaces: vec!["team-a".into()],
                    subscriptions: Vec::new(),
                    resource_groups: Vec::new(),
                    virtual_machines: vms,
                },
            );
            s.metadata.uid = Some("scope-1".into());
            s.metadata.resource_version = Some(rv.into());
            s
        };
        scope_writer.apply_watcher_event(&watcher::Event::Apply(scope(
            "1",
            vec![vm_id("rg1", "vm1")],
        )));
        let view =
            WorldView::new(vec![policies], Vec::new(), Vec::new()).with_scopes(scopes, false);
        let valid = |view: &WorldView| {
            let world = view.snapshot_without_grants();
            crate::plan::validate_policy(&world.policies[0].spec).is_ok()
        };
        assert!(!valid(&view), "vm2 is outside the scope");
        assert!(!valid(&view), "and stays so from the cache");
        scope_writer.apply_watcher_event(&watcher::Event::Apply(scope(
            "2",
            vec![vm_id("rg1", "vm1"), vm_id("rg1", "vm2")],
        )));
        assert!(valid(&view), "the scope now names vm2");
        scope_writer.apply_watcher_event(&watcher::Event::Apply(scope(
            "3",
            vec![vm_id("rg1", "vm1")],
        )));
        assert!(!valid(&view), "and no longer does");
    }

    /// A policy's validation is kept with the version a snapshot holds, and a new version is
    /// validated anew.
    #[test]
    fn a_policy_is_validated_once_per_version() {
        use crate::plan::desired::tests::example_policy;
        let (policies, mut writer) = reflector::store::<JitPolicy>();
        let mut policy = example_policy();
        policy.metadata.resource_version = Some("1".into());
        writer.apply_watcher_event(&watcher::Event::Apply(policy.clone()));
        let (no_scopes, _scope_writer) = reflector::store::<JitScope>();
        // Unscoped namespaces allowed: the policy is judged on its own.
        let view =
            WorldView::new(vec![policies], Vec::new(), Vec::new()).with_scopes(no_scopes, true);
        let check = |view: &WorldView| {
            let world = view.snapshot_without_grants();
            view.policy_check(&world.policies[0])
        };
        assert!(check(&view).spec.is_ok());
        assert!(check(&view).spec.is_ok(), "from the cache");
        policy.metadata.resource_version = Some("2".into());
        policy.spec.virtual_machines.clear();
        writer.apply_watcher_event(&watcher::Event::Apply(policy));
        assert!(check(&view).spec.is_err(), "the new version lists no VM");
        // A copy the snapshot does not hold is validated as it is.
        let mut other = example_policy();
        other.spec.virtual_machines.clear();
        assert!(view.policy_check(&other).spec.is_err());
    }

    /// Once the store holds the version we wrote, our copy goes: the snapshot shares the
    /// store's object and the overlay is empty.
    #[test]
    fn our_copy_goes_once_the_store_has_the_same_version() {
        let (view, store) = view_of(&[grant("a", "u1", "5")]);
        view.record_grant(&grant("a", "u1", "5"));
        let world = view.snapshot();
        let stored = store
            .get(&reflector::ObjectRef::from_obj(world.grants[0].as_ref()))
            .expect("stored");
        assert!(Arc::ptr_eq(&world.grants[0], &stored));
        assert!(view.overlay().grants.is_empty(), "our copy was dropped");
    }

    /// Our own write stands until the store catches up, and a deleted object never comes back.
    #[test]
    fn overlay_and_tombstones_still_apply() {
        let (view, _store) = view_of(&[grant("a", "u1", "5"), grant("b", "u2", "6")]);
        let mut mine = grant("a", "u1", "7");
        mine.spec.justification = "newer".into();
        view.record_grant(&mine);
        view.forget("u2");
        let world = view.snapshot();
        let names: Vec<(String, String)> = world
            .grants
            .iter()
            .map(|g| (g.name_any(), g.spec.justification.clone()))
            .collect();
        assert_eq!(names, vec![("a".to_string(), "newer".to_string())]);
    }
}
