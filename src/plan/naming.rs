//! Rule names and descriptions: guarantee 5 ("own only its rules").
//!
//! NSG security rules carry no tags, so ownership is encoded in the rule name: every rule
//! Portcullis creates starts with [`RULE_PREFIX`], and nothing else is ever written or deleted.
//! Names are derived from object UIDs through a short stable hash, so they are deterministic,
//! fit Azure's limits and never depend on user-chosen (possibly long) object names. The
//! description names the owning object for humans reading the NSG in the portal.

use jiff::Timestamp;
use sha2::{Digest, Sha256};

use crate::api::Protocol;

/// Every rule Portcullis creates starts with this.
pub const RULE_PREFIX: &str = "portcullis-";
/// Azure's limit on a rule name.
pub const MAX_RULE_NAME_LEN: usize = 80;
/// Azure's limit on a rule description.
pub const MAX_DESCRIPTION_CHARS: usize = 140;

/// Whether Portcullis owns the rule with this name (case-insensitive prefix, as Azure names are
/// case-insensitive).
pub fn is_owned(rule_name: &str) -> bool {
    starts_with_ci(rule_name, RULE_PREFIX)
}

/// The first 10 hex characters of the SHA-256 of `s`.
pub fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(10);
    for b in digest.iter().take(5) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// `tcp`, `udp` or `any`: the protocol as it appears in rule names and descriptions.
pub fn protocol_token(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "any",
    }
}

/// The Allow rule of a grant for one protocol: `portcullis-a-<hash(uid)>-<proto>`.
pub fn grant_rule_name(grant_uid: &str, protocol: Protocol) -> String {
    format!(
        "{RULE_PREFIX}a-{}-{}",
        short_hash(grant_uid),
        protocol_token(protocol)
    )
}

/// The Deny rule of a policy for one VM port:
/// `portcullis-d-<hash(uid)>-<hash(lowercase vm id), 6>-<port>-<proto>`.
pub fn policy_rule_name(policy_uid: &str, vm_id: &str, port: u16, protocol: Protocol) -> String {
    let vm_hash = short_hash(&vm_id.to_ascii_lowercase());
    format!(
        "{RULE_PREFIX}d-{}-{}-{port}-{}",
        short_hash(policy_uid),
        &vm_hash[..6],
        protocol_token(protocol)
    )
}

/// The address family of a rule: Azure refuses a rule that mixes IPv4 and IPv6 addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// The name of a rule's family variant: IPv4 rules keep the base name (the names rules had
/// before the split), IPv6 rules get `-v6`.
pub fn with_family(base: String, family: Family) -> String {
    match family {
        Family::V4 => base,
        Family::V6 => format!("{base}-v6"),
    }
}

fn starts_with_ci(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

/// The name prefix shared by every Allow rule of the grant with this uid.
pub fn grant_rule_prefix(grant_uid: &str) -> String {
    format!("{RULE_PREFIX}a-{}-", short_hash(grant_uid))
}

/// Whether `rule_name` is one of the Allow rules of the grant with this uid (any protocol).
pub fn is_grant_rule_of(rule_name: &str, grant_uid: &str) -> bool {
    starts_with_ci(rule_name, &grant_rule_prefix(grant_uid))
}

/// Whether `rule_name` is one of the Deny rules of the policy with this uid (any VM or port).
pub fn is_policy_rule_of(rule_name: &str, policy_uid: &str) -> bool {
    starts_with_ci(
        rule_name,
        &format!("{RULE_PREFIX}d-{}-", short_hash(policy_uid)),
    )
}

/// Azure's rule-name rule: 1-80 characters of letters, digits, `_`, `.`, `-`; starting with a
/// letter or digit; ending with a letter, digit or `_`.
pub fn is_valid_rule_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    bytes.len() <= MAX_RULE_NAME_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && first.is_ascii_alphanumeric()
        && (last.is_ascii_alphanumeric() || *last == b'_')
}

/// Cuts `s` to at most `max` characters, on a character boundary.
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// RFC 3339 in UTC with seconds precision (fractions cut): `2025-06-15T14:06:40Z`.
pub fn rfc3339_seconds(t: Timestamp) -> String {
    Timestamp::from_second(t.as_second())
        .unwrap_or(t)
        .to_string()
}

/// `portcullis grant <ns>/<name> until <expiresAt>`, at most 140 characters.
pub fn grant_description(namespace: &str, name: &str, expires_at: Timestamp) -> String {
    truncate_chars(
        &format!(
            "portcullis grant {namespace}/{name} until {}",
            rfc3339_seconds(expires_at)
        ),
        MAX_DESCRIPTION_CHARS,
    )
}

