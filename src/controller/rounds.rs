//! Work coalesced by NSG. A grant's reconcile asks for each of its NSGs to be brought in line
//! and returns at once; workers sync every dirty NSG (all NSGs in parallel, one sync per NSG at
//! a time) and wake the grants that asked once a sync that began after their request has
//! finished. A reconcile never holds its slot across Azure's long-running operations, and every
//! request that arrived while an NSG was being written is answered by its next sync: expiries
//! due together in one NSG close in one write, a burst opens in a few writes per NSG.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use tracing::debug;

use super::Error;
use super::nsg::{NsgOutcome, NsgSyncer};
use super::telemetry::Telemetry;
use super::world::{WorldView, index_ref};
use crate::api::AccessGrant;
use crate::locks::lock;

/// How many NSGs are synced at once. Not the reconcile concurrency: an NSG round is mostly a
/// wait on Azure, and the subscription's write budget (see `azure::pacing`) sets the pace.
pub const NSGS_AT_ONCE: usize = 256;

/// A sync's result, shared by every grant it answers.
pub type RoundResult = Result<NsgOutcome, Arc<Error>>;

/// What a grant needs an NSG's sync to reflect. Asking to close never takes the answer to an
/// earlier request to open: that sync may have begun while the grant was still live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Intent {
    Open,
    Close,
}

/// Where a woken grant's reconcile is triggered (see `run_controllers`).
pub type Wake = Box<dyn Fn(ObjectRef<AccessGrant>) + Send + Sync>;

/// The bookkeeping of rounds, without I/O: which NSGs are dirty, which round each request needs,
/// whom a finished round answers.
///
/// NSGs are keyed by their lower-cased id, one allocation shared by every request for the NSG:
/// in a burst of 10,000 grants each holds its tickets until its rounds have run.
#[derive(Default)]
struct Book {
    nsgs: HashMap<Arc<str>, NsgRounds>,
    /// Dirty NSGs with no sync running, oldest request first.
    queue: VecDeque<Arc<str>>,
    /// Per grant uid: the requests it has not taken the answers of.
    tickets: HashMap<String, Vec<Ticket>>,
}

/// The NSG's key: its lower-cased id, shared with the NSG's entry if it has one.
fn key_of(nsgs: &HashMap<Arc<str>, NsgRounds>, nsg: &str) -> Arc<str> {
    let lower = nsg.to_ascii_lowercase();
    match nsgs.get_key_value(lower.as_str()) {
        Some((key, _)) => key.clone(),
        None => lower.into(),
    }
}

/// What asking gives a grant.
pub enum Answer {
    /// Every NSG answered: the result of a round that began after each request was made.
    Ready(Vec<(String, RoundResult)>),
    /// Not yet (the grant is woken when they have). `new`: the NSGs this call asked for the
    /// first time; the others were asked before and are in, or due for, their round.
    Pending { new: Vec<String> },
}

impl Answer {
    pub fn ready(self) -> Option<Vec<(String, RoundResult)>> {
        match self {
            Answer::Ready(answers) => Some(answers),
            Answer::Pending { .. } => None,
        }
    }
}

/// A grant's request for an NSG: the round it needs.
struct Ticket {
    nsg: Arc<str>,
    intent: Intent,
    round: u64,
}

/// Drops the tickets for `nsgs` (any case) and `intent`.
fn drop_tickets(tickets: &mut Vec<Ticket>, nsgs: &[String], intent: Intent) {
    tickets.retain(|t| t.intent != intent || !nsgs.iter().any(|n| n.eq_ignore_ascii_case(&t.nsg)));
}

#[derive(Default)]
struct NsgRounds {
    /// The NSG's id as first asked for (rounds are keyed by the lower-cased id).
    id: String,
    /// Rounds begun; the round running, if one is.
    started: u64,
    finished: u64,
    running: bool,
    /// A request came after the last round began: another round is due.
    dirty: bool,
    /// The result of round `finished`.
    last: Option<RoundResult>,
    /// Grants to wake, each with the round it waits for.
    waiters: HashMap<ObjectRef<AccessGrant>, u64>,
}

