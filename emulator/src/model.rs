//! The in-memory Azure world (subscriptions, resource groups, NSGs, rules, NICs, subnets, VMs)
//! and its rendering to ARM JSON as the 2024-03-01 network API (and, for VMs, the 2024-07-01
//! compute API) returns it.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

/// `properties` of a security rule as given by a client (every field optional, so requests
/// can be parsed leniently and refused with a precise error by `validate`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleProps {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_address_prefix: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub source_port_ranges: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub destination_port_ranges: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub source_address_prefixes: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub destination_address_prefixes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// Properties the emulator does not model, kept and echoed as given (as ARM keeps the
    /// properties it knows and the emulator does not).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

impl RuleProps {
    /// The `properties` object as Azure returns it: singular fields when given, the four
    /// plural arrays always (empty when the singular form is used), plus `provisioningState`.
    pub fn to_json(&self, provisioning_state: &str) -> Value {
        let mut m = self.extra.clone();
        m.insert("provisioningState".into(), json!(provisioning_state));
        let mut put_str = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        };
        put_str("description", &self.description);
        put_str("protocol", &self.protocol);
        put_str("sourcePortRange", &self.source_port_range);
        put_str("destinationPortRange", &self.destination_port_range);
        put_str("sourceAddressPrefix", &self.source_address_prefix);
        put_str("destinationAddressPrefix", &self.destination_address_prefix);
        put_str("access", &self.access);
        if let Some(p) = self.priority {
            m.insert("priority".into(), json!(p));
        }
        if let Some(d) = &self.direction {
            m.insert("direction".into(), json!(d));
        }
        m.insert("sourcePortRanges".into(), json!(self.source_port_ranges));
        m.insert(
            "destinationPortRanges".into(),
            json!(self.destination_port_ranges),
        );
        m.insert(
            "sourceAddressPrefixes".into(),
            json!(self.source_address_prefixes),
        );
        m.insert(
            "destinationAddressPrefixes".into(),
            json!(self.destination_address_prefixes),
        );
        Value::Object(m)
    }
}

pub const SUCCEEDED: &str = "Succeeded";
pub const UPDATING: &str = "Updating";
pub const DELETING: &str = "Deleting";

pub fn new_etag() -> String {
    format!("W/\"{}\"", uuid::Uuid::new_v4())
}

pub fn new_guid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct World {
    pub subscriptions: Vec<Subscription>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub resource_groups: Vec<ResourceGroup>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceGroup {
    pub name: String,
    pub location: String,
    pub nsgs: Vec<Nsg>,
    pub vnets: Vec<Vnet>,
    pub nics: Vec<Nic>,
    /// Absent from state files written before VMs were modelled: [`World::ensure_vms`] derives
    /// them from the NICs then.
    #[serde(default)]
    pub vms: Vec<Vm>,
}

/// A virtual machine. Its NICs are not stored here: they are the NICs (anywhere in the world)
/// whose `virtual_machine` names it, so the NIC -> VM link has one source of truth.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub location: String,
    /// `properties.vmId`.
    pub vm_id: String,
    pub vm_size: String,
    /// RFC 3339, `properties.timeCreated`.
    pub time_created: String,
    /// Compute etags are quoted counters (`"1"`); the emulator has no VM writes.
    pub etag: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Nsg {
    pub name: String,
    pub location: String,
    pub resource_guid: String,
    pub etag: String,
    pub provisioning_state: String,
    #[serde(default)]
    pub tags: Option<Value>,
    /// `properties.flushConnection`.
    #[serde(default)]
    pub flush_connection: bool,
    /// `properties` the emulator does not model, kept from the last PUT and echoed back.
    #[serde(default)]
    pub extra_properties: serde_json::Map<String, Value>,
    pub rules: Vec<Rule>,
    /// The write in flight on this NSG: operation id and when it completes.
    #[serde(skip)]
    pub pending: Option<(String, std::time::Instant)>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub etag: String,
    pub provisioning_state: String,
    pub props: RuleProps,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Vnet {
    pub name: String,
    pub etag: String,
    pub subnets: Vec<Subnet>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Subnet {
    pub name: String,
    pub etag: String,
    pub address_prefix: String,
    pub nsg: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub location: String,
    pub etag: String,
    pub resource_guid: String,
    pub mac_address: String,
    /// The VM it is attached to: a name (a VM in the NIC's resource group) or a full VM id (a VM
    /// in another resource group or subscription).
    pub virtual_machine: Option<String>,
    pub nsg: Option<String>,
    pub ip_configurations: Vec<IpConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    pub name: String,
    pub etag: String,
    pub private_ip_address: String,
    pub allocation_method: String,
    pub vnet: String,
    pub subnet: String,
    pub primary: bool,
}

pub fn find<'a, T>(items: &'a [T], name: &str, key: impl Fn(&T) -> &str) -> Option<&'a T> {
    items.iter().find(|i| key(i).eq_ignore_ascii_case(name))
}

pub fn find_mut<'a, T>(
    items: &'a mut [T],
    name: &str,
    key: impl Fn(&T) -> &str,
) -> Option<&'a mut T> {
    items.iter_mut().find(|i| key(i).eq_ignore_ascii_case(name))
}

