//! The pure rules of admission: given the request's objects and the objects they name, allow or
//! say why not. What a refused requester or approver is told names the rule, not the policy's
//! other contents.

use kube::ResourceExt;
use kube::core::DynamicObject;

use super::stamp::{STAMP_ANNOTATION, StampError, StampKey, Who};
use super::verify;
use crate::api::{AccessApproval, AccessGrant, JitPolicy};
use crate::plan::approval::requirements;

/// The stamp verified and names the user making the request.
pub fn stamped_by(verified: Result<String, StampError>, username: &str) -> Result<(), String> {
    match verified {
        Ok(stamped) if stamped == username => Ok(()),
        Ok(_) | Err(_) => Err(format!(
            "the {STAMP_ANNOTATION} annotation is not the one this webhook wrote for this request: \
             is the portcullis mutating webhook registered, and does another webhook rewrite it?"
        )),
    }
}

fn annotation<'a>(object: Option<&'a DynamicObject>, key: &str) -> Option<&'a str> {
    object?
        .metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// An UPDATE: nobody changes a stamp, and an approval's spec is fixed once made.
pub fn update(
    old: Option<&DynamicObject>,
    new: Option<&DynamicObject>,
    is_approval: bool,
) -> Result<(), String> {
    if annotation(old, STAMP_ANNOTATION) != annotation(new, STAMP_ANNOTATION) {
        return Err(format!(
            "the {STAMP_ANNOTATION} annotation records who created this object and cannot be changed"
        ));
    }
    if is_approval {
        let spec = |o: Option<&DynamicObject>| o.and_then(|o| o.data.get("spec").cloned());
        if spec(old) != spec(new) {
            return Err(
                "an AccessApproval cannot be changed once made; create a new one (or delete it)"
                    .to_string(),
            );
        }
    }
    Ok(())
}

/// A new decision by `approver` on `grant`.
pub fn approval(
    key: &StampKey,
    approver: &Who,
    grant: &AccessGrant,
    policy: Option<&JitPolicy>,
    others: &[AccessApproval],
) -> Result<(), String> {
    let grant_name = grant.name_any();
    let status = grant.status.clone().unwrap_or_default();
    if status.activated_at.is_some() || status.phase.is_some_and(|p| p.is_final()) {
        return Err(format!(
            "AccessGrant {grant_name} is not waiting for a decision (it is {})",
            status.phase.map(|p| p.as_str()).unwrap_or("decided")
        ));
    }
    let Some(policy) = policy else {
        return Err(format!(
            "AccessGrant {grant_name} is not waiting for a decision (its policy does not exist)"
        ));
    };
    let needed = requirements(&policy.spec, &grant.spec);
    if needed.is_empty() {
        return Err(format!(
            "AccessGrant {grant_name} is not waiting for a decision (its policy needs no approval)"
        ));
    }
    match verify::requester(key, grant) {
        Ok(requester) if requester.username == approver.username => {
            return Err("nobody may approve or reject their own grant".to_string());
        }
        Ok(_) => {}
        Err(_) => {
            return Err(format!(
                "AccessGrant {grant_name} has no verified requester, so it cannot be approved"
            ));
        }
    }
    let user = approver.user_ref();
    if !needed.iter().any(|r| r.approvers.includes(&user)) {
        return Err(format!(
            "{} is not an approver for AccessGrant {grant_name}",
            approver.username
        ));
    }
    let already = verify::decisions(key, others, grant)
        .into_iter()
        .any(|d| d.approver.username == approver.username);
    if already {
        return Err(format!(
            "{} has already decided on AccessGrant {grant_name}",
            approver.username
        ));
    }
    Ok(())
}
