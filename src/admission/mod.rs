//! Admission: what the webhook stamps on `portcullis.dev` objects and what it refuses. The
//! decisions are functions of the request and of the objects it names, which the webhook edge
//! (`crate::webhook`) looks up through [`Lookup`]; [`decide`] holds the pure rules.
//!
//! - CREATE of an `AccessGrant`: stamped with the requester (whatever the client wrote there
//!   is overwritten), and given the finalizer that holds it until its rules are closed.
//! - CREATE of an `AccessApproval`: stamped with the approver, bound to the grant as it is now;
//!   refused for one's own grant, for someone the policy does not list, for a second decision
//!   by the same person, and for a grant that is not waiting for one.
//! - UPDATE: a stamp never changes; an approval's spec never changes.

pub mod decide;
pub mod stamp;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use jiff::Timestamp;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::api::{AccessApproval, AccessGrant, GRANT_FINALIZER, JitPolicy, decode};
use stamp::{Binding, DECIDED_BY_ANNOTATION, STAMP_ANNOTATION, Stamp, Who, bound_name};
pub use stamp::{StampError, StampKey};

/// Reads the objects an admission decision depends on (the webhook serves them from the API
/// server). An error makes the webhook refuse the request: with `failurePolicy: Fail`, nothing
/// is admitted that could not be checked.
#[async_trait]
pub trait Lookup: Send + Sync {
    async fn grant(&self, namespace: &str, name: &str) -> Result<Option<AccessGrant>, LookupError>;
    async fn policy(&self, namespace: &str, name: &str) -> Result<Option<JitPolicy>, LookupError>;
    /// Every `AccessApproval` in `namespace` that names the grant `grant`.
    async fn approvals(
        &self,
        namespace: &str,
        grant: &str,
    ) -> Result<Vec<AccessApproval>, LookupError>;
}

#[derive(Debug, thiserror::Error)]
#[error("could not read {what}: {message}")]
pub struct LookupError {
    pub what: String,
    pub message: String,
}

/// The admission decisions, with the key that signs stamps.
pub struct Admission {
    key: StampKey,
    lookup: Arc<dyn Lookup>,
}

/// The kinds the webhook serves, by resource (plural).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Grant,
    Approval,
}

impl Kind {
    fn of(request: &AdmissionRequest<DynamicObject>) -> Option<Kind> {
        if request.resource.group != crate::api::GROUP {
            return None;
        }
        match request.resource.resource.as_str() {
            "accessgrants" => Some(Kind::Grant),
            "accessapprovals" => Some(Kind::Approval),
            _ => None,
        }
    }
}

fn who(request: &AdmissionRequest<DynamicObject>) -> Who {
    let user = &request.user_info;
    Who {
        username: user.username.clone().unwrap_or_default(),
        uid: user.uid.clone().unwrap_or_default(),
        groups: user.groups.clone().unwrap_or_default(),
    }
}

fn refuse(
    request: &AdmissionRequest<DynamicObject>,
    why: impl std::fmt::Display,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    info!(
        operation = ?request.operation,
        resource = %request.resource.resource,
        namespace = request.namespace.as_deref().unwrap_or_default(),
        name = %request.name,
        user = request.user_info.username.as_deref().unwrap_or_default(),
        reason = %why,
        "admission refused"
    );
    response.deny(why)
}

/// JSON patch operations that set `values` in the object's annotations, creating the map if
/// needed.
fn annotate(
    annotations: Option<&BTreeMap<String, String>>,
    values: &[(&str, String)],
) -> Vec<Value> {
    match annotations {
        None => {
            let map: serde_json::Map<String, Value> = values
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
                .collect();
            vec![json!({"op": "add", "path": "/metadata/annotations", "value": map})]
        }
        Some(_) => values
            .iter()
            .map(|(k, v)| {
                let key = k.replace('~', "~0").replace('/', "~1");
                json!({"op": "add", "path": format!("/metadata/annotations/{key}"), "value": v})
            })
            .collect(),
    }
}

