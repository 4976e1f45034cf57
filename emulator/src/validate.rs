//! Security rule validation, modelled on the checks (and error codes) of the real Azure
//! network resource provider. Pure functions, no I/O.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::RuleProps;

/// Maximum number of (user) security rules in one NSG.
pub const MAX_RULES_PER_NSG: usize = 1000;
/// Maximum length of a rule description.
pub const MAX_DESCRIPTION_LEN: usize = 140;

pub const INVALID_RESOURCE_NAME: &str = "InvalidResourceName";
pub const INVALID_REQUEST_FORMAT: &str = "InvalidRequestFormat";
pub const INVALID_PRIORITY: &str = "SecurityRuleInvalidPriority";
pub const CONFLICT: &str = "SecurityRuleConflict";
pub const INVALID_PROTOCOL: &str = "SecurityRuleInvalidProtocol";
pub const INVALID_ACCESS: &str = "SecurityRuleInvalidAccess";
pub const INVALID_DIRECTION: &str = "SecurityRuleInvalidDirection";
pub const DESCRIPTION_TOO_LONG: &str = "SecurityRuleDescriptionTooLong";
pub const INVALID_ADDRESS_PREFIX: &str = "SecurityRuleInvalidAddressPrefix";
pub const INVALID_PORT_RANGE: &str = "SecurityRuleInvalidPortRange";
pub const UNSUPPORTED_VALUE: &str = "SecurityRuleParameterContainsUnsupportedValue";
pub const TOO_MANY_RULES: &str = "SecurityRuleCountLimitReached";
pub const TOO_MANY_ADDRESSES: &str = "SecurityRuleAddressesOrPortsPerSecurityGroupLimitReached";
/// IP addresses and ranges of one NSG, summed over all its rules and counted apart for sources
/// and destinations.
pub const MAX_ADDRESSES_PER_NSG: usize = 4000;
pub const MIXED_FAMILIES: &str = "ResourceCannotContainAddressPrefixesFromDifferentAddressFamilies";

/// A refused rule: an ARM error code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: &'static str,
    pub message: String,
}

fn violation(code: &'static str, message: impl Into<String>) -> Violation {
    Violation {
        code,
        message: message.into(),
    }
}

/// ARM resource name rule for security rules: 1-80 characters, starts with a letter or digit,
/// ends with a letter, digit or underscore, and contains only letters, digits, `_`, `.` and `-`.
pub fn validate_rule_name(name: &str) -> Result<(), Violation> {
    let ok = !name.is_empty()
        && name.chars().count() <= 80
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(violation(
            INVALID_RESOURCE_NAME,
            format!(
                "Resource name {name} is invalid. The name can be up to 80 characters long. It must begin with a word character, and it must end with a word character or with '_'. The name may contain word characters or '.', '-', '_'."
            ),
        ))
    }
}

fn canonical<'a>(value: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .find(|a| a.eq_ignore_ascii_case(value))
        .copied()
}

/// Service tags accepted as address prefixes (case-insensitive; regional variants like
/// `Storage.WestEurope` are accepted for the regional tags).
const SERVICE_TAGS: &[&str] = &[
    "Internet",
    "VirtualNetwork",
    "AzureLoadBalancer",
    "AzureCloud",
    "AzureTrafficManager",
    "Storage",
    "Sql",
    "SqlManagement",
    "AzureCosmosDB",
    "AzureKeyVault",
    "EventHub",
    "ServiceBus",
    "AzureMonitor",
    "AzureActiveDirectory",
    "AzureContainerRegistry",
    "AppService",
    "AppServiceManagement",
    "ApiManagement",
    "AzureBackup",
    "AzureFrontDoor.Backend",
    "AzureFrontDoor.Frontend",
    "AzureFrontDoor.FirstParty",
    "GatewayManager",
    "GuestAndHybridManagement",
    "AzureBastion",
    "AzureResourceManager",
    "AzureMachineLearning",
    "AzureKubernetesService",
    "BatchNodeManagement",
    "DataFactory",
    "HDInsight",
    "MicrosoftContainerRegistry",
    "PowerBI",
    "AzureDevOps",
];

