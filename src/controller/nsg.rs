//! Bringing one NSG in line with the plan: list, plan (pure), then per-rule DELETE/PUT. One sync
//! per NSG at a time in this process, so two reconcilers never pick the same free priority.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use jiff::Timestamp;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{debug, info, instrument, warn};

use super::Error;
use super::inventory::Inventory;
use super::telemetry::Telemetry;
use super::world::{World, WorldGeneration};
use crate::azure::pacing::Admission;
use crate::azure::{BudgetKind, NetworkApi, NsgSnapshot, nsg_json, with_reserved};
use crate::locks::lock;
use crate::plan::rule::NsgRule;
use crate::plan::{Bands, Naming, NsgPlan, RuleIntent, plan_nsg};

/// A rule of ours that stands in an NSG: all that grants and policies record of it. Kept for
/// every rule of every NSG between syncs, so nothing more than the name and the priority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedRule {
    pub name: String,
    pub priority: u16,
}

/// What a sync did and what now stands in the NSG.
#[derive(Clone, Debug, Default)]
pub struct NsgOutcome {
    pub nsg_id: String,
    /// Every Portcullis rule that stands in the NSG after the sync, with its priority. Shared:
    /// every grant the sync answers gets the outcome.
    pub placed: Arc<[PlacedRule]>,
    /// Rules that could not be given a priority: their band is full.
    pub unplaced: Vec<RuleIntent>,
    /// Rules of ours that were changed or deleted by hand and were put back.
    pub corrected: Vec<String>,
    /// Rules that did not exist and were created (new, or deleted by hand and restored).
    pub created: Vec<String>,
    /// Rules of ours that were deleted: closed grants, removed policies, orphans.
    pub deleted: Vec<String>,
    pub writes: usize,
}

impl NsgOutcome {
    fn new(nsg_id: &str) -> NsgOutcome {
        NsgOutcome {
            nsg_id: nsg_id.to_string(),
            ..Default::default()
        }
    }

    /// What stands once `plan` is applied; nothing written yet.
    fn planned(nsg_id: &str, plan: &NsgPlan) -> NsgOutcome {
        NsgOutcome {
            placed: plan
                .placed
                .iter()
                .map(|r| PlacedRule {
                    name: r.name.clone(),
                    priority: r.priority,
                })
                .collect(),
            unplaced: plan.unplaced.clone(),
            ..NsgOutcome::new(nsg_id)
        }
    }
}

/// The longest a sync waits for its place in the subscription's write budget before it writes
/// anyway (Azure's 429s are still honoured): an estimate gone wrong never stalls an NSG. Longer
/// than the client's own bound: in a burst every NSG queues for a write, 10 per second.
const BUDGET_WAIT_MAX: Duration = Duration::from_secs(60);

/// The least time between two writes of one NSG's opens when `usable` of the `full` tokens a
/// bucket can have usable are left: none while it is full; below that, one long-running
/// operation's time (Azure's `Retry-After`, 1 s, about what a write takes anyway) scaled by how
/// far down it is (2 s at half, 4 s at a quarter), up to [`WRITE_SPACING_MAX`].
fn write_spacing(usable: i64, full: i64) -> Option<Duration> {
    if usable >= full {
        return None;
    }
    let ratio = full.max(1) as f64 / usable.max(1) as f64;
    Some(WRITE_SPACING_UNIT.mul_f64(ratio).min(WRITE_SPACING_MAX))
}

/// When grants last asked for syncs (see [`NsgSyncer::asked`]), and whether the budget left
/// would pay for a write of every NSG spacing out now.
#[derive(Clone, Copy)]
struct LastAsked {
    this_nsg: Option<Instant>,
    any_nsg: Option<Instant>,
    budget_for_all: bool,
}

/// When a spacing of `spacing`, due to end at `due`, begun at `began`, ends given the requests
/// so far (see [`NsgSyncer::space_out`]): at `due`, or once requests have stopped coming, for
/// this NSG for a quarter of the spacing, or for every NSG for [`QUIET_MIN`] while the budget
/// left would pay for a write of every NSG spacing out. (Not otherwise: with the budget short,
/// the end of a burst would start every NSG's write at once, to wait in the pacer's queue with
/// its NSG read.)
fn spacing_ends(due: Instant, spacing: Duration, began: Instant, asked: LastAsked) -> Instant {
    let quiet_after =
        |last: Option<Instant>, quiet_for: Duration| last.unwrap_or(began).max(began) + quiet_for;
    let nsg_quiet = quiet_after(asked.this_nsg, (spacing / 4).max(QUIET_MIN));
    let end = due.min(nsg_quiet);
    if asked.budget_for_all {
        end.min(quiet_after(asked.any_nsg, QUIET_MIN))
    } else {
        end
    }
}

/// Counts a sync as spacing out for as long as it lives: in the count the budget rule reads
/// (kept with or without telemetry), and in the `nsgs_spacing_out` gauge and its seconds.
struct SpacingOut<'a> {
    count: &'a AtomicUsize,
    telemetry: Option<&'a Telemetry>,
    began: Instant,
}

impl<'a> SpacingOut<'a> {
    fn begin(count: &'a AtomicUsize, telemetry: Option<&'a Telemetry>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        if let Some(telemetry) = telemetry {
            telemetry.spacing_out_began();
        }
        SpacingOut {
            count,
            telemetry,
            began: Instant::now(),
        }
    }
}