/// `portcullis policy <ns>/<name> deny <vm name>:<port>/<proto>`, at most 140 characters.
pub fn policy_description(
    namespace: &str,
    name: &str,
    vm_name: &str,
    port: u16,
    protocol: Protocol,
) -> String {
    truncate_chars(
        &format!(
            "portcullis policy {namespace}/{name} deny {vm_name}:{port}/{}",
            protocol_token(protocol)
        ),
        MAX_DESCRIPTION_CHARS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_short() {
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(short_hash("abc"), "ba7816bf8f");
        assert_eq!(short_hash("abc").len(), 10);
        assert_ne!(short_hash("abc"), short_hash("abd"));
    }

    #[test]
    fn names_have_the_documented_shape() {
        let uid = "0b6c3f2e-4a1d-4d8e-9f00-123456789abc";
        let a = grant_rule_name(uid, Protocol::Tcp);
        assert_eq!(a, format!("portcullis-a-{}-tcp", short_hash(uid)));
        let vm =
            "/subscriptions/s/resourceGroups/RG/providers/Microsoft.Compute/virtualMachines/VM1";
        let d = policy_rule_name(uid, vm, 22, Protocol::Udp);
        assert_eq!(
            d,
            format!(
                "portcullis-d-{}-{}-22-udp",
                short_hash(uid),
                &short_hash(&vm.to_lowercase())[..6]
            )
        );
        assert_eq!(
            d,
            policy_rule_name(uid, &vm.to_uppercase(), 22, Protocol::Udp),
            "VM id case does not matter"
        );
        assert!(is_owned(&a) && is_owned(&d));
        assert!(is_valid_rule_name(&a) && is_valid_rule_name(&d));
    }

    #[test]
    fn longest_names_fit_azure() {
        let uid = "f".repeat(300);
        let vm = format!(
            "/subscriptions/{}/resourceGroups/x/providers/Microsoft.Compute/virtualMachines/y",
            "s".repeat(400)
        );
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Any] {
            let d = policy_rule_name(&uid, &vm, 65535, p);
            assert!(is_valid_rule_name(&d), "{d}");
            assert!(d.len() <= 40, "{d}");
            let a = grant_rule_name(&uid, p);
            assert!(is_valid_rule_name(&a), "{a}");
        }
    }

    #[test]
    fn rules_of_one_owner() {
        let a = grant_rule_name("g-uid", Protocol::Udp);
        assert!(is_grant_rule_of(&a, "g-uid"));
        assert!(is_grant_rule_of(&a.to_uppercase(), "g-uid"));
        assert!(!is_grant_rule_of(&a, "other"));
        assert!(!is_policy_rule_of(&a, "g-uid"));
        let d = policy_rule_name(
            "p-uid",
            "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachines/v",
            22,
            Protocol::Tcp,
        );
        assert!(is_policy_rule_of(&d, "p-uid"));
        assert!(!is_policy_rule_of(&d, "other"));
        assert!(!is_grant_rule_of(&d, "p-uid"));
        assert!(!is_grant_rule_of("AllowSSH", "g-uid"));
    }

    #[test]
    fn azure_name_limits() {
        assert!(is_valid_rule_name(&"a".repeat(80)));
        assert!(!is_valid_rule_name(&"a".repeat(81)));
        assert!(!is_valid_rule_name(""));
        assert!(is_valid_rule_name("a"));
        assert!(is_valid_rule_name("a_"));
        assert!(!is_valid_rule_name("a-"));
        assert!(!is_valid_rule_name("a."));
        assert!(!is_valid_rule_name("-a"));
        assert!(!is_valid_rule_name("_a"));
        assert!(!is_valid_rule_name("a b"));
        assert!(!is_valid_rule_name("é"));
        assert!(is_valid_rule_name("A.b-c_9"));
    }

    #[test]
    fn ownership_is_a_case_insensitive_prefix() {
        assert!(is_owned("portcullis-a-0123456789-tcp"));
        assert!(is_owned("PortCullis-anything"));
        assert!(!is_owned("portcullis"));
        assert!(!is_owned("my-portcullis-rule"));
        assert!(!is_owned("AllowSSH"));
        assert!(!is_owned(""));
        assert!(
            !is_owned("portcullié-x"),
            "a multibyte char at the boundary must not panic"
        );
    }

    #[test]
    fn descriptions() {
        let t = Timestamp::from_second(1_750_000_000).expect("ok");
        let t_frac = t
            .checked_add(jiff::SignedDuration::from_millis(999))
            .expect("ok");
        assert_eq!(
            grant_description("team-a", "fix-disk", t_frac),
            "portcullis grant team-a/fix-disk until 2025-06-15T15:06:40Z"
        );
        assert_eq!(
            policy_description("team-a", "prod-ssh", "vm1", 22, Protocol::Tcp),
            "portcullis policy team-a/prod-ssh deny vm1:22/tcp"
        );
    }

    #[test]
    fn long_descriptions_are_cut_on_a_char_boundary() {
        let long = "é".repeat(63); // a namespace is ASCII in practice; be safe anyway
        let name = "n".repeat(253);
        let t = Timestamp::from_second(0).expect("ok");
        let g = grant_description(&long, &name, t);
        assert_eq!(g.chars().count(), MAX_DESCRIPTION_CHARS);
        let p = policy_description(&long, &name, &"v".repeat(64), 65535, Protocol::Any);
        assert_eq!(p.chars().count(), MAX_DESCRIPTION_CHARS);
        assert_eq!(truncate_chars("abc", 5), "abc");
        assert_eq!(truncate_chars("ééé", 2), "éé");
    }
}