/// The JSON patch operation that adds `finalizer`, unless the object holds it already.
fn add_finalizer(finalizers: Option<&Vec<String>>, finalizer: &str) -> Option<Value> {
    match finalizers {
        None => Some(json!({"op": "add", "path": "/metadata/finalizers", "value": [finalizer]})),
        Some(held) if held.iter().any(|f| f == finalizer) => None,
        Some(_) => Some(json!({"op": "add", "path": "/metadata/finalizers/-", "value": finalizer})),
    }
}

/// `request`'s admission with `ops` as its patch.
fn patched(
    request: &AdmissionRequest<DynamicObject>,
    ops: Vec<Value>,
) -> Result<AdmissionResponse, String> {
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(ops)).map_err(|e| e.to_string())?;
    AdmissionResponse::from(request)
        .with_patch(patch)
        .map_err(|e| e.to_string())
}

/// An UPDATE that drops the stamps puts them back. A GitOps tool applying its manifest with
/// server-side apply owns the annotation the webhook added under its field manager, and so
/// removes it on the next apply; that must neither erase who asked nor fail the sync. A changed
/// stamp is not restored here: the validating webhook refuses it.
fn restore_stamps(request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let (Some(old), Some(new)) = (&request.old_object, &request.object) else {
        return response;
    };
    let kept = |key: &str| old.metadata.annotations.as_ref().and_then(|a| a.get(key));
    let dropped: Vec<(&str, String)> = [STAMP_ANNOTATION, DECIDED_BY_ANNOTATION]
        .into_iter()
        .filter_map(|key| {
            let value = kept(key)?;
            let now = new.metadata.annotations.as_ref().and_then(|a| a.get(key));
            now.is_none().then(|| (key, value.clone()))
        })
        .collect();
    if dropped.is_empty() {
        return response;
    }
    match patched(
        request,
        annotate(new.metadata.annotations.as_ref(), &dropped),
    ) {
        Ok(restored) => restored,
        Err(e) => {
            warn!(error = %e, "could not build the patch restoring a stamp");
            refuse(request, "internal error: could not keep the stamp")
        }
    }
}

impl Admission {
    pub fn new(key: StampKey, lookup: Arc<dyn Lookup>) -> Self {
        Admission { key, lookup }
    }

    /// The mutating webhook (`/mutate`): stamps who created a grant or an approval.
    pub async fn mutate(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        if request.operation == Operation::Update && Kind::of(request).is_some() {
            return restore_stamps(request);
        }
        let (Some(kind), Operation::Create, Some(object)) =
            (Kind::of(request), &request.operation, &request.object)
        else {
            return AdmissionResponse::from(request);
        };
        let namespace = request.namespace.clone().unwrap_or_default();
        let name = bound_name(
            object.metadata.name.as_deref().unwrap_or_default(),
            object.metadata.generate_name.as_deref(),
        );
        let who = who(request);
        let (binding, mut extra, finalizer) = match kind {
            Kind::Grant => (
                Binding::Grant { namespace, name },
                Vec::new(),
                add_finalizer(object.metadata.finalizers.as_ref(), GRANT_FINALIZER),
            ),
            Kind::Approval => {
                let approval: AccessApproval = match decode(object.clone()) {
                    Ok(a) => a,
                    Err(e) => return refuse(request, format!("not a valid AccessApproval: {e}")),
                };
                let grant = match self
                    .lookup
                    .grant(&namespace, &approval.spec.grant_ref.name)
                    .await
                {
                    Ok(Some(g)) => g,
                    Ok(None) => {
                        let msg = format!(
                            "AccessGrant {namespace}/{} does not exist",
                            approval.spec.grant_ref.name
                        );
                        return refuse(request, msg);
                    }
                    Err(e) => return refuse(request, e),
                };
                let binding = Binding::Approval {
                    namespace,
                    name,
                    grant_uid: grant.metadata.uid.clone().unwrap_or_default(),
                    grant_generation: grant.metadata.generation.unwrap_or_default(),
                    decision: approval.spec.decision.as_str().to_string(),
                    comment: approval.spec.comment.clone().unwrap_or_default(),
                };
                let decided_by = vec![(DECIDED_BY_ANNOTATION, who.username.clone())];
                (binding, decided_by, None)
            }
        };
        let stamp = Stamp::sign(&self.key, &who, Timestamp::now(), &binding);
        extra.push((STAMP_ANNOTATION, stamp.to_annotation()));
        let mut ops = annotate(object.metadata.annotations.as_ref(), &extra);
        ops.extend(finalizer);
        match patched(request, ops) {
            Ok(response) => response,
            Err(e) => {
                warn!(error = %e, "could not build the stamp patch");
                refuse(request, "internal error: could not stamp the object")
            }
        }
    }

