//! [`NsgRule`] <-> `azure_mgmt_network` security-rule models.
//!
//! Reading folds Azure's singular fields into the plural lists. Writing uses the singular field
//! for a one-entry list and the plural field otherwise, so what Azure shows stays natural.

use azure_mgmt_network::models::{
    SecurityRule, SecurityRuleAccess, SecurityRuleDirection, SecurityRulePropertiesFormat,
    security_rule_properties_format::Protocol,
};

use super::error::AzureError;
use crate::plan::rule::{Access, Direction, NsgRule, RuleProtocol};

/// The model Portcullis PUTs for `rule`.
pub fn to_model(rule: &NsgRule) -> SecurityRule {
    let protocol = match &rule.protocol {
        RuleProtocol::Tcp => Protocol::Tcp,
        RuleProtocol::Udp => Protocol::Udp,
        RuleProtocol::Any => Protocol::U2a,
        RuleProtocol::Other(s) => Protocol::UnknownValue(s.clone()),
    };
    let access = match rule.access {
        Access::Allow => SecurityRuleAccess::Allow,
        Access::Deny => SecurityRuleAccess::Deny,
    };
    let direction = match rule.direction {
        Direction::Inbound => SecurityRuleDirection::Inbound,
        Direction::Outbound => SecurityRuleDirection::Outbound,
    };
    let mut p =
        SecurityRulePropertiesFormat::new(protocol, access, i32::from(rule.priority), direction);
    p.description = Some(rule.description.clone());
    (p.source_address_prefix, p.source_address_prefixes) = split(&rule.source_address_prefixes);
    (p.source_port_range, p.source_port_ranges) = split(&rule.source_port_ranges);
    (p.destination_address_prefix, p.destination_address_prefixes) =
        split(&rule.destination_address_prefixes);
    (p.destination_port_range, p.destination_port_ranges) = split(&rule.destination_port_ranges);
    let mut model = SecurityRule::new();
    model.name = Some(rule.name.clone());
    model.properties = Some(p);
    model
}

fn split(list: &[String]) -> (Option<String>, Vec<String>) {
    match list {
        [one] => (Some(one.clone()), Vec::new()),
        many => (None, many.to_vec()),
    }
}

fn fold(single: &Option<String>, plural: &[String]) -> Vec<String> {
    let mut out: Vec<String> = plural.to_vec();
    if let Some(s) = single
        && !s.is_empty()
        && !out.iter().any(|x| x == s)
    {
        out.insert(0, s.clone());
    }
    out
}

