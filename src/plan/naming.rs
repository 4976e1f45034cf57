//! Rule names and descriptions: guarantee 5 ("own only its rules").
//!
//! NSG security rules carry no tags, so ownership is encoded in the rule name. Every rule an
//! installation creates is named by one exact grammar that carries the installation's id:
//!
//! - Allow rule of a grant: `portcullis-<inst>-a-<hash10(grant uid)>-<proto>[-v6]`
//! - Deny rule of a policy, one per group of its VMs in an NSG that share a port set:
//!   `portcullis-<inst>-g-<hash10(policy uid)>-<hash10(ports)>-<chunk>-<proto>[-v6]`
//! - Deny rule of a policy for one VM port, as versions before aggregated Deny rules wrote it:
//!   `portcullis-<inst>-d-<hash10(policy uid)>-<hash6(vm id)>-<port>-<proto>[-v6]`. Never
//!   written any more; still recognised as the policy's own, so the diff migrates it.
//!
//! A rule is this installation's only if its name parses exactly by that grammar with this
//! installation's id (lowercase, exact hash lengths, a known protocol, an optional `-v6`):
//! `Portcullis-Bastion`, `portcullis-foo` or another installation's rules are never written or
//! deleted. Names from before installation ids (`portcullis-a-...`, `portcullis-d-...`, the
//! same grammar without `<inst>-`) count as this installation's only when it adopts them
//! ([`Naming::adopt_legacy`]); they are then deleted and recreated under the new names by the
//! normal diff. Names are derived from object UIDs through a short stable hash, so they are
//! deterministic, fit Azure's limits and never depend on user-chosen (possibly long) object
//! names. The description names the owning object for humans reading the NSG in the portal.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use sha2::{Digest, Sha256};

use crate::api::Protocol;

/// Every rule Portcullis creates starts with this.
pub const RULE_PREFIX: &str = "portcullis-";
/// Azure's limit on a rule name.
pub const MAX_RULE_NAME_LEN: usize = 80;
/// Azure's limit on a rule description.
pub const MAX_DESCRIPTION_CHARS: usize = 140;
/// The installation id when none is configured.
pub const DEFAULT_INSTALLATION: &str = "default";
/// The longest installation id.
pub const MAX_INSTALLATION_LEN: usize = 8;

/// The id of one installation of the operator, carried in every rule name it writes: 1-8
/// lowercase ASCII letters or digits. Installations that share an NSG must use different ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Installation(String);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("installation id `{0}` must be 1-{MAX_INSTALLATION_LEN} lowercase ASCII letters or digits")]
pub struct InvalidInstallation(pub String);

