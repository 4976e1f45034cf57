//! Object-by-object decoding of what the API server sends. The API server's schema checks are
//! looser than the Rust types (its `date-time` format, for one), so an object it admits may not
//! decode. Decoding a whole LIST or watch as one typed value would let that one object stop the
//! operator everywhere; here every object is decoded on its own, and one that does not decode is
//! reported and set aside, failing closed:
//! - a grant that does not decode leaves the world (its Allow rules close at the next sync of
//!   its NSGs, which is asked for at once);
//! - a policy that does not decode keeps its last decoded copy, and where there is none its rules
//!   are quarantined: kept in Azure as they are, never deleted, until it decodes again or is gone.

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::core::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::warn;

/// What to do with an object that stops decoding, by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnUndecodable {
    /// Remove it from the view: what it opened closes.
    Drop,
    /// Keep the last copy that decoded (and quarantine its rules if there is none).
    KeepLast,
}

/// An object that did not decode.
#[derive(Clone, Debug)]
pub struct Undecodable {
    pub kind: &'static str,
    pub reference: ObjectReference,
    pub error: String,
    /// NSGs the object's raw status says it has rules in.
    pub nsgs: Vec<String>,
}

/// What the decoding streams tell the rest of the operator.
#[derive(Clone, Debug)]
pub enum Seen {
    /// An object that does not decode (again, or for the first time).
    Undecodable(Box<Undecodable>),
    /// An object decoded: whatever was reported about it before is over.
    Decoded { uid: String },
    /// An object is gone from the API server: drop every copy of it.
    Deleted { uid: String },
}

/// Where the decoding streams tell what they saw: at once to the world's marks of undecodable
/// objects (before the event reaches a store, so no plan is ever made from a store that has an
/// object's change but a world that does not know it is undecodable, such as a restart's first
/// sync deleting an unreadable policy's Deny rules), then to the reporter (Events, metrics,
/// syncs) through the channel.
#[derive(Clone)]
pub struct Reports {
    tx: mpsc::UnboundedSender<Seen>,
    marks: UndecodableMarks,
}

impl Reports {
    pub fn new(tx: mpsc::UnboundedSender<Seen>, marks: UndecodableMarks) -> Self {
        Reports { tx, marks }
    }

    fn tell(&self, seen: Seen) {
        match &seen {
            Seen::Undecodable(report) => {
                let uid = report.reference.uid.as_deref().unwrap_or_default();
                self.marks.mark(uid, Some(report.kind == "JitPolicy"));
            }
            Seen::Decoded { uid } | Seen::Deleted { uid } => self.marks.mark(uid, None),
        }
        // The receiver lives as long as the controllers; a send after that has nobody to tell.
        let _ = self.tx.send(seen);
    }
}

use super::world::UndecodableMarks;

pub use crate::api::decode;

fn reference<K: Resource<DynamicType = ()>>(raw: &DynamicObject) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: raw.metadata.name.clone(),
        namespace: raw.metadata.namespace.clone(),
        uid: raw.metadata.uid.clone(),
        resource_version: raw.metadata.resource_version.clone(),
        ..Default::default()
    }
}

/// The NSG ids a raw object's `status.rules[].networkSecurityGroup` names, read without the
/// typed model (which is what failed).
fn raw_nsgs(raw: &DynamicObject) -> Vec<String> {
    raw.data
        .pointer("/status/rules")
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("networkSecurityGroup")?.as_str())
        .map(str::to_string)
        .collect()
}

/// The raw API for `K`, cluster-wide or in one namespace.
pub fn raw_api<K: Resource<DynamicType = ()>>(
    client: kube::Client,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    let resource = ApiResource::erase::<K>(&());
    match namespace {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    }
}

/// LISTs `K` and decodes each object on its own; the ones that fail are logged and returned
/// apart, never hiding the others.
pub async fn list<K>(
    api: &Api<DynamicObject>,
) -> Result<(Vec<K>, Vec<Box<Undecodable>>), kube::Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    list_in_pages(api, LIST_PAGE).await
}