impl World {
    pub fn sub(&self, id: &str) -> Option<&Subscription> {
        find(&self.subscriptions, id, |s| &s.id)
    }
    pub fn sub_mut(&mut self, id: &str) -> Option<&mut Subscription> {
        find_mut(&mut self.subscriptions, id, |s| &s.id)
    }
    pub fn nsg_mut(&mut self, sub: &str, rg: &str, nsg: &str) -> Option<&mut Nsg> {
        let rg = self.sub_mut(sub)?.rg_mut(rg)?;
        find_mut(&mut rg.nsgs, nsg, |n| &n.name)
    }
}

impl Subscription {
    pub fn rg(&self, name: &str) -> Option<&ResourceGroup> {
        find(&self.resource_groups, name, |r| &r.name)
    }
    pub fn rg_mut(&mut self, name: &str) -> Option<&mut ResourceGroup> {
        find_mut(&mut self.resource_groups, name, |r| &r.name)
    }
}

impl ResourceGroup {
    pub fn nsg(&self, name: &str) -> Option<&Nsg> {
        find(&self.nsgs, name, |n| &n.name)
    }
    pub fn nic(&self, name: &str) -> Option<&Nic> {
        find(&self.nics, name, |n| &n.name)
    }
    pub fn vnet(&self, name: &str) -> Option<&Vnet> {
        find(&self.vnets, name, |n| &n.name)
    }
    pub fn vm(&self, name: &str) -> Option<&Vm> {
        find(&self.vms, name, |n| &n.name)
    }
}

impl World {
    /// The NICs attached to the VM `vm_id` (compared case-insensitively), as (NIC id, NIC), in
    /// world order.
    pub fn nics_of_vm(&self, vm_id: &str) -> Vec<(String, &Nic)> {
        let mut out = Vec::new();
        for s in &self.subscriptions {
            for r in &s.resource_groups {
                for n in &r.nics {
                    if nic_vm_id(s, r, n).is_some_and(|v| v.eq_ignore_ascii_case(vm_id)) {
                        out.push((nic_id(s, r, &n.name), n));
                    }
                }
            }
        }
        out
    }

    /// The ids of the NICs attached to each VM, by lower-cased VM id, in world order: one pass
    /// over the NICs, for answering a list of VMs without a scan of every NIC per VM.
    pub fn nic_ids_by_vm(&self) -> std::collections::HashMap<String, Vec<String>> {
        let mut out: std::collections::HashMap<String, Vec<String>> =
            std::collections::HashMap::new();
        for s in &self.subscriptions {
            for r in &s.resource_groups {
                for n in &r.nics {
                    if let Some(vm) = nic_vm_id(s, r, n) {
                        out.entry(vm.to_ascii_lowercase())
                            .or_default()
                            .push(nic_id(s, r, &n.name));
                    }
                }
            }
        }
        out
    }