impl Installation {
    pub fn new(id: &str) -> Result<Self, InvalidInstallation> {
        let valid = (1..=MAX_INSTALLATION_LEN).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if valid {
            Ok(Installation(id.to_string()))
        } else {
            Err(InvalidInstallation(id.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Installation {
    fn default() -> Self {
        Installation(DEFAULT_INSTALLATION.to_string())
    }
}

impl FromStr for Installation {
    type Err = InvalidInstallation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Installation::new(s)
    }
}

impl fmt::Display for Installation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How this installation names its rules and which names it owns. Passed explicitly to the
/// planner (never a global), next to the priority bands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Naming {
    pub installation: Installation,
    /// Whether rules named the way they were before installation ids count as this
    /// installation's own (deleted as orphans, recreated under the new names). Turn it off on
    /// all but one installation when several share NSGs.
    pub adopt_legacy: bool,
}

impl Default for Naming {
    fn default() -> Self {
        Naming {
            installation: Installation::default(),
            adopt_legacy: true,
        }
    }
}

/// What a rule name says, once parsed by the exact grammar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleName {
    /// `None`: a legacy name, from before installation ids.
    pub installation: Option<String>,
    pub kind: RuleKind,
    pub protocol: Protocol,
    pub family: Family,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleKind {
    /// A grant's Allow rule: the hash of the grant's uid.
    Allow { grant: String },
    /// A policy's Deny rule for one VM port (older versions): the hash of the policy's uid, the
    /// short hash of the VM id, the port.
    Deny {
        policy: String,
        vm: String,
        port: u16,
    },
    /// A policy's Deny rule for a group of VMs sharing a port set: the hash of the policy's
    /// uid, the hash of the sorted port list, the chunk (a group too large for one rule is
    /// split, see `desired::DENY_RULE_MAX_ADDRESSES`).
    DenyGroup {
        policy: String,
        ports: String,
        chunk: u16,
    },
}

impl RuleKind {
    /// The policy hash of a Deny rule of either form.
    pub fn policy(&self) -> Option<&str> {
        match self {
            RuleKind::Deny { policy, .. } | RuleKind::DenyGroup { policy, .. } => Some(policy),
            RuleKind::Allow { .. } => None,
        }
    }
}

impl RuleName {
    /// The name again, exactly as the operator writes it.
    pub fn render(&self) -> String {
        let mut out = String::from(RULE_PREFIX);
        if let Some(inst) = &self.installation {
            out.push_str(inst);
            out.push('-');
        }
        let proto = protocol_token(self.protocol);
        match &self.kind {
            RuleKind::Allow { grant } => out.push_str(&format!("a-{grant}-{proto}")),
            RuleKind::Deny { policy, vm, port } => {
                out.push_str(&format!("d-{policy}-{vm}-{port}-{proto}"))
            }
            RuleKind::DenyGroup {
                policy,
                ports,
                chunk,
            } => out.push_str(&format!("g-{policy}-{ports}-{chunk}-{proto}")),
        }
        with_family(out, self.family)
    }

    /// Parses `name` by the exact grammar (current or legacy); anything else is `None`. Exact:
    /// for every `Some(parsed)`, `parsed.render() == name`.
    pub fn parse(name: &str) -> Option<RuleName> {
        let rest = name.strip_prefix(RULE_PREFIX)?;
        let (rest, family) = match rest.strip_suffix("-v6") {
            Some(r) => (r, Family::V6),
            None => (rest, Family::V4),
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let (installation, body) = match parts.first() {
            // Only `a` and `d` rules existed before installation ids.
            Some(&"a") | Some(&"d") if Self::parse_body(&parts).is_some() => (None, &parts[..]),
            Some(inst) => {
                Installation::new(inst).ok()?;
                (Some(inst.to_string()), &parts[1..])
            }
            None => return None,
        };
        let (kind, protocol) = Self::parse_body(body)?;
        let parsed = RuleName {
            installation,
            kind,
            protocol,
            family,
        };
        // Belt and braces: only a name that renders back to itself is ours.
        (parsed.render() == name).then_some(parsed)
    }

    fn parse_body(parts: &[&str]) -> Option<(RuleKind, Protocol)> {
        match parts {
            ["a", grant, proto] if is_hex(grant, 10) => Some((
                RuleKind::Allow {
                    grant: grant.to_string(),
                },
                parse_protocol(proto)?,
            )),
            ["d", policy, vm, port, proto] if is_hex(policy, 10) && is_hex(vm, 6) => {
                let number: u16 = port.parse().ok()?;
                (number.to_string() == *port).then_some(())?;
                Some((
                    RuleKind::Deny {
                        policy: policy.to_string(),
                        vm: vm.to_string(),
                        port: number,
                    },
                    parse_protocol(proto)?,
                ))
            }
            ["g", policy, ports, chunk, proto] if is_hex(policy, 10) && is_hex(ports, 10) => {
                let number: u16 = chunk.parse().ok()?;
                (number.to_string() == *chunk).then_some(())?;
                Some((
                    RuleKind::DenyGroup {
                        policy: policy.to_string(),
                        ports: ports.to_string(),
                        chunk: number,
                    },
                    parse_protocol(proto)?,
                ))
            }
            _ => None,
        }
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_protocol(token: &str) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Any]
        .into_iter()
        .find(|p| protocol_token(*p) == token)
}

impl Naming {
    pub fn new(installation: Installation, adopt_legacy: bool) -> Self {
        Naming {
            installation,
            adopt_legacy,
        }
    }

    /// The Allow rule of a grant for one protocol: `portcullis-<inst>-a-<hash(uid)>-<proto>`.
    pub fn grant_rule_name(&self, grant_uid: &str, protocol: Protocol) -> String {
        RuleName {
            installation: Some(self.installation.0.clone()),
            kind: RuleKind::Allow {
                grant: short_hash(grant_uid),
            },
            protocol,
            family: Family::V4,
        }
        .render()
    }

    /// The Deny rule of a policy for a group of VMs that share `ports` (for `protocol`, in
    /// `family`), chunk `chunk` of the group:
    /// `portcullis-<inst>-g-<hash(uid)>-<hash(ports)>-<chunk>-<proto>[-v6]`. The NSG is not in
    /// the name: a name needs to be unique within its NSG only, and the same policy's groups in
    /// two NSGs are different rules anyway. `ports` in any order, duplicates ignored.
    pub fn policy_group_rule_name(
        &self,
        policy_uid: &str,
        protocol: Protocol,
        family: Family,
        ports: &[u16],
        chunk: u16,
    ) -> String {
        let name = RuleName {
            installation: Some(self.installation.0.clone()),
            kind: RuleKind::DenyGroup {
                policy: short_hash(policy_uid),
                ports: ports_hash(ports),
                chunk,
            },
            protocol,
            family: Family::V4,
        }
        .render();
        with_family(name, family)
    }

    /// The Deny rule of a policy for one VM port, as versions before aggregated Deny rules named
    /// it: `portcullis-<inst>-d-<hash(uid)>-<hash(lowercase vm id), 6>-<port>-<proto>`. No longer
    /// written; known so that those rules are recognised as the policy's and migrated.
    pub fn policy_rule_name(
        &self,
        policy_uid: &str,
        vm_id: &str,
        port: u16,
        protocol: Protocol,
    ) -> String {
        RuleName {
            installation: Some(self.installation.0.clone()),
            kind: deny_kind(policy_uid, vm_id, port),
            protocol,
            family: Family::V4,
        }
        .render()
    }

    /// The name parsed, if this installation owns it: its own names, and legacy names when it
    /// adopts them.
    pub fn owned(&self, rule_name: &str) -> Option<RuleName> {
        RuleName::parse(rule_name).filter(|n| match &n.installation {
            Some(inst) => *inst == self.installation.0,
            None => self.adopt_legacy,
        })
    }

    /// Whether this installation owns the rule with this name: it may delete it.
    pub fn is_owned(&self, rule_name: &str) -> bool {
        self.owned(rule_name).is_some()
    }

    /// Whether this installation may write a rule with this name: its own current names only
    /// (a legacy name is never written, only deleted).
    pub fn is_writable(&self, rule_name: &str) -> bool {
        self.owned(rule_name)
            .is_some_and(|n| n.installation.is_some())
    }

    /// Whether `rule_name` is one of this installation's Allow rules of the grant with this uid
    /// (any protocol or family; legacy names too when adopted).
    pub fn is_grant_rule_of(&self, rule_name: &str, grant_uid: &str) -> bool {
        self.owned(rule_name).is_some_and(
            |n| matches!(n.kind, RuleKind::Allow { grant } if grant == short_hash(grant_uid)),
        )
    }

    /// Whether `rule_name` is one of this installation's Deny rules of the policy with this uid:
    /// aggregated or per-VM (older versions), any group, VM, port, protocol or family; legacy
    /// names too when adopted.
    pub fn is_policy_rule_of(&self, rule_name: &str, policy_uid: &str) -> bool {
        self.owned(rule_name)
            .is_some_and(|n| n.kind.policy() == Some(short_hash(policy_uid).as_str()))
    }

    /// The name prefix shared by every current Allow rule of the grant with this uid (for
    /// reading an NSG by eye or in tests; ownership is decided by [`Naming::is_grant_rule_of`]).
    pub fn grant_rule_prefix(&self, grant_uid: &str) -> String {
        format!(
            "{RULE_PREFIX}{}-a-{}-",
            self.installation,
            short_hash(grant_uid)
        )
    }
}

fn deny_kind(policy_uid: &str, vm_id: &str, port: u16) -> RuleKind {
    RuleKind::Deny {
        policy: short_hash(policy_uid),
        vm: short_hash(&vm_id.to_ascii_lowercase())[..6].to_string(),
        port,
    }
}

/// The legacy name (before installation ids) of a grant's Allow rule:
/// `portcullis-a-<hash(uid)>-<proto>`. Never written; known so it can be migrated.
pub fn legacy_grant_rule_name(grant_uid: &str, protocol: Protocol) -> String {
    RuleName {
        installation: None,
        kind: RuleKind::Allow {
            grant: short_hash(grant_uid),
        },
        protocol,
        family: Family::V4,
    }
    .render()
}

/// The legacy name (before installation ids) of a policy's Deny rule:
/// `portcullis-d-<hash(uid)>-<hash(vm id), 6>-<port>-<proto>`.
pub fn legacy_policy_rule_name(
    policy_uid: &str,
    vm_id: &str,
    port: u16,
    protocol: Protocol,
) -> String {
    RuleName {
        installation: None,
        kind: deny_kind(policy_uid, vm_id, port),
        protocol,
        family: Family::V4,
    }
    .render()
}

/// Whether the name is a Portcullis rule name of any installation, or a legacy one (for tests
/// and tools telling people's rules from any operator's).
pub fn is_portcullis_rule_name(rule_name: &str) -> bool {
    RuleName::parse(rule_name).is_some()
}

/// The hash naming a port set: of the sorted, deduplicated ports, comma-separated.
fn ports_hash(ports: &[u16]) -> String {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    short_hash(&list.join(","))
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

/// `portcullis policy <ns>/<name> deny <ports>/<proto> on <n> VM(s)[ (part i of k)]`, at
/// most 140 characters: the policy's name is cut first, so the ports and the count stay
/// readable; a long port list is shown by its first ports and its length.
pub fn policy_group_description(
    namespace: &str,
    name: &str,
    ports: &[u16],
    protocol: Protocol,
    vms: usize,
    part: Option<(usize, usize)>,
) -> String {
    const MAX_PORTS_SHOWN: usize = 6;
    let shown: Vec<String> = ports
        .iter()
        .take(MAX_PORTS_SHOWN)
        .map(u16::to_string)
        .collect();
    let mut ports_text = shown.join(",");
    if ports.len() > MAX_PORTS_SHOWN {
        ports_text.push_str(&format!(",... ({} ports)", ports.len()));
    }
    let vm_word = if vms == 1 { "VM" } else { "VMs" };
    let part = part
        .map(|(i, k)| format!(" (part {i} of {k})"))
        .unwrap_or_default();
    let tail = format!(
        " deny {ports_text}/{} on {vms} {vm_word}{part}",
        protocol_token(protocol)
    );
    let head = truncate_chars(
        &format!("portcullis policy {namespace}/{name}"),
        MAX_DESCRIPTION_CHARS.saturating_sub(tail.chars().count()),
    );
    truncate_chars(&format!("{head}{tail}"), MAX_DESCRIPTION_CHARS)
}

/// `portcullis policy <ns>/<name> deny <vm name>:<port>/<proto>`, at most 140 characters: the
/// description of the per-VM Deny rules of older versions.
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

    const VM: &str =
        "/subscriptions/s/resourceGroups/RG/providers/Microsoft.Compute/virtualMachines/VM1";

    fn naming(inst: &str, adopt_legacy: bool) -> Naming {
        Naming::new(Installation::new(inst).expect("valid id"), adopt_legacy)
    }

    #[test]
    fn names_have_the_documented_shape() {
        let n = Naming::default();
        let uid = "0b6c3f2e-4a1d-4d8e-9f00-123456789abc";
        let a = n.grant_rule_name(uid, Protocol::Tcp);
        assert_eq!(a, format!("portcullis-default-a-{}-tcp", short_hash(uid)));
        let d = n.policy_rule_name(uid, VM, 22, Protocol::Udp);
        assert_eq!(
            d,
            format!(
                "portcullis-default-d-{}-{}-22-udp",
                short_hash(uid),
                &short_hash(&VM.to_lowercase())[..6]
            )
        );
        assert_eq!(
            d,
            n.policy_rule_name(uid, &VM.to_uppercase(), 22, Protocol::Udp),
            "VM id case does not matter"
        );
        assert!(n.is_owned(&a) && n.is_owned(&d));
        assert!(n.is_writable(&a) && n.is_writable(&d));
        assert!(is_valid_rule_name(&a) && is_valid_rule_name(&d));
        assert!(a.starts_with(&n.grant_rule_prefix(uid)));
        assert_eq!(
            legacy_grant_rule_name(uid, Protocol::Tcp),
            format!("portcullis-a-{}-tcp", short_hash(uid))
        );
        assert_eq!(
            legacy_policy_rule_name(uid, VM, 22, Protocol::Udp),
            format!(
                "portcullis-d-{}-{}-22-udp",
                short_hash(uid),
                &short_hash(&VM.to_lowercase())[..6]
            )
        );
    }

    #[test]
    fn group_deny_names_are_the_policys_own_and_stable() {
        let n = Naming::default();
        let name = n.policy_group_rule_name("p-uid", Protocol::Tcp, Family::V4, &[3389, 22], 0);
        assert_eq!(
            name,
            format!(
                "portcullis-default-g-{}-{}-0-tcp",
                short_hash("p-uid"),
                short_hash("22,3389")
            )
        );
        // Port order and duplicates do not change the name; the port set, chunk, protocol and
        // family do.
        assert_eq!(
            name,
            n.policy_group_rule_name("p-uid", Protocol::Tcp, Family::V4, &[22, 3389, 22], 0)
        );
        let others = [
            n.policy_group_rule_name("p-uid", Protocol::Tcp, Family::V4, &[22], 0),
            n.policy_group_rule_name("p-uid", Protocol::Tcp, Family::V4, &[22, 3389], 1),
            n.policy_group_rule_name("p-uid", Protocol::Udp, Family::V4, &[22, 3389], 0),
            n.policy_group_rule_name("p-uid", Protocol::Tcp, Family::V6, &[22, 3389], 0),
        ];
        assert!(others.iter().all(|o| *o != name), "{others:?}");
        assert!(others[3].ends_with("-v6"));
        assert!(n.is_writable(&name) && is_valid_rule_name(&name));
        assert!(n.is_policy_rule_of(&name, "p-uid") && n.is_policy_rule_of(&others[3], "p-uid"));
        assert!(!n.is_policy_rule_of(&name, "q-uid") && !n.is_grant_rule_of(&name, "p-uid"));
        assert!(!naming("blue", true).is_owned(&name));
        // Installation ids that spell a rule kind do not confuse the grammar.
        for inst in ["a", "d", "g"] {
            let own = naming(inst, true);
            let g = own.policy_group_rule_name("p-uid", Protocol::Any, Family::V6, &[1], 65535);
            assert!(
                own.is_writable(&g) && own.is_policy_rule_of(&g, "p-uid"),
                "{g}"
            );
            assert!(!n.is_owned(&g), "{g}");
        }
        // There is no legacy (installation-less) form of a group rule.
        let h = short_hash("x");
        assert!(!n.is_owned(&format!("portcullis-g-{h}-{h}-0-tcp")));
        let longest = naming("zzzzzzzz", true).policy_group_rule_name(
            &"u".repeat(300),
            Protocol::Any,
            Family::V6,
            &[65535; 40],
            u16::MAX,
        );
        assert!(
            is_valid_rule_name(&longest) && longest.len() <= 64,
            "{longest}"
        );
    }

    #[test]
    fn group_descriptions_name_the_policy_and_count_the_vms() {
        assert_eq!(
            policy_group_description("team-a", "prod-ssh", &[22, 3389], Protocol::Tcp, 100, None),
            "portcullis policy team-a/prod-ssh deny 22,3389/tcp on 100 VMs"
        );
        assert_eq!(
            policy_group_description("team-a", "p", &[53], Protocol::Udp, 1, Some((2, 3))),
            "portcullis policy team-a/p deny 53/udp on 1 VM (part 2 of 3)"
        );
        let many: Vec<u16> = (1..=40).collect();
        let long = policy_group_description(
            &"n".repeat(63),
            &"x".repeat(253),
            &many,
            Protocol::Any,
            4000,
            Some((10, 10)),
        );
        assert_eq!(long.chars().count(), MAX_DESCRIPTION_CHARS);
        assert!(
            long.ends_with(" deny 1,2,3,4,5,6,... (40 ports)/any on 4000 VMs (part 10 of 10)"),
            "{long}"
        );
    }

    #[test]
    fn installation_ids_are_short_lowercase_alphanumerics() {
        for ok in ["default", "a", "d", "blue", "green2", "12345678", "0"] {
            assert_eq!(Installation::new(ok).map(|i| i.to_string()), Ok(ok.into()));
        }
        for bad in [
            "",
            "123456789",
            "Blue",
            "blue-1",
            "blue_1",
            "bl ue",
            "bl\u{e9}",
            "portcullis",
        ] {
            assert!(Installation::new(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Installation::default().as_str(), DEFAULT_INSTALLATION);
        assert!(Installation::new(DEFAULT_INSTALLATION).is_ok());
    }

    #[test]
    fn longest_names_fit_azure() {
        let uid = "f".repeat(300);
        let vm = format!(
            "/subscriptions/{}/resourceGroups/x/providers/Microsoft.Compute/virtualMachines/y",
            "s".repeat(400)
        );
        let n = naming("zzzzzzzz", true);
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Any] {
            for f in [Family::V4, Family::V6] {
                let d = with_family(n.policy_rule_name(&uid, &vm, 65535, p), f);
                assert!(is_valid_rule_name(&d), "{d}");
                assert!(d.len() <= 60, "{d}");
                assert!(n.is_writable(&d), "{d}");
                let a = with_family(n.grant_rule_name(&uid, p), f);
                assert!(is_valid_rule_name(&a), "{a}");
                assert!(n.is_writable(&a), "{a}");
            }
        }
    }

    #[test]
    fn rules_of_one_owner() {
        let n = Naming::default();
        let a = n.grant_rule_name("g-uid", Protocol::Udp);
        assert!(n.is_grant_rule_of(&a, "g-uid"));
        assert!(n.is_grant_rule_of(&with_family(a.clone(), Family::V6), "g-uid"));
        assert!(
            !n.is_grant_rule_of(&a.to_uppercase(), "g-uid"),
            "exact names only"
        );
        assert!(!n.is_grant_rule_of(&format!("{a}x"), "g-uid"));
        assert!(!n.is_grant_rule_of(&a, "other"));
        assert!(!n.is_policy_rule_of(&a, "g-uid"));
        let d = n.policy_rule_name("p-uid", VM, 22, Protocol::Tcp);
        assert!(n.is_policy_rule_of(&d, "p-uid"));
        assert!(!n.is_policy_rule_of(&d, "other"));
        assert!(!n.is_grant_rule_of(&d, "p-uid"));
        assert!(!n.is_grant_rule_of("AllowSSH", "g-uid"));
        // Another installation's rules of the same objects are not ours.
        let other = naming("blue", true);
        assert!(!other.is_grant_rule_of(&a, "g-uid"));
        assert!(!other.is_policy_rule_of(&d, "p-uid"));
        // Legacy names belong to the grant only where they are adopted.
        let legacy = legacy_grant_rule_name("g-uid", Protocol::Udp);
        assert!(n.is_grant_rule_of(&legacy, "g-uid"));
        assert!(!naming("default", false).is_grant_rule_of(&legacy, "g-uid"));
        let legacy_d = legacy_policy_rule_name("p-uid", VM, 22, Protocol::Tcp);
        assert!(n.is_policy_rule_of(&legacy_d, "p-uid"));
        assert!(!naming("default", false).is_policy_rule_of(&legacy_d, "p-uid"));
    }

    #[test]
    fn ownership_is_the_exact_grammar_of_this_installation() {
        let n = Naming::default();
        let h = "0123456789";
        for owned in [
            format!("portcullis-default-a-{h}-tcp"),
            format!("portcullis-default-a-{h}-any-v6"),
            format!("portcullis-default-d-{h}-abcdef-22-udp"),
            format!("portcullis-default-d-{h}-abcdef-65535-tcp-v6"),
            format!("portcullis-default-d-{h}-abcdef-0-tcp"),
        ] {
            assert!(n.is_owned(&owned), "{owned}");
            assert!(n.is_writable(&owned), "{owned}");
        }
        for foreign in [
            "Portcullis-Bastion".to_string(),
            "portcullis-bastion".into(),
            "portcullis-foo".into(),
            "portcullis-".into(),
            "portcullis".into(),
            "my-portcullis-rule".into(),
            "AllowSSH".into(),
            "".into(),
            "portcullié-x".into(),
            format!("PORTCULLIS-DEFAULT-A-{h}-TCP"),
            format!("Portcullis-default-a-{h}-tcp"),
            format!("portcullis-default-a-{h}-TCP"),
            format!("portcullis-default-a-{h}-icmp"),
            format!("portcullis-default-a-{h}-tcp-v4"),
            format!("portcullis-default-a-{h}-tcp-v6-v6"),
            format!("portcullis-default-a-{h}0-tcp"),
            "portcullis-default-a-012345678-tcp".to_string(),
            "portcullis-default-a-012345678g-tcp".to_string(),
            "portcullis-default-a-012345678A-tcp".to_string(),
            format!("portcullis-default-a-{h}-tcp-"),
            format!("portcullis-default-a-{h}-tcp-x"),
            format!("portcullis-default-x-{h}-tcp"),
            format!("portcullis-default-d-{h}-abcdef-022-tcp"),
            format!("portcullis-default-d-{h}-abcdef-65536-tcp"),
            format!("portcullis-default-d-{h}-abcdef--1-tcp"),
            format!("portcullis-default-d-{h}-abcdef-+22-tcp"),
            format!("portcullis-default-d-{h}-abcde-22-tcp"),
            format!("portcullis-default-d-{h}-abcdef-22"),
            format!("portcullis--a-{h}-tcp"),
            // Other installations.
            format!("portcullis-blue-a-{h}-tcp"),
            format!("portcullis-defaults-a-{h}-tcp"),
            format!("portcullis-blue-d-{h}-abcdef-22-tcp"),
        ] {
            assert!(!n.is_owned(&foreign), "{foreign} owned");
            assert!(!n.is_writable(&foreign), "{foreign} writable");
        }
        // Legacy names: owned (not writable) when adopted, foreign otherwise; their grammar is
        // exact too.
        let legacy_a = format!("portcullis-a-{h}-tcp");
        let legacy_d = format!("portcullis-d-{h}-abcdef-22-tcp-v6");
        for legacy in [&legacy_a, &legacy_d] {
            assert!(n.is_owned(legacy) && !n.is_writable(legacy), "{legacy}");
            assert!(!naming("default", false).is_owned(legacy), "{legacy}");
            assert!(naming("blue", true).is_owned(legacy), "{legacy}");
        }
        for not_legacy in [
            format!("portcullis-a-{h}"),
            format!("portcullis-a-{h}-tcp-22"),
            format!("portcullis-d-{h}-22-tcp"),
            format!("portcullis-A-{h}-tcp"),
        ] {
            assert!(!n.is_owned(&not_legacy), "{not_legacy}");
        }
        // Ids `a` and `d` do not confuse the grammar with legacy names.
        let a_inst = naming("a", false);
        let name = a_inst.grant_rule_name("u", Protocol::Tcp);
        assert!(a_inst.is_writable(&name));
        assert!(!a_inst.is_owned(&legacy_a) && !n.is_owned(&name));
        assert_eq!(
            RuleName::parse(&legacy_a).map(|p| p.installation),
            Some(None)
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_protocol() -> impl Strategy<Value = Protocol> {
            prop_oneof![
                Just(Protocol::Tcp),
                Just(Protocol::Udp),
                Just(Protocol::Any)
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::default())] // PROPTEST_CASES sets the count (256)

            /// Every name the planner can produce parses exactly, renders back to itself, is
            /// writable by its installation only, and belongs to its object only.
            #[test]
            fn produced_names_round_trip(
                inst in "[a-z0-9]{1,8}",
                other in "[a-z0-9]{1,8}",
                uid in "\\PC{0,60}",
                vm in "\\PC{0,120}",
                port in any::<u16>(),
                protocol in arb_protocol(),
                v6 in any::<bool>(),
            ) {
                let n = naming(&inst, false);
                let family = if v6 { Family::V6 } else { Family::V4 };
                let a = with_family(n.grant_rule_name(&uid, protocol), family);
                let d = with_family(n.policy_rule_name(&uid, &vm, port, protocol), family);
                let g = n.policy_group_rule_name(&uid, protocol, family, &[port, 22], port);
                for name in [&a, &d, &g] {
                    let parsed = RuleName::parse(name);
                    prop_assert!(parsed.is_some(), "{} does not parse", name);
                    let parsed = parsed.expect("checked");
                    prop_assert_eq!(&parsed.render(), name);
                    prop_assert_eq!(parsed.installation.as_deref(), Some(inst.as_str()));
                    prop_assert_eq!(parsed.protocol, protocol);
                    prop_assert_eq!(parsed.family, family);
                    prop_assert!(n.is_writable(name));
                    prop_assert!(is_valid_rule_name(name));
                    prop_assert_eq!(naming(&other, true).is_owned(name), other == inst);
                }
                prop_assert!(n.is_grant_rule_of(&a, &uid) && !n.is_policy_rule_of(&a, &uid));
                prop_assert!(n.is_policy_rule_of(&d, &uid) && !n.is_grant_rule_of(&d, &uid));
                prop_assert!(n.is_policy_rule_of(&g, &uid) && !n.is_grant_rule_of(&g, &uid));
                let legacy = with_family(legacy_policy_rule_name(&uid, &vm, port, protocol), family);
                prop_assert!(naming(&inst, true).is_policy_rule_of(&legacy, &uid));
                prop_assert!(!n.is_owned(&legacy));
            }

            /// Whatever parses renders back to exactly the input: the grammar admits no
            /// variants (case, padding, extra parts).
            #[test]
            fn parsing_is_exact(name in "(portcullis-|Portcullis-)?([a-z0-9]{1,9}-)?[adgADG]-[0-9a-fA-F]{5,11}(-[0-9a-f]{6}|-[0-9a-f]{9,11})?(-0?[0-9]{1,5})?-(tcp|udp|any|TCP|icmp)(-v6|-v4)?") {
                if let Some(parsed) = RuleName::parse(&name) {
                    prop_assert_eq!(parsed.render(), name);
                }
            }
        }
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
