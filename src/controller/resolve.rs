//! VM resolution from shared list reads, cached for one resync period and shared by every
//! policy. A resolution round reads, once per period, the VM list and the NIC list of each
//! resource group involved and the subnet list of each virtual network involved, instead of a
//! GET of every VM, NIC and subnet: a policy over 1,000 VMs in one resource group costs a few
//! paged lists per period, not 3,000 GETs. A VM the lists cannot resolve (not listed, a NIC or
//! subnet missing from its list, an id that does not parse) is read alone as before
//! ([`NetworkApi::resolve_vm`]), so a missing VM is still `NotFound` and a NIC its VM names but
//! ARM lacks is still an error.
//!
//! A policy reconcile that finds an entry stale reads Azure again, and a policy requeues
//! itself for when its entries go stale, so a changed private IP or NSG (deallocate and
//! restart, a NIC moved) reaches its rules at most one resync period after the change, plus
//! one sync: a VM's entry goes stale with the oldest list it was built from.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::azure::{AzureError, NetworkApi, NicView, ResourceId, VmTargets};
use crate::locks::lock;

/// A value read from Azure, and the instant it goes stale.
struct Timed<T> {
    value: T,
    fresh_until: Instant,
}

/// One key's slot: held across a read of Azure, so that policies asking for the same stale
/// VM or list at once (they are requeued for the same instant) wait for one read instead of
/// each making their own.
type Slot<T> = Arc<tokio::sync::Mutex<Option<Timed<T>>>>;

/// Slots by lower-cased key. Only successes are kept: a failed read is tried again by the
/// next asker.
struct Slots<T> {
    inner: Mutex<SlotMap<T>>,
}

struct SlotMap<T> {
    slots: HashMap<String, Slot<T>>,
    /// Prune when the map grows past this (twice its size after the last prune), so a map of
    /// 1,000 live VMs is not scanned on every ask.
    prune_above: usize,
}

impl<T> Slots<T> {
    fn new() -> Self {
        Slots {
            inner: Mutex::new(SlotMap {
                slots: HashMap::new(),
                prune_above: 64,
            }),
        }
    }

    fn get(&self, key: &str, now: Instant, ttl: Duration) -> Slot<T> {
        // Plain data: a panic elsewhere while holding the lock leaves it usable.
        let mut map = lock(&self.inner);
        if map.slots.len() > map.prune_above {
            // Forget keys nobody has asked about for a whole period (and nobody is reading).
            map.slots.retain(|_, slot| match slot.try_lock() {
                Ok(entry) => entry.as_ref().is_some_and(|e| e.fresh_until + ttl > now),
                Err(_) => true,
            });
            map.prune_above = (map.slots.len() * 2).max(64);
        }
        map.slots.entry(key.to_string()).or_default().clone()
    }
}

/// VM ids (lower-cased) to the ids of the NICs they list.
type VmList = HashMap<String, Vec<String>>;
/// NIC ids (lower-cased) to the NICs.
type NicList = HashMap<String, NicView>;
/// Subnet ids (lower-cased) to their NSG.
type SubnetList = HashMap<String, Option<String>>;

/// Resolved VMs, and the lists they were resolved from, for one period each.
pub struct Resolutions {
    ttl: Duration,
    /// By VM id.
    vms: Slots<VmTargets>,
    /// By `subscription/resourceGroup`.
    vm_lists: Slots<Arc<VmList>>,
    /// By `subscription/resourceGroup`.
    nic_lists: Slots<Arc<NicList>>,
    /// By `subscription/resourceGroup/virtualNetwork`.
    subnet_lists: Slots<Arc<SubnetList>>,
}

/// The cache key of an ARM id: ids are case-insensitive.
fn key_of(id: &str) -> String {
    id.trim().trim_end_matches('/').to_ascii_lowercase()
}

impl Resolutions {
    /// `ttl`: how long a resolution is used before Azure is read again (the resync period).
    pub fn new(ttl: Duration) -> Self {
        Resolutions {
            ttl,
            vms: Slots::new(),
            vm_lists: Slots::new(),
            nic_lists: Slots::new(),
            subnet_lists: Slots::new(),
        }
    }

    /// The VM's targets (`vm_id` as given) and the instant they go stale: from the cache while
    /// fresh, else from Azure.
    pub async fn resolve(
        &self,
        azure: &dyn NetworkApi,
        vm_id: &str,
    ) -> Result<(VmTargets, Instant), AzureError> {
        self.resolve_at(azure, vm_id, Instant::now()).await
    }