    /// Every VM a NIC names exists (in its resource group, when that resource group exists; a
    /// reference to an unknown resource group stays dangling, and its VM is not found).
    pub fn ensure_vms(&mut self) {
        let mut wanted = Vec::new();
        for s in &self.subscriptions {
            for r in &s.resource_groups {
                for n in &r.nics {
                    if let Some(id) = nic_vm_id(s, r, n) {
                        wanted.push(id);
                    }
                }
            }
        }
        for id in wanted {
            let Some((sub, rg, name)) = parse_vm_id(&id) else {
                continue;
            };
            let Some(r) = self.sub_mut(&sub).and_then(|s| s.rg_mut(&rg)) else {
                continue;
            };
            if r.vm(&name).is_none() {
                let location = r.location.clone();
                r.vms.push(Vm::new(&name, &location, None));
            }
        }
    }
}

impl Vm {
    pub fn new(name: &str, location: &str, vm_size: Option<&str>) -> Vm {
        Vm {
            name: name.to_string(),
            location: location.to_string(),
            vm_id: new_guid(),
            vm_size: vm_size.unwrap_or("Standard_B2s").to_string(),
            time_created: jiff::Timestamp::now().to_string(),
            etag: "\"1\"".to_string(),
        }
    }
}

impl Nsg {
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        find(&self.rules, name, |r| &r.name)
    }
    pub fn rule_mut(&mut self, name: &str) -> Option<&mut Rule> {
        find_mut(&mut self.rules, name, |r| &r.name)
    }
}

/// Resource id helpers (fixture casing preserved).
pub fn rg_id(sub: &Subscription, rg: &ResourceGroup) -> String {
    format!("/subscriptions/{}/resourceGroups/{}", sub.id, rg.name)
}

pub fn nsg_id(sub: &Subscription, rg: &ResourceGroup, nsg_name: &str) -> String {
    format!(
        "{}/providers/Microsoft.Network/networkSecurityGroups/{nsg_name}",
        rg_id(sub, rg)
    )
}

pub fn rule_json(nsg_id: &str, rule: &Rule) -> Value {
    json!({
        "name": rule.name,
        "id": format!("{nsg_id}/securityRules/{}", rule.name),
        "etag": rule.etag,
        "type": "Microsoft.Network/networkSecurityGroups/securityRules",
        "properties": rule.props.to_json(&rule.provisioning_state),
    })
}

/// The six default rules every NSG carries, as `(name, description, source, destination, access, priority, direction)`.
const DEFAULT_RULES: [(&str, &str, &str, &str, &str, i64, &str); 6] = [
    (
        "AllowVnetInBound",
        "Allow inbound traffic from all VMs in VNET",
        "VirtualNetwork",
        "VirtualNetwork",
        "Allow",
        65000,
        "Inbound",
    ),
    (
        "AllowAzureLoadBalancerInBound",
        "Allow inbound traffic from azure load balancer",
        "AzureLoadBalancer",
        "*",
        "Allow",
        65001,
        "Inbound",
    ),
    (
        "DenyAllInBound",
        "Deny all inbound traffic",
        "*",
        "*",
        "Deny",
        65500,
        "Inbound",
    ),
    (
        "AllowVnetOutBound",
        "Allow outbound traffic from all VMs to all VMs in VNET",
        "VirtualNetwork",
        "VirtualNetwork",
        "Allow",
        65000,
        "Outbound",
    ),
    (
        "AllowInternetOutBound",
        "Allow outbound traffic from all VMs to Internet",
        "*",
        "Internet",
        "Allow",
        65001,
        "Outbound",
    ),
    (
        "DenyAllOutBound",
        "Deny all outbound traffic",
        "*",
        "*",
        "Deny",
        65500,
        "Outbound",
    ),
];

/// The default security rules of an NSG, as ARM JSON.
pub fn default_rules_json(nsg_id: &str, nsg_etag: &str) -> Vec<Value> {
    DEFAULT_RULES
        .iter()
        .map(
            |(name, description, src, dst, access, priority, direction)| {
                let props = RuleProps {
                    description: Some((*description).to_string()),
                    protocol: Some("*".into()),
                    source_port_range: Some("*".into()),
                    destination_port_range: Some("*".into()),
                    source_address_prefix: Some((*src).to_string()),
                    destination_address_prefix: Some((*dst).to_string()),
                    access: Some((*access).to_string()),
                    priority: Some(*priority),
                    direction: Some((*direction).to_string()),
                    ..RuleProps::default()
                };
                json!({
                    "name": name,
                    "id": format!("{nsg_id}/defaultSecurityRules/{name}"),
                    "etag": nsg_etag,
                    "type": "Microsoft.Network/networkSecurityGroups/defaultSecurityRules",
                    "properties": props.to_json(SUCCEEDED),
                })
            },
        )
        .collect()
}

