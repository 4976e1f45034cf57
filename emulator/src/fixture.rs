//! The fixture format: the Azure world the emulator starts with (YAML or JSON).
//!
//! See `emulator/README.md` for the documented shape.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::EmulatorError;

/// The starting state of the emulated Azure world.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fixture {
    #[serde(default)]
    pub subscriptions: Vec<FixtureSubscription>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureSubscription {
    pub id: String,
    #[serde(default)]
    pub resource_groups: Vec<FixtureResourceGroup>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureResourceGroup {
    pub name: String,
    pub location: String,
    #[serde(default)]
    pub network_security_groups: Vec<FixtureNsg>,
    #[serde(default)]
    pub virtual_networks: Vec<FixtureVnet>,
    #[serde(default)]
    pub network_interfaces: Vec<FixtureNic>,
    /// VMs declared explicitly (optional: a VM a NIC names exists anyway). Useful for a VM
    /// without NICs, or to set its size.
    #[serde(default)]
    pub virtual_machines: Vec<FixtureVm>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureVm {
    pub name: String,
    /// Defaults to the resource group's location.
    #[serde(default)]
    pub location: Option<String>,
    /// `hardwareProfile.vmSize`, default `Standard_B2s`.
    #[serde(default)]
    pub vm_size: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureNsg {
    pub name: String,
    /// Defaults to the resource group's location.
    #[serde(default)]
    pub location: Option<String>,
    /// Pre-existing user rules in ARM `SecurityRule` JSON shape (`name` + `properties`).
    #[serde(default)]
    pub security_rules: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureVnet {
    pub name: String,
    #[serde(default)]
    pub subnets: Vec<FixtureSubnet>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureSubnet {
    pub name: String,
    pub address_prefix: String,
    /// Name of an NSG in the same resource group.
    #[serde(default)]
    pub network_security_group: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureNic {
    pub name: String,
    /// The VM it is attached to: a name (a VM in the same resource group,
    /// `.../Microsoft.Compute/virtualMachines/<name>`), or a full VM id in another resource group
    /// (or subscription) of the fixture.
    #[serde(default)]
    pub virtual_machine: Option<String>,
    /// Name of an NSG in the same resource group.
    #[serde(default)]
    pub network_security_group: Option<String>,
    #[serde(default)]
    pub ip_configurations: Vec<FixtureIpConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureIpConfig {
    pub name: String,
    #[serde(rename = "privateIPAddress")]
    pub private_ip_address: String,
    /// `Dynamic` (default) or `Static`.
    #[serde(rename = "privateIPAllocationMethod", default)]
    pub private_ip_allocation_method: Option<String>,
    /// `<vnet>/<subnet>` in the same resource group.
    pub subnet: String,
    /// Defaults to true for the first IP configuration.
    #[serde(default)]
    pub primary: Option<bool>,
}

impl Fixture {
    /// Parses a YAML (or JSON, which is YAML) fixture.
    pub fn from_yaml_str(s: &str) -> Result<Fixture, EmulatorError> {
        let fixture: Fixture = serde_yaml::from_str(s)?;
        fixture.check()?;
        Ok(fixture)
    }

    /// Reads a fixture file (YAML or JSON).
    pub fn from_file(p: &Path) -> Result<Fixture, EmulatorError> {
        let text = std::fs::read_to_string(p).map_err(|source| EmulatorError::Io {
            path: p.display().to_string(),
            source,
        })?;
        Self::from_yaml_str(&text)
    }

    /// Checks cross references (NSG names, subnets) so a broken fixture fails at load time.
    pub fn check(&self) -> Result<(), EmulatorError> {
        for sub in &self.subscriptions {
            for rg in &sub.resource_groups {
                let has_nsg = |name: &str| {
                    rg.network_security_groups
                        .iter()
                        .any(|n| n.name.eq_ignore_ascii_case(name))
                };
                let has_subnet = |path: &str| {
                    let Some((vnet, subnet)) = path.split_once('/') else {
                        return false;
                    };
                    rg.virtual_networks.iter().any(|v| {
                        v.name.eq_ignore_ascii_case(vnet)
                            && v.subnets
                                .iter()
                                .any(|s| s.name.eq_ignore_ascii_case(subnet))
                    })
                };
                for vnet in &rg.virtual_networks {
                    for subnet in &vnet.subnets {
                        if let Some(nsg) = &subnet.network_security_group
                            && !has_nsg(nsg)
                        {
                            return Err(EmulatorError::Fixture(format!(
                                "subnet {}/{} in resource group {} names unknown NSG {nsg}",
                                vnet.name, subnet.name, rg.name
                            )));
                        }
                    }
                }
                let mut vm_names = std::collections::HashSet::new();
                for vm in &rg.virtual_machines {
                    if !vm_names.insert(vm.name.to_ascii_lowercase()) {
                        return Err(EmulatorError::Fixture(format!(
                            "VM {} is declared twice in resource group {}",
                            vm.name, rg.name
                        )));
                    }
                }
                for nic in &rg.network_interfaces {
                    if let Some(vm) = nic
                        .virtual_machine
                        .as_deref()
                        .filter(|v| v.starts_with('/'))
                    {
                        let known = crate::model::parse_vm_id(vm).is_some_and(|(s, r, _)| {
                            self.subscriptions.iter().any(|x| {
                                x.id.eq_ignore_ascii_case(&s)
                                    && x.resource_groups
                                        .iter()
                                        .any(|g| g.name.eq_ignore_ascii_case(&r))
                            })
                        });
                        if !known {
                            return Err(EmulatorError::Fixture(format!(
                                "NIC {} in resource group {} names VM {vm}: not a VM id in a resource group of the fixture",
                                nic.name, rg.name
                            )));
                        }
                    }
                    if let Some(nsg) = &nic.network_security_group
                        && !has_nsg(nsg)
                    {
                        return Err(EmulatorError::Fixture(format!(
                            "NIC {} in resource group {} names unknown NSG {nsg}",
                            nic.name, rg.name
                        )));
                    }
                    for ipc in &nic.ip_configurations {
                        if !has_subnet(&ipc.subnet) {
                            return Err(EmulatorError::Fixture(format!(
                                "NIC {} ipConfiguration {} names unknown subnet {} (expected <vnet>/<subnet>)",
                                nic.name, ipc.name, ipc.subnet
                            )));
                        }
                        if ipc.private_ip_address.parse::<std::net::IpAddr>().is_err() {
                            return Err(EmulatorError::Fixture(format!(
                                "NIC {} ipConfiguration {} has invalid privateIPAddress {}",
                                nic.name, ipc.name, ipc.private_ip_address
                            )));
                        }
                    }
                }
                for nsg in &rg.network_security_groups {
                    for rule in &nsg.security_rules {
                        if rule.get("name").and_then(|n| n.as_str()).is_none() {
                            return Err(EmulatorError::Fixture(format!(
                                "a security rule of NSG {} has no name",
                                nsg.name
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_fixture_parses() {
        let text = include_str!("../fixtures/demo.yaml");
        let f = Fixture::from_yaml_str(text).unwrap();
        assert_eq!(f.subscriptions.len(), 1);
        let rg = &f.subscriptions[0].resource_groups[0];
        assert_eq!(rg.name, "rg-demo");
        assert_eq!(rg.network_interfaces.len(), 2);
    }

    #[test]
    fn unknown_nsg_reference_is_refused() {
        let text = r#"
subscriptions:
  - id: s
    resourceGroups:
      - name: rg
        location: westeurope
        networkInterfaces:
          - name: nic
            networkSecurityGroup: nope
"#;
        let err = Fixture::from_yaml_str(text).unwrap_err();
        assert!(err.to_string().contains("unknown NSG nope"), "{err}");
    }

    #[test]
    fn vm_in_an_unknown_resource_group_is_refused() {
        let text = r#"
subscriptions:
  - id: s
    resourceGroups:
      - name: rg
        location: westeurope
        networkInterfaces:
          - name: nic
            virtualMachine: /subscriptions/s/resourceGroups/nope/providers/Microsoft.Compute/virtualMachines/vm
"#;
        let err = Fixture::from_yaml_str(text).unwrap_err();
        assert!(err.to_string().contains("not a VM id"), "{err}");
    }

    #[test]
    fn unknown_field_is_refused() {
        assert!(Fixture::from_yaml_str("subscription: []").is_err());
    }
}
