//! What every reconcile shares: the Kubernetes client, the Azure edge, the world view, Events.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Client, Resource};
use tracing::warn;

use super::events::EventPublisher;
use super::nsg::NsgSyncer;
use super::resolve::Resolutions;
use super::rounds::Rounds;
use super::telemetry::Telemetry;
use super::world::WorldView;
use crate::locks::lock;

pub const FIELD_MANAGER: &str = "portcullis";

pub struct Context {
    pub client: Client,
    pub nsgs: NsgSyncer,
    /// Grants' NSG work, coalesced by NSG (see `rounds`).
    pub rounds: Rounds,
    pub world: WorldView,
    pub resync: Duration,
    /// VM resolutions, each used for one resync period.
    pub resolutions: Resolutions,
    pub telemetry: Arc<Telemetry>,
    /// Verifies the webhook's stamps; `None` verifies nothing (see `Settings::stamp_key`).
    pub stamp_key: Option<crate::admission::StampKey>,
    pub audit: super::audit::AuditLog,
    /// See `Settings::finished_grant_ttl`.
    pub finished_grant_ttl: Option<Duration>,
    events: EventPublisher,
    /// Consecutive failed reconciles per object (uid), for its backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Grants (uids) whose overdue close was recorded, while they stay overdue.
    overdue_recorded: Mutex<HashSet<String>>,
}

impl Context {
    pub fn new(
        client: Client,
        nsgs: NsgSyncer,
        world: WorldView,
        resync: Duration,
        telemetry: Arc<Telemetry>,
        stamp_key: Option<crate::admission::StampKey>,
        audit: super::audit::AuditLog,
    ) -> Self {
        let reporter = Reporter {
            controller: "portcullis".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            events: EventPublisher::new(client.clone(), reporter),
            client,
            nsgs,
            rounds: Rounds::new(1, None),
            world,
            resync,
            resolutions: Resolutions::new(resync),
            telemetry,
            stamp_key,
            audit,
            finished_grant_ttl: None,
            failures: Mutex::new(HashMap::new()),
            overdue_recorded: Mutex::new(HashSet::new()),
        }
    }

    pub fn with_rounds(mut self, rounds: Rounds) -> Self {
        self.rounds = rounds;
        self
    }

    /// Deletes finished grants this long after they finished (`None`: never).
    pub fn with_finished_grant_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.finished_grant_ttl = ttl;
        self
    }

    /// The grants whose overdue close was recorded (see `grant::record_overdue`).
    pub fn overdue_recorded(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        lock(&self.overdue_recorded)
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        lock(&self.failures)
    }

    /// Counts one more failure of the object; returns how many in a row.
    pub fn failed(&self, key: &str) -> u32 {
        let mut failures = self.failures();
        let n = failures.entry(key.to_string()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    pub fn succeeded(&self, key: &str) {
        self.failures().remove(key);
    }

    /// Publishes an Event; a failure to publish is logged, never fails the reconcile.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.event_for(&obj.object_ref(&()), warning, reason, action, note)
            .await;
    }

    /// Publishes an Event about an object known only by reference (one that does not decode).
    pub async fn event_for(
        &self,
        reference: &ObjectReference,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        // Boxed: a reconcile task holds its largest await inline, and the recorder's future
        // (about 3 KB) was most of it.
        if let Err(e) = Box::pin(self.events.publish(&event, reference)).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

pub type Ctx = Arc<Context>;