pub fn nsg_json(sub: &Subscription, rg: &ResourceGroup, nsg: &Nsg) -> Value {
    let id = nsg_id(sub, rg, &nsg.name);
    let rules: Vec<Value> = nsg.rules.iter().map(|r| rule_json(&id, r)).collect();
    let mut props = Value::Object(nsg.extra_properties.clone());
    props["provisioningState"] = json!(nsg.provisioning_state);
    props["resourceGuid"] = json!(nsg.resource_guid);
    props["flushConnection"] = json!(nsg.flush_connection);
    props["securityRules"] = json!(rules);
    props["defaultSecurityRules"] = json!(default_rules_json(&id, &nsg.etag));
    let nics: Vec<Value> = rg
        .nics
        .iter()
        .filter(|n| {
            n.nsg
                .as_deref()
                .is_some_and(|x| x.eq_ignore_ascii_case(&nsg.name))
        })
        .map(|n| json!({ "id": nic_id(sub, rg, &n.name) }))
        .collect();
    if !nics.is_empty() {
        props["networkInterfaces"] = json!(nics);
    }
    let subnets: Vec<Value> = rg
        .vnets
        .iter()
        .flat_map(|v| v.subnets.iter().map(move |s| (v, s)))
        .filter(|(_, s)| {
            s.nsg
                .as_deref()
                .is_some_and(|x| x.eq_ignore_ascii_case(&nsg.name))
        })
        .map(|(v, s)| json!({ "id": subnet_id(sub, rg, &v.name, &s.name) }))
        .collect();
    if !subnets.is_empty() {
        props["subnets"] = json!(subnets);
    }
    let mut out = json!({
        "name": nsg.name,
        "id": id,
        "etag": nsg.etag,
        "type": "Microsoft.Network/networkSecurityGroups",
        "location": nsg.location,
        "properties": props,
    });
    if let Some(tags) = &nsg.tags {
        out["tags"] = tags.clone();
    }
    out
}

pub fn nic_id(sub: &Subscription, rg: &ResourceGroup, name: &str) -> String {
    format!(
        "{}/providers/Microsoft.Network/networkInterfaces/{name}",
        rg_id(sub, rg)
    )
}

pub fn subnet_id(sub: &Subscription, rg: &ResourceGroup, vnet: &str, subnet: &str) -> String {
    format!(
        "{}/providers/Microsoft.Network/virtualNetworks/{vnet}/subnets/{subnet}",
        rg_id(sub, rg)
    )
}

pub fn vm_id(sub: &Subscription, rg: &ResourceGroup, vm: &str) -> String {
    format!(
        "{}/providers/Microsoft.Compute/virtualMachines/{vm}",
        rg_id(sub, rg)
    )
}

/// The full id of the VM a NIC is attached to, if any.
pub fn nic_vm_id(sub: &Subscription, rg: &ResourceGroup, nic: &Nic) -> Option<String> {
    let vm = nic.virtual_machine.as_deref()?;
    Some(if vm.starts_with('/') {
        vm.to_string()
    } else {
        vm_id(sub, rg, vm)
    })
}

/// A parsed `.../Microsoft.Compute/virtualMachines/{vm}` id: (subscription, resource group, vm).
pub fn parse_vm_id(id: &str) -> Option<(String, String, String)> {
    let segs: Vec<&str> = id.trim_matches('/').split('/').collect();
    let lit = |i: usize, s: &str| segs.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
    (segs.len() == 8
        && lit(0, "subscriptions")
        && lit(2, "resourceGroups")
        && lit(4, "providers")
        && lit(5, "Microsoft.Compute")
        && lit(6, "virtualMachines")
        && segs.iter().all(|x| !x.is_empty()))
    .then(|| {
        (
            segs[1].to_string(),
            segs[3].to_string(),
            segs[7].to_string(),
        )
    })
}

