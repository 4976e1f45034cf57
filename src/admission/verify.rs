//! Reading stamps back: who requested a grant, and the decisions made on it, as far as this
//! operator's key can vouch for them. Used by the controller (which trusts nothing else) and by
//! the webhook (to check a new decision against the ones already made).

use jiff::Timestamp;
use kube::ResourceExt;

use super::stamp::{Binding, STAMP_ANNOTATION, Stamp, StampError, StampKey, Who, candidate_names};
use crate::api::{AccessApproval, AccessGrant};
use crate::plan::approval::VerifiedDecision;

fn stamp_of(annotations: &std::collections::BTreeMap<String, String>) -> Result<Stamp, StampError> {
    let value = annotations
        .get(STAMP_ANNOTATION)
        .ok_or(StampError::Missing)?;
    Stamp::from_annotation(value)
}

fn created(meta: &kube::api::ObjectMeta) -> Option<Timestamp> {
    meta.creation_timestamp.as_ref().map(|t| t.0)
}

/// Who created the grant, if the webhook stamped it for this very grant.
pub fn requester(key: &StampKey, grant: &AccessGrant) -> Result<Who, StampError> {
    let stamp = stamp_of(grant.annotations())?;
    let namespace = grant.namespace().unwrap_or_default();
    let bindings: Vec<Binding> =
        candidate_names(&grant.name_any(), grant.metadata.generate_name.as_deref())
            .into_iter()
            .map(|name| Binding::Grant {
                namespace: namespace.clone(),
                name,
            })
            .collect();
    stamp.verify(key, &bindings, created(&grant.metadata))
}

/// The approval's stamp bindings, for the grant as it is now (its uid and generation).
pub fn approval_bindings(approval: &AccessApproval, grant: &AccessGrant) -> Vec<Binding> {
    let namespace = approval.namespace().unwrap_or_default();
    let grant_uid = grant.uid().unwrap_or_default();
    let grant_generation = grant.metadata.generation.unwrap_or_default();
    candidate_names(
        &approval.name_any(),
        approval.metadata.generate_name.as_deref(),
    )
    .into_iter()
    .map(|name| Binding::Approval {
        namespace: namespace.clone(),
        name,
        grant_uid: grant_uid.clone(),
        grant_generation,
        decision: approval.spec.decision.as_str().to_string(),
        comment: approval.spec.comment.clone().unwrap_or_default(),
    })
    .collect()
}

/// The decision the approval records on `grant` as it is now. An approval made for another
/// grant of the same name (deleted and re-created), or before the grant's spec was edited, does
/// not verify: it was for a request that no longer stands.
pub fn decision(
    key: &StampKey,
    approval: &AccessApproval,
    grant: &AccessGrant,
) -> Result<VerifiedDecision, StampError> {
    if approval.spec.grant_ref.name != grant.name_any() || approval.namespace() != grant.namespace()
    {
        return Err(StampError::BadSignature);
    }
    let stamp = stamp_of(approval.annotations())?;
    let who = stamp.verify(
        key,
        &approval_bindings(approval, grant),
        created(&approval.metadata),
    )?;
    Ok(VerifiedDecision {
        approver: who.user_ref(),
        decision: approval.spec.decision,
        at: stamp.at,
        comment: approval.spec.comment.clone(),
    })
}

/// Every decision on `grant` that verifies, oldest first.
pub fn decisions(
    key: &StampKey,
    approvals: &[AccessApproval],
    grant: &AccessGrant,
) -> Vec<VerifiedDecision> {
    let mut out: Vec<VerifiedDecision> = approvals
        .iter()
        .filter_map(|a| decision(key, a, grant).ok())
        .collect();
    out.sort_by_key(|d| d.at);
    out
}