impl Drop for SpacingOut<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        if let Some(telemetry) = self.telemetry {
            telemetry.spacing_out_ended(self.began.elapsed());
        }
    }
}

const WRITE_SPACING_UNIT: Duration = Duration::from_secs(1);
/// Bounds how long a grant can wait for its open to be spaced out.
const WRITE_SPACING_MAX: Duration = Duration::from_secs(10);
/// The least time without a request after which a spaced-out open goes; also how long no NSG
/// at all must be asked for before a burst counts as over.
const QUIET_MIN: Duration = Duration::from_millis(250);

/// What a sync means to write, and what it was asked for.
struct Decision {
    asked: Asked,
    plan: NsgPlan,
}

/// What one whole-NSG write changes among the rules.
#[derive(Default)]
struct RuleEdits {
    deletes: Vec<String>,
    puts: Vec<NsgRule>,
}

/// What a list's copy of an NSG showed (see [`NsgSyncer::check_listed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listed {
    /// As asked: counted as read when the list was.
    InLine,
    /// A sync of it runs now, or began after the list was read: that one reads it.
    Busy,
    /// Something to write, a rule without room, or a copy older than the NSG's last write:
    /// it needs a sync of its own.
    OutOfLine,
}

/// The last successful sync of an NSG: when it began, what it did, and what it was asked for.
struct LastSync {
    started: Instant,
    outcome: NsgOutcome,
    asked: AskedDigest,
    /// It left the NSG as asked (found it so, or wrote it so): nothing without a priority.
    in_line: bool,
}

impl LastSync {
    /// What a sync that would only repeat this one answers: the rules standing, nothing done.
    fn repeated(&self, nsg_id: &str) -> NsgOutcome {
        NsgOutcome {
            placed: self.outcome.placed.clone(),
            ..NsgOutcome::new(nsg_id)
        }
    }
}

/// What the world asks of an NSG: the rules to make stand, and the policies whose rules to keep.
struct Asked {
    desired: Vec<RuleIntent>,
    quarantined: Vec<String>,
    digest: AskedDigest,
}

impl Asked {
    fn new(desired: Vec<RuleIntent>, quarantined: Vec<String>) -> Asked {
        let mut hasher = DigestHasher::default();
        (&desired, &quarantined).hash(&mut hasher);
        Asked {
            desired,
            quarantined,
            digest: AskedDigest(hasher.0.finalize().into()),
        }
    }
}

/// Stands for an [`Asked`] between syncs, where only whether it changed matters: kept for every
/// NSG, so a hash of it rather than a copy of every rule (most of the memory a sync kept, with
/// 10,000 grants). SHA-256, so that two different asks never pass for one.
#[derive(Clone, Copy, PartialEq, Eq)]
struct AskedDigest([u8; 32]);

/// Feeds what `Hash` writes into SHA-256 (its encoding delimits strings and lists, so two
/// different values never write the same bytes).
#[derive(Default)]
struct DigestHasher(Sha256);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Unused: the digest is the whole SHA-256.
    fn finish(&self) -> u64 {
        0
    }
}

/// What the world asked of an NSG, and for how long that answer holds without planning again:
/// while the world's generation has not moved and before the first live grant lapses.
struct Planned {
    generation: u64,
    until: Option<Timestamp>,
    asked: AskedDigest,
}

impl Planned {
    fn holds(&self, generation: u64, now: Timestamp) -> bool {
        self.generation == generation && self.until.is_none_or(|until| now < until)
    }
}

/// One NSG's place in this process: its sync lock, and a signal that reaches a sync while it
/// holds the lock.
#[derive(Default)]
struct NsgSlot {
    state: tokio::sync::Mutex<NsgState>,
    /// A grant asked for its rules in the NSG to be closed (see [`NsgSyncer::close_asked`]).
    close_asked: Notify,
    /// When a grant last asked for the NSG to be synced (see [`NsgSyncer::asked`]).
    last_asked: Mutex<Option<Instant>>,
}

impl NsgSlot {
    fn last_asked(&self) -> Option<Instant> {
        *lock(&self.last_asked)
    }
}

/// Everything this process remembers about one NSG, behind its sync lock.
#[derive(Default)]
struct NsgState {
    last: Option<LastSync>,
    planned: Option<Planned>,
    /// When the last sync that wrote ended.
    last_write: Option<Instant>,
}

/// The earliest `expiresAt` after `now` among the world's grants: where a plan made at `now`
/// may change with no event at all.
fn next_lapse(world: &World, now: Timestamp) -> Option<Timestamp> {
    world
        .grants
        .iter()
        .filter_map(|g| g.status.as_ref()?.expires_at.as_ref().map(|t| t.0))
        .filter(|t| *t > now)
        .min()
}