/// Whether `s` names a service tag (case-insensitive), optionally with a region suffix.
pub fn is_service_tag(s: &str) -> bool {
    if SERVICE_TAGS.iter().any(|t| t.eq_ignore_ascii_case(s)) {
        return true;
    }
    match s.split_once('.') {
        Some((tag, region)) => {
            !region.is_empty()
                && region.chars().all(|c| c.is_ascii_alphanumeric())
                && SERVICE_TAGS
                    .iter()
                    .any(|t| !t.contains('.') && t.eq_ignore_ascii_case(tag))
        }
        None => false,
    }
}

/// An IPv4/IPv6 address or CIDR prefix.
pub fn is_ip_or_cidr(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || s.parse::<IpNet>().is_ok()
}

/// A singular address prefix: `*`, an address, a CIDR or a service tag.
pub fn is_valid_address_prefix(s: &str) -> bool {
    s == "*" || is_ip_or_cidr(s) || is_service_tag(s)
}

/// The address family of a prefix: `Some(true)` for IPv6, `Some(false)` for IPv4, `None` for
/// `*` and service tags (which Azure lets stand beside either family).
pub fn address_family_is_v6(s: &str) -> Option<bool> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.is_ipv6());
    }
    s.parse::<IpNet>().ok().map(|n| matches!(n, IpNet::V6(_)))
}

/// Azure refuses a rule whose source and destination prefixes, taken together, mix IPv4 and
/// IPv6 (HTTP 400, see `shared/azure-facts.md` (c)).
fn check_address_families(rule_id: &str, props: &RuleProps) -> Result<(), Violation> {
    let all = props
        .source_address_prefix
        .iter()
        .chain(&props.source_address_prefixes)
        .chain(&props.destination_address_prefix)
        .chain(&props.destination_address_prefixes);
    let (mut v4, mut v6) = (false, false);
    for p in all {
        match address_family_is_v6(p) {
            Some(true) => v6 = true,
            Some(false) => v4 = true,
            None => {}
        }
    }
    if v4 && v6 {
        return Err(violation(
            MIXED_FAMILIES,
            format!(
                "Resource {rule_id} contains IP addresses or prefixes that belong to different address families. All IP addresses or prefixes in the resource should belong to the same address family."
            ),
        ));
    }
    Ok(())
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok()
}

/// A port or port range: `N` or `N-M` with `0 <= N <= M <= 65535` (no `*`).
pub fn is_valid_port_or_range(s: &str) -> bool {
    match s.split_once('-') {
        Some((lo, hi)) => matches!((parse_port(lo), parse_port(hi)), (Some(a), Some(b)) if a <= b),
        None => parse_port(s).is_some(),
    }
}

/// A singular port range: `*`, `N` or `N-M`.
pub fn is_valid_port_range(s: &str) -> bool {
    s == "*" || is_valid_port_or_range(s)
}

struct Field<'a> {
    singular_name: &'static str,
    plural_name: &'static str,
    singular: &'a Option<String>,
    plural: &'a [String],
}

/// Azure refuses a rule that sets both the singular and the plural form of a field.
fn both_forms_set(rule_id: &str, f: &Field<'_>) -> Violation {
    violation(
        UNSUPPORTED_VALUE,
        format!(
            "Security rule {rule_id} specifies both {} and {}. Only one of them may be set.",
            f.singular_name, f.plural_name
        ),
    )
}