impl Book {
    /// The answers to `uid`'s requests for `nsgs`: for each, the result of a round that began
    /// after the request was first made. Until every NSG has one, none is taken (a grant that
    /// took each NSG's answer as it came would chase new rounds for ever): the NSGs still
    /// needed are dirty and `who` (if given) is woken when the round it needs has finished.
    fn ask(
        &mut self,
        uid: &str,
        who: Option<&ObjectRef<AccessGrant>>,
        nsgs: &[String],
        intent: Intent,
    ) -> Answer {
        let tickets = self.tickets.entry(uid.to_string()).or_default();
        let mut answers = Vec::new();
        let mut waiting = false;
        let mut new = Vec::new();
        for nsg in nsgs {
            let key = key_of(&self.nsgs, nsg);
            let entry = self.nsgs.entry(key.clone()).or_insert_with(|| NsgRounds {
                id: nsg.clone(),
                ..Default::default()
            });
            let needed = match tickets.iter().find(|t| t.intent == intent && t.nsg == key) {
                Some(ticket) => ticket.round,
                None => {
                    new.push(nsg.clone());
                    tickets.push(Ticket {
                        nsg: key.clone(),
                        intent,
                        round: entry.started + 1,
                    });
                    entry.started + 1
                }
            };
            if let Some(result) = entry.last.as_ref().filter(|_| entry.finished >= needed) {
                answers.push((nsg.clone(), result.clone()));
                continue;
            }
            waiting = true;
            if let Some(who) = who {
                let waits_for = entry.waiters.entry(who.clone()).or_insert(needed);
                *waits_for = (*waits_for).min(needed);
            }
            if !entry.dirty && entry.started < needed {
                entry.dirty = true;
                if !entry.running {
                    self.queue.push_back(key);
                }
            }
        }
        if waiting {
            return Answer::Pending { new };
        }
        drop_tickets(tickets, nsgs, intent);
        if intent == Intent::Close {
            // A closed grant never opens again: an open it asked for before is moot.
            tickets.retain(|t| t.intent != Intent::Open);
        }
        if tickets.is_empty() {
            self.tickets.remove(uid);
        }
        Answer::Ready(answers)
    }

    /// Begins the next round of the oldest dirty NSG: its id (as first asked for) and the
    /// round's number.
    fn begin(&mut self) -> Option<(String, u64)> {
        let key = self.queue.pop_front()?;
        let entry = self.nsgs.get_mut(&key)?;
        entry.dirty = false;
        entry.running = true;
        entry.started += 1;
        Some((entry.id.clone(), entry.started))
    }

    /// Records a finished round; returns the grants it answers. An NSG asked for again while
    /// it ran goes back in the queue.
    fn finish(
        &mut self,
        nsg: &str,
        round: u64,
        result: RoundResult,
    ) -> Vec<ObjectRef<AccessGrant>> {
        let key = key_of(&self.nsgs, nsg);
        let entry = self.nsgs.entry(key.clone()).or_default();
        entry.running = false;
        entry.finished = round;
        entry.last = Some(result);
        let mut answered = Vec::new();
        entry.waiters.retain(|who, needed| {
            let done = *needed <= round;
            if done {
                answered.push(who.clone());
            }
            !done
        });
        if entry.dirty {
            self.queue.push_back(key);
        }
        answered
    }

    /// Drops what is kept for a grant that is gone.
    fn forget(&mut self, uid: &str) {
        self.tickets.remove(uid);
    }

    /// Drops `uid`'s requests for `nsgs`: they were answered without a round.
    fn withdraw(&mut self, uid: &str, nsgs: &[String], intent: Intent) {
        if let Some(tickets) = self.tickets.get_mut(uid) {
            drop_tickets(tickets, nsgs, intent);
            if tickets.is_empty() {
                self.tickets.remove(uid);
            }
        }
    }
}

pub struct Rounds {
    book: Mutex<Book>,
    /// A request made an NSG dirty.
    dirty: tokio::sync::Notify,
    /// A round finished (for callers that wait in place).
    finished: tokio::sync::Notify,
    wake: Option<Wake>,
    parallel: usize,
    telemetry: Option<Arc<Telemetry>>,
}

