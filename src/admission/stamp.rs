//! Stamps: who created an object, as the admission webhook saw it, signed with a key only the
//! operator holds, so that the controller can tell a stamp the webhook wrote from one a client
//! wrote itself (with the webhook bypassed or unregistered), and never trusts the latter.
//!
//! A stamp binds the person to the object it was made for: its kind, namespace and name (or
//! `generateName`), the time it was made (the controller accepts it only near the object's
//! `creationTimestamp`, so a stamp copied onto a later object is worthless), and for an
//! approval the grant decided on, at the generation decided on, and the decision itself.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::api::UserRef;

/// The annotation that holds a grant's requester stamp, or an approval's approver stamp.
pub const STAMP_ANNOTATION: &str = "portcullis.dev/stamp";
/// The approver's username in plain text, for `kubectl get approvals` only: never trusted.
pub const DECIDED_BY_ANNOTATION: &str = "portcullis.dev/decided-by-user";

/// How far a stamp's time may lie from the object's `creationTimestamp`: the webhook runs
/// moments before the API server stores the object.
pub const MAX_SKEW: SignedDuration = SignedDuration::from_secs(120);

/// The HMAC key that signs stamps (at least 32 bytes).
#[derive(Clone)]
pub struct StampKey(Vec<u8>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StampError {
    #[error("the stamp key is {0} bytes; it needs at least 32")]
    KeyTooShort(usize),
    #[error("no stamp: the object was not created through the admission webhook")]
    Missing,
    #[error("the stamp does not parse: {0}")]
    Malformed(String),
    #[error(
        "the stamp's signature does not match: it was not written by this operator's webhook for this object"
    )]
    BadSignature,
    #[error("the stamp was made at {at}, too far from the object's creation at {created}")]
    Stale { at: Timestamp, created: Timestamp },
}

impl StampKey {
    pub fn new(bytes: Vec<u8>) -> Result<StampKey, StampError> {
        if bytes.len() < 32 {
            return Err(StampError::KeyTooShort(bytes.len()));
        }
        Ok(StampKey(bytes))
    }

    /// A fresh random key (32 bytes from the OS).
    pub fn generate() -> Result<StampKey, getrandom::Error> {
        let mut bytes = vec![0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(StampKey(bytes))
    }

    /// The key's bytes, for storing it in a Secret.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, message: &[u8]) -> Hmac<Sha256> {
        hmac_sha256(&self.0, message)
    }
}

/// HMAC-SHA256 of `message` under `key`, ready to `finalize` or `verify_slice` (constant
/// time). Shared by the stamps and the notifications' signatures.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(message);
    mac
}

impl std::fmt::Debug for StampKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StampKey(<redacted>)")
    }
}

/// Who, when, and the signature; stored as JSON in [`STAMP_ANNOTATION`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub username: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub at: Timestamp,
    pub signature: String,
}

impl Stamp {
    /// Signs `who` for the object `binding` describes.
    pub fn sign(key: &StampKey, who: &Who, at: Timestamp, binding: &Binding) -> Stamp {
        let mac = key.mac(&message(who, at, binding));
        Stamp {
            username: who.username.clone(),
            uid: who.uid.clone(),
            groups: who.groups.clone(),
            at,
            signature: BASE64.encode(mac.finalize().into_bytes()),
        }
    }

    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_annotation(value: &str) -> Result<Stamp, StampError> {
        serde_json::from_str(value).map_err(|e| StampError::Malformed(e.to_string()))
    }

    /// The stamp's person, if this key signed it for one of the `bindings` (an object created
    /// with `generateName` may match under its name or its `generateName`) within
    /// [`MAX_SKEW`] of `created`.
    pub fn verify(
        &self,
        key: &StampKey,
        bindings: &[Binding],
        created: Option<Timestamp>,
    ) -> Result<Who, StampError> {
        let who = Who {
            username: self.username.clone(),
            uid: self.uid.clone(),
            groups: self.groups.clone(),
        };
        let signature = BASE64
            .decode(&self.signature)
            .map_err(|_| StampError::BadSignature)?;
        let signed = bindings.iter().any(|b| {
            key.mac(&message(&who, self.at, b))
                .verify_slice(&signature)
                .is_ok()
        });
        if !signed {
            return Err(StampError::BadSignature);
        }
        if let Some(created) = created
            && created.duration_since(self.at).abs() > MAX_SKEW
        {
            return Err(StampError::Stale {
                at: self.at,
                created,
            });
        }
        Ok(who)
    }
}

/// A person as the API server authenticated them (the AdmissionReview's `userInfo`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Who {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl Who {
    pub fn user_ref(&self) -> UserRef {
        UserRef {
            username: self.username.clone(),
            groups: self.groups.clone(),
        }
    }
}

/// What a stamp is made for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// A grant, by namespace and name (or `generateName` followed by `*`).
    Grant { namespace: String, name: String },
    /// An approval, by namespace and name (or `generateName*`), bound to the grant's uid and
    /// generation at the time of the decision, and to the decision and comment.
    Approval {
        namespace: String,
        name: String,
        grant_uid: String,
        grant_generation: i64,
        decision: String,
        comment: String,
    },
}

