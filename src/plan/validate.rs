//! Validation of policies and grants: guarantee 2 ("open only what a valid grant asks").
//!
//! The CRD schema already refuses most malformed objects, but old API servers and old clients
//! may not enforce it, so every rule is checked again here, together with the rules a schema
//! cannot express (a grant's port, source and duration measured against its policy). A refusal
//! is a [`Denial`]: a CamelCase reason for the condition and a sentence that names exactly which
//! rule was broken. Pure: no I/O, the clock is a parameter.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use jiff::{SignedDuration, Timestamp};

use crate::api::duration::{format_iso8601, parse_iso8601};
use crate::api::{AccessGrantSpec, JitPolicySpec, PolicyPort, Protocol};

/// The longest access window any policy may allow (Defender's limit): P1D.
pub const MAX_ACCESS_DURATION: Duration = Duration::from_secs(86_400);
/// Schema limits, checked again.
pub const MAX_POLICY_VMS: usize = 1000;
pub const MAX_PORTS_PER_VM: usize = 32;
pub const MAX_ALLOWED_PREFIXES_PER_PORT: usize = 64;
pub const MAX_VM_ID_LEN: usize = 512;
pub const MAX_GRANT_PORTS: usize = 32;
pub const JUSTIFICATION_CHARS: std::ops::RangeInclusive<usize> = 3..=256;

/// How long a validated grant lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessWindow {
    /// `spec.duration`: from activation.
    For(Duration),
    /// `spec.notAfter`: an absolute end.
    Until(Timestamp),
}

/// A grant that passed every check, in the terms the planner needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatedGrant {
    /// The policy's full VM resource ID (the policy's spelling).
    pub vm_id: String,
    /// Every (port, protocol) pair the grant opens, sorted and deduplicated. A port the policy
    /// lists under several protocols yields several pairs.
    pub ports: Vec<(u16, Protocol)>,
    /// The source, in canonical form (see [`AddressPrefix::canonical`]).
    pub source: String,
    pub window: AccessWindow,
}

impl ValidatedGrant {
    /// When access ends for a grant activated at `activated_at`.
    pub fn expires_at(&self, activated_at: Timestamp) -> Timestamp {
        match self.window {
            AccessWindow::Until(t) => t,
            AccessWindow::For(d) => SignedDuration::try_from(d)
                .ok()
                .and_then(|d| activated_at.checked_add(d).ok())
                .unwrap_or(Timestamp::MAX),
        }
    }

    /// The VM's name (last segment of its resource ID).
    pub fn vm_name(&self) -> &str {
        vm_name(&self.vm_id)
    }
}

/// Why a policy or grant was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenialReason {
    // Grant.
    /// The grant's policy is itself invalid.
    PolicyInvalid,
    /// Both `duration` and `notAfter` are set.
    DurationAndNotAfter,
    /// Neither `duration` nor `notAfter` is set.
    NoDuration,
    /// `duration` does not parse, or is zero.
    InvalidDuration,
    /// The window is longer than the policy allows for one of the requested ports.
    DurationExceedsPolicy,
    /// `notAfter` is not in the future.
    NotAfterInPast,
    /// `justification` is too short or too long.
    InvalidJustification,
    /// The VM is not named by the policy.
    VirtualMachineNotInPolicy,
    /// A bare VM name matches several VMs of the policy (different resource groups).
    VirtualMachineAmbiguous,
    /// The grant's port list is empty, too long, or holds port 0.
    InvalidPorts,
    /// A requested port is not in the policy for that VM.
    PortNotInPolicy,
    /// `sourceAddressPrefix` is not an address, a CIDR, `*` or `Internet`.
    InvalidSourceAddressPrefix,
    /// The source is the whole world and the policy does not list exactly that for every port.
    SourceOpenToTheWorld,
    /// The source does not lie inside the prefixes the policy allows.
    SourceNotAllowed,
    /// The source's address family (IPv4/IPv6) is not one the VM has an address of.
    AddressFamilyMismatch,
    // Policy.
    /// No VMs, or too many.
    InvalidVirtualMachines,
    /// A VM ID is not a well-formed `Microsoft.Compute/virtualMachines` resource ID.
    InvalidVirtualMachineId,
    /// The same VM (case-insensitively) is listed twice.
    DuplicateVirtualMachine,
    /// The same (port, protocol) is listed twice for one VM.
    DuplicatePort,
    /// `maxRequestAccessDuration` does not parse, is zero, or exceeds P1D.
    InvalidMaxRequestAccessDuration,
    /// An allowed source prefix does not parse, or there are too many.
    InvalidAllowedSourceAddressPrefix,
    /// Both `allowedSourceAddressPrefix` and `allowedSourceAddressPrefixes` are set.
    ConflictingAllowedSourceForms,
    /// A port has no allowed source at all.
    NoAllowedSource,
    /// An approval setting is out of range: `required` over 10, approvers missing, a bad timeout.
    InvalidApproval,
    // Who asked, who decided.
    /// The requester is not among the policy's `requesters`.
    RequesterNotAllowed,
    /// The policy needs to know who asked (requesters or approval), and no verified stamp says.
    RequesterUnverified,
    /// An approver rejected the grant.
    Rejected,
    /// The approvals did not arrive before the policy's timeout.
    ApprovalTimedOut,
}

impl DenialReason {
    /// The CamelCase `reason` of a condition.
    pub fn as_str(&self) -> &'static str {
        match self {
            DenialReason::PolicyInvalid => "PolicyInvalid",
            DenialReason::DurationAndNotAfter => "DurationAndNotAfter",
            DenialReason::NoDuration => "NoDuration",
            DenialReason::InvalidDuration => "InvalidDuration",
            DenialReason::DurationExceedsPolicy => "DurationExceedsPolicy",
            DenialReason::NotAfterInPast => "NotAfterInPast",
            DenialReason::InvalidJustification => "InvalidJustification",
            DenialReason::VirtualMachineNotInPolicy => "VirtualMachineNotInPolicy",
            DenialReason::VirtualMachineAmbiguous => "VirtualMachineAmbiguous",
            DenialReason::InvalidPorts => "InvalidPorts",
            DenialReason::PortNotInPolicy => "PortNotInPolicy",
            DenialReason::InvalidSourceAddressPrefix => "InvalidSourceAddressPrefix",
            DenialReason::SourceOpenToTheWorld => "SourceOpenToTheWorld",
            DenialReason::SourceNotAllowed => "SourceNotAllowed",
            DenialReason::AddressFamilyMismatch => "AddressFamilyMismatch",
            DenialReason::InvalidVirtualMachines => "InvalidVirtualMachines",
            DenialReason::InvalidVirtualMachineId => "InvalidVirtualMachineId",
            DenialReason::DuplicateVirtualMachine => "DuplicateVirtualMachine",
            DenialReason::DuplicatePort => "DuplicatePort",
            DenialReason::InvalidMaxRequestAccessDuration => "InvalidMaxRequestAccessDuration",
            DenialReason::InvalidAllowedSourceAddressPrefix => "InvalidAllowedSourceAddressPrefix",
            DenialReason::ConflictingAllowedSourceForms => "ConflictingAllowedSourceForms",
            DenialReason::NoAllowedSource => "NoAllowedSource",
            DenialReason::InvalidApproval => "InvalidApproval",
            DenialReason::RequesterNotAllowed => "RequesterNotAllowed",
            DenialReason::RequesterUnverified => "RequesterUnverified",
            DenialReason::Rejected => "Rejected",
            DenialReason::ApprovalTimedOut => "ApprovalTimedOut",
        }
    }
}