    async fn resolve_at(
        &self,
        azure: &dyn NetworkApi,
        vm_id: &str,
        now: Instant,
    ) -> Result<(VmTargets, Instant), AzureError> {
        let key = key_of(vm_id);
        let slot = self.vms.get(&key, now, self.ttl);
        let mut entry = slot.lock().await;
        if let Some(e) = entry.as_ref().filter(|e| e.fresh_until > now) {
            let targets = VmTargets {
                vm_id: vm_id.to_string(),
                ..e.value.clone()
            };
            return Ok((targets, e.fresh_until));
        }
        let read = match self.resolve_from_lists(azure, vm_id, &key, now).await {
            Ok(Some(found)) => Ok(found),
            // Counted from before the read: what it saw is at most `ttl` old when dropped.
            Ok(None) => azure
                .resolve_vm(vm_id)
                .await
                .map(|targets| (targets, now + self.ttl)),
            Err(e) => Err(e),
        };
        match read {
            Ok((targets, fresh_until)) => {
                *entry = Some(Timed {
                    value: targets.clone(),
                    fresh_until,
                });
                Ok((targets, fresh_until))
            }
            Err(e) => {
                *entry = None;
                Err(e)
            }
        }
    }

    /// The VM resolved from the lists of its resource group (and of the resource groups and
    /// virtual networks its NICs name), with the instant the oldest of them goes stale; `None`
    /// when the lists do not resolve it, and it must be read alone.
    async fn resolve_from_lists(
        &self,
        azure: &dyn NetworkApi,
        vm_id: &str,
        key: &str,
        now: Instant,
    ) -> Result<Option<(VmTargets, Instant)>, AzureError> {
        let Ok(vm) = ResourceId::parse_typed(vm_id, "Microsoft.Compute", &["virtualMachines"])
        else {
            return Ok(None);
        };
        let (sub, rg) = (vm.subscription.as_str(), vm.resource_group.as_str());
        let listed = self
            .listing(&self.vm_lists, &format!("{sub}/{rg}"), now, || async {
                let vms = azure.list_vms(sub, rg).await?;
                Ok(vms
                    .into_iter()
                    .map(|v| (key_of(&v.vm_id), v.nic_ids))
                    .collect::<VmList>())
            })
            .await?;
        let Some((vms, mut fresh_until)) = listed else {
            return Ok(None);
        };
        // A VM without NICs is `NotFound`, as `resolve_vm` says.
        let Some(mut nic_ids) = vms.get(key).filter(|n| !n.is_empty()).cloned() else {
            return Ok(None);
        };
        nic_ids.sort_by_key(|id| id.to_ascii_lowercase());
        nic_ids.dedup_by(|a, b| a.eq_ignore_ascii_case(b));

        let mut nics = Vec::with_capacity(nic_ids.len());
        for nic_id in &nic_ids {
            let Ok(nic) =
                ResourceId::parse_typed(nic_id, "Microsoft.Network", &["networkInterfaces"])
            else {
                return Ok(None);
            };
            let (sub, rg) = (nic.subscription.as_str(), nic.resource_group.as_str());
            let listed = self
                .listing(&self.nic_lists, &format!("{sub}/{rg}"), now, || async {
                    let nics = azure.list_nics(sub, rg).await?;
                    Ok(nics
                        .into_iter()
                        .map(|n| (key_of(&n.id), n))
                        .collect::<NicList>())
                })
                .await?;
            let Some((listing, until)) = listed else {
                return Ok(None);
            };
            fresh_until = fresh_until.min(until);
            let Some(found) = listing.get(&key_of(nic_id)) else {
                return Ok(None);
            };
            nics.push(found.clone());
        }

        let mut subnet_nsgs = SubnetList::new();
        for subnet_id in nics
            .iter()
            .flat_map(|n| &n.ip_configurations)
            .filter_map(|c| c.subnet_id.as_deref())
        {
            let subnet_key = key_of(subnet_id);
            if subnet_nsgs.contains_key(&subnet_key) {
                continue;
            }
            let Ok(subnet) = ResourceId::parse_typed(
                subnet_id,
                "Microsoft.Network",
                &["virtualNetworks", "subnets"],
            ) else {
                return Ok(None);
            };
            let (sub, rg) = (subnet.subscription.as_str(), subnet.resource_group.as_str());
            let vnet = subnet.name_at(0).unwrap_or_default();
            let listed = self
                .listing(
                    &self.subnet_lists,
                    &format!("{sub}/{rg}/{vnet}"),
                    now,
                    || async {
                        let subnets = azure.list_subnets(sub, rg, vnet).await?;
                        Ok(subnets
                            .into_iter()
                            .map(|s| (key_of(&s.id), s.nsg_id))
                            .collect::<SubnetList>())
                    },
                )
                .await?;
            let Some((listing, until)) = listed else {
                return Ok(None);
            };
            fresh_until = fresh_until.min(until);
            let Some(nsg) = listing.get(&subnet_key) else {
                return Ok(None);
            };
            subnet_nsgs.insert(subnet_key, nsg.clone());
        }
        Ok(
            VmTargets::assemble(vm_id, &nics, |id| subnet_nsgs.get(&key_of(id)).cloned())
                .map(|targets| (targets, fresh_until)),
        )
    }