/// [`list`], `page` objects per request.
pub async fn list_in_pages<K>(
    api: &Api<DynamicObject>,
    page: u32,
) -> Result<(Vec<K>, Vec<Box<Undecodable>>), kube::Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    let mut decoded = Vec::new();
    let mut failed = Vec::new();
    // Page by page, as the watches list: 10,000 grants in one answer were held three times
    // over (the body, its JSON, the decoded objects) at the start of a restart.
    let mut params = ListParams::default().limit(page);
    loop {
        let page = api.list(&params).await?;
        for raw in page.items {
            match undecodable::<K>(raw) {
                Ok(obj) => decoded.push(obj),
                Err(report) => failed.push(report),
            }
        }
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok((decoded, failed)),
        }
    }
}

/// Objects per page of a one-off list (kube-runtime's watches list 500 at a time too).
const LIST_PAGE: u32 = 500;

fn undecodable<K>(mut raw: DynamicObject) -> Result<K, Box<Undecodable>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    strip_bookkeeping(&mut raw.metadata);
    let reference = reference::<K>(&raw);
    let nsgs = raw_nsgs(&raw);
    decode::<K>(raw).map_err(|e| {
        let kind = K::kind(&()).into_owned();
        warn!(
            kind = %kind,
            namespace = reference.namespace.as_deref().unwrap_or_default(),
            name = reference.name.as_deref().unwrap_or_default(),
            error = %e,
            "object does not decode: skipped"
        );
        Box::new(Undecodable {
            kind: kind_label::<K>(),
            reference,
            error: e.to_string(),
            nsgs,
        })
    })
}

/// Drops what the operator never reads and what makes up most of an object's size: the field
/// managers' records and `kubectl apply`'s copy of the last applied manifest. Every object is held
/// in the stores (and planned from) for as long as it exists, so this is most of the memory per
/// grant. Nothing is ever written back from these copies (status goes by server-side apply of the
/// status alone), so the API server's own fields are untouched.
pub fn strip_bookkeeping(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A `'static` kind label for metrics.
fn kind_label<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "AccessGrant" => "AccessGrant",
        "JitPolicy" => "JitPolicy",
        "AccessApproval" => "AccessApproval",
        "JitScope" => "JitScope",
        _ => "Other",
    }
}

/// Turns a watch stream of raw objects into a stream of typed events, decoding object by
/// object (see the module documentation for what happens to one that does not decode). The last
/// copy of an object that decoded is the one `known` holds (the store this stream, or its twin,
/// fills): the stream keeps no copy of its own, which doubled the memory of every grant.
pub fn typed_events<K>(
    raw: impl Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>> + Send + 'static,
    on_undecodable: OnUndecodable,
    reports: Reports,
    known: Store<K>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Send + Sync + 'static,
{
    raw.filter_map(move |event| {
        let out = match event {
            Err(e) => Some(Err(e)),
            Ok(event) => translate(event, on_undecodable, &known, &reports).map(Ok),
        };
        std::future::ready(out)
    })
}

fn uid_of(raw: &DynamicObject) -> String {
    raw.metadata.uid.clone().unwrap_or_default()
}

/// Where `raw` sits in a store: taken before decoding consumes it.
fn store_ref<K>(raw: &DynamicObject) -> Option<ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
{
    let at = ObjectRef::<K>::new(raw.metadata.name.as_deref()?);
    Some(match raw.metadata.namespace.as_deref() {
        Some(ns) => at.within(ns),
        None => at,
    })
}

/// The copy that `known` holds at `at`, if it is the same object (uid `uid`). Looked up only
/// for an object that does not decode: a copy for every event cost a clone of each object.
fn last_decoded<K>(at: Option<&ObjectRef<K>>, uid: &str, known: &Store<K>) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let kept = known.get(at?)?;
    (kept.meta().uid.as_deref().unwrap_or_default() == uid).then(|| kept.as_ref().clone())
}

