//! Notification targets: read from Secrets (a webhook URL is a credential: Slack's and Teams'
//! carry their token in the path), and chosen for a grant's step. Pure.
//!
//! A target Secret carries the label [`LABEL`] (the operator watches only such Secrets) and:
//! - `data.url` (required): `https://...`; `http://` only to a loopback IP (tests);
//! - `data.format`: `slack`, `teams` or `generic` (default);
//! - `data.signingKey`: required for `generic` (at least 16 bytes), optional otherwise;
//! - `data.events`: a comma-separated list of event names (default: every event).
//!
//! Label value `true`: the target applies to every grant in its namespace. Value `policy`: only
//! to grants under a JitPolicy whose `spec.notifications` names it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use url::Url;

use super::Event;
use super::sign::{MIN_KEY_BYTES, SigningKey};
use crate::api::NotificationRef;

/// The label that makes the operator read a Secret as a notification target.
pub const LABEL: &str = "portcullis.dev/notification-target";
/// Label value: the target applies to every grant in the namespace.
pub const NAMESPACE_WIDE: &str = "true";
/// Label value: the target applies only where a policy names it.
pub const POLICY_ONLY: &str = "policy";
/// The label selector of the operator's Secret watch.
pub const SELECTOR: &str = "portcullis.dev/notification-target in (true,policy)";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Slack,
    Teams,
    Generic,
}

/// Why a target is refused. Messages never contain the URL, nor the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("data.url is missing")]
    MissingUrl,
    #[error("data.{0} is not UTF-8 text")]
    NotText(&'static str),
    #[error("data.url is not a URL")]
    BadUrl,
    #[error(
        "data.url must be https (http only to a loopback address), and carry no user or password"
    )]
    InsecureUrl,
    #[error("data.format {0:?} is not one of slack, teams, generic")]
    UnknownFormat(String),
    #[error(
        "the generic format needs data.signingKey (at least {MIN_KEY_BYTES} bytes): nothing is sent unsigned"
    )]
    MissingSigningKey,
    #[error("data.signingKey is {0} bytes; it needs at least {MIN_KEY_BYTES}")]
    ShortSigningKey(usize),
    #[error("data.events names {0:?}, which is not an event (known: {known})", known = known_events())]
    UnknownEvent(String),
    #[error(
        "JitPolicy {policy} names Secret {secret}, which does not exist in the namespace or lacks the label {LABEL}"
    )]
    NotFound { policy: String, secret: String },
}

fn known_events() -> String {
    Event::ALL.map(Event::as_str).join(", ")
}

/// One target, ready to send to.
#[derive(Clone, Debug)]
pub struct Target {
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
    pub url: Url,
    pub format: Format,
    pub signing_key: Option<SigningKey>,
    /// The events it wants.
    pub events: Vec<Event>,
}

impl Target {
    /// `namespace/name` of its Secret: what logs and Events name, never the URL.
    pub fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn wants(&self, event: Event) -> bool {
        self.events.contains(&event)
    }

    /// Reads a target from its Secret's data.
    pub fn from_secret(secret: &Secret) -> Result<Target, TargetError> {
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let text = |key: &'static str| -> Result<Option<String>, TargetError> {
            data.get(key)
                .map(|v| {
                    String::from_utf8(v.0.clone())
                        .map(|s| s.trim().to_string())
                        .map_err(|_| TargetError::NotText(key))
                })
                .transpose()
        };
        let url = text("url")?
            .filter(|u| !u.is_empty())
            .ok_or(TargetError::MissingUrl)?;
        let url = parse_url(&url)?;
        let format = match text("format")?.as_deref() {
            None | Some("") | Some("generic") => Format::Generic,
            Some("slack") => Format::Slack,
            Some("teams") => Format::Teams,
            Some(other) => return Err(TargetError::UnknownFormat(other.to_string())),
        };
        let signing_key = match data.get("signingKey").map(|k| k.0.clone()) {
            None => None,
            Some(bytes) => {
                let len = bytes.len();
                Some(SigningKey::new(bytes).ok_or(TargetError::ShortSigningKey(len))?)
            }
        };
        if format == Format::Generic && signing_key.is_none() {
            return Err(TargetError::MissingSigningKey);
        }
        let events = match text("events")?.filter(|e| !e.is_empty()) {
            None => Event::ALL.to_vec(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| Event::parse(n).ok_or_else(|| TargetError::UnknownEvent(n.to_string())))
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(Target {
            namespace: secret.namespace().unwrap_or_default(),
            name: secret.name_any(),
            url,
            format,
            signing_key,
            events,
        })
    }
}