    /// A list from its slot while fresh, else read (by one asker, the others waiting for it).
    /// A list Azure does not find (its resource group or network gone) is `None`: the VMs that
    /// needed it are read alone, and say what is missing.
    async fn listing<T, F, Fut>(
        &self,
        slots: &Slots<Arc<T>>,
        key: &str,
        now: Instant,
        read: F,
    ) -> Result<Option<(Arc<T>, Instant)>, AzureError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, AzureError>>,
    {
        let slot = slots.get(&key_of(key), now, self.ttl);
        let mut entry = slot.lock().await;
        if let Some(e) = entry.as_ref().filter(|e| e.fresh_until > now) {
            return Ok(Some((Arc::clone(&e.value), e.fresh_until)));
        }
        match read().await {
            Ok(value) => {
                let value = Arc::new(value);
                let fresh_until = now + self.ttl;
                *entry = Some(Timed {
                    value: Arc::clone(&value),
                    fresh_until,
                });
                Ok(Some((value, fresh_until)))
            }
            Err(e) => {
                *entry = None;
                match e {
                    AzureError::NotFound { .. } => Ok(None),
                    other => Err(other),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;
    use std::sync::Arc;

    use portcullis_azure_emulator::{EmulatorConfig, Fixture, RunningEmulator};

    use super::*;
    use crate::azure::{
        AzureClientOptions, AzureNetworkClient, CredentialConfig, build_credential,
    };

    const SUB: &str = "00000000-0000-0000-0000-000000000001";
    const VM1: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-demo/providers/Microsoft.Compute/virtualMachines/vm1";
    const NIC1: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-demo/providers/Microsoft.Network/networkInterfaces/vm1-nic";

    async fn start(fixture: Fixture, page_size: usize) -> RunningEmulator {
        let config = EmulatorConfig {
            fixture,
            page_size,
            ..Default::default()
        };
        portcullis_azure_emulator::spawn(config, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    async fn emulator() -> RunningEmulator {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/emulator/fixtures/demo.yaml");
        let fixture = Fixture::from_file(std::path::Path::new(path)).unwrap();
        start(fixture, 100).await
    }

    fn client(emu: &RunningEmulator) -> Arc<AzureNetworkClient> {
        let base = url::Url::parse(&emu.base_url()).unwrap();
        let cfg = CredentialConfig::ClientSecret {
            tenant_id: "t".into(),
            client_id: "c".into(),
            client_secret: "s".into(),
        };
        let credential = build_credential(&cfg, &base, azure_core::new_http_client()).unwrap();
        Arc::new(AzureNetworkClient::new(base, credential, AzureClientOptions::default()).unwrap())
    }

    /// ARM reads the emulator served, by kind (each page of a list is one read).
    #[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
    struct Reads {
        vm_lists: usize,
        nic_lists: usize,
        subnet_lists: usize,
        vm_gets: usize,
        nic_gets: usize,
        subnet_gets: usize,
    }

    impl Reads {
        fn gets(&self) -> usize {
            self.vm_gets + self.nic_gets + self.subnet_gets
        }
        fn total(&self) -> usize {
            self.gets() + self.vm_lists + self.nic_lists + self.subnet_lists
        }
    }

    async fn reads(emu: &RunningEmulator) -> Reads {
        let mut r = Reads::default();
        for req in emu.admin().requests().await.unwrap() {
            if req.method != "GET" {
                continue;
            }
            let path = req.path.split('?').next().unwrap_or_default();
            let count = if path.ends_with("/virtualMachines") {
                &mut r.vm_lists
            } else if path.contains("/virtualMachines/") {
                &mut r.vm_gets
            } else if path.ends_with("/networkInterfaces") {
                &mut r.nic_lists
            } else if path.contains("/networkInterfaces/") {
                &mut r.nic_gets
            } else if path.ends_with("/subnets") {
                &mut r.subnet_lists
            } else if path.contains("/subnets/") {
                &mut r.subnet_gets
            } else {
                continue;
            };
            *count += 1;
        }
        r
    }

    fn one_each() -> Reads {
        Reads {
            vm_lists: 1,
            nic_lists: 1,
            subnet_lists: 1,
            ..Reads::default()
        }
    }

    #[tokio::test]
    async fn one_read_per_period_and_a_new_address_after_it() {
        let emu = emulator().await;
        let azure = client(&emu);
        let cache = Resolutions::new(Duration::from_secs(60));
        let t0 = Instant::now();

        let (first, stale_at) = cache.resolve_at(azure.as_ref(), VM1, t0).await.unwrap();
        assert_eq!(first.private_ips, ["10.0.1.4"]);
        assert_eq!(stale_at, t0 + Duration::from_secs(60));
        // Fresh: served from memory, whatever case the id is given in.
        let upper = VM1
            .to_uppercase()
            .replace("VIRTUALMACHINES", "virtualMachines");
        let (again, _) = cache
            .resolve_at(azure.as_ref(), &upper, t0 + Duration::from_secs(59))
            .await
            .unwrap();
        assert_eq!(again.vm_id, upper);
        assert_eq!(reads(&emu).await, one_each());

        // Deallocate and restart: a new address, seen once the period is over.
        emu.admin()
            .set_nic_private_ip(NIC1, None, "10.0.1.44")
            .await
            .unwrap();
        let (cached, _) = cache
            .resolve_at(azure.as_ref(), VM1, t0 + Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(cached.private_ips, ["10.0.1.4"]);
        let later = t0 + Duration::from_secs(60);
        let (fresh, stale_at) = cache.resolve_at(azure.as_ref(), VM1, later).await.unwrap();
        assert_eq!(fresh.private_ips, ["10.0.1.44"]);
        assert_eq!(stale_at, later + Duration::from_secs(60));
        let r = reads(&emu).await;
        assert_eq!(
            (r.vm_lists, r.nic_lists, r.subnet_lists, r.gets()),
            (2, 2, 2, 0)
        );
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn policies_asking_at_once_share_one_read() {
        let emu = emulator().await;
        let azure = client(&emu);
        let cache = Resolutions::new(Duration::from_secs(60));
        let vm2 = VM1.replace("/vm1", "/vm2");
        let asks =
            (0..8).map(|i| cache.resolve(azure.as_ref(), if i % 2 == 0 { VM1 } else { &vm2 }));
        for (i, result) in futures::future::join_all(asks)
            .await
            .into_iter()
            .enumerate()
        {
            let want = if i % 2 == 0 { "10.0.1.4" } else { "10.0.1.5" };
            assert_eq!(result.unwrap().0.private_ips, [want]);
        }
        assert_eq!(reads(&emu).await, one_each());
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn a_missing_vm_is_not_remembered() {
        let emu = emulator().await;
        let azure = client(&emu);
        let cache = Resolutions::new(Duration::from_secs(60));
        let missing = VM1.replace("/vm1", "/nope");
        for _ in 0..2 {
            let err = cache.resolve(azure.as_ref(), &missing).await.unwrap_err();
            assert!(matches!(err, AzureError::NotFound { .. }), "{err:?}");
        }
        let r = reads(&emu).await;
        // Not in its resource group's list (read once), so read alone, and asked again.
        assert_eq!((r.vm_lists, r.vm_gets), (1, 2), "{r:?}");
        // A resource group that does not exist: no list, the VM's own read says NotFound.
        let elsewhere = VM1.replace("/rg-demo/", "/rg-gone/");
        let err = cache.resolve(azure.as_ref(), &elsewhere).await.unwrap_err();
        assert!(matches!(err, AzureError::NotFound { .. }), "{err:?}");
        emu.shutdown().await;
    }

    fn vm_id(rg: &str, i: usize) -> String {
        format!(
            "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/vm{i}"
        )
    }

    fn nic_id(rg: &str, name: &str) -> String {
        format!(
            "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces/{name}"
        )
    }

    /// `n` VMs in `rg-big`: ten with their own NIC NSG, every fifth with a second NIC in
    /// another virtual network, vm0 with an IPv6 configuration as well; subnets with and
    /// without NSGs, in two virtual networks. vm3 also has a NIC in `rg-far`.
    fn big_fixture(n: usize) -> Fixture {
        let mut nsgs = String::from("          - name: nsg-a\n          - name: nsg-b\n");
        for i in 0..10 {
            let _ = writeln!(nsgs, "          - name: nsg-vm{i}");
        }
        let mut nics = String::new();
        for i in 0..n {
            let subnet = if i % 2 == 0 { "vnet-a/a1" } else { "vnet-a/a2" };
            let _ = write!(
                nics,
                "          - name: vm{i}-nic\n            virtualMachine: vm{i}\n"
            );
            if i < 10 {
                let _ = writeln!(nics, "            networkSecurityGroup: nsg-vm{i}");
            }
            let _ = write!(
                nics,
                "            ipConfigurations:\n              - name: ipconfig1\n                privateIPAddress: 10.{}.{}.{}\n                subnet: {subnet}\n",
                1 + i % 2,
                i / 200,
                4 + i % 200
            );
            if i == 0 {
                let _ = write!(
                    nics,
                    "              - name: ipconfig6\n                privateIPAddress: fd00::4\n                subnet: vnet-b/v6\n"
                );
            }
            if i % 5 == 0 {
                let _ = write!(
                    nics,
                    "          - name: vm{i}-data\n            virtualMachine: vm{i}\n            ipConfigurations:\n              - name: ipconfig1\n                privateIPAddress: 10.3.{}.{}\n                subnet: vnet-b/b1\n",
                    i / 200,
                    4 + i % 200
                );
            }
        }
        let text = format!(
            r#"
subscriptions:
  - id: {SUB}
    resourceGroups:
      - name: rg-big
        location: westeurope
        networkSecurityGroups:
{nsgs}        virtualNetworks:
          - name: vnet-a
            subnets:
              - name: a1
                addressPrefix: 10.1.0.0/16
                networkSecurityGroup: nsg-a
              - name: a2
                addressPrefix: 10.2.0.0/16
          - name: vnet-b
            subnets:
              - name: b1
                addressPrefix: 10.3.0.0/16
                networkSecurityGroup: nsg-b
              - name: v6
                addressPrefix: fd00::/64
                networkSecurityGroup: nsg-b
        networkInterfaces:
{nics}      - name: rg-far
        location: westeurope
        networkSecurityGroups:
          - name: nsg-far
        virtualNetworks:
          - name: vnet-far
            subnets:
              - name: f1
                addressPrefix: 10.9.0.0/16
        networkInterfaces:
          - name: vm3-far
            virtualMachine: {vm3}
            networkSecurityGroup: nsg-far
            ipConfigurations:
              - name: ipconfig1
                privateIPAddress: 10.9.0.3
                subnet: vnet-far/f1
"#,
            vm3 = vm_id("rg-big", 3),
        );
        Fixture::from_yaml_str(&text).unwrap()
    }

    /// The issue's steady state: 50 VMs, each resolved once per period. One VM GET, NIC GETs and
    /// subnet GETs per VM before; a few paged lists now, with exactly the same targets.
    #[tokio::test]
    async fn fifty_vms_cost_a_few_lists_per_period_not_three_gets_each() {
        const N: usize = 50;
        // Small pages: every list takes several pages, and all of them are followed.
        let emu = start(big_fixture(N), 7).await;
        let azure = client(&emu);
        let ids: Vec<String> = (0..N).map(|i| vm_id("rg-big", i)).collect();

        // Before: one by one, as every VM was resolved until now.
        let mut alone = Vec::new();
        for id in &ids {
            alone.push(azure.resolve_vm(id).await.unwrap());
        }
        let before = reads(&emu).await;
        assert_eq!(before.vm_gets, N);
        assert_eq!(before.nic_gets, N + N / 5 + 1, "{before:?}");
        assert!(before.total() >= 3 * N, "{before:?}");

        // After: every VM at once, as policies asking together do.
        let cache = Resolutions::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let asks = ids
            .iter()
            .map(|id| cache.resolve_at(azure.as_ref(), id, t0));
        let listed: Vec<VmTargets> = futures::future::join_all(asks)
            .await
            .into_iter()
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(listed, alone, "the same targets, read either way");
        assert_eq!(
            listed[0].private_ips,
            ["10.3.0.4", "10.1.0.4", "fd00::4"],
            "both families, NICs in the order of their ids"
        );
        assert_eq!(listed[3].private_ips, ["10.2.0.7", "10.9.0.3"]);
        assert!(
            listed[3].nsg_ids[1].ends_with("/nsg-far"),
            "{:?}",
            listed[3]
        );
        let after = reads(&emu).await;
        let round = Reads {
            vm_lists: after.vm_lists - before.vm_lists,
            nic_lists: after.nic_lists - before.nic_lists,
            subnet_lists: after.subnet_lists - before.subnet_lists,
            vm_gets: after.vm_gets - before.vm_gets,
            nic_gets: after.nic_gets - before.nic_gets,
            subnet_gets: after.subnet_gets - before.subnet_gets,
        };
        let pages = |items: usize| items.div_ceil(7);
        assert_eq!(
            round,
            Reads {
                vm_lists: pages(N),
                // rg-big's NICs, and rg-far's one (vm3's second NIC).
                nic_lists: pages(N + N / 5 + 1) + 1,
                // vnet-a, vnet-b and vnet-far: one page each.
                subnet_lists: 3,
                ..Reads::default()
            }
        );
        eprintln!(
            "{N} VMs per period: {} reads one by one, {} from lists",
            before.total(),
            round.total()
        );

        // Inside the period: nothing is read.
        for id in &ids {
            cache
                .resolve_at(azure.as_ref(), id, t0 + Duration::from_secs(59))
                .await
                .unwrap();
        }
        assert_eq!(reads(&emu).await, after);

        // A changed address is seen once the period is over, from the next round of lists.
        emu.admin()
            .set_nic_private_ip(&nic_id("rg-big", "vm7-nic"), None, "10.2.0.77")
            .await
            .unwrap();
        let later = t0 + Duration::from_secs(60);
        let (moved, stale_at) = cache
            .resolve_at(azure.as_ref(), &ids[7], later)
            .await
            .unwrap();
        assert_eq!(moved.private_ips, ["10.2.0.77"]);
        assert_eq!(stale_at, later + Duration::from_secs(60));
        let again = reads(&emu).await;
        assert_eq!(again.gets(), after.gets());
        assert_eq!(again.vm_lists - after.vm_lists, pages(N));
        emu.shutdown().await;
    }

    /// A VM its resource group lists without a NIC is read alone, and is `NotFound` as before;
    /// a NIC moved to another NSG is seen after the period.
    #[tokio::test]
    async fn a_vm_without_a_nic_is_read_alone_and_a_moved_nic_is_seen() {
        let mut fixture = big_fixture(2);
        fixture.subscriptions[0].resource_groups[0]
            .virtual_machines
            .push(portcullis_azure_emulator::FixtureVm {
                name: "lonely".into(),
                ..Default::default()
            });
        let emu = start(fixture, 100).await;
        let azure = client(&emu);
        let cache = Resolutions::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let lonely = vm_id("rg-big", 0).replace("/vm0", "/lonely");
        let err = cache
            .resolve_at(azure.as_ref(), &lonely, t0)
            .await
            .unwrap_err();
        assert!(matches!(err, AzureError::NotFound { .. }), "{err:?}");
        let r = reads(&emu).await;
        assert_eq!((r.vm_lists, r.vm_gets, r.nic_lists), (1, 1, 0), "{r:?}");

        let vm1 = vm_id("rg-big", 1);
        let (targets, _) = cache.resolve_at(azure.as_ref(), &vm1, t0).await.unwrap();
        assert!(targets.nsg_ids[0].ends_with("/nsg-vm1"), "{targets:?}");
        emu.admin()
            .set_nic_nsg(&nic_id("rg-big", "vm1-nic"), Some("nsg-vm0"))
            .await
            .unwrap();
        let (cached, _) = cache
            .resolve_at(azure.as_ref(), &vm1, t0 + Duration::from_secs(59))
            .await
            .unwrap();
        assert_eq!(cached, targets);
        let (moved, _) = cache
            .resolve_at(azure.as_ref(), &vm1, t0 + Duration::from_secs(60))
            .await
            .unwrap();
        assert!(moved.nsg_ids[0].ends_with("/nsg-vm0"), "{moved:?}");
        let r = reads(&emu).await;
        assert_eq!((r.vm_lists, r.nic_lists, r.gets()), (2, 2, 1), "{r:?}");
        emu.shutdown().await;
    }
}
