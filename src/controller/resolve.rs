//! VM resolution, cached for one resync period and shared by every policy: a VM named by
//! several policies costs one VM GET (plus its NICs and subnets) per period, not one per
//! policy per reconcile. A policy reconcile that finds an entry stale reads Azure again, and a
//! policy requeues itself for when its entries go stale, so a changed private IP or NSG
//! (deallocate and restart, a NIC moved) reaches its rules at most one resync period after the
//! change, plus one sync.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::azure::{AzureError, NetworkApi, VmTargets};

struct Entry {
    targets: VmTargets,
    fresh_until: Instant,
}

/// One VM's slot: held across a read of Azure, so that policies asking for the same stale VM
/// at once (they are requeued for the same instant) wait for one read instead of each making
/// their own.
type Slot = Arc<tokio::sync::Mutex<Option<Entry>>>;

/// Resolved VMs by lower-cased id. Only successes are kept: a VM not found (or failing) is
/// asked again at the next reconcile.
pub struct Resolutions {
    ttl: Duration,
    slots: Mutex<HashMap<String, Slot>>,
}

impl Resolutions {
    /// `ttl`: how long a resolution is used before Azure is read again (the resync period).
    pub fn new(ttl: Duration) -> Self {
        Resolutions {
            ttl,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &str, now: Instant) -> Slot {
        // Plain data: a panic elsewhere while holding the lock leaves it usable.
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slots.len() > 64 {
            // Forget VMs nobody has asked about for a whole period (and nobody is reading).
            let ttl = self.ttl;
            slots.retain(|_, slot| match slot.try_lock() {
                Ok(entry) => entry.as_ref().is_some_and(|e| e.fresh_until + ttl > now),
                Err(_) => true,
            });
        }
        slots.entry(key.to_string()).or_default().clone()
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
        let key = vm_id.trim().trim_end_matches('/').to_ascii_lowercase();
        let slot = self.slot(&key, now);
        let mut entry = slot.lock().await;
        if let Some(e) = entry.as_ref().filter(|e| e.fresh_until > now) {
            let targets = VmTargets {
                vm_id: vm_id.to_string(),
                ..e.targets.clone()
            };
            return Ok((targets, e.fresh_until));
        }
        match azure.resolve_vm(vm_id).await {
            Ok(targets) => {
                // Counted from before the read: what it saw is at most `ttl` old when dropped.
                let fresh_until = now + self.ttl;
                *entry = Some(Entry {
                    targets: targets.clone(),
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use portcullis_azure_emulator::{EmulatorConfig, Fixture, RunningEmulator};

    use super::*;
    use crate::azure::{
        AzureClientOptions, AzureNetworkClient, CredentialConfig, build_credential,
    };

    const VM1: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-demo/providers/Microsoft.Compute/virtualMachines/vm1";
    const NIC1: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-demo/providers/Microsoft.Network/networkInterfaces/vm1-nic";

    async fn emulator() -> RunningEmulator {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/emulator/fixtures/demo.yaml");
        let fixture = Fixture::from_file(std::path::Path::new(path)).unwrap();
        let config = EmulatorConfig {
            fixture,
            ..Default::default()
        };
        portcullis_azure_emulator::spawn(config, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
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

    async fn vm_gets(emu: &RunningEmulator) -> usize {
        emu.admin()
            .requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.path.contains("/virtualMachines/"))
            .count()
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
        assert_eq!(vm_gets(&emu).await, 1);

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
        assert_eq!(vm_gets(&emu).await, 2);
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn policies_asking_at_once_share_one_read() {
        let emu = emulator().await;
        let azure = client(&emu);
        let cache = Resolutions::new(Duration::from_secs(60));
        let asks = (0..8).map(|_| cache.resolve(azure.as_ref(), VM1));
        for result in futures::future::join_all(asks).await {
            assert_eq!(result.unwrap().0.private_ips, ["10.0.1.4"]);
        }
        assert_eq!(vm_gets(&emu).await, 1);
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
        assert_eq!(vm_gets(&emu).await, 2, "asked again, not cached");
        emu.shutdown().await;
    }
}