/// The name a stamp binds: the object's name, or its `generateName` with `*` when the client
/// left the name to the server (the webhook runs before the name is generated).
pub fn bound_name(name: &str, generate_name: Option<&str>) -> String {
    match generate_name {
        Some(prefix) if name.is_empty() => format!("{prefix}*"),
        _ => name.to_string(),
    }
}

/// The names an existing object's stamp may have been bound to.
pub fn candidate_names(name: &str, generate_name: Option<&str>) -> Vec<String> {
    let mut names = vec![name.to_string()];
    if let Some(prefix) = generate_name.filter(|p| !p.is_empty() && name.starts_with(*p)) {
        names.push(format!("{prefix}*"));
    }
    names
}

fn message(who: &Who, at: Timestamp, binding: &Binding) -> Vec<u8> {
    let bound = match binding {
        Binding::Grant { namespace, name } => {
            serde_json::json!(["AccessGrant", namespace, name])
        }
        Binding::Approval {
            namespace,
            name,
            grant_uid,
            grant_generation,
            decision,
            comment,
        } => serde_json::json!([
            "AccessApproval",
            namespace,
            name,
            grant_uid,
            grant_generation,
            decision,
            comment
        ]),
    };
    // A JSON array: unambiguous however the strings are chosen.
    serde_json::json!([
        "portcullis-stamp-v1",
        bound,
        who.username,
        who.uid,
        who.groups,
        at.to_string()
    ])
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> StampKey {
        StampKey::new(vec![b; 32]).unwrap()
    }

    fn alice() -> Who {
        Who {
            username: "alice".into(),
            uid: "u-1".into(),
            groups: vec!["devs".into()],
        }
    }

    fn grant(name: &str) -> Binding {
        Binding::Grant {
            namespace: "team-a".into(),
            name: name.into(),
        }
    }

    fn at() -> Timestamp {
        "2026-11-26T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_stamp_verifies_for_its_object_only() {
        let s = Stamp::sign(&key(1), &alice(), at(), &grant("g1"));
        let back = Stamp::from_annotation(&s.to_annotation()).unwrap();
        assert_eq!(
            back.verify(&key(1), &[grant("g1")], Some(at())),
            Ok(alice())
        );
        assert_eq!(
            back.verify(&key(1), &[grant("g2")], Some(at())),
            Err(StampError::BadSignature)
        );
        assert_eq!(
            back.verify(&key(2), &[grant("g1")], Some(at())),
            Err(StampError::BadSignature)
        );
    }

    #[test]
    fn an_edited_stamp_does_not_verify() {
        let s = Stamp::sign(&key(1), &alice(), at(), &grant("g1"));
        let forged = [
            Stamp {
                username: "mallory".into(),
                ..s.clone()
            },
            Stamp {
                groups: vec!["admins".into()],
                ..s.clone()
            },
            Stamp {
                at: at().checked_add(SignedDuration::from_secs(1)).unwrap(),
                ..s.clone()
            },
            Stamp {
                signature: "not base64!".into(),
                ..s.clone()
            },
        ];
        for f in forged {
            assert_eq!(
                f.verify(&key(1), &[grant("g1")], None),
                Err(StampError::BadSignature),
                "{f:?}"
            );
        }
    }

    #[test]
    fn a_stamp_far_from_creation_is_stale() {
        let s = Stamp::sign(&key(1), &alice(), at(), &grant("g1"));
        let later = at().checked_add(SignedDuration::from_mins(10)).unwrap();
        assert!(matches!(
            s.verify(&key(1), &[grant("g1")], Some(later)),
            Err(StampError::Stale { .. })
        ));
        let soon = at().checked_add(SignedDuration::from_secs(3)).unwrap();
        assert!(s.verify(&key(1), &[grant("g1")], Some(soon)).is_ok());
    }

    #[test]
    fn generated_names_bind_to_the_prefix() {
        let bound = bound_name("", Some("ssh-"));
        assert_eq!(bound, "ssh-*");
        let s = Stamp::sign(&key(1), &alice(), at(), &grant(&bound));
        let names = candidate_names("ssh-x7k2p", Some("ssh-"));
        let bindings: Vec<Binding> = names.iter().map(|n| grant(n)).collect();
        assert!(s.verify(&key(1), &bindings, None).is_ok());
        // A name that does not start with the prefix offers no prefix binding.
        assert_eq!(candidate_names("other", Some("ssh-")), vec!["other"]);
    }

    #[test]
    fn approvals_bind_the_grant_generation_and_the_decision() {
        let approval = |generation: i64, decision: &str| Binding::Approval {
            namespace: "team-a".into(),
            name: "ok-1".into(),
            grant_uid: "grant-uid".into(),
            grant_generation: generation,
            decision: decision.into(),
            comment: "fine".into(),
        };
        let s = Stamp::sign(&key(1), &alice(), at(), &approval(1, "Approve"));
        assert!(s.verify(&key(1), &[approval(1, "Approve")], None).is_ok());
        assert!(s.verify(&key(1), &[approval(2, "Approve")], None).is_err());
        assert!(s.verify(&key(1), &[approval(1, "Reject")], None).is_err());
    }

    #[test]
    fn short_keys_are_refused_and_keys_never_print() {
        assert_eq!(
            StampKey::new(vec![0; 16]).unwrap_err(),
            StampError::KeyTooShort(16)
        );
        assert_eq!(format!("{:?}", key(7)), "StampKey(<redacted>)");
    }
}