impl fmt::Display for DenialReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the condition reason and a sentence naming the broken rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denial {
    pub reason: DenialReason,
    pub message: String,
}

pub(crate) fn deny<T>(reason: DenialReason, message: impl Into<String>) -> Result<T, Denial> {
    Err(Denial {
        reason,
        message: message.into(),
    })
}

/// A parsed address prefix as NSG rules and policies spell them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressPrefix {
    /// `*`: every address of both families.
    Any,
    /// The `Internet` service tag.
    Internet,
    /// An address or CIDR. `bare` records that the input had no `/len`.
    Net { net: IpNet, bare: bool },
}

impl AddressPrefix {
    /// Parses `*`, `Internet` (exact spelling, as the schema), an IPv4/IPv6 address or a CIDR.
    /// Host bits in a CIDR are accepted (Azure accepts them too) and cleared by [`Self::canonical`].
    pub fn parse(s: &str) -> Option<AddressPrefix> {
        match s {
            "*" => return Some(AddressPrefix::Any),
            "Internet" => return Some(AddressPrefix::Internet),
            _ => {}
        }
        if let Some((addr, len)) = s.split_once('/') {
            // Strict parts, as the schema's pattern: `ipnet` alone admits `10.0.0.01/8`, which
            // some tools read as octal.
            let addr = IpAddr::from_str(addr).ok()?;
            let canonical_len = len == "0" || (!len.starts_with('0') && !len.starts_with('+'));
            let len: u8 = len.parse().ok().filter(|_| canonical_len)?;
            IpNet::new(addr, len).ok().map(|net| AddressPrefix::Net {
                net: net.trunc(),
                bare: false,
            })
        } else {
            IpAddr::from_str(s).ok().map(|a| AddressPrefix::Net {
                net: IpNet::from(a),
                bare: true,
            })
        }
    }

    /// `*`, `Internet`, or any prefix of length 0.
    pub fn is_open_to_world(&self) -> bool {
        match self {
            AddressPrefix::Any | AddressPrefix::Internet => true,
            AddressPrefix::Net { net, .. } => net.prefix_len() == 0,
        }
    }

    /// Whether every address of `inner` lies inside `self`. `*` and `Internet` contain every
    /// address of both families; a CIDR contains only prefixes of its own family.
    pub fn contains(&self, inner: &AddressPrefix) -> bool {
        match (self, inner) {
            (AddressPrefix::Any, _) => true,
            (AddressPrefix::Internet, AddressPrefix::Any) => false,
            (AddressPrefix::Internet, _) => true,
            (AddressPrefix::Net { .. }, AddressPrefix::Any | AddressPrefix::Internet) => false,
            (AddressPrefix::Net { net: outer, .. }, AddressPrefix::Net { net: inner, .. }) => {
                outer.contains(inner)
            }
        }
    }

    /// The same set of addresses (ignores the bare/CIDR spelling of a host).
    pub fn same_set(&self, other: &AddressPrefix) -> bool {
        match (self, other) {
            (AddressPrefix::Net { net: a, .. }, AddressPrefix::Net { net: b, .. }) => a == b,
            (a, b) => a == b,
        }
    }

    /// `Some(true)` for IPv4, `Some(false)` for IPv6, `None` for `*`/`Internet`.
    pub fn is_ipv4(&self) -> Option<bool> {
        match self {
            AddressPrefix::Net { net, .. } => Some(matches!(net, IpNet::V4(_))),
            _ => None,
        }
    }

    /// The spelling written into NSG rules: `*`, `Internet`, a bare address (if the input was
    /// bare), or a CIDR with host bits cleared. IPv6 in its compressed lowercase form.
    pub fn canonical(&self) -> String {
        match self {
            AddressPrefix::Any => "*".to_string(),
            AddressPrefix::Internet => "Internet".to_string(),
            AddressPrefix::Net { net, bare: true } => net.addr().to_string(),
            AddressPrefix::Net { net, bare: false } => net.to_string(),
        }
    }
}

/// Whether `id` is a well-formed VM resource ID, exactly as the schema's `VM_RESOURCE_ID` pattern:
/// `/subscriptions/<s>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<name>`,
/// each segment within Azure's characters and lengths.
/// The `N` parts of `s` split at `sep`, when it has exactly `N`; without allocating (IDs are
/// checked for every VM of a policy, at every reconcile and plan).
pub fn split_exact<const N: usize>(s: &str, sep: char) -> Option<[&str; N]> {
    let mut parts = s.split(sep);
    let mut out = [""; N];
    for slot in &mut out {
        *slot = parts.next()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn is_vm_resource_id(id: &str) -> bool {
    if id.len() > MAX_VM_ID_LEN {
        return false;
    }
    matches!(
        split_exact::<9>(id, '/'),
        Some(["", "subscriptions", sub, "resourceGroups", rg, "providers", "Microsoft.Compute", "virtualMachines", name])
            if is_subscription_segment(sub) && is_resource_group_name(rg) && is_vm_name(name)
    )
}

fn is_subscription_segment(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// 1-90 of letters, digits, `_ . ( ) -`, not ending with a period (ASCII only).
fn is_resource_group_name(s: &str) -> bool {
    (1..=90).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.()-".contains(&b))
        && !s.ends_with('.')
}

/// A VM name as the schema's `VM_REFERENCE` spells it: 1-64 of letters, digits, `_ . -`, not
/// ending with a period.
pub fn is_vm_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !s.ends_with('.')
}

/// Whether free text may be shown as is (the schema's `DISPLAY_SAFE_TEXT`): no control
/// characters, no Unicode line separators, no bidirectional overrides.
pub fn is_display_safe(s: &str) -> bool {
    !s.chars().any(|c| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    })
}

/// The last path segment of a resource ID (the VM's name); the input itself if it has no `/`.
pub fn vm_name(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

pub(crate) fn protocol_str(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Any => "*",
    }
}

pub(crate) fn protocol_rank(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
        Protocol::Any => 2,
    }
}

