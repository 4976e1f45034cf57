//! The security-rule model shared by the planner and the Azure edge. Pure data, no I/O.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Access {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// Azure's protocol values (`Tcp`, `Udp`, `Icmp`, `Esp`, `Ah`, `*`). Portcullis writes only
/// `Tcp`, `Udp` and `*`, but reads whatever others put in an NSG.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RuleProtocol {
    Tcp,
    Udp,
    Any,
    Other(String),
}

impl RuleProtocol {
    pub fn as_azure(&self) -> &str {
        match self {
            RuleProtocol::Tcp => "Tcp",
            RuleProtocol::Udp => "Udp",
            RuleProtocol::Any => "*",
            RuleProtocol::Other(s) => s,
        }
    }

    pub fn from_azure(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => RuleProtocol::Tcp,
            "udp" => RuleProtocol::Udp,
            "*" => RuleProtocol::Any,
            _ => RuleProtocol::Other(s.to_string()),
        }
    }
}

/// One NSG security rule, normalised: Azure's singular and plural prefix/port fields are folded
/// into the plural lists here (a singular `sourceAddressPrefix: "x"` reads as `["x"]`), so two rules
/// that Azure treats as equal compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NsgRule {
    pub name: String,
    pub description: String,
    pub priority: u16,
    pub direction: Direction,
    pub access: Access,
    pub protocol: RuleProtocol,
    pub source_address_prefixes: Vec<String>,
    pub source_port_ranges: Vec<String>,
    pub destination_address_prefixes: Vec<String>,
    pub destination_port_ranges: Vec<String>,
    /// Azure reports the rule's last write as `Failed`: whatever it holds is not to be trusted,
    /// so a rule of ours in that state is written again.
    pub provisioning_failed: bool,
}

impl NsgRule {
    /// Compares what Azure enforces and shows (everything), ignoring list order. A rule whose
    /// provisioning failed matches nothing.
    pub fn same_content(&self, other: &NsgRule) -> bool {
        fn sorted(v: &[String]) -> Vec<String> {
            let mut v = v.to_vec();
            v.sort();
            v
        }
        !self.provisioning_failed
            && !other.provisioning_failed
            && self.name.eq_ignore_ascii_case(&other.name)
            && self.description == other.description
            && self.priority == other.priority
            && self.direction == other.direction
            && self.access == other.access
            && self.protocol == other.protocol
            && sorted(&self.source_address_prefixes) == sorted(&other.source_address_prefixes)
            && sorted(&self.source_port_ranges) == sorted(&other.source_port_ranges)
            && sorted(&self.destination_address_prefixes)
                == sorted(&other.destination_address_prefixes)
            && sorted(&self.destination_port_ranges) == sorted(&other.destination_port_ranges)
    }
}