/// A VM as `GET .../virtualMachines/{vm}?api-version=2024-07-01` returns it (the model view):
/// the fields of the `VirtualMachine_Get` example that the emulator models, and
/// `networkProfile.networkInterfaces` listing every NIC attached to it, wherever it lives
/// (`properties.primary` on each when there are several, as Azure requires then).
pub fn vm_json(world: &World, sub: &Subscription, rg: &ResourceGroup, vm: &Vm) -> Value {
    let id = vm_id(sub, rg, &vm.name);
    let nics: Vec<String> = world
        .nics_of_vm(&id)
        .into_iter()
        .map(|(nic_id, _)| nic_id)
        .collect();
    vm_json_with_nics(sub, rg, vm, &nics)
}

/// [`vm_json`] with the ids of the VM's NICs already known (see [`World::nic_ids_by_vm`]).
pub fn vm_json_with_nics(
    sub: &Subscription,
    rg: &ResourceGroup,
    vm: &Vm,
    nics: &[String],
) -> Value {
    let id = vm_id(sub, rg, &vm.name);
    let several = nics.len() > 1;
    let refs: Vec<Value> = nics
        .iter()
        .enumerate()
        .map(|(i, nic_id)| {
            if several {
                json!({ "id": nic_id, "properties": { "primary": i == 0 } })
            } else {
                json!({ "id": nic_id })
            }
        })
        .collect();
    json!({
        "name": vm.name,
        "id": id,
        "type": "Microsoft.Compute/virtualMachines",
        "location": vm.location,
        "etag": vm.etag,
        "properties": {
            "vmId": vm.vm_id,
            "hardwareProfile": { "vmSize": vm.vm_size },
            "networkProfile": { "networkInterfaces": refs },
            "provisioningState": SUCCEEDED,
            "timeCreated": vm.time_created,
        },
    })
}

fn canonical_name<'a>(rg: &'a ResourceGroup, nsg: &'a str) -> &'a str {
    rg.nsg(nsg).map_or(nsg, |n| n.name.as_str())
}

pub fn nic_json(sub: &Subscription, rg: &ResourceGroup, nic: &Nic) -> Value {
    let id = nic_id(sub, rg, &nic.name);
    let ipcs: Vec<Value> = nic
        .ip_configurations
        .iter()
        .map(|c| {
            let version = if c.private_ip_address.contains(':') {
                "IPv6"
            } else {
                "IPv4"
            };
            json!({
                "name": c.name,
                "id": format!("{id}/ipConfigurations/{}", c.name),
                "etag": c.etag,
                "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
                "properties": {
                    "provisioningState": SUCCEEDED,
                    "privateIPAddress": c.private_ip_address,
                    "privateIPAllocationMethod": c.allocation_method,
                    "subnet": { "id": subnet_id(sub, rg, &c.vnet, &c.subnet) },
                    "primary": c.primary,
                    "privateIPAddressVersion": version,
                }
            })
        })
        .collect();
    let mut props = json!({
        "provisioningState": SUCCEEDED,
        "resourceGuid": nic.resource_guid,
        "ipConfigurations": ipcs,
        "dnsSettings": { "dnsServers": [], "appliedDnsServers": [] },
        "macAddress": nic.mac_address,
        "enableAcceleratedNetworking": false,
        "enableIPForwarding": false,
        "disableTcpStateTracking": false,
        "primary": true,
        "vnetEncryptionSupported": false,
        "nicType": "Standard",
    });
    if let Some(nsg) = &nic.nsg {
        props["networkSecurityGroup"] = json!({ "id": nsg_id(sub, rg, canonical_name(rg, nsg)) });
    }
    if let Some(vm) = nic_vm_id(sub, rg, nic) {
        props["virtualMachine"] = json!({ "id": vm });
    }
    json!({
        "name": nic.name,
        "id": id,
        "etag": nic.etag,
        "type": "Microsoft.Network/networkInterfaces",
        "location": nic.location,
        "properties": props,
    })
}