fn describe_duration(d: Duration) -> String {
    format_iso8601(d)
}

/// Checks a policy spec on its own. Everything the schema checks, plus what it cannot.
pub fn validate_policy(spec: &JitPolicySpec) -> Result<(), Denial> {
    use DenialReason as R;
    let n = spec.virtual_machines.len();
    if n == 0 || n > MAX_POLICY_VMS {
        return deny(
            R::InvalidVirtualMachines,
            format!(
                "the policy must list between 1 and {MAX_POLICY_VMS} virtual machines (it lists {n})"
            ),
        );
    }
    // A set: a policy may list 1,000 VMs, and it is validated often.
    let mut seen_vms: std::collections::HashSet<String> =
        std::collections::HashSet::with_capacity(n);
    for vm in &spec.virtual_machines {
        if !is_vm_resource_id(&vm.id) {
            return deny(
                R::InvalidVirtualMachineId,
                format!(
                    "`{}` is not a VM resource ID of the form /subscriptions/<subscription>/resourceGroups/<group>/providers/Microsoft.Compute/virtualMachines/<name> (at most {MAX_VM_ID_LEN} characters)",
                    vm.id
                ),
            );
        }
        let lower = vm.id.to_ascii_lowercase();
        if seen_vms.contains(&lower) {
            return deny(
                R::DuplicateVirtualMachine,
                format!("virtual machine {} is listed twice", vm.id),
            );
        }
        seen_vms.insert(lower);
        let name = vm_name(&vm.id);
        let np = vm.ports.len();
        if np == 0 || np > MAX_PORTS_PER_VM {
            return deny(
                R::InvalidPorts,
                format!(
                    "virtual machine {name} must list between 1 and {MAX_PORTS_PER_VM} ports (it lists {np})"
                ),
            );
        }
        let mut seen_ports: Vec<(u16, Protocol)> = Vec::with_capacity(np);
        for port in &vm.ports {
            validate_policy_port(name, port)?;
            if seen_ports.contains(&(port.number, port.protocol)) {
                return deny(
                    R::DuplicatePort,
                    format!(
                        "port {}/{} is listed twice for virtual machine {name}",
                        port.number,
                        protocol_str(port.protocol)
                    ),
                );
            }
            seen_ports.push((port.number, port.protocol));
            if let Some(approval) = &port.approval {
                let what = format!(
                    "port {}/{} of virtual machine {name}",
                    port.number,
                    protocol_str(port.protocol)
                );
                super::approval::validate_approval(&what, approval)?;
            }
        }
    }
    if let Some(approval) = &spec.approval {
        super::approval::validate_approval("the policy", approval)?;
    }
    Ok(())
}

/// "port N/proto of virtual machine vm", formatted only into a denial's message.
struct PortOfVm<'a> {
    vm: &'a str,
    port: &'a PolicyPort,
}

impl std::fmt::Display for PortOfVm<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "port {}/{} of virtual machine {}",
            self.port.number,
            protocol_str(self.port.protocol),
            self.vm
        )
    }
}

fn validate_policy_port(vm: &str, port: &PolicyPort) -> Result<(), Denial> {
    use DenialReason as R;
    let what = PortOfVm { vm, port };
    if port.number == 0 {
        return deny(
            R::InvalidPorts,
            format!("{what}: port numbers run from 1 to 65535"),
        );
    }
    match parse_iso8601(&port.max_request_access_duration) {
        Err(e) => {
            return deny(
                R::InvalidMaxRequestAccessDuration,
                format!("{what}: maxRequestAccessDuration {e}"),
            );
        }
        Ok(d) if d.is_zero() => {
            return deny(
                R::InvalidMaxRequestAccessDuration,
                format!("{what}: maxRequestAccessDuration must be more than zero"),
            );
        }
        Ok(d) if d > MAX_ACCESS_DURATION => {
            return deny(
                R::InvalidMaxRequestAccessDuration,
                format!(
                    "{what}: maxRequestAccessDuration {} exceeds the P1D maximum",
                    port.max_request_access_duration
                ),
            );
        }
        Ok(_) => {}
    }
    if port.allowed_source_address_prefix.is_some()
        && !port.allowed_source_address_prefixes.is_empty()
    {
        return deny(
            R::ConflictingAllowedSourceForms,
            format!(
                "{what}: set either allowedSourceAddressPrefix or allowedSourceAddressPrefixes, not both"
            ),
        );
    }
    let sources = port.allowed_sources();
    if sources.is_empty() {
        return deny(
            R::NoAllowedSource,
            format!(
                "{what}: no allowed source (set allowedSourceAddressPrefix or allowedSourceAddressPrefixes)"
            ),
        );
    }
    if sources.len() > MAX_ALLOWED_PREFIXES_PER_PORT {
        return deny(
            R::InvalidAllowedSourceAddressPrefix,
            format!(
                "{what}: at most {MAX_ALLOWED_PREFIXES_PER_PORT} allowed source prefixes (it lists {})",
                sources.len()
            ),
        );
    }
    for s in sources {
        if AddressPrefix::parse(s).is_none() {
            return deny(
                R::InvalidAllowedSourceAddressPrefix,
                format!(
                    "{what}: allowed source `{s}` is not an IPv4/IPv6 address or CIDR, `*` or `Internet`"
                ),
            );
        }
    }
    Ok(())
}

/// Checks a grant against its policy at `now` (the controller passes the activation time for an
/// active grant, so a grant stays valid throughout its window).
pub fn validate_grant(
    policy_name: &str,
    policy: &JitPolicySpec,
    grant: &AccessGrantSpec,
    now: Timestamp,
) -> Result<ValidatedGrant, Denial> {
    validate_grant_checked(policy_name, policy, &validate_policy(policy), grant, now)
}

/// [`validate_grant`] with the policy's own validation already done (`policy_check`, see
/// `PolicyCheck`): a policy over 500 VMs is validated once per version, not for every grant.
pub fn validate_grant_checked(
    policy_name: &str,
    policy: &JitPolicySpec,
    policy_check: &Result<(), Denial>,
    grant: &AccessGrantSpec,
    now: Timestamp,
) -> Result<ValidatedGrant, Denial> {
    if let Err(d) = policy_check {
        return deny(
            DenialReason::PolicyInvalid,
            format!("policy {policy_name} is invalid: {}", d.message),
        );
    }
    validate_grant_under(policy_name, policy, grant, now)
}