pub struct NsgSyncer {
    azure: Arc<dyn NetworkApi>,
    bands: Bands,
    naming: Naming,
    slots: Mutex<HashMap<String, Arc<NsgSlot>>>,
    /// When a grant last asked for any NSG (see [`NsgSyncer::asked`]).
    last_asked_any: Mutex<Option<Instant>>,
    /// Syncs spacing out their writes now (over every subscription: an overcount with several).
    spacing_now: AtomicUsize,
    /// Cleared the moment leadership is lost: no write starts after that.
    writes_allowed: AtomicBool,
    /// Where every NSG is recorded before its first write (see `inventory`).
    inventory: Option<Arc<Inventory>>,
    /// Opt-in: set `flushConnection` on every NSG before writing to it, so that closing a rule
    /// also cuts the connections it allowed. The NSGs known to have it set.
    flush_connections: Option<Mutex<HashSet<String>>>,
    one_write_per_nsg: bool,
    /// Where band fullness is reported after each sync.
    telemetry: Option<Arc<Telemetry>>,
    /// How long an NSG found in line stays trusted when nothing it is asked for changed: a sync
    /// asked for the same rules within this time answers without reading Azure. `None` reads on
    /// every sync.
    read_sharing: Option<std::time::Duration>,
    /// With it, what an NSG is asked for is planned again only when the world changed (or a
    /// grant lapsed), not at every sync: a steady state costs no planning.
    world_generation: Option<WorldGeneration>,
}

impl NsgSyncer {
    pub fn new(azure: Arc<dyn NetworkApi>, bands: Bands, naming: Naming) -> Self {
        NsgSyncer {
            azure,
            bands,
            naming,
            slots: Mutex::new(HashMap::new()),
            last_asked_any: Mutex::new(None),
            spacing_now: AtomicUsize::new(0),
            writes_allowed: AtomicBool::new(true),
            inventory: None,
            flush_connections: None,
            one_write_per_nsg: false,
            telemetry: None,
            read_sharing: None,
            world_generation: None,
        }
    }

    /// Plans each NSG again only when `generation` moved since its last plan (see [`Planned`]).
    pub fn with_world_generation(mut self, generation: WorldGeneration) -> Self {
        self.world_generation = Some(generation);
        self
    }

    /// Sets the NSG's `flushConnection` before the first write to it (see SECURITY.md for the
    /// cost: every rule change in that NSG, by anyone, re-evaluates every flow through it).
    /// Several changes to an NSG in one conditional write of the whole NSG (see
    /// `Settings::one_write_per_nsg`).
    pub fn with_one_write_per_nsg(mut self, enabled: bool) -> Self {
        self.one_write_per_nsg = enabled;
        self
    }

    /// Reads each NSG at most once per `fresh_for` while what it is asked for does not change
    /// (a quiet steady state reads once per NSG per resync, not once per object touching it).
    /// Drift by others is then found within `fresh_for` of the last read.
    pub fn with_read_sharing(mut self, fresh_for: std::time::Duration) -> Self {
        self.read_sharing = Some(fresh_for);
        self
    }

    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    pub fn with_flush_connections(mut self, enabled: bool) -> Self {
        self.flush_connections = enabled.then(|| Mutex::new(HashSet::new()));
        self
    }

    /// With the opt-in, makes sure the NSG re-evaluates established flows when rules change: one
    /// conditional whole-NSG PUT that changes only `flushConnection`. Returns the writes made.
    async fn ensure_flush_connection(&self, nsg_id: &str) -> Result<usize, Error> {
        let Some(flushed) = &self.flush_connections else {
            return Ok(0);
        };
        let key = nsg_id.to_ascii_lowercase();
        let flushed = || lock(flushed);
        if flushed().contains(&key) {
            return Ok(0);
        }
        let writes = self
            .write_whole_nsg(nsg_id, None, |snapshot| {
                let flushing = nsg_json::property(&snapshot.raw, "flushConnection")?;
                if flushing.as_ref().and_then(serde_json::Value::as_bool) == Some(true) {
                    return Ok(None);
                }
                snapshot.raw = nsg_json::with_property(
                    &snapshot.raw,
                    "flushConnection",
                    &serde_json::Value::Bool(true),
                )?;
                info!("setting flushConnection on the NSG (opt-in)");
                Ok(Some(RuleEdits::default()))
            })
            .await?;
        flushed().insert(key);
        Ok(writes)
    }

