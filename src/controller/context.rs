//! What every reconcile shares: the Kubernetes client, the Azure edge, the world view, Events.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use tracing::warn;

use super::nsg::NsgSyncer;
use super::telemetry::Telemetry;
use super::world::WorldView;

pub const FIELD_MANAGER: &str = "portcullis";

pub struct Context {
    pub client: Client,
    pub nsgs: NsgSyncer,
    pub world: WorldView,
    pub resync: Duration,
    pub telemetry: Arc<Telemetry>,
    recorder: Recorder,
}

impl Context {
    pub fn new(
        client: Client,
        nsgs: NsgSyncer,
        world: WorldView,
        resync: Duration,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        let reporter = Reporter {
            controller: "portcullis".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        Context {
            client,
            nsgs,
            world,
            resync,
            telemetry,
            recorder,
        }
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
        let reference: ObjectReference = obj.object_ref(&());
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
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

pub type Ctx = Arc<Context>;