/// One raw event to at most one typed event.
fn translate<K>(
    event: watcher::Event<DynamicObject>,
    on_undecodable: OnUndecodable,
    known: &Store<K>,
    reports: &Reports,
) -> Option<watcher::Event<K>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone,
{
    use watcher::Event as E;
    let tell = |seen: Seen| reports.tell(seen);
    match event {
        E::Init => Some(E::Init),
        E::InitDone => Some(E::InitDone),
        E::Apply(raw) => {
            let (uid, at) = (uid_of(&raw), store_ref::<K>(&raw));
            match undecodable::<K>(raw) {
                Ok(obj) => {
                    tell(Seen::Decoded { uid });
                    Some(E::Apply(obj))
                }
                Err(r) => {
                    tell(Seen::Undecodable(r));
                    match on_undecodable {
                        OnUndecodable::Drop => {
                            last_decoded(at.as_ref(), &uid, known).map(E::Delete)
                        }
                        OnUndecodable::KeepLast => None,
                    }
                }
            }
        }
        E::InitApply(raw) => {
            let (uid, at) = (uid_of(&raw), store_ref::<K>(&raw));
            match undecodable::<K>(raw) {
                Ok(obj) => {
                    tell(Seen::Decoded { uid });
                    Some(E::InitApply(obj))
                }
                Err(r) => {
                    tell(Seen::Undecodable(r));
                    match on_undecodable {
                        OnUndecodable::Drop => None,
                        OnUndecodable::KeepLast => {
                            last_decoded(at.as_ref(), &uid, known).map(E::InitApply)
                        }
                    }
                }
            }
        }
        E::Delete(raw) => {
            let (uid, at) = (uid_of(&raw), store_ref::<K>(&raw));
            tell(Seen::Deleted { uid: uid.clone() });
            match decode::<K>(raw) {
                Ok(obj) => Some(E::Delete(obj)),
                Err(_) => last_decoded(at.as_ref(), &uid, known).map(E::Delete),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::JitPolicy;
    use crate::controller::world::UndecodableMarks;

    fn raw_policy(uid: &str, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "JitPolicy",
            "metadata": {"name": "p", "namespace": "t", "uid": uid, "resourceVersion": "1"},
            "spec": spec
        }))
        .expect("raw object")
    }

    /// The world learns that a policy is unreadable before anything reaches a store, not when
    /// the reporter gets round to it: a plan made in between would delete its Deny rules.
    #[test]
    fn an_undecodable_object_is_marked_before_its_event_goes_on() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let marks = UndecodableMarks::default();
        let generation = marks.generation().clone();
        let reports = Reports::new(tx, marks.clone());
        let (known, _writer) = kube::runtime::reflector::store::<JitPolicy>();
        let bad = raw_policy("u1", serde_json::json!({"virtualMachines": "not a list"}));
        let event = translate::<JitPolicy>(
            watcher::Event::InitApply(bad),
            OnUndecodable::KeepLast,
            &known,
            &reports,
        );
        assert!(event.is_none(), "nothing to keep: no event");
        assert!(marks.is_marked("u1"), "marked at once");
        assert_eq!(generation.current(), 1, "the world moved");
        assert!(matches!(rx.try_recv(), Ok(Seen::Undecodable(_))));

        let good = raw_policy("u1", serde_json::json!({"virtualMachines": []}));
        let event = translate::<JitPolicy>(
            watcher::Event::Apply(good),
            OnUndecodable::KeepLast,
            &known,
            &reports,
        );
        assert!(matches!(event, Some(watcher::Event::Apply(_))));
        assert!(!marks.is_marked("u1"), "readable again: unmarked at once");
        assert_eq!(generation.current(), 2);
    }
}