fn check_address_field(rule_id: &str, f: Field<'_>) -> Result<(), Violation> {
    match (f.singular, f.plural.is_empty()) {
        (Some(_), false) => Err(both_forms_set(rule_id, &f)),
        (None, true) => Err(violation(
            INVALID_ADDRESS_PREFIX,
            format!(
                "Security rule {rule_id} has invalid Address prefix. Neither {} nor {} is specified.",
                f.singular_name, f.plural_name
            ),
        )),
        (Some(v), true) => {
            if is_valid_address_prefix(v) {
                Ok(())
            } else {
                Err(violation(
                    INVALID_ADDRESS_PREFIX,
                    format!(
                        "Security rule {rule_id} has invalid Address prefix. Value provided: {v}"
                    ),
                ))
            }
        }
        (None, false) => {
            for v in f.plural {
                if v == "*" || is_service_tag(v) {
                    return Err(violation(
                        UNSUPPORTED_VALUE,
                        format!(
                            "Security rule parameter {} for rule with Id {rule_id} contains unsupported value {v}. Only IP addresses and CIDR prefixes are allowed in {}.",
                            f.plural_name, f.plural_name
                        ),
                    ));
                }
                if !is_ip_or_cidr(v) {
                    return Err(violation(
                        INVALID_ADDRESS_PREFIX,
                        format!(
                            "Security rule {rule_id} has invalid Address prefix. Value provided: {v}"
                        ),
                    ));
                }
            }
            Ok(())
        }
    }
}

fn port_error(rule_id: &str, v: &str) -> Violation {
    violation(
        INVALID_PORT_RANGE,
        format!(
            "Security rule {rule_id} has invalid Port range. Value provided: {v}. Value should be an integer OR integer range with '-' delimiter. Valid range 0-65535."
        ),
    )
}

fn check_port_field(rule_id: &str, f: Field<'_>) -> Result<(), Violation> {
    match (f.singular, f.plural.is_empty()) {
        (Some(_), false) => Err(both_forms_set(rule_id, &f)),
        (None, true) => Err(violation(
            INVALID_PORT_RANGE,
            format!(
                "Security rule {rule_id} has invalid Port range. Neither {} nor {} is specified.",
                f.singular_name, f.plural_name
            ),
        )),
        (Some(v), true) => {
            if is_valid_port_range(v) {
                Ok(())
            } else {
                Err(port_error(rule_id, v))
            }
        }
        (None, false) => {
            for v in f.plural {
                if v == "*" {
                    return Err(violation(
                        UNSUPPORTED_VALUE,
                        format!(
                            "Security rule parameter {} for rule with Id {rule_id} contains unsupported value *.",
                            f.plural_name
                        ),
                    ));
                }
                if !is_valid_port_or_range(v) {
                    return Err(port_error(rule_id, v));
                }
            }
            Ok(())
        }
    }
}

/// Validates one rule's properties and returns them normalised (enum casing as Azure returns it).
pub fn validate_rule(rule_id: &str, props: &RuleProps) -> Result<RuleProps, Violation> {
    let mut out = props.clone();
    match props.priority {
        Some(p) if (100..=4096).contains(&p) => {}
        other => {
            let shown = other.map_or_else(|| "null".to_string(), |p| p.to_string());
            return Err(violation(
                INVALID_PRIORITY,
                format!(
                    "Security rule {rule_id} has invalid Priority. Value provided: {shown} Allowed range 100-4096."
                ),
            ));
        }
    }
    let protocol = props.protocol.as_deref().unwrap_or("");
    match canonical(protocol, &["Tcp", "Udp", "Icmp", "Esp", "Ah", "*"]) {
        Some(p) => out.protocol = Some(p.to_string()),
        None => {
            return Err(violation(
                INVALID_PROTOCOL,
                format!(
                    "Security rule {rule_id} has invalid Protocol. Value provided: {protocol}. Allowed values: Tcp, Udp, Icmp, Esp, Ah, *."
                ),
            ));
        }
    }
    let access = props.access.as_deref().unwrap_or("");
    match canonical(access, &["Allow", "Deny"]) {
        Some(a) => out.access = Some(a.to_string()),
        None => {
            return Err(violation(
                INVALID_ACCESS,
                format!(
                    "Security rule {rule_id} has invalid Access. Value provided: {access}. Allowed values: Allow, Deny."
                ),
            ));
        }
    }
    let direction = props.direction.as_deref().unwrap_or("");
    match canonical(direction, &["Inbound", "Outbound"]) {
        Some(d) => out.direction = Some(d.to_string()),
        None => {
            return Err(violation(
                INVALID_DIRECTION,
                format!(
                    "Security rule {rule_id} has invalid Direction. Value provided: {direction}. Allowed values: Inbound, Outbound."
                ),
            ));
        }
    }
    if let Some(d) = &props.description
        && d.chars().count() > MAX_DESCRIPTION_LEN
    {
        return Err(violation(
            DESCRIPTION_TOO_LONG,
            format!(
                "Security rule {rule_id} has a description of {} characters; at most {MAX_DESCRIPTION_LEN} are allowed.",
                d.chars().count()
            ),
        ));
    }
    check_address_field(
        rule_id,
        Field {
            singular_name: "sourceAddressPrefix",
            plural_name: "sourceAddressPrefixes",
            singular: &props.source_address_prefix,
            plural: &props.source_address_prefixes,
        },
    )?;
    check_address_field(
        rule_id,
        Field {
            singular_name: "destinationAddressPrefix",
            plural_name: "destinationAddressPrefixes",
            singular: &props.destination_address_prefix,
            plural: &props.destination_address_prefixes,
        },
    )?;
    check_address_families(rule_id, props)?;
    check_port_field(
        rule_id,
        Field {
            singular_name: "sourcePortRange",
            plural_name: "sourcePortRanges",
            singular: &props.source_port_range,
            plural: &props.source_port_ranges,
        },
    )?;
    check_port_field(
        rule_id,
        Field {
            singular_name: "destinationPortRange",
            plural_name: "destinationPortRanges",
            singular: &props.destination_port_range,
            plural: &props.destination_port_ranges,
        },
    )?;
    Ok(out)
}