impl Rounds {
    /// At most `parallel` NSGs are synced at once; `wake` triggers a grant's reconcile.
    pub fn new(parallel: usize, wake: Option<Wake>) -> Self {
        Rounds {
            book: Mutex::new(Book::default()),
            dirty: tokio::sync::Notify::new(),
            finished: tokio::sync::Notify::new(),
            wake,
            parallel: parallel.max(1),
            telemetry: None,
        }
    }

    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        lock(&self.book)
    }

    /// The answers for the grant's NSGs (see [`Book::ask`]); if pending, the grant is woken
    /// later.
    pub fn ask(&self, grant: &AccessGrant, nsgs: &[String], intent: Intent) -> Answer {
        self.ask_for(grant, nsgs, intent, true)
    }

    fn ask_for(&self, grant: &AccessGrant, nsgs: &[String], intent: Intent, wake: bool) -> Answer {
        let uid = grant.metadata.uid.clone().unwrap_or_default();
        let who = wake.then(|| index_ref(grant));
        let answer = self.book().ask(&uid, who.as_ref(), nsgs, intent);
        if let Answer::Pending { .. } = answer {
            self.dirty.notify_one();
        }
        answer
    }

    /// Like [`Rounds::ask`], but waits in place for the answers (holding the caller's slot);
    /// nothing is woken (a deleted grant's reconcile would find no object).
    pub async fn ask_and_wait(
        &self,
        grant: &AccessGrant,
        nsgs: &[String],
        intent: Intent,
    ) -> Vec<(String, RoundResult)> {
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if let Answer::Ready(answers) = self.ask_for(grant, nsgs, intent, false) {
                return answers;
            }
            finished.await;
        }
    }

    pub fn forget(&self, uid: &str) {
        self.book().forget(uid);
    }

    /// Whether the grant (by uid) has asked for rounds it has not taken the answers of: its
    /// last reconcile only asked, so it has not succeeded (nor failed) yet.
    pub fn is_waiting(&self, uid: &str) -> bool {
        self.book().tickets.contains_key(uid)
    }

    /// The grant's requests for `nsgs` were answered without a round (see
    /// `NsgSyncer::in_line_now`): a later request must not take an older round's answer.
    pub fn withdraw(&self, grant: &AccessGrant, nsgs: &[String], intent: Intent) {
        let uid = grant.metadata.uid.clone().unwrap_or_default();
        self.book().withdraw(&uid, nsgs, intent);
    }

    /// The workers: runs every dirty NSG's next round, `parallel` at a time, for ever.
    pub async fn run(&self, syncer: &NsgSyncer, world: &WorldView) {
        let mut running = FuturesUnordered::new();
        loop {
            while running.len() < self.parallel {
                let Some((nsg, round)) = self.book().begin() else {
                    break;
                };
                running.push(async move {
                    let result = syncer
                        .sync(&nsg, || world.for_nsg(&nsg), Timestamp::now())
                        .await
                        .map_err(Arc::new);
                    (nsg, round, result)
                });
            }
            let queued = self.book().queue.len();
            if let Some(telemetry) = &self.telemetry {
                telemetry.set_nsgs_in_rounds(queued + running.len());
            }
            tokio::select! {
                Some((nsg, round, result)) = running.next(), if !running.is_empty() => {
                    let label = result.as_ref().map_or_else(|e| e.category(), |_| "ok");
                    let answered = self.book().finish(&nsg, round, result);
                    debug!(nsg = %nsg, round, answered = answered.len(), result = label, "NSG round finished");
                    if let Some(telemetry) = &self.telemetry {
                        telemetry.nsg_round(label, queued + running.len());
                    }
                    self.finished.notify_waiters();
                    if let Some(wake) = &self.wake {
                        answered.into_iter().for_each(wake);
                    }
                }
                _ = self.dirty.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(name: &str) -> ObjectRef<AccessGrant> {
        ObjectRef::new(name).within("team")
    }

    fn outcome(nsg: &str, writes: usize) -> RoundResult {
        Ok(NsgOutcome {
            nsg_id: nsg.to_string(),
            writes,
            ..Default::default()
        })
    }

    fn nsgs(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    /// `name` asks for `ids`; the writes of each answer, or `None` while waiting.
    fn ask(book: &mut Book, name: &str, ids: &[&str], intent: Intent) -> Option<Vec<usize>> {
        let answers = book
            .ask(name, Some(&grant(name)), &nsgs(ids), intent)
            .ready()?;
        Some(
            answers
                .into_iter()
                .map(|(_, r)| r.map_or(usize::MAX, |o| o.writes))
                .collect(),
        )
    }

    #[test]
    fn requests_made_while_an_nsg_is_written_share_its_next_round() {
        let mut book = Book::default();
        assert_eq!(ask(&mut book, "a", &["NSG-1"], Intent::Open), None);
        let (nsg, first) = book.begin().expect("dirty");
        assert_eq!(
            (nsg.as_str(), first),
            ("NSG-1", 1),
            "synced as first asked for"
        );
        // b and c ask while round 1 runs: it may have read the world before them.
        assert_eq!(ask(&mut book, "b", &["nsg-1"], Intent::Open), None);
        assert_eq!(ask(&mut book, "c", &["nsg-1"], Intent::Open), None);
        assert!(book.begin().is_none(), "one round per NSG at a time");
        assert_eq!(
            book.finish("nsg-1", first, outcome("nsg-1", 1)),
            vec![grant("a")]
        );
        assert_eq!(ask(&mut book, "a", &["nsg-1"], Intent::Open), Some(vec![1]));
        assert_eq!(ask(&mut book, "b", &["nsg-1"], Intent::Open), None);
        let (_, second) = book.begin().expect("b and c made it dirty again");
        let mut answered = book.finish("nsg-1", second, outcome("nsg-1", 2));
        answered.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(answered, vec![grant("b"), grant("c")]);
        assert_eq!(ask(&mut book, "b", &["nsg-1"], Intent::Open), Some(vec![2]));
        assert_eq!(ask(&mut book, "c", &["nsg-1"], Intent::Open), Some(vec![2]));
        assert!(book.begin().is_none(), "nothing left to do");
    }

    #[test]
    fn an_answer_is_taken_once_and_a_new_request_needs_a_new_round() {
        let mut book = Book::default();
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Open), None);
        let (_, round) = book.begin().expect("dirty");
        book.finish("n", round, outcome("n", 1));
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Open), Some(vec![1]));
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Open), None);
        assert!(book.begin().is_some());
    }

    #[test]
    fn no_answer_is_taken_until_every_nsg_has_one() {
        let mut book = Book::default();
        assert_eq!(ask(&mut book, "a", &["x", "y"], Intent::Open), None);
        let (_, rx) = book.begin().expect("x dirty");
        let (_, ry) = book.begin().expect("y dirty");
        book.finish("x", rx, outcome("x", 1));
        assert_eq!(ask(&mut book, "a", &["x", "y"], Intent::Open), None);
        assert!(
            book.begin().is_none(),
            "x's answer is kept, not asked again"
        );
        book.finish("y", ry, outcome("y", 1));
        assert_eq!(
            ask(&mut book, "a", &["x", "y"], Intent::Open),
            Some(vec![1, 1])
        );
    }

    /// What holds back a spaced-out open is new requests: a grant woken by one NSG's round while
    /// it still waits for another's asks nothing new of either.
    #[test]
    fn only_a_first_request_for_an_nsg_is_new() {
        let mut book = Book::default();
        let new = |answer: Answer| match answer {
            Answer::Pending { new } => new,
            Answer::Ready(_) => panic!("answered"),
        };
        let a = Some(grant("a"));
        let (xy, intent) = (nsgs(&["x", "y"]), Intent::Open);
        assert_eq!(new(book.ask("a", a.as_ref(), &xy, intent)), xy);
        let (_, rx) = book.begin().expect("x dirty");
        let (_, _ry) = book.begin().expect("y dirty");
        book.finish("x", rx, outcome("x", 1));
        assert!(new(book.ask("a", a.as_ref(), &xy, intent)).is_empty());
        assert_eq!(
            new(book.ask("a", a.as_ref(), &nsgs(&["x", "z"]), intent)),
            nsgs(&["z"]),
            "z is new; x is still asked from before"
        );
    }

    #[test]
    fn a_close_never_takes_the_answer_to_an_open() {
        let mut book = Book::default();
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Open), None);
        let (_, first) = book.begin().expect("dirty");
        // The grant lapses while its open is written: the close needs a round of its own.
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Close), None);
        book.finish("n", first, outcome("n", 1));
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Close), None);
        let (_, second) = book.begin().expect("the close made it dirty");
        assert_eq!(book.finish("n", second, outcome("n", 2)), vec![grant("a")]);
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Close), Some(vec![2]));
        assert!(
            book.tickets.is_empty(),
            "the moot open is dropped with the close"
        );
    }

    #[test]
    fn nsgs_are_independent_and_a_failure_answers_only_its_own() {
        let mut book = Book::default();
        assert_eq!(
            ask(&mut book, "a", &["broken", "fine"], Intent::Close),
            None
        );
        let (first, r1) = book.begin().expect("dirty");
        let (second, r2) = book.begin().expect("both run at once");
        assert_eq!((first.as_str(), second.as_str()), ("broken", "fine"));
        book.finish("broken", r1, Err(Arc::new(Error::NotLeader)));
        book.finish("fine", r2, outcome("fine", 1));
        assert_eq!(
            ask(&mut book, "a", &["broken", "fine"], Intent::Close),
            Some(vec![usize::MAX, 1])
        );
    }

    #[test]
    fn a_withdrawn_request_is_not_answered_by_an_older_round() {
        let mut book = Book::default();
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Open), None);
        let (_, round) = book.begin().expect("dirty");
        book.finish("n", round, outcome("n", 1));
        // Answered elsewhere; the next request needs a round of its own.
        book.withdraw("a", &nsgs(&["n"]), Intent::Open);
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Open), None);
        assert!(book.begin().is_some());
    }

    #[test]
    fn a_forgotten_grant_asks_afresh() {
        let mut book = Book::default();
        assert_eq!(ask(&mut book, "a", &["n"], Intent::Close), None);
        assert!(book.tickets.contains_key("a"));
        book.forget("a");
        assert!(book.tickets.is_empty());
    }
}