/// [`validate_grant`] under a policy already known to be valid: the planner validates each
/// policy once per plan, not once for each of its grants (a policy over 500 VMs under 10,000
/// grants made that the whole cost of planning).
pub fn validate_grant_under(
    policy_name: &str,
    policy: &JitPolicySpec,
    grant: &AccessGrantSpec,
    now: Timestamp,
) -> Result<ValidatedGrant, Denial> {
    use DenialReason as R;

    // The window's shape.
    enum Requested {
        For(Duration, String),
        Until(Timestamp),
    }
    let requested = match (&grant.duration, &grant.not_after) {
        (Some(_), Some(_)) => {
            return deny(
                R::DurationAndNotAfter,
                "set either duration or notAfter, not both",
            );
        }
        (None, None) => {
            return deny(
                R::NoDuration,
                "set duration (e.g. PT1H) or notAfter (an RFC 3339 time)",
            );
        }
        (Some(d), None) => match parse_iso8601(d) {
            Err(e) => return deny(R::InvalidDuration, format!("duration {e}")),
            Ok(x) if x.is_zero() => {
                return deny(R::InvalidDuration, "duration must be more than zero");
            }
            Ok(x) => Requested::For(x, d.clone()),
        },
        (None, Some(t)) => Requested::Until(t.0),
    };

    let jl = grant.justification.chars().count();
    if !JUSTIFICATION_CHARS.contains(&jl) {
        return deny(
            R::InvalidJustification,
            format!(
                "justification must be {} to {} characters long (it is {jl})",
                JUSTIFICATION_CHARS.start(),
                JUSTIFICATION_CHARS.end()
            ),
        );
    }
    if !is_display_safe(&grant.justification) {
        return deny(
            R::InvalidJustification,
            "justification must not hold control characters, line separators or bidirectional overrides",
        );
    }

    // The VM.
    let wanted = grant.virtual_machine.as_str();
    let matches: Vec<_> = policy
        .virtual_machines
        .iter()
        .filter(|vm| {
            if wanted.contains('/') {
                vm.id.eq_ignore_ascii_case(wanted)
            } else {
                vm_name(&vm.id).eq_ignore_ascii_case(wanted)
            }
        })
        .collect();
    let vm = match matches.as_slice() {
        // What a refused requester is told names the rule, not the policy's other contents.
        [] => {
            return deny(
                R::VirtualMachineNotInPolicy,
                format!("virtual machine {wanted} is not in policy {policy_name}"),
            );
        }
        [one] => *one,
        many => {
            let ids: Vec<&str> = many.iter().map(|v| v.id.as_str()).collect();
            return deny(
                R::VirtualMachineAmbiguous,
                format!(
                    "virtual machine {wanted} matches {} VMs in policy {policy_name} ({}); name it by its full resource ID",
                    many.len(),
                    ids.join(", ")
                ),
            );
        }
    };
    let vm_label = vm_name(&vm.id);

    // The ports.
    if grant.ports.is_empty() || grant.ports.len() > MAX_GRANT_PORTS {
        return deny(
            R::InvalidPorts,
            format!(
                "a grant must list between 1 and {MAX_GRANT_PORTS} ports (it lists {})",
                grant.ports.len()
            ),
        );
    }
    if grant.ports.contains(&0) {
        return deny(
            R::InvalidPorts,
            "port 0 is not a port: port numbers run from 1 to 65535",
        );
    }
    let mut wanted_ports = grant.ports.clone();
    wanted_ports.sort_unstable();
    // The schema declares the list a set (the API server refuses duplicates); a duplicate in an
    // object stored before that is harmless, so it is merged rather than refused.
    wanted_ports.dedup();
    let mut entries: Vec<&PolicyPort> = Vec::new();
    for p in &wanted_ports {
        let found: Vec<&PolicyPort> = vm.ports.iter().filter(|pp| pp.number == *p).collect();
        if found.is_empty() {
            return deny(
                R::PortNotInPolicy,
                format!("port {p} is not in policy {policy_name} for {vm_label}"),
            );
        }
        entries.extend(found);
    }
    entries.sort_by_key(|e| (e.number, protocol_rank(e.protocol)));

    // The source.
    let Some(source) = AddressPrefix::parse(&grant.source_address_prefix) else {
        return deny(
            R::InvalidSourceAddressPrefix,
            format!(
                "sourceAddressPrefix `{}` is not an IPv4/IPv6 address or CIDR, `*` or `Internet`",
                grant.source_address_prefix
            ),
        );
    };
    let allowed_of = |e: &PolicyPort| -> Vec<AddressPrefix> {
        e.allowed_sources()
            .into_iter()
            .filter_map(AddressPrefix::parse)
            .collect()
    };
    for e in &entries {
        let allowed = allowed_of(e);
        let ok = if source.is_open_to_world() {
            allowed.iter().any(|a| a.same_set(&source))
        } else {
            allowed.iter().any(|a| a.contains(&source))
        };
        if !ok {
            let port = format!("{}/{}", e.number, protocol_str(e.protocol));
            return if source.is_open_to_world() {
                deny(
                    R::SourceOpenToTheWorld,
                    format!(
                        "source {} opens port {port} of {vm_label} to the whole world, and policy {policy_name} does not list exactly {} for it",
                        grant.source_address_prefix, grant.source_address_prefix
                    ),
                )
            } else {
                deny(
                    R::SourceNotAllowed,
                    format!(
                        "source {} is not inside the prefixes policy {policy_name} allows for {vm_label} port {port}",
                        grant.source_address_prefix
                    ),
                )
            };
        }
    }

    // The duration: the smallest maximum of the requested ports wins.
    let mut max: Option<(Duration, &PolicyPort)> = None;
    for e in &entries {
        let d = parse_iso8601(&e.max_request_access_duration).unwrap_or(Duration::ZERO);
        if max.is_none_or(|(m, _)| d < m) {
            max = Some((d, e));
        }
    }
    let (max, max_entry) = match max {
        Some(m) => m,
        None => return deny(R::InvalidPorts, "a grant must list at least one port"),
    };
    let limit = format!(
        "the {} policy {policy_name} allows for {vm_label} port {}/{}",
        max_entry.max_request_access_duration,
        max_entry.number,
        protocol_str(max_entry.protocol)
    );
    let window = match requested {
        Requested::For(d, spelled) => {
            if d > max {
                return deny(
                    R::DurationExceedsPolicy,
                    format!("duration {spelled} exceeds {limit}"),
                );
            }
            AccessWindow::For(d)
        }
        Requested::Until(t) => {
            if t <= now {
                return deny(
                    R::NotAfterInPast,
                    format!("notAfter {t} is not in the future (now: {now})"),
                );
            }
            let span = t.duration_since(now);
            let max_signed = SignedDuration::try_from(max).unwrap_or(SignedDuration::MAX);
            if span > max_signed {
                let secs = u64::try_from(span.as_secs()).unwrap_or(u64::MAX);
                return deny(
                    R::DurationExceedsPolicy,
                    format!(
                        "notAfter {t} is {} from now, which exceeds {limit}",
                        describe_duration(Duration::from_secs(secs))
                    ),
                );
            }
            AccessWindow::Until(t)
        }
    };

    let mut ports: Vec<(u16, Protocol)> = entries.iter().map(|e| (e.number, e.protocol)).collect();
    ports.sort_by_key(|(n, p)| (*n, protocol_rank(*p)));
    ports.dedup();
    Ok(ValidatedGrant {
        vm_id: vm.id.clone(),
        ports,
        source: source.canonical(),
        window,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::{PolicyRef, PolicyVirtualMachine};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    pub(crate) const SUB: &str = "/subscriptions/00000000-0000-0000-0000-000000000001";

    pub(crate) fn vm_id(rg: &str, name: &str) -> String {
        format!("{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}")
    }

    pub(crate) fn port(number: u16, protocol: Protocol, allowed: &[&str], max: &str) -> PolicyPort {
        PolicyPort {
            number,
            protocol,
            allowed_source_address_prefix: None,
            allowed_source_address_prefixes: allowed.iter().map(|s| s.to_string()).collect(),
            max_request_access_duration: max.to_string(),
            approval: None,
        }
    }

    /// prod-ssh: vm1 (rg1) 22/TCP from 203.0.113.0/24 for PT3H, 53/UDP and 53/TCP from
    /// 10.0.0.0/8 for PT1H, 443/TCP from 2001:db8::/32 for PT8H; vm2 (rg1) 3389/TCP from
    /// 198.51.100.0/24 for P1D.
    pub(crate) fn policy() -> JitPolicySpec {
        JitPolicySpec {
            virtual_machines: vec![
                PolicyVirtualMachine {
                    id: vm_id("rg1", "vm1"),
                    ports: vec![
                        port(22, Protocol::Tcp, &["203.0.113.0/24"], "PT3H"),
                        port(53, Protocol::Udp, &["10.0.0.0/8"], "PT1H"),
                        port(53, Protocol::Tcp, &["10.0.0.0/8"], "PT2H"),
                        port(
                            443,
                            Protocol::Tcp,
                            &["2001:db8::/32", "192.0.2.0/24"],
                            "PT8H",
                        ),
                    ],
                },
                PolicyVirtualMachine {
                    id: vm_id("rg1", "vm2"),
                    ports: vec![port(3389, Protocol::Tcp, &["198.51.100.0/24"], "P1D")],
                },
            ],
            ..Default::default()
        }
    }

    pub(crate) fn grant(vm: &str, ports: &[u16], source: &str, duration: &str) -> AccessGrantSpec {
        AccessGrantSpec {
            policy_ref: PolicyRef {
                name: "prod-ssh".to_string(),
            },
            virtual_machine: vm.to_string(),
            ports: ports.to_vec(),
            source_address_prefix: source.to_string(),
            duration: Some(duration.to_string()),
            not_after: None,
            justification: "INC-1234: disk full".to_string(),
        }
    }

    pub(crate) fn now() -> Timestamp {
        Timestamp::from_second(1_750_000_000).expect("valid")
    }

    fn refused(policy: &JitPolicySpec, g: &AccessGrantSpec) -> Denial {
        validate_grant("prod-ssh", policy, g, now()).expect_err("should be denied")
    }

    fn policy_refused(p: &JitPolicySpec) -> Denial {
        validate_policy(p).expect_err("policy should be invalid")
    }

    // ---- acceptances -------------------------------------------------------------------

    #[test]
    fn accepts_a_plain_grant() {
        let v = validate_grant(
            "prod-ssh",
            &policy(),
            &grant("vm1", &[22], "203.0.113.7/32", "PT1H"),
            now(),
        )
        .expect("valid");
        assert_eq!(v.vm_id, vm_id("rg1", "vm1"));
        assert_eq!(v.ports, vec![(22, Protocol::Tcp)]);
        assert_eq!(v.source, "203.0.113.7/32");
        assert_eq!(v.window, AccessWindow::For(Duration::from_secs(3600)));
        assert_eq!(
            v.expires_at(now()),
            now()
                .checked_add(SignedDuration::from_hours(1))
                .expect("ok")
        );
        assert_eq!(v.vm_name(), "vm1");
    }

    #[test]
    fn accepts_full_id_case_insensitively() {
        let id = vm_id("RG1", "VM1").to_ascii_uppercase();
        let v = validate_grant(
            "prod-ssh",
            &policy(),
            &grant(&id, &[22], "203.0.113.7", "PT1H"),
            now(),
        )
        .expect("valid");
        assert_eq!(
            v.vm_id,
            vm_id("rg1", "vm1"),
            "the policy's spelling is kept"
        );
        assert_eq!(v.source, "203.0.113.7", "a bare address stays bare");
    }

    #[test]
    fn accepts_bare_name_case_insensitively() {
        assert!(
            validate_grant(
                "prod-ssh",
                &policy(),
                &grant("Vm1", &[22], "203.0.113.7", "PT1H"),
                now()
            )
            .is_ok()
        );
    }

    #[test]
    fn a_port_listed_under_two_protocols_yields_two_pairs_sorted_and_deduped() {
        let v = validate_grant(
            "prod-ssh",
            &policy(),
            &grant("vm1", &[53, 22, 53], "10.1.2.3", "PT1H"),
            now(),
        );
        // 22 needs 203.0.113.0/24, so use only 53 here.
        assert_eq!(
            v.expect_err("22 refuses 10.1.2.3").reason,
            DenialReason::SourceNotAllowed
        );
        let v = validate_grant(
            "prod-ssh",
            &policy(),
            &grant("vm1", &[53, 53], "10.1.2.3", "PT1H"),
            now(),
        )
        .expect("valid");
        assert_eq!(v.ports, vec![(53, Protocol::Tcp), (53, Protocol::Udp)]);
    }

    #[test]
    fn accepts_ipv6_source_inside_ipv6_prefix() {
        let v = validate_grant(
            "prod-ssh",
            &policy(),
            &grant("vm1", &[443], "2001:DB8:0:1::/64", "PT8H"),
            now(),
        )
        .expect("valid");
        assert_eq!(v.source, "2001:db8:0:1::/64", "canonical lowercase");
        let v = validate_grant(
            "prod-ssh",
            &policy(),
            &grant("vm1", &[443], "2001:db8::5", "PT1H"),
            now(),
        )
        .expect("valid");
        assert_eq!(v.source, "2001:db8::5");
    }

    #[test]
    fn host_bits_are_cleared_in_the_canonical_source() {
        let v = validate_grant(
            "prod-ssh",
            &policy(),
            &grant("vm1", &[22], "203.0.113.77/28", "PT1H"),
            now(),
        )
        .expect("valid");
        assert_eq!(v.source, "203.0.113.64/28");
    }

    #[test]
    fn accepts_not_after_within_the_maximum() {
        let mut g = grant("vm1", &[22], "203.0.113.7/32", "PT1H");
        g.duration = None;
        let t = now()
            .checked_add(SignedDuration::from_hours(3))
            .expect("ok");
        g.not_after = Some(Time(t));
        let v =
            validate_grant("prod-ssh", &policy(), &g, now()).expect("exactly the maximum is fine");
        assert_eq!(v.window, AccessWindow::Until(t));
        assert_eq!(
            v.expires_at(
                now()
                    .checked_add(SignedDuration::from_hours(2))
                    .expect("ok")
            ),
            t
        );
    }

    #[test]
    fn accepts_duration_equal_to_the_maximum_and_p1d() {
        assert!(
            validate_grant(
                "prod-ssh",
                &policy(),
                &grant("vm1", &[22], "203.0.113.7", "PT3H"),
                now()
            )
            .is_ok()
        );
        assert!(
            validate_grant(
                "prod-ssh",
                &policy(),
                &grant("vm2", &[3389], "198.51.100.1", "P1D"),
                now()
            )
            .is_ok()
        );
    }

    #[test]
    fn world_source_accepted_when_policy_lists_exactly_it() {
        for world in ["*", "Internet", "0.0.0.0/0", "::/0"] {
            let mut p = policy();
            p.virtual_machines[1].ports[0].allowed_source_address_prefixes =
                vec![world.to_string()];
            let v = validate_grant("prod-ssh", &p, &grant("vm2", &[3389], world, "PT1H"), now())
                .unwrap_or_else(|e| panic!("{world}: {e}"));
            assert_eq!(v.source, world);
        }
    }

    #[test]
    fn wildcard_policy_contains_narrow_sources() {
        let mut p = policy();
        p.virtual_machines[1].ports[0].allowed_source_address_prefixes = vec!["*".to_string()];
        assert!(
            validate_grant(
                "prod-ssh",
                &p,
                &grant("vm2", &[3389], "192.0.2.1", "PT1H"),
                now()
            )
            .is_ok()
        );
        assert!(
            validate_grant(
                "prod-ssh",
                &p,
                &grant("vm2", &[3389], "2001:db8::1", "PT1H"),
                now()
            )
            .is_ok()
        );
    }

    #[test]
    fn singular_allowed_source_form_is_honoured() {
        let mut p = policy();
        let port = &mut p.virtual_machines[1].ports[0];
        port.allowed_source_address_prefixes.clear();
        port.allowed_source_address_prefix = Some("198.51.100.0/24".to_string());
        assert!(validate_policy(&p).is_ok());
        assert!(
            validate_grant(
                "prod-ssh",
                &p,
                &grant("vm2", &[3389], "198.51.100.9", "PT1H"),
                now()
            )
            .is_ok()
        );
    }

    #[test]
    fn ambiguous_name_resolves_with_a_full_id() {
        let mut p = policy();
        p.virtual_machines.push(PolicyVirtualMachine {
            id: vm_id("rg2", "vm1"),
            ports: vec![port(22, Protocol::Tcp, &["203.0.113.0/24"], "PT3H")],
        });
        let d = refused(&p, &grant("vm1", &[22], "203.0.113.7", "PT1H"));
        assert_eq!(d.reason, DenialReason::VirtualMachineAmbiguous);
        assert!(d.message.contains("rg2"), "{}", d.message);
        assert!(
            validate_grant(
                "prod-ssh",
                &p,
                &grant(&vm_id("rg2", "vm1"), &[22], "203.0.113.7", "PT1H"),
                now()
            )
            .is_ok()
        );
    }

    // ---- grant denials, one per reason -------------------------------------------------

    #[test]
    fn denies_duration_and_not_after() {
        let mut g = grant("vm1", &[22], "203.0.113.7", "PT1H");
        g.not_after = Some(Time(now()));
        assert_eq!(
            refused(&policy(), &g).reason,
            DenialReason::DurationAndNotAfter
        );
    }

    #[test]
    fn denies_no_duration() {
        let mut g = grant("vm1", &[22], "203.0.113.7", "PT1H");
        g.duration = None;
        assert_eq!(refused(&policy(), &g).reason, DenialReason::NoDuration);
    }

    #[test]
    fn denies_invalid_duration() {
        for bad in ["1H", "PT0S", "P", "PT1Y"] {
            let d = refused(&policy(), &grant("vm1", &[22], "203.0.113.7", bad));
            assert_eq!(d.reason, DenialReason::InvalidDuration, "{bad}");
        }
    }

    #[test]
    fn denies_duration_over_the_smallest_maximum() {
        let d = refused(&policy(), &grant("vm1", &[22], "203.0.113.7", "PT4H"));
        assert_eq!(d.reason, DenialReason::DurationExceedsPolicy);
        assert_eq!(
            d.message,
            "duration PT4H exceeds the PT3H policy prod-ssh allows for vm1 port 22/TCP"
        );
        // 53/UDP allows PT1H, 53/TCP PT2H: the smaller wins.
        let d = refused(&policy(), &grant("vm1", &[53], "10.0.0.1", "PT90M"));
        assert_eq!(d.reason, DenialReason::DurationExceedsPolicy);
        assert!(
            d.message.contains("PT1H") && d.message.contains("53/UDP"),
            "{}",
            d.message
        );
    }

    #[test]
    fn denies_not_after_too_far() {
        let mut g = grant("vm1", &[22], "203.0.113.7", "PT1H");
        g.duration = None;
        g.not_after = Some(Time(
            now()
                .checked_add(SignedDuration::from_secs(3 * 3600 + 1))
                .expect("ok"),
        ));
        let d = refused(&policy(), &g);
        assert_eq!(d.reason, DenialReason::DurationExceedsPolicy);
        assert!(d.message.contains("PT3H1S"), "{}", d.message);
    }

    #[test]
    fn denies_not_after_in_the_past() {
        let mut g = grant("vm1", &[22], "203.0.113.7", "PT1H");
        g.duration = None;
        g.not_after = Some(Time(now()));
        assert_eq!(refused(&policy(), &g).reason, DenialReason::NotAfterInPast);
        g.not_after = Some(Time(
            now().checked_sub(SignedDuration::from_secs(1)).expect("ok"),
        ));
        assert_eq!(refused(&policy(), &g).reason, DenialReason::NotAfterInPast);
    }

    #[test]
    fn denies_bad_justification() {
        let mut g = grant("vm1", &[22], "203.0.113.7", "PT1H");
        g.justification = "ok".to_string();
        assert_eq!(
            refused(&policy(), &g).reason,
            DenialReason::InvalidJustification
        );
        g.justification = "x".repeat(257);
        assert_eq!(
            refused(&policy(), &g).reason,
            DenialReason::InvalidJustification
        );
    }

    #[test]
    fn denies_vm_not_in_policy() {
        let d = refused(&policy(), &grant("vm9", &[22], "203.0.113.7", "PT1H"));
        assert_eq!(d.reason, DenialReason::VirtualMachineNotInPolicy);
        assert_eq!(d.message, "virtual machine vm9 is not in policy prod-ssh");
        // A full ID in another resource group is not the policy's VM.
        let d = refused(
            &policy(),
            &grant(&vm_id("rg9", "vm1"), &[22], "203.0.113.7", "PT1H"),
        );
        assert_eq!(d.reason, DenialReason::VirtualMachineNotInPolicy);
    }

    #[test]
    fn denies_invalid_ports() {
        for ports in [vec![], vec![0], (1..=33).collect::<Vec<u16>>()] {
            let d = refused(&policy(), &grant("vm1", &ports, "203.0.113.7", "PT1H"));
            assert_eq!(d.reason, DenialReason::InvalidPorts, "{ports:?}");
        }
    }

    #[test]
    fn denies_port_not_in_policy() {
        let d = refused(
            &policy(),
            &grant("vm2", &[3389, 22], "198.51.100.1", "PT1H"),
        );
        assert_eq!(d.reason, DenialReason::PortNotInPolicy);
        assert_eq!(d.message, "port 22 is not in policy prod-ssh for vm2");
        let d = refused(&policy(), &grant("vm1", &[3389], "203.0.113.7", "PT1H"));
        assert_eq!(d.message, "port 3389 is not in policy prod-ssh for vm1");
    }

    #[test]
    fn denies_invalid_source() {
        for bad in [
            "",
            "banana",
            "10.0.0.1/33",
            "10.0.0",
            "2001:db8::/129",
            " 10.0.0.1",
            "internet",
            "1.2.3.4-1.2.3.5",
        ] {
            let d = refused(&policy(), &grant("vm1", &[22], bad, "PT1H"));
            assert_eq!(
                d.reason,
                DenialReason::InvalidSourceAddressPrefix,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn denies_world_sources_unless_listed_exactly() {
        for world in ["*", "Internet", "0.0.0.0/0", "::/0", "10.0.0.0/0"] {
            let d = refused(&policy(), &grant("vm1", &[22], world, "PT1H"));
            assert_eq!(d.reason, DenialReason::SourceOpenToTheWorld, "{world}");
        }
        // The policy lists `*` but the grant asks for 0.0.0.0/0: not exactly that value.
        let mut p = policy();
        p.virtual_machines[1].ports[0].allowed_source_address_prefixes = vec!["*".to_string()];
        let d = refused(&p, &grant("vm2", &[3389], "0.0.0.0/0", "PT1H"));
        assert_eq!(d.reason, DenialReason::SourceOpenToTheWorld);
        // Every requested port must list it.
        let mut p = policy();
        p.virtual_machines[0].ports[1].allowed_source_address_prefixes = vec!["*".to_string()];
        let d = refused(&p, &grant("vm1", &[53], "*", "PT1H"));
        assert_eq!(d.reason, DenialReason::SourceOpenToTheWorld);
        assert!(d.message.contains("53/TCP"), "{}", d.message);
    }

    #[test]
    fn denies_source_outside_the_allowed_prefixes() {
        let d = refused(&policy(), &grant("vm1", &[22], "198.51.100.7/32", "PT1H"));
        assert_eq!(d.reason, DenialReason::SourceNotAllowed);
        assert_eq!(
            d.message,
            "source 198.51.100.7/32 is not inside the prefixes policy prod-ssh allows for vm1 port 22/TCP"
        );
        // Wider than allowed.
        let d = refused(&policy(), &grant("vm1", &[22], "203.0.112.0/23", "PT1H"));
        assert_eq!(d.reason, DenialReason::SourceNotAllowed);
        // Wrong family: an IPv6 source against an IPv4-only port, IPv4-mapped included.
        let d = refused(
            &policy(),
            &grant("vm1", &[22], "::ffff:203.0.113.7", "PT1H"),
        );
        assert_eq!(d.reason, DenialReason::SourceNotAllowed);
        let d = refused(&policy(), &grant("vm1", &[443], "2001:db9::1", "PT1H"));
        assert_eq!(d.reason, DenialReason::SourceNotAllowed);
        // A policy that allows only `Internet` does not contain `*`.
        let mut p = policy();
        p.virtual_machines[1].ports[0].allowed_source_address_prefixes =
            vec!["Internet".to_string()];
        assert_eq!(
            refused(&p, &grant("vm2", &[3389], "*", "PT1H")).reason,
            DenialReason::SourceOpenToTheWorld
        );
    }

    #[test]
    fn denies_grant_under_an_invalid_policy() {
        let mut p = policy();
        p.virtual_machines[0].ports[0].max_request_access_duration = "P2D".to_string();
        let d = refused(&p, &grant("vm1", &[22], "203.0.113.7", "PT1H"));
        assert_eq!(d.reason, DenialReason::PolicyInvalid);
        assert!(
            d.message.starts_with("policy prod-ssh is invalid: "),
            "{}",
            d.message
        );
    }

    // ---- policy denials ----------------------------------------------------------------

    #[test]
    fn example_policy_is_valid() {
        assert_eq!(validate_policy(&policy()), Ok(()));
    }

    #[test]
    fn policy_vm_count() {
        let p = JitPolicySpec {
            virtual_machines: vec![],
            ..Default::default()
        };
        assert_eq!(
            policy_refused(&p).reason,
            DenialReason::InvalidVirtualMachines
        );
        let mut p = policy();
        p.virtual_machines = (0..=MAX_POLICY_VMS)
            .map(|i| PolicyVirtualMachine {
                id: vm_id("rg", &format!("vm{i}")),
                ports: vec![port(22, Protocol::Tcp, &["10.0.0.0/8"], "PT1H")],
            })
            .collect();
        assert_eq!(
            policy_refused(&p).reason,
            DenialReason::InvalidVirtualMachines
        );
        p.virtual_machines.pop();
        assert!(validate_policy(&p).is_ok());
    }

    #[test]
    fn policy_vm_id_must_be_well_formed() {
        for bad in [
            "vm1".to_string(),
            format!("{SUB}/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/"),
            format!("{SUB}/resourceGroups/rg1/providers/Microsoft.Network/networkInterfaces/nic1"),
            format!(
                "{SUB}/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/vm1/extensions/x"
            ),
            format!("{SUB}/resourceGroups//providers/Microsoft.Compute/virtualMachines/vm1"),
            format!(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{}",
                "v".repeat(500)
            ),
        ] {
            let mut p = policy();
            p.virtual_machines[0].id = bad.clone();
            assert_eq!(
                policy_refused(&p).reason,
                DenialReason::InvalidVirtualMachineId,
                "{bad}"
            );
        }
    }

    #[test]
    fn policy_vm_ids_unique_case_insensitively() {
        let mut p = policy();
        p.virtual_machines[1].id = vm_id("RG1", "VM1");
        let d = policy_refused(&p);
        assert_eq!(d.reason, DenialReason::DuplicateVirtualMachine);
    }

    #[test]
    fn policy_ports() {
        let mut p = policy();
        p.virtual_machines[0].ports.clear();
        assert_eq!(policy_refused(&p).reason, DenialReason::InvalidPorts);
        let mut p = policy();
        p.virtual_machines[0].ports[0].number = 0;
        assert_eq!(policy_refused(&p).reason, DenialReason::InvalidPorts);
        let mut p = policy();
        p.virtual_machines[0].ports = (1..=33)
            .map(|n| port(n, Protocol::Tcp, &["10.0.0.0/8"], "PT1H"))
            .collect();
        assert_eq!(policy_refused(&p).reason, DenialReason::InvalidPorts);
    }

    #[test]
    fn policy_duplicate_port_protocol() {
        let mut p = policy();
        p.virtual_machines[0]
            .ports
            .push(port(22, Protocol::Tcp, &["10.0.0.0/8"], "PT1H"));
        let d = policy_refused(&p);
        assert_eq!(d.reason, DenialReason::DuplicatePort);
        assert_eq!(
            d.message,
            "port 22/TCP is listed twice for virtual machine vm1"
        );
        // Same number, other protocol: fine.
        let mut p = policy();
        p.virtual_machines[0]
            .ports
            .push(port(22, Protocol::Any, &["10.0.0.0/8"], "PT1H"));
        assert!(validate_policy(&p).is_ok());
    }

    #[test]
    fn policy_max_duration() {
        for bad in ["P2D", "PT0S", "PT24H1S", "three hours", ""] {
            let mut p = policy();
            p.virtual_machines[0].ports[0].max_request_access_duration = bad.to_string();
            assert_eq!(
                policy_refused(&p).reason,
                DenialReason::InvalidMaxRequestAccessDuration,
                "{bad}"
            );
        }
        let mut p = policy();
        p.virtual_machines[0].ports[0].max_request_access_duration = "PT24H".to_string();
        assert!(validate_policy(&p).is_ok());
    }

    #[test]
    fn policy_allowed_sources() {
        let mut p = policy();
        p.virtual_machines[0].ports[0].allowed_source_address_prefixes =
            vec!["10.0.0.0/33".to_string()];
        assert_eq!(
            policy_refused(&p).reason,
            DenialReason::InvalidAllowedSourceAddressPrefix
        );
        let mut p = policy();
        p.virtual_machines[0].ports[0].allowed_source_address_prefixes =
            (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
        assert_eq!(
            policy_refused(&p).reason,
            DenialReason::InvalidAllowedSourceAddressPrefix
        );
        let mut p = policy();
        p.virtual_machines[0].ports[0]
            .allowed_source_address_prefixes
            .clear();
        assert_eq!(policy_refused(&p).reason, DenialReason::NoAllowedSource);
        let mut p = policy();
        p.virtual_machines[0].ports[0].allowed_source_address_prefix =
            Some("10.0.0.0/8".to_string());
        assert_eq!(
            policy_refused(&p).reason,
            DenialReason::ConflictingAllowedSourceForms
        );
        let mut p = policy();
        p.virtual_machines[0].ports[0].allowed_source_address_prefixes = vec![
            "*".to_string(),
            "Internet".to_string(),
            "::/0".to_string(),
            "2001:db8::1".to_string(),
        ];
        assert!(validate_policy(&p).is_ok());
    }

    #[test]
    fn reasons_are_camel_case() {
        for r in [
            DenialReason::PolicyInvalid,
            DenialReason::SourceOpenToTheWorld,
            DenialReason::DuplicatePort,
        ] {
            let s = r.as_str();
            assert!(s.chars().next().is_some_and(|c| c.is_ascii_uppercase()));
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric()));
            assert_eq!(r.to_string(), s);
        }
    }

    #[test]
    fn address_prefix_parsing_and_containment() {
        let p = |s| AddressPrefix::parse(s).expect(s);
        assert!(p("10.0.0.0/8").contains(&p("10.1.2.3")));
        assert!(p("10.0.0.0/8").contains(&p("10.0.0.0/8")));
        assert!(!p("10.0.0.0/8").contains(&p("10.0.0.0/7")));
        assert!(!p("10.0.0.0/8").contains(&p("*")));
        assert!(p("*").contains(&p("Internet")));
        assert!(p("Internet").contains(&p("2001:db8::1")));
        assert!(p("0.0.0.0/0").is_open_to_world() && p("::/0").is_open_to_world());
        assert!(!p("0.0.0.0/1").is_open_to_world());
        assert!(p("10.1.2.3/32").same_set(&p("10.1.2.3")));
        assert_eq!(p("10.1.2.3/32").canonical(), "10.1.2.3/32");
        assert_eq!(p("10.1.2.3").is_ipv4(), Some(true));
        assert_eq!(p("::1").is_ipv4(), Some(false));
        assert_eq!(p("*").is_ipv4(), None);
    }
}