/// A URL the operator may post to: https, or http to a loopback IP literal; no credentials in
/// it (they would end up in proxies' logs).
fn parse_url(text: &str) -> Result<Url, TargetError> {
    let url = Url::parse(text).map_err(|_| TargetError::BadUrl)?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::InsecureUrl);
    }
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(url::Host::Domain(_)) => false,
        None => return Err(TargetError::BadUrl),
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(TargetError::InsecureUrl),
    }
}

/// A target that cannot be used, and the object to report it on.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `Secret` or `JitPolicy`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub error: TargetError,
}

/// The targets of one step, and the ones refused on the way.
#[derive(Debug, Default)]
pub struct Selection {
    pub targets: Vec<Target>,
    pub refused: Vec<Refusal>,
}

/// Chooses the targets for `event` of a grant in `namespace`: every Secret there labelled
/// [`NAMESPACE_WIDE`], and those the grant's policy names (`policy`: its name and
/// `spec.notifications`), each once. `secrets` are the labelled Secrets the operator sees (of
/// any namespace). A Secret that does not describe a valid target is refused, never half used.
pub fn select(
    event: Event,
    namespace: &str,
    secrets: &[&Secret],
    policy: Option<(&str, &[NotificationRef])>,
) -> Selection {
    let here: Vec<&Secret> = secrets
        .iter()
        .copied()
        .filter(|s| s.namespace().as_deref() == Some(namespace))
        .collect();
    let label = |s: &Secret| s.labels().get(LABEL).cloned().unwrap_or_default();
    let mut chosen: Vec<&Secret> = here
        .iter()
        .copied()
        .filter(|s| label(s) == NAMESPACE_WIDE)
        .collect();
    let mut selection = Selection::default();
    if let Some((policy_name, refs)) = policy {
        for r in refs {
            let found = here.iter().copied().find(|s| {
                s.name_any() == r.secret_name
                    && matches!(label(s).as_str(), NAMESPACE_WIDE | POLICY_ONLY)
            });
            match found {
                Some(s) => chosen.push(s),
                None => selection.refused.push(Refusal {
                    kind: "JitPolicy",
                    namespace: namespace.to_string(),
                    name: policy_name.to_string(),
                    error: TargetError::NotFound {
                        policy: policy_name.to_string(),
                        secret: r.secret_name.clone(),
                    },
                }),
            }
        }
    }
    chosen.sort_by_key(|s| s.name_any());
    chosen.dedup_by_key(|s| s.name_any());
    for secret in chosen {
        match Target::from_secret(secret) {
            Ok(t) if t.wants(event) => selection.targets.push(t),
            Ok(_) => {}
            Err(error) => selection.refused.push(Refusal {
                kind: "Secret",
                namespace: namespace.to_string(),
                name: secret.name_any(),
                error,
            }),
        }
    }
    selection
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(ns: &str, name: &str, label: Option<&str>, data: &[(&str, &str)]) -> Secret {
        let mut s = Secret::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        if let Some(l) = label {
            s.metadata.labels = Some([(LABEL.to_string(), l.to_string())].into());
        }
        s.data = Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        );
        s
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn generic(ns: &str, name: &str, label: &str) -> Secret {
        secret(
            ns,
            name,
            Some(label),
            &[("url", "https://hooks.example/x"), ("signingKey", KEY)],
        )
    }

    fn refs(names: &[&str]) -> Vec<NotificationRef> {
        names
            .iter()
            .map(|n| NotificationRef {
                secret_name: n.to_string(),
            })
            .collect()
    }

    fn names(sel: &Selection) -> Vec<String> {
        sel.targets.iter().map(|t| t.name.clone()).collect()
    }

    #[test]
    fn a_secret_reads_as_a_target_with_defaults() {
        let t = Target::from_secret(&generic("a", "hook", "true")).expect("valid");
        assert_eq!(t.format, Format::Generic);
        assert_eq!(t.events, Event::ALL.to_vec());
        assert_eq!(t.describe(), "a/hook");
        let s = secret(
            "a",
            "slack",
            Some("true"),
            &[
                ("url", " https://hooks.slack.com/services/T/B/secret\n"),
                ("format", "slack"),
                ("events", "awaitingApproval, closeOverdue"),
            ],
        );
        let t = Target::from_secret(&s).expect("valid");
        assert_eq!(t.format, Format::Slack);
        assert!(t.signing_key.is_none());
        assert_eq!(t.events, vec![Event::AwaitingApproval, Event::CloseOverdue]);
        assert!(t.wants(Event::CloseOverdue) && !t.wants(Event::Activated));
    }

    #[test]
    fn bad_secrets_are_refused_and_the_reason_never_shows_the_url() {
        let url = "https://hooks.slack.com/services/T/B/TOKEN";
        let cases: Vec<(Vec<(&str, &str)>, TargetError)> = vec![
            (vec![("signingKey", KEY)], TargetError::MissingUrl),
            (
                vec![("url", "not a url"), ("signingKey", KEY)],
                TargetError::BadUrl,
            ),
            (
                vec![("url", "http://hooks.example/x"), ("signingKey", KEY)],
                TargetError::InsecureUrl,
            ),
            (
                vec![("url", "http://localhost:80/x"), ("signingKey", KEY)],
                TargetError::InsecureUrl,
            ),
            (
                vec![("url", "https://u:p@hooks.example/x"), ("signingKey", KEY)],
                TargetError::InsecureUrl,
            ),
            (
                vec![("url", "ftp://127.0.0.1/x"), ("signingKey", KEY)],
                TargetError::InsecureUrl,
            ),
            (vec![("url", url)], TargetError::MissingSigningKey),
            (
                vec![("url", url), ("format", "generic"), ("signingKey", "short")],
                TargetError::ShortSigningKey(5),
            ),
            (
                vec![("url", url), ("format", "discord")],
                TargetError::UnknownFormat("discord".into()),
            ),
            (
                vec![
                    ("url", url),
                    ("format", "slack"),
                    ("events", "activated,opened"),
                ],
                TargetError::UnknownEvent("opened".into()),
            ),
        ];
        for (data, want) in cases {
            let got = Target::from_secret(&secret("a", "s", Some("true"), &data));
            let err = got.expect_err("refused");
            assert_eq!(err, want, "{data:?}");
            assert!(!err.to_string().contains("TOKEN"), "{err}");
            assert!(!err.to_string().contains(KEY), "{err}");
        }
        // Loopback over http is fine (tests), IPv4 and IPv6.
        for u in ["http://127.0.0.1:9/x", "http://[::1]:9/x"] {
            let s = secret("a", "s", Some("true"), &[("url", u), ("signingKey", KEY)]);
            assert!(Target::from_secret(&s).is_ok(), "{u}");
        }
    }

    #[test]
    fn namespace_wide_and_policy_named_targets_are_chosen_once_each() {
        let wide = generic("a", "wide", NAMESPACE_WIDE);
        let named = generic("a", "named", POLICY_ONLY);
        let other_policy = generic("a", "other", POLICY_ONLY);
        let other_ns = generic("b", "elsewhere", NAMESPACE_WIDE);
        let secrets = [&wide, &named, &other_policy, &other_ns];
        let sel = select(Event::Activated, "a", &secrets, None);
        assert_eq!(names(&sel), ["wide"]);
        let r = refs(&["named", "wide"]);
        let sel = select(Event::Activated, "a", &secrets, Some(("prod", &r)));
        assert_eq!(names(&sel), ["named", "wide"]);
        assert!(sel.refused.is_empty());
        let sel = select(Event::Activated, "b", &secrets, None);
        assert_eq!(names(&sel), ["elsewhere"]);
    }

    #[test]
    fn a_missing_or_unlabelled_named_secret_is_reported_on_the_policy() {
        let unlabelled = secret(
            "a",
            "plain",
            None,
            &[("url", "https://x.example/"), ("signingKey", KEY)],
        );
        let r = refs(&["plain", "absent"]);
        let sel = select(Event::Expired, "a", &[&unlabelled], Some(("prod", &r)));
        assert!(sel.targets.is_empty());
        assert_eq!(sel.refused.len(), 2);
        assert!(
            sel.refused
                .iter()
                .all(|r| r.kind == "JitPolicy" && r.name == "prod")
        );
    }

    #[test]
    fn an_invalid_target_is_refused_while_the_others_are_used_and_filters_apply() {
        let good = generic("a", "good", NAMESPACE_WIDE);
        let unsigned = secret(
            "a",
            "unsigned",
            Some(NAMESPACE_WIDE),
            &[("url", "https://x.example/")],
        );
        let picky = secret(
            "a",
            "picky",
            Some(NAMESPACE_WIDE),
            &[
                ("url", "https://x.example/"),
                ("format", "teams"),
                ("events", "expired"),
            ],
        );
        let secrets = [&good, &unsigned, &picky];
        let sel = select(Event::Activated, "a", &secrets, None);
        assert_eq!(names(&sel), ["good"]);
        assert_eq!(
            sel.refused,
            vec![Refusal {
                kind: "Secret",
                namespace: "a".into(),
                name: "unsigned".into(),
                error: TargetError::MissingSigningKey,
            }]
        );
        let sel = select(Event::Expired, "a", &secrets, None);
        assert_eq!(names(&sel), ["good", "picky"]);
    }
}