pub fn subnet_json(sub: &Subscription, rg: &ResourceGroup, vnet: &Vnet, subnet: &Subnet) -> Value {
    let ipcs: Vec<Value> = rg
        .nics
        .iter()
        .flat_map(|n| n.ip_configurations.iter().map(move |c| (n, c)))
        .filter(|(_, c)| {
            c.vnet.eq_ignore_ascii_case(&vnet.name) && c.subnet.eq_ignore_ascii_case(&subnet.name)
        })
        .map(|(n, c)| json!({ "id": format!("{}/ipConfigurations/{}", nic_id(sub, rg, &n.name), c.name) }))
        .collect();
    let mut props = json!({
        "provisioningState": SUCCEEDED,
        "addressPrefix": subnet.address_prefix,
        "ipConfigurations": ipcs,
        "privateEndpointNetworkPolicies": "Disabled",
        "privateLinkServiceNetworkPolicies": "Enabled",
    });
    if let Some(nsg) = &subnet.nsg {
        props["networkSecurityGroup"] = json!({ "id": nsg_id(sub, rg, canonical_name(rg, nsg)) });
    }
    json!({
        "name": subnet.name,
        "id": subnet_id(sub, rg, &vnet.name, &subnet.name),
        "etag": subnet.etag,
        "type": "Microsoft.Network/virtualNetworks/subnets",
        "properties": props,
    })
}

/// A parsed `.../networkSecurityGroups/{nsg}/securityRules/{rule}` id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleId {
    pub subscription: String,
    pub resource_group: String,
    pub nsg: String,
    pub rule: String,
}

/// Parses a security rule resource id (case-insensitive literals).
pub fn parse_rule_id(id: &str) -> Option<RuleId> {
    let segs: Vec<&str> = id.trim_matches('/').split('/').collect();
    let lit = |i: usize, s: &str| segs.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
    if segs.len() == 10
        && lit(0, "subscriptions")
        && lit(2, "resourceGroups")
        && lit(4, "providers")
        && lit(5, "Microsoft.Network")
        && lit(6, "networkSecurityGroups")
        && lit(8, "securityRules")
    {
        Some(RuleId {
            subscription: segs[1].to_string(),
            resource_group: segs[3].to_string(),
            nsg: segs[7].to_string(),
            rule: segs[9].to_string(),
        })
    } else {
        None
    }
}

/// A parsed `.../networkSecurityGroups/{nsg}` id: (subscription, resource group, nsg).
pub fn parse_nsg_id(id: &str) -> Option<(String, String, String)> {
    let segs: Vec<&str> = id.trim_matches('/').split('/').collect();
    let lit = |i: usize, s: &str| segs.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
    if segs.len() == 8
        && lit(0, "subscriptions")
        && lit(2, "resourceGroups")
        && lit(4, "providers")
        && lit(5, "Microsoft.Network")
        && lit(6, "networkSecurityGroups")
    {
        Some((
            segs[1].to_string(),
            segs[3].to_string(),
            segs[7].to_string(),
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn singular_rule_echoes_empty_plurals() {
        let p = RuleProps {
            protocol: Some("Tcp".into()),
            destination_port_range: Some("22".into()),
            ..RuleProps::default()
        };
        let j = p.to_json(SUCCEEDED);
        assert_eq!(j["destinationPortRange"], "22");
        assert_eq!(j["destinationPortRanges"], json!([]));
        assert!(j.get("sourceAddressPrefix").is_none());
    }

    #[test]
    fn rule_ids_parse_case_insensitively() {
        let id = "/subscriptions/S/resourcegroups/RG/providers/microsoft.network/networksecuritygroups/N/securityrules/R";
        let r = parse_rule_id(id).unwrap();
        assert_eq!((r.subscription.as_str(), r.rule.as_str()), ("S", "R"));
        assert!(parse_rule_id("/subscriptions/S/resourceGroups/RG").is_none());
        assert_eq!(
            parse_nsg_id(
                "/subscriptions/S/resourceGroups/RG/providers/Microsoft.Network/networkSecurityGroups/N"
            ),
            Some(("S".into(), "RG".into(), "N".into()))
        );
    }

    #[test]
    fn six_default_rules() {
        let d = default_rules_json("/x", "e");
        assert_eq!(d.len(), 6);
        assert_eq!(d[2]["name"], "DenyAllInBound");
        assert_eq!(d[2]["properties"]["priority"], 65500);
    }
}