/// Reads an Azure security rule into the normalised model.
pub fn from_model(model: &SecurityRule) -> Result<NsgRule, AzureError> {
    let name = model.name.clone().unwrap_or_default();
    let p = model.properties.as_ref().ok_or_else(|| {
        AzureError::InvalidResponse(format!("security rule {name:?} has no properties"))
    })?;
    let protocol = match &p.protocol {
        Protocol::Tcp => RuleProtocol::Tcp,
        Protocol::Udp => RuleProtocol::Udp,
        Protocol::U2a => RuleProtocol::Any,
        Protocol::Icmp => RuleProtocol::Other("Icmp".into()),
        Protocol::Esp => RuleProtocol::Other("Esp".into()),
        Protocol::Ah => RuleProtocol::Other("Ah".into()),
        Protocol::UnknownValue(s) => RuleProtocol::from_azure(s),
    };
    let access = match &p.access {
        SecurityRuleAccess::Allow => Access::Allow,
        SecurityRuleAccess::Deny => Access::Deny,
        SecurityRuleAccess::UnknownValue(s) if s.eq_ignore_ascii_case("allow") => Access::Allow,
        SecurityRuleAccess::UnknownValue(s) if s.eq_ignore_ascii_case("deny") => Access::Deny,
        SecurityRuleAccess::UnknownValue(s) => {
            return Err(AzureError::InvalidResponse(format!(
                "security rule {name:?} has unknown access {s:?}"
            )));
        }
    };
    let direction = match &p.direction {
        SecurityRuleDirection::Inbound => Direction::Inbound,
        SecurityRuleDirection::Outbound => Direction::Outbound,
        SecurityRuleDirection::UnknownValue(s) if s.eq_ignore_ascii_case("inbound") => {
            Direction::Inbound
        }
        SecurityRuleDirection::UnknownValue(s) if s.eq_ignore_ascii_case("outbound") => {
            Direction::Outbound
        }
        SecurityRuleDirection::UnknownValue(s) => {
            return Err(AzureError::InvalidResponse(format!(
                "security rule {name:?} has unknown direction {s:?}"
            )));
        }
    };
    let priority = u16::try_from(p.priority).map_err(|_| {
        AzureError::InvalidResponse(format!(
            "security rule {name:?} has out-of-range priority {}",
            p.priority
        ))
    })?;
    Ok(NsgRule {
        name,
        description: p.description.clone().unwrap_or_default(),
        priority,
        direction,
        access,
        protocol,
        source_address_prefixes: fold(&p.source_address_prefix, &p.source_address_prefixes),
        source_port_ranges: fold(&p.source_port_range, &p.source_port_ranges),
        destination_address_prefixes: fold(
            &p.destination_address_prefix,
            &p.destination_address_prefixes,
        ),
        destination_port_ranges: fold(&p.destination_port_range, &p.destination_port_ranges),
        provisioning_failed: matches!(
            &p.provisioning_state,
            Some(azure_mgmt_network::models::ProvisioningState::Failed)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> NsgRule {
        NsgRule {
            name: "portcullis-abc".into(),
            description: "grant ns/g".into(),
            priority: 110,
            direction: Direction::Inbound,
            access: Access::Allow,
            protocol: RuleProtocol::Tcp,
            source_address_prefixes: vec!["203.0.113.7/32".into()],
            source_port_ranges: vec!["*".into()],
            destination_address_prefixes: vec!["10.0.0.4".into(), "10.0.0.5".into()],
            destination_port_ranges: vec!["22".into()],
            provisioning_failed: false,
        }
    }

    #[test]
    fn writes_singular_for_one_and_plural_for_many() {
        let m = to_model(&rule());
        let v = serde_json::to_value(&m).unwrap();
        let p = &v["properties"];
        assert_eq!(p["sourceAddressPrefix"], "203.0.113.7/32");
        assert!(p.get("sourceAddressPrefixes").is_none());
        assert_eq!(p["destinationAddressPrefixes"][1], "10.0.0.5");
        assert!(p.get("destinationAddressPrefix").is_none());
        assert_eq!(p["protocol"], "Tcp");
        assert_eq!(p["access"], "Allow");
        assert_eq!(p["direction"], "Inbound");
        assert_eq!(p["priority"], 110);
        assert_eq!(p["destinationPortRange"], "22");
    }

    #[test]
    fn round_trips() {
        for proto in [
            RuleProtocol::Tcp,
            RuleProtocol::Udp,
            RuleProtocol::Any,
            RuleProtocol::Other("Icmp".into()),
        ] {
            let mut r = rule();
            r.protocol = proto;
            let json = serde_json::to_vec(&to_model(&r)).unwrap();
            let back: SecurityRule = serde_json::from_slice(&json).unwrap();
            let back = from_model(&back).unwrap();
            assert!(back.same_content(&r), "{back:?} != {r:?}");
            assert_eq!(back, r);
        }
    }

    #[test]
    fn reads_azure_json_folding_singular_fields() {
        let v = serde_json::json!({
            "name": "user-rule",
            "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/n/securityRules/user-rule",
            "properties": {
                "protocol": "*", "access": "Deny", "direction": "Outbound", "priority": 4096,
                "sourceAddressPrefix": "*", "sourcePortRange": "*",
                "destinationAddressPrefixes": ["10.0.0.0/24"], "destinationPortRanges": ["80", "443"],
                "provisioningState": "Succeeded"
            }
        });
        let m: SecurityRule = serde_json::from_value(v).unwrap();
        let r = from_model(&m).unwrap();
        assert_eq!(r.protocol, RuleProtocol::Any);
        assert_eq!(r.access, Access::Deny);
        assert_eq!(r.direction, Direction::Outbound);
        assert_eq!(r.description, "");
        assert_eq!(r.source_address_prefixes, vec!["*"]);
        assert_eq!(r.destination_port_ranges, vec!["80", "443"]);
    }
}
