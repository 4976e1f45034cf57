//! Events, published as kube-runtime's `Recorder` publishes them: the same Event about the same
//! object within six minutes becomes one more in the first one's series. The `Recorder` keeps a
//! full copy of every Event for those six minutes and walks all of them at every publish; with
//! 10,000 grants each opening and closing, that was tens of megabytes and a scan of tens of
//! thousands of entries per Event. Here a series is remembered by its name and count only, in
//! time order, and at most `REMEMBERED` of them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::locks::lock;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};

/// How long a repeat joins the earlier Event's series (as kube-runtime's `Recorder`).
const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// Series remembered at most. Past it the oldest is forgotten: its next repeat starts a new
/// Event rather than counting on the old one.
const REMEMBERED: usize = 4096;

pub struct EventPublisher {
    client: Client,
    reporter: Reporter,
    recent: Mutex<Recent>,
}

impl EventPublisher {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        EventPublisher {
            client,
            reporter,
            recent: Mutex::new(Recent::default()),
        }
    }

    /// Creates the Event, or counts it on the series of the same Event published recently.
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> kube::Result<()> {
        let now = Timestamp::now();
        let key = series_key(event, regarding);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let repeat = self.recent().repeat_of(&key, now);
        if let Some(Series { name, count, .. }) = repeat {
            let patch = serde_json::json!({
                "note": event.note,
                "series": EventSeries { count: count + 1, last_observed_time: MicroTime(now) },
            });
            events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            self.recent().record(key, name, count + 1, now);
            return Ok(());
        }
        let on = regarding
            .name
            .as_deref()
            .unwrap_or(&self.reporter.controller);
        let name = format!("{on}.{:x}", now.as_nanosecond());
        events
            .create(
                &PostParams::default(),
                &self.event(event, regarding, &name, now),
            )
            .await?;
        self.recent().record(key, name, 1, now);
        Ok(())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        lock(&self.recent)
    }

    fn event(
        &self,
        event: &Event,
        regarding: &ObjectReference,
        name: &str,
        now: Timestamp,
    ) -> K8sEvent {
        let controller = &self.reporter.controller;
        K8sEvent {
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            note: event.note.clone(),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(name.to_string()),
                ..Default::default()
            },
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .to_string(),
            ),
            ..Default::default()
        }
    }
}

/// What makes two Events the same: their type, reason and action, and the object they regard.
fn series_key(event: &Event, regarding: &ObjectReference) -> String {
    let field = |f: &Option<String>| f.clone().unwrap_or_default();
    [
        format!("{:?}", event.type_),
        event.reason.clone(),
        event.action.clone(),
        field(&regarding.kind),
        field(&regarding.namespace),
        field(&regarding.name),
        field(&regarding.uid),
    ]
    .join("\u{0}")
}

#[derive(Clone, Debug, PartialEq)]
struct Series {
    name: String,
    count: i32,
    last: Timestamp,
}

/// The series published recently, and when each was last counted, oldest first.
#[derive(Default)]
struct Recent {
    series: HashMap<String, Series>,
    order: VecDeque<(Timestamp, String)>,
}

impl Recent {
    /// The series a publish of `key` at `now` counts on, if it is still open.
    fn repeat_of(&mut self, key: &str, now: Timestamp) -> Option<Series> {
        self.forget_before(now - SERIES_WINDOW);
        self.series.get(key).cloned()
    }

    fn record(&mut self, key: String, name: String, count: i32, now: Timestamp) {
        self.order.push_back((now, key.clone()));
        self.series.insert(
            key,
            Series {
                name,
                count,
                last: now,
            },
        );
        self.forget_before(now - SERIES_WINDOW);
    }

    /// Drops the series last counted before `cutoff`, and the oldest beyond `REMEMBERED`. A
    /// series counted again has a later place in `order`: only its last place removes it.
    fn forget_before(&mut self, cutoff: Timestamp) {
        while let Some((at, key)) = self.order.front() {
            if *at >= cutoff && self.order.len() <= REMEMBERED {
                break;
            }
            if self.series.get(key).is_some_and(|s| s.last == *at) {
                self.series.remove(key);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn a_repeat_within_the_window_counts_on_the_series_and_one_after_it_starts_anew() {
        let mut recent = Recent::default();
        assert_eq!(recent.repeat_of("a", at(0)), None);
        recent.record("a".into(), "ev.1".into(), 1, at(0));
        let series = recent.repeat_of("a", at(300));
        assert_eq!(series.map(|s| (s.name, s.count)), Some(("ev.1".into(), 1)));
        recent.record("a".into(), "ev.1".into(), 2, at(300));
        // Six minutes after its last count, not its first.
        assert_eq!(recent.repeat_of("a", at(659)).map(|s| s.count), Some(2));
        assert_eq!(recent.repeat_of("a", at(661)), None);
        assert!(recent.series.is_empty() && recent.order.is_empty());
    }

    #[test]
    fn at_most_so_many_series_are_remembered_oldest_forgotten_first() {
        let mut recent = Recent::default();
        for i in 0..REMEMBERED + 10 {
            recent.record(format!("k{i}"), format!("ev.{i}"), 1, at(0));
        }
        assert_eq!(recent.series.len(), REMEMBERED);
        assert_eq!(recent.order.len(), REMEMBERED);
        assert_eq!(recent.repeat_of("k9", at(1)), None);
        assert!(recent.repeat_of("k10", at(1)).is_some());
        // Counting one series again and again does not grow what is kept past the bound.
        for _ in 0..2 * REMEMBERED {
            recent.record("k10".into(), "ev.10".into(), 2, at(1));
        }
        assert!(recent.order.len() <= REMEMBERED);
        assert!(recent.series.len() <= REMEMBERED);
    }

    #[test]
    fn events_differing_in_reason_or_object_are_different_series() {
        let event = |reason: &str| Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some("a note is not part of the key".into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        let object = |name: &str| ObjectReference {
            kind: Some("AccessGrant".into()),
            namespace: Some("team".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        };
        let mut noted = event("AzureError");
        noted.note = Some("another note".into());
        assert_eq!(
            series_key(&event("AzureError"), &object("a")),
            series_key(&noted, &object("a"))
        );
        assert_ne!(
            series_key(&event("AzureError"), &object("a")),
            series_key(&event("Denied"), &object("a"))
        );
        assert_ne!(
            series_key(&event("AzureError"), &object("a")),
            series_key(&event("AzureError"), &object("b"))
        );
    }
}