    /// One conditional write of the whole NSG: read it (unless `read` is a snapshot just read),
    /// let `edit` change the snapshot and name the rules to drop and to put (`None`: nothing to
    /// write), PUT it with `If-Match` on the etag just read, and on 412 read and decide again, a
    /// few times. Every other property and rule goes back as read. Returns the number of writes
    /// made.
    async fn write_whole_nsg(
        &self,
        nsg_id: &str,
        mut read: Option<NsgSnapshot>,
        mut edit: impl FnMut(&mut NsgSnapshot) -> Result<Option<RuleEdits>, Error>,
    ) -> Result<usize, Error> {
        const ATTEMPTS: usize = 3;
        let mut writes = 0;
        for attempt in 1..=ATTEMPTS {
            let mut snapshot = match read.take() {
                Some(snapshot) => snapshot,
                None => self.azure.read_nsg(nsg_id).await?,
            };
            let Some(RuleEdits { deletes, puts }) = edit(&mut snapshot)? else {
                return Ok(writes);
            };
            self.check_writes_allowed()?;
            writes += 1;
            match self.azure.put_nsg(snapshot, &deletes, &puts).await {
                Ok(()) => return Ok(writes),
                Err(e) if e.is_precondition_failed() && attempt < ATTEMPTS => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(writes)
    }

    /// Records every NSG in `inventory` before the first write to it.
    pub fn with_inventory(mut self, inventory: Arc<Inventory>) -> Self {
        self.inventory = Some(inventory);
        self
    }

    /// Write-ahead: the NSG is in the inventory before anything is written to it, or nothing
    /// is written (a rule the sweep cannot find later could stand forever).
    async fn record(&self, nsg_id: &str) -> Result<(), Error> {
        match &self.inventory {
            Some(inventory) => inventory
                .record(nsg_id)
                .await
                .map_err(|source| Error::Inventory {
                    nsg: nsg_id.to_string(),
                    source,
                }),
            None => Ok(()),
        }
    }

    pub fn allow_writes(&self, allowed: bool) {
        self.writes_allowed.store(allowed, Ordering::SeqCst);
    }

    fn check_writes_allowed(&self) -> Result<(), Error> {
        if self.writes_allowed.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }

    pub fn azure(&self) -> &Arc<dyn NetworkApi> {
        &self.azure
    }

    /// How this installation names its rules: which rules are whose.
    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    fn slot(&self, nsg_id: &str) -> Arc<NsgSlot> {
        let mut slots = lock(&self.slots);
        slots
            .entry(nsg_id.to_ascii_lowercase())
            .or_default()
            .clone()
    }

    /// A grant's close is due in the NSG (expired, revoked or deleted): a sync spacing out its
    /// opens there (see [`NsgSyncer::space_out`]) stops waiting and plans again, so the close is
    /// not held back behind the spacing. Kept until a sync takes it, so a close asked just before
    /// the wait began still ends it.
    pub fn close_asked(&self, nsg_id: &str) {
        self.slot(nsg_id).close_asked.notify_one();
    }

    /// A grant asked for the NSG to be synced: a sync spacing out its opens there waits until
    /// requests have stopped coming for a while (see [`NsgSyncer::space_out`]).
    pub fn asked(&self, nsg_id: &str) {
        let slot = self.slot(nsg_id);
        let now = Instant::now();
        *lock(&slot.last_asked) = Some(now);
        *lock(&self.last_asked_any) = Some(now);
    }

    /// Removes rules by one conditional PUT of the whole NSG without them (the write Azure
    /// allows under a `CanNotDelete` lock). Returns the number of writes made.
    async fn delete_by_nsg_put(&self, nsg_id: &str, names: &[String]) -> Result<usize, Error> {
        self.write_whole_nsg(nsg_id, None, |snapshot| {
            let present: Vec<String> = names
                .iter()
                .filter(|n| {
                    snapshot
                        .rules
                        .iter()
                        .any(|r| r.name.eq_ignore_ascii_case(n))
                })
                .cloned()
                .collect();
            if present.is_empty() {
                return Ok(None);
            }
            info!(rules = ?present, "rule DELETE refused by a lock: removing by a conditional NSG PUT");
            Ok(Some(RuleEdits {
                deletes: present,
                puts: Vec::new(),
            }))
        })
        .await
    }

    /// Makes the NSG match what `world` asks for at `now`. `world` is taken by a closure so the
    /// snapshot is read after the lock is held, never before.
    #[instrument(skip(self, world), fields(nsg = %nsg_id))]
    pub async fn sync(
        &self,
        nsg_id: &str,
        world: impl Fn() -> World,
        now: Timestamp,
    ) -> Result<NsgOutcome, Error> {
        self.sync_held(nsg_id, &world, now, false).await
    }

    /// [`NsgSyncer::sync`] that reads Azure whatever the last sync found: for an NSG a list's
    /// copy showed out of line (see [`NsgSyncer::check_listed`]).
    #[instrument(skip(self, world), fields(nsg = %nsg_id))]
    pub async fn sync_fresh(
        &self,
        nsg_id: &str,
        world: impl Fn() -> World,
        now: Timestamp,
    ) -> Result<NsgOutcome, Error> {
        self.sync_held(nsg_id, &world, now, true).await
    }

    /// Takes the NSG's slot, then syncs it (see [`NsgSyncer::sync_asked`]). Unless `fresh`,
    /// a sync that began after this request answers it.
    async fn sync_held(
        &self,
        nsg_id: &str,
        world: &impl Fn() -> World,
        now: Timestamp,
        fresh: bool,
    ) -> Result<NsgOutcome, Error> {
        let requested = Instant::now();
        let slot = self.slot(nsg_id);
        let mut state = slot.state.lock().await;
        // A close asked before now is in the world this sync reads.
        let _ = slot.close_asked.notified().now_or_never();
        // Many reconciles ask for the same NSG at once (every grant in a shared subnet NSG): a
        // sync that began after this request read a world at least as new as the caller's, so
        // its result stands for this request too, and the queue drains in one more sync.
        if !fresh && let Some(done) = state.last.as_ref().filter(|d| d.started >= requested) {
            debug!("NSG synced since this request: result shared");
            return Ok(done.outcome.clone());
        }
        self.sync_asked(nsg_id, world, now, &mut state, &slot, fresh)
            .await
    }

    /// Checks the NSG against `listed`, its rules in a list of its resource group's NSGs read at
    /// `listed_at` (one read for many NSGs, see `inventory::sweep`), without calling Azure and
    /// without waiting: found in line, it counts as read then, and the objects' own syncs need
    /// not read it. Anything else is left to a sync of its own.
    pub fn check_listed(
        &self,
        nsg_id: &str,
        world: impl FnOnce() -> World,
        now: Timestamp,
        listed: &[NsgRule],
        listed_at: Instant,
    ) -> Listed {
        let slot = self.slot(nsg_id);
        // A sync running now reads the NSG itself.
        let Ok(mut state) = slot.state.try_lock() else {
            return Listed::Busy;
        };
        if state.last.as_ref().is_some_and(|d| d.started >= listed_at) {
            return Listed::Busy;
        }
        if state.last_write.is_some_and(|w| w >= listed_at) {
            return Listed::OutOfLine;
        }
        let now = now.max(Timestamp::now());
        let asked = self.ask(nsg_id, &mut state.planned, world, now);
        let plan = self.plan_for(&asked, listed);
        if !plan.is_noop() || !plan.unplaced.is_empty() {
            return Listed::OutOfLine;
        }
        if let Some(telemetry) = &self.telemetry {
            telemetry.set_band_usage(nsg_id, plan.band_usage(listed, &self.bands));
        }
        state.last = Some(LastSync {
            started: listed_at,
            in_line: true,
            outcome: NsgOutcome::planned(nsg_id, &plan),
            asked: asked.digest,
        });
        Listed::InLine
    }

    /// The body of a sync once its slot is held: plan, read (unless the NSG was found in line
    /// recently and `fresh` is false) and write, and record the outcome as of its start.
    async fn sync_asked(
        &self,
        nsg_id: &str,
        world: &impl Fn() -> World,
        now: Timestamp,
        state: &mut NsgState,
        slot: &NsgSlot,
        fresh: bool,
    ) -> Result<NsgOutcome, Error> {
        let started = Instant::now();
        // The clock as of now, not as of the caller's reconcile start: the world is read now.
        let now = now.max(Timestamp::now());
        let known = state
            .planned
            .as_ref()
            .and_then(|p| self.still_holds(p, now));
        let (digest, asked) = match known {
            Some(digest) => (digest, None),
            None => {
                let asked = self.ask(nsg_id, &mut state.planned, world, now);
                (asked.digest, Some(asked))
            }
        };
        if !fresh
            && let Some(done) = state
                .last
                .as_ref()
                .filter(|d| self.still_in_line(d, digest))
        {
            debug!("NSG found in line recently and asked for the same: no read");
            return Ok(done.repeated(nsg_id));
        }
        let asked = asked.unwrap_or_else(|| self.ask(nsg_id, &mut state.planned, world, now));
        let (outcome, asked) = self.sync_locked(nsg_id, asked, state, world, slot).await?;
        if outcome.writes > 0 {
            state.last_write = Some(Instant::now());
        }
        state.last = Some(LastSync {
            started,
            // A write that succeeded left the NSG as asked, as surely as a read finding it so.
            in_line: outcome.unplaced.is_empty(),
            outcome: outcome.clone(),
            asked,
        });
        Ok(outcome)
    }

    /// When the NSG was last read by a sync (by its own read, or from a list's copy); `None`
    /// if never. While a sync of it runs, now: that sync reads it.
    pub fn last_read(&self, nsg_id: &str) -> Option<Instant> {
        let slot = self.slot(nsg_id);
        let Ok(state) = slot.state.try_lock() else {
            return Some(Instant::now());
        };
        state.last.as_ref().map(|last| last.started)
    }

    /// The NSG's last outcome, when a sync asked for now would only repeat it: the world has
    /// not changed since its plan was made, no grant has lapsed since, and the NSG was found in
    /// line within the read-sharing window. A reconcile that merely checks (a resync) takes it
    /// instead of waiting for a round. `None` while a sync of the NSG runs.
    pub fn in_line_now(&self, nsg_id: &str) -> Option<NsgOutcome> {
        let slot = self.slot(nsg_id);
        let state = slot.state.try_lock().ok()?;
        let asked = self.still_holds(state.planned.as_ref()?, Timestamp::now())?;
        let last = state.last.as_ref()?;
        self.still_in_line(last, asked)
            .then(|| last.repeated(nsg_id))
    }

    /// What the NSG was last asked for, while that answer still holds at `now`: the world has
    /// not changed since and no grant has lapsed. The generation is read before the world it is
    /// planned from, so a change racing with it only makes the plan look older than it is.
    fn still_holds(&self, planned: &Planned, now: Timestamp) -> Option<AskedDigest> {
        let generation = self.world_generation.as_ref()?.current();
        planned.holds(generation, now).then_some(planned.asked)
    }

    /// What the world asks of the NSG at `now`, planned from a fresh snapshot; recorded (as its
    /// digest) in `planned`.
    fn ask(
        &self,
        nsg_id: &str,
        planned: &mut Option<Planned>,
        world: impl FnOnce() -> World,
        now: Timestamp,
    ) -> Asked {
        let generation = self.world_generation.as_ref().map(WorldGeneration::current);
        let world = world();
        let asked = Asked::new(
            world.desired_rules(nsg_id, now, &self.naming),
            world.quarantined_policies.clone(),
        );
        *planned = generation.map(|generation| Planned {
            generation,
            until: next_lapse(&world, now),
            asked: asked.digest,
        });
        asked
    }

    fn still_in_line(&self, last: &LastSync, asked: AskedDigest) -> bool {
        self.read_sharing
            .is_some_and(|fresh_for| last.started.elapsed() < fresh_for)
            && last.in_line
            && last.asked == asked
    }

    /// Reads the NSG once, plans, and writes what the plan changes. The write first takes its
    /// place in the subscription's budget (see [`NsgSyncer::take_place`]) and, if it had to
    /// wait, is planned again from the world as it is once it may go: in a burst it then carries
    /// every grant that arrived while it waited, instead of going out stale and leaving them to
    /// one more write each. Returns the outcome and (the digest of) what it was asked for in
    /// the end.
    async fn sync_locked(
        &self,
        nsg_id: &str,
        asked: Asked,
        state: &mut NsgState,
        world: &impl Fn() -> World,
        slot: &NsgSlot,
    ) -> Result<(NsgOutcome, AskedDigest), Error> {
        // One read serves the plan and, when it has several changes, the conditional write.
        let snapshot = self.azure.read_nsg(nsg_id).await?;
        let mut decision = Decision {
            plan: self.plan_for(&asked, &snapshot.rules),
            asked,
        };
        let reserved = self
            .take_place(nsg_id, &mut decision, state, world, &snapshot.rules, slot)
            .await;
        let Decision { asked, plan } = decision;
        if let Some(telemetry) = &self.telemetry {
            telemetry.set_band_usage(nsg_id, plan.band_usage(&snapshot.rules, &self.bands));
        }
        if plan.is_noop() {
            debug!(rules = snapshot.rules.len(), "NSG already matches the plan");
            if let Some(place) = reserved {
                place.cancel();
            }
            return Ok((NsgOutcome::planned(nsg_id, &plan), asked.digest));
        }
        let write = self.write_plan(nsg_id, snapshot, &asked, plan);
        let outcome = match reserved {
            Some(place) => with_reserved(place, write).await?,
            None => write.await?,
        };
        Ok((outcome, asked.digest))
    }

    /// Takes the write's place in the subscription's budget before the write is made up, and
    /// plans again if it had to wait for it (or was spaced out, see [`NsgSyncer::space_out`]:
    /// then its urgency and bucket are decided again too).
    /// `None`: nothing to write, or a client that does not pace.
    async fn take_place(
        &self,
        nsg_id: &str,
        decision: &mut Decision,
        state: &mut NsgState,
        world: &impl Fn() -> World,
        rules: &[NsgRule],
        slot: &NsgSlot,
    ) -> Option<Admission> {
        let plan_again = |decision: &mut Decision, planned: &mut Option<Planned>| {
            decision.asked = self.ask(nsg_id, planned, world, Timestamp::now());
            decision.plan = self.plan_for(&decision.asked, rules);
        };
        // A write that closes goes before the opens waiting for the budget, and is never
        // spaced out.
        let urgent = |plan: &NsgPlan| !plan.deletes.is_empty();
        let mut kind = self.budget_kind(&decision.plan)?;
        if !urgent(&decision.plan)
            && self
                .space_out(nsg_id, kind, state.last_write, world, slot)
                .await
        {
            debug!("spaced out: planning the write again");
            plan_again(decision, &mut state.planned);
            kind = self.budget_kind(&decision.plan)?;
        }
        let place = self
            .azure
            .reserve_budget(nsg_id, kind, urgent(&decision.plan), BUDGET_WAIT_MAX)
            .await?;
        if !place.waited.is_zero() {
            debug!(waited = ?place.waited, "waited for the subscription's budget: planning the write again");
            plan_again(decision, &mut state.planned);
        }
        Some(place.admission)
    }

    /// Once the subscription's budget for `kind` is being spent, waits until the NSG's last
    /// write is [`write_spacing`] old. In a burst an NSG's opens then go out less often the
    /// lower the budget runs: each write carries more of the grants arriving meanwhile, and what
    /// is left of the budget goes further, instead of being spent early on rounds that each
    /// carry a few grants. The wait ends sooner once the grants to carry are all there (see
    /// [`spacing_ends`]): no grant has asked for the NSG for a quarter of the spacing, or for any
    /// NSG for [`QUIET_MIN`] (the burst is over, wherever it was) while the budget would pay for
    /// every NSG spacing out. It also ends at the next grant lapse, and when a grant's close is
    /// asked in the NSG (a close must not wait). Returns whether it waited.
    async fn space_out(
        &self,
        nsg_id: &str,
        kind: BudgetKind,
        last_write: Option<Instant>,
        world: &impl Fn() -> World,
        slot: &NsgSlot,
    ) -> bool {
        let (Some(last_write), Some(left)) = (last_write, self.azure.budget_left(nsg_id, kind))
        else {
            return false;
        };
        let Some(spacing) = write_spacing(left.usable, left.full) else {
            return false;
        };
        let mut due = last_write + spacing;
        if let Some(lapse) = next_lapse(&world(), Timestamp::now()) {
            let until_lapse = Duration::try_from(lapse.duration_since(Timestamp::now()))
                .unwrap_or(Duration::ZERO);
            due = due.min(Instant::now() + until_lapse);
        }
        if due <= Instant::now() {
            return false;
        }
        debug!(?spacing, "budget low: spacing out the NSG's writes");
        let spacing_out = SpacingOut::begin(&self.spacing_now, self.telemetry.as_deref());
        loop {
            let spacing_now = self.spacing_now.load(Ordering::Relaxed);
            let asked = LastAsked {
                this_nsg: slot.last_asked(),
                any_nsg: *lock(&self.last_asked_any),
                budget_for_all: self.azure.budget_left(nsg_id, kind).is_some_and(|left| {
                    left.usable >= i64::try_from(spacing_now).unwrap_or(i64::MAX)
                }),
            };
            let wake = spacing_ends(due, spacing, spacing_out.began, asked);
            if wake <= Instant::now() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(wake.into()) => {}
                () = slot.close_asked.notified() => {
                    debug!("a close was asked: spacing ended");
                    break;
                }
            }
        }
        true
    }

    /// The bucket `plan`'s write is charged to; `None` when it writes nothing.
    fn budget_kind(&self, plan: &NsgPlan) -> Option<BudgetKind> {
        if plan.is_noop() {
            None
        } else if self.in_one_write(plan) || !plan.puts.is_empty() {
            Some(BudgetKind::Write)
        } else {
            Some(BudgetKind::Delete)
        }
    }

    /// What `asked` makes of the NSG's rules `existing`.
    fn plan_for(&self, asked: &Asked, existing: &[NsgRule]) -> NsgPlan {
        let mut plan = plan_nsg(existing, &asked.desired, &self.bands, &self.naming);
        plan.keep_rules_of_policies(&self.naming, &asked.quarantined);
        plan
    }

    /// Whether `plan` goes to Azure as one conditional write of the whole NSG.
    fn in_one_write(&self, plan: &NsgPlan) -> bool {
        self.one_write_per_nsg && plan.deletes.len() + plan.puts.len() > 1
    }

    /// Writes what `plan` (made from `snapshot`) changes: in one conditional write of the NSG
    /// when it has several changes, else rule by rule.
    async fn write_plan(
        &self,
        nsg_id: &str,
        snapshot: NsgSnapshot,
        asked: &Asked,
        plan: NsgPlan,
    ) -> Result<NsgOutcome, Error> {
        self.record(nsg_id).await?;
        let flushed_now = self.ensure_flush_connection(nsg_id).await? > 0;
        if !self.in_one_write(&plan) {
            return self
                .apply_rule_by_rule(nsg_id, &snapshot.rules, &plan)
                .await;
        }
        // Setting flushConnection wrote the NSG: its etag has moved on, so read it again.
        let read = (!flushed_now).then_some((snapshot, plan));
        match self
            .apply_in_one_write(nsg_id, &|rules| self.plan_for(asked, rules), read)
            .await
        {
            // Azure refused the write as a whole (one rule it will not take): apply the
            // changes one by one, so that the others, and every close, still happen.
            Err(e)
                if e.azure()
                    .is_some_and(|a| a.is_permanent() && !a.is_scope_locked()) =>
            {
                warn!(error = %e, "the NSG refused one write of all changes: writing them one by one");
                let existing = self.azure.list_rules(nsg_id).await?;
                let plan = self.plan_for(asked, &existing);
                self.apply_rule_by_rule(nsg_id, &existing, &plan).await
            }
            done => done,
        }
    }

    /// Applies a plan of several changes in one conditional write of the whole NSG (one ARM
    /// write and one long-running operation instead of one per rule; Azure serialises writes to
    /// an NSG anyway). `read`: the NSG just read and the plan made from it, for the first
    /// attempt. On 412 the plan is made again from the fresh read, so a rule someone else added
    /// in between stays.
    async fn apply_in_one_write(
        &self,
        nsg_id: &str,
        plan_for: &impl Fn(&[NsgRule]) -> NsgPlan,
        read: Option<(NsgSnapshot, NsgPlan)>,
    ) -> Result<NsgOutcome, Error> {
        let (read, mut first_plan) = read.unzip();
        let mut applied: Option<(NsgPlan, HashSet<String>)> = None;
        let writes = self
            .write_whole_nsg(nsg_id, read, |snapshot| {
                let plan = first_plan
                    .take()
                    .unwrap_or_else(|| plan_for(&snapshot.rules));
                let existing = snapshot
                    .rules
                    .iter()
                    .map(|r| r.name.to_ascii_lowercase())
                    .collect();
                let edits = (!plan.is_noop()).then(|| RuleEdits {
                    deletes: plan.deletes.clone(),
                    puts: plan.puts.clone(),
                });
                if edits.is_some() {
                    info!(deletes = ?plan.deletes, puts = plan.puts.len(), "one conditional write of the NSG");
                }
                applied = Some((plan, existing));
                Ok(edits)
            })
            .await?;
        let Some((plan, existing)) = applied else {
            return Ok(NsgOutcome::new(nsg_id));
        };
        let mut outcome = NsgOutcome::planned(nsg_id, &plan);
        outcome.writes = writes;
        if writes > 0 {
            outcome.deleted = plan.deletes.clone();
            for rule in &plan.puts {
                if existing.contains(&rule.name.to_ascii_lowercase()) {
                    outcome.corrected.push(rule.name.clone());
                } else {
                    outcome.created.push(rule.name.clone());
                }
            }
        }
        Ok(outcome)
    }

    /// Applies a plan rule by rule: deletes first, then puts.
    async fn apply_rule_by_rule(
        &self,
        nsg_id: &str,
        existing: &[NsgRule],
        plan: &NsgPlan,
    ) -> Result<NsgOutcome, Error> {
        let existing_names: HashSet<String> = existing
            .iter()
            .map(|r| r.name.to_ascii_lowercase())
            .collect();
        let mut outcome = NsgOutcome::planned(nsg_id, plan);
        // Deletes first: a rule being replaced never holds a priority another put wants.
        let mut locked = Vec::new();
        for name in &plan.deletes {
            info!(rule = %name, "deleting rule no live grant or policy explains");
            self.check_writes_allowed()?;
            match self.azure.delete_rule(nsg_id, name).await {
                Ok(()) => outcome.deleted.push(name.clone()),
                // A CanNotDelete lock refuses a rule DELETE, yet allows a PUT of the NSG
                // without the rule: closing must still succeed, by the write Azure allows.
                Err(e) if e.is_scope_locked() => locked.push(name.clone()),
                Err(e) => return Err(e.into()),
            }
            outcome.writes += 1;
        }
        if !locked.is_empty() {
            outcome.writes += self.delete_by_nsg_put(nsg_id, &locked).await?;
            outcome.deleted.extend(locked);
        }
        for rule in &plan.puts {
            let existed = existing_names.contains(&rule.name.to_ascii_lowercase());
            info!(rule = %rule.name, priority = rule.priority, existed, "writing rule");
            self.check_writes_allowed()?;
            self.azure.put_rule(nsg_id, rule).await?;
            outcome.writes += 1;
            if existed {
                outcome.corrected.push(rule.name.clone());
            } else {
                outcome.created.push(rule.name.clone());
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spaced-out open goes once the grants it would carry are all there: requests for its
    /// NSG have stopped for a quarter of the spacing, or requests for every NSG have stopped (a
    /// burst over many NSGs has ended) for `QUIET_MIN` and the budget would pay for them all;
    /// at the latest when the spacing is due.
    #[test]
    fn spacing_ends_when_requests_stop_here_or_everywhere() {
        let began = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let spacing = Duration::from_secs(4);
        let due = began + spacing;
        let asked = |this: u64, any: u64| LastAsked {
            this_nsg: Some(began + ms(this)),
            any_nsg: Some(began + ms(any)),
            budget_for_all: true,
        };
        assert_eq!(
            spacing_ends(due, spacing, began, asked(3_000, 3_900)),
            due,
            "requests still coming: due"
        );
        assert_eq!(
            spacing_ends(due, spacing, began, asked(1_000, 3_000)),
            began + ms(2_000),
            "quiet here for a quarter of the spacing, while other NSGs are still asked for"
        );
        assert_eq!(
            spacing_ends(due, spacing, began, asked(2_500, 2_500)),
            began + ms(2_500) + QUIET_MIN,
            "no NSG asked for since: the burst is over"
        );
        let short = LastAsked {
            budget_for_all: false,
            ..asked(2_500, 2_500)
        };
        assert_eq!(
            spacing_ends(due, spacing, began, short),
            began + ms(3_500),
            "the budget would not pay for every NSG spacing out: only this NSG's quiet counts"
        );
        let never = LastAsked {
            this_nsg: None,
            any_nsg: None,
            budget_for_all: true,
        };
        assert_eq!(
            spacing_ends(due, spacing, began, never),
            began + QUIET_MIN,
            "counted from the spacing's start"
        );
    }

    #[test]
    fn writes_are_spaced_out_more_the_lower_the_budget_runs() {
        assert_eq!(write_spacing(200, 200), None, "full");
        assert_eq!(write_spacing(100, 200), Some(Duration::from_secs(2)));
        assert_eq!(write_spacing(50, 200), Some(Duration::from_secs(4)));
        assert_eq!(write_spacing(1, 200), Some(WRITE_SPACING_MAX), "bounded");
        assert_eq!(
            write_spacing(-40, 200),
            Some(WRITE_SPACING_MAX),
            "places queued"
        );
    }

    fn intent(ports: &[&str]) -> RuleIntent {
        RuleIntent {
            owner: crate::plan::desired::Owner::Grant {
                uid: "u1".into(),
                namespace: "team".into(),
                name: "ssh".into(),
            },
            name: "jit-g-1".into(),
            description: "ssh for alice".into(),
            access: crate::plan::Access::Allow,
            direction: crate::plan::Direction::Inbound,
            protocol: crate::plan::RuleProtocol::Tcp,
            source_address_prefixes: vec!["203.0.113.7".into()],
            source_port_ranges: vec!["*".into()],
            destination_address_prefixes: vec!["10.0.0.4".into()],
            destination_port_ranges: ports.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn an_ask_is_known_by_its_digest_and_any_change_moves_it() {
        let digest = |ports: &[&str], quarantined: &[&str]| {
            let quarantined = quarantined.iter().map(|q| q.to_string()).collect();
            Asked::new(vec![intent(ports)], quarantined).digest
        };
        assert!(digest(&["22"], &[]) == digest(&["22"], &[]), "the same ask");
        assert!(digest(&["22"], &[]) != digest(&["2222"], &[]), "a port");
        assert!(
            digest(&["22"], &[]) != digest(&["22"], &["p1"]),
            "a quarantine"
        );
        assert!(
            digest(&["22", "80"], &[]) != digest(&["2280"], &[]),
            "strings are delimited"
        );
        assert!(
            Asked::new(vec![], vec![]).digest != Asked::new(vec![intent(&["22"])], vec![]).digest,
            "a rule more"
        );
    }
}