/// Refuses an NSG whose rules, together, name more than [`MAX_ADDRESSES_PER_NSG`] source or
/// destination IP addresses and ranges. Only addresses and CIDR ranges count ("IP addresses and
/// ranges", in Azure's limits); `*` and service tags do not. Whether Azure counts tags is not
/// documented.
pub fn check_address_limit<'a>(
    nsg_id: &str,
    rules: impl IntoIterator<Item = &'a RuleProps>,
) -> Result<(), Violation> {
    let (mut source, mut destination) = (0, 0);
    for r in rules {
        source += addresses_in(
            r.source_address_prefix.as_deref(),
            &r.source_address_prefixes,
        );
        destination += addresses_in(
            r.destination_address_prefix.as_deref(),
            &r.destination_address_prefixes,
        );
    }
    for (count, what) in [
        (source, "SourceAddressPrefixes"),
        (destination, "DestinationAddressPrefixes"),
    ] {
        if count > MAX_ADDRESSES_PER_NSG {
            return Err(violation(
                TOO_MANY_ADDRESSES,
                format!(
                    "Network security group {nsg_id} has {count} {what}. A security group cannot \
                     have more than {MAX_ADDRESSES_PER_NSG} {what} as per the limit \
                     MaxSecurityRuleAddressesOrPortsPerSecurityGroup."
                ),
            ));
        }
    }
    Ok(())
}

/// The IP addresses and CIDR ranges among a rule's prefixes (one side).
fn addresses_in(single: Option<&str>, many: &[String]) -> usize {
    single
        .into_iter()
        .chain(many.iter().map(String::as_str))
        .filter(|p| p.parse::<IpAddr>().is_ok() || p.parse::<IpNet>().is_ok())
        .count()
}