    /// The validating webhook (`/validate`): refuses changes of stamps and decisions that may
    /// not be made.
    pub async fn validate(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let Some(kind) = Kind::of(request) else {
            return AdmissionResponse::from(request);
        };
        let verdict = match (kind, &request.operation) {
            (_, Operation::Update) => decide::update(
                request.old_object.as_ref(),
                request.object.as_ref(),
                kind == Kind::Approval,
            ),
            (Kind::Grant, Operation::Create) => self.check_grant_create(request),
            (Kind::Approval, Operation::Create) => self.check_approval_create(request).await,
            _ => Ok(()),
        };
        match verdict {
            Ok(()) => AdmissionResponse::from(request),
            Err(why) => refuse(request, why),
        }
    }

    /// The stamp on a new grant is this webhook's, for this user: no other mutating webhook
    /// rewrote it after ours.
    fn check_grant_create(&self, request: &AdmissionRequest<DynamicObject>) -> Result<(), String> {
        let object = request.object.clone().ok_or("no object in the request")?;
        let grant: AccessGrant =
            decode(object).map_err(|e| format!("not a valid AccessGrant: {e}"))?;
        let stamped = verify::requester(&self.key, &grant).map(|w| w.username);
        decide::stamped_by(stamped, &who(request).username)
    }

    async fn check_approval_create(
        &self,
        request: &AdmissionRequest<DynamicObject>,
    ) -> Result<(), String> {
        let object = request.object.clone().ok_or("no object in the request")?;
        let approval: AccessApproval =
            decode(object).map_err(|e| format!("not a valid AccessApproval: {e}"))?;
        let namespace = request.namespace.clone().unwrap_or_default();
        let grant_name = &approval.spec.grant_ref.name;
        let grant = self
            .lookup
            .grant(&namespace, grant_name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("AccessGrant {namespace}/{grant_name} does not exist"))?;
        let policy = self
            .lookup
            .policy(&namespace, grant.policy_name())
            .await
            .map_err(|e| e.to_string())?;
        let others = self
            .lookup
            .approvals(&namespace, grant_name)
            .await
            .map_err(|e| e.to_string())?;
        let approver = who(request);
        let stamped = verify::decision(&self.key, &approval, &grant).map(|d| d.approver.username);
        decide::stamped_by(stamped, &approver.username)?;
        decide::approval(&self.key, &approver, &grant, policy.as_ref(), &others)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finalizer_is_added_once_beside_any_other() {
        let none = add_finalizer(None, GRANT_FINALIZER);
        assert_eq!(
            none,
            Some(json!({"op": "add", "path": "/metadata/finalizers", "value": [GRANT_FINALIZER]}))
        );
        let others = vec!["example.com/keep".to_string()];
        assert_eq!(
            add_finalizer(Some(&others), GRANT_FINALIZER),
            Some(json!({"op": "add", "path": "/metadata/finalizers/-", "value": GRANT_FINALIZER}))
        );
        let held = vec![others[0].clone(), GRANT_FINALIZER.to_string()];
        assert_eq!(add_finalizer(Some(&held), GRANT_FINALIZER), None);
    }
}