/// Checks a (validated) rule against the NSG's other rules: no two rules may share priority
/// and direction.
pub fn check_conflicts<'a>(
    rule_id: &str,
    name: &str,
    props: &RuleProps,
    others: impl IntoIterator<Item = (&'a str, &'a RuleProps)>,
) -> Result<(), Violation> {
    for (other_name, other) in others {
        if other_name.eq_ignore_ascii_case(name) {
            continue;
        }
        let same_direction = match (&other.direction, &props.direction) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        };
        if same_direction && other.priority == props.priority {
            return Err(violation(
                CONFLICT,
                format!(
                    "Security rule {rule_id} conflicts with rule {other_name}. Rules cannot have the same Priority and Direction. To learn more, see aka.ms/nsgrules."
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> RuleProps {
        RuleProps {
            protocol: Some("tcp".into()),
            source_address_prefix: Some("*".into()),
            source_port_range: Some("*".into()),
            destination_address_prefix: Some("10.0.1.4".into()),
            destination_port_range: Some("22".into()),
            access: Some("allow".into()),
            priority: Some(110),
            direction: Some("inbound".into()),
            ..RuleProps::default()
        }
    }

    fn code(p: &RuleProps) -> &'static str {
        validate_rule("r", p).err().map_or("ok", |v| v.code)
    }

    #[test]
    fn valid_rule_is_normalised() {
        let out = validate_rule("r", &rule()).unwrap();
        assert_eq!(out.protocol.as_deref(), Some("Tcp"));
        assert_eq!(out.access.as_deref(), Some("Allow"));
        assert_eq!(out.direction.as_deref(), Some("Inbound"));
    }

    #[test]
    fn names() {
        for ok in ["a", "rule1", "jit-22_x.y", "A_", &"a".repeat(80)] {
            assert!(validate_rule_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "a-",
            "a.",
            "a b",
            "a/b",
            "ü",
            &"a".repeat(81),
        ] {
            assert_eq!(
                validate_rule_name(bad).unwrap_err().code,
                INVALID_RESOURCE_NAME,
                "{bad}"
            );
        }
    }

    #[test]
    fn priorities() {
        for (p, ok) in [
            (99, false),
            (100, true),
            (4096, true),
            (4097, false),
            (-1, false),
        ] {
            let r = RuleProps {
                priority: Some(p),
                ..rule()
            };
            assert_eq!(code(&r) == "ok", ok, "{p}");
        }
        let r = RuleProps {
            priority: None,
            ..rule()
        };
        assert_eq!(code(&r), INVALID_PRIORITY);
    }

    #[test]
    fn enums() {
        assert_eq!(
            code(&RuleProps {
                protocol: Some("Tcpx".into()),
                ..rule()
            }),
            INVALID_PROTOCOL
        );
        assert_eq!(
            code(&RuleProps {
                protocol: None,
                ..rule()
            }),
            INVALID_PROTOCOL
        );
        assert_eq!(
            code(&RuleProps {
                access: Some("Permit".into()),
                ..rule()
            }),
            INVALID_ACCESS
        );
        assert_eq!(
            code(&RuleProps {
                direction: Some("In".into()),
                ..rule()
            }),
            INVALID_DIRECTION
        );
        for p in ["Tcp", "UDP", "icmp", "Esp", "Ah", "*"] {
            assert_eq!(
                code(&RuleProps {
                    protocol: Some(p.into()),
                    ..rule()
                }),
                "ok",
                "{p}"
            );
        }
    }

    #[test]
    fn descriptions() {
        let ok = RuleProps {
            description: Some("x".repeat(140)),
            ..rule()
        };
        assert_eq!(code(&ok), "ok");
        let bad = RuleProps {
            description: Some("x".repeat(141)),
            ..rule()
        };
        assert_eq!(code(&bad), DESCRIPTION_TOO_LONG);
    }

    #[test]
    fn address_prefixes() {
        for ok in [
            "*",
            "10.0.0.1",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "2001:db8::/32",
            "::1",
            "Internet",
            "virtualnetwork",
            "AzureLoadBalancer",
            "Storage.WestEurope",
        ] {
            assert!(is_valid_address_prefix(ok), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.256",
            "10.0.0.0/33",
            "10.0.0",
            "garbage",
            "10.0.0.0/",
            "Storage.",
            "1.2.3.4 ",
        ] {
            assert!(!is_valid_address_prefix(bad), "{bad}");
            let r = RuleProps {
                source_address_prefix: Some(bad.into()),
                ..rule()
            };
            assert_eq!(code(&r), INVALID_ADDRESS_PREFIX, "{bad}");
        }
    }

    #[test]
    fn plural_forms() {
        let r = RuleProps {
            destination_address_prefix: None,
            destination_address_prefixes: vec!["10.0.1.4".into(), "10.0.1.5/32".into()],
            destination_port_range: None,
            destination_port_ranges: vec!["22".into(), "8000-8100".into()],
            ..rule()
        };
        assert_eq!(code(&r), "ok");
        let both = RuleProps {
            destination_address_prefixes: vec!["10.0.1.4".into()],
            ..rule()
        };
        assert_eq!(code(&both), UNSUPPORTED_VALUE);
        let both_ports = RuleProps {
            destination_port_ranges: vec!["22".into()],
            ..rule()
        };
        assert_eq!(code(&both_ports), UNSUPPORTED_VALUE);
        let neither = RuleProps {
            destination_address_prefix: None,
            ..rule()
        };
        assert_eq!(code(&neither), INVALID_ADDRESS_PREFIX);
        let tag_in_plural = RuleProps {
            source_address_prefix: None,
            source_address_prefixes: vec!["Internet".into()],
            ..rule()
        };
        assert_eq!(code(&tag_in_plural), UNSUPPORTED_VALUE);
        let bad_in_plural = RuleProps {
            source_address_prefix: None,
            source_address_prefixes: vec!["1.2.3.4/40".into()],
            ..rule()
        };
        assert_eq!(code(&bad_in_plural), INVALID_ADDRESS_PREFIX);
    }

    #[test]
    fn address_families_must_not_mix() {
        let v6_src_v4_dst = RuleProps {
            source_address_prefix: Some("2001:db8::1/128".into()),
            ..rule()
        };
        assert_eq!(code(&v6_src_v4_dst), MIXED_FAMILIES);
        let mixed_plural = RuleProps {
            destination_address_prefix: None,
            destination_address_prefixes: vec!["10.0.1.4".into(), "2001:db8::4".into()],
            ..rule()
        };
        assert_eq!(code(&mixed_plural), MIXED_FAMILIES);
        let all_v6 = RuleProps {
            source_address_prefix: Some("2001:db8::/64".into()),
            destination_address_prefix: Some("2001:db8::4".into()),
            ..rule()
        };
        assert_eq!(code(&all_v6), "ok");
        // `*` and service tags stand beside either family.
        for neutral in ["*", "Internet", "VirtualNetwork"] {
            let r = RuleProps {
                source_address_prefix: Some(neutral.into()),
                destination_address_prefix: Some("2001:db8::4".into()),
                ..rule()
            };
            assert_eq!(code(&r), "ok", "{neutral}");
        }
    }

    #[test]
    fn port_ranges() {
        for ok in ["*", "0", "22", "65535", "1-65535", "80-80"] {
            assert!(is_valid_port_range(ok), "{ok}");
        }
        for bad in [
            "", "65536", "-1", "22-21", "a", "1-", "-", "1-2-3", "+22", " 22", "1,2", "000022",
        ] {
            assert!(!is_valid_port_range(bad), "{bad}");
            let r = RuleProps {
                destination_port_range: Some(bad.into()),
                ..rule()
            };
            assert_eq!(code(&r), INVALID_PORT_RANGE, "{bad}");
        }
        let neither = RuleProps {
            source_port_range: None,
            ..rule()
        };
        assert_eq!(code(&neither), INVALID_PORT_RANGE);
    }

    #[test]
    fn conflicts() {
        let a = validate_rule("a", &rule()).unwrap();
        let same = a.clone();
        let out = RuleProps {
            direction: Some("Outbound".into()),
            ..a.clone()
        };
        let other_prio = RuleProps {
            priority: Some(111),
            ..a.clone()
        };
        assert!(check_conflicts("x", "new", &a, [("old", &same)]).is_err());
        assert!(
            check_conflicts("x", "old", &a, [("old", &same)]).is_ok(),
            "replacing itself"
        );
        assert!(check_conflicts("x", "new", &a, [("old", &out)]).is_ok());
        assert!(check_conflicts("x", "new", &a, [("old", &other_prio)]).is_ok());
        assert_eq!(
            check_conflicts("x", "new", &a, [("old", &same)])
                .unwrap_err()
                .code,
            CONFLICT
        );
    }
}
