//! Metrics (Prometheus text format) and health state, shared by the controllers and the HTTP
//! server that exposes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::world::World;
use crate::api::GrantPhase;
use crate::azure::{AzureStats, BudgetKind, Paced};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    path: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpenGrantLabels {
    namespace: String,
    virtual_machine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BandLabels {
    nsg: String,
    band: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

const PHASES: [GrantPhase; 6] = [
    GrantPhase::Pending,
    GrantPhase::Active,
    GrantPhase::Expired,
    GrantPhase::Revoked,
    GrantPhase::Denied,
    GrantPhase::Failed,
];

/// Azure request counters, read from the adapter's own counts at scrape time.
#[derive(Debug)]
struct AzureRequests(AzureStats);

impl prometheus_client::collector::Collector for AzureRequests {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.snapshot();
        let mut family = encoder.encode_descriptor(
            "azure_requests",
            "Azure Resource Manager requests by operation and HTTP status (429 = throttled)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for ((operation, status), count) in snapshot {
            let labels = [("operation", operation), ("status", status)];
            let metric = family.encode_family(&labels)?;
            ConstCounter::new(count).encode(metric)?;
        }
        // Pacing against ARM's budget (src/azure/pacing.rs): every kind, zero until paced.
        let paced = self.0.paced();
        let per_kind = |encoder: &mut DescriptorEncoder, name, help, value: fn(Paced) -> f64| {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for kind in BudgetKind::ALL {
                let p = paced.get(&kind).copied().unwrap_or_default();
                let labels = [("kind", kind.as_str())];
                ConstCounter::new(value(p)).encode(family.encode_family(&labels)?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        per_kind(
            &mut encoder,
            "azure_paced_seconds",
            "Time Azure requests waited for ARM's subscription budget (token buckets) to refill, by kind",
            |p| p.seconds,
        )?;
        per_kind(
            &mut encoder,
            "azure_paced_requests",
            "Azure requests held back to stay inside ARM's subscription budget, by kind",
            |p| p.requests as f64,
        )?;
        Ok(())
    }
}

pub struct Telemetry {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_duration: Family<ControllerLabels, Histogram>,
    grants: Family<PhaseLabels, Gauge>,
    open_rules: Gauge,
    expiry_lag: Histogram,
    overdue: Gauge,
    undecodable: Family<KindLabels, Gauge>,
    leader: Gauge,
    inventory_nsgs: Gauge,
    sweep_failures: Counter,
    webhook_admissions: Family<WebhookLabels, Counter>,
    open_grants: Family<OpenGrantLabels, Gauge>,
    band_usage: Family<BandLabels, Gauge<f64, AtomicU64>>,
    /// 1 while Azure answers (see `set_azure_reachable`); also the readiness probe's source.
    azure_reachable: Gauge,
    webhook_certificate_expiry: Gauge,
    notifications: Family<ResultLabels, Counter>,
    nsg_rounds: Family<ResultLabels, Counter>,
    nsgs_in_rounds: Gauge,
    nsgs_spacing_out: Gauge,
    nsg_spacing_seconds: Counter<f64, AtomicU64>,
    caches_synced: AtomicBool,
    standby: AtomicBool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    pub fn new(azure: Option<AzureStats>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("portcullis");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            });
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            reconcile_duration.clone(),
        );
        let grants = Family::<PhaseLabels, Gauge>::default();
        registry.register("grants", "AccessGrants by phase", grants.clone());
        let open_rules = Gauge::default();
        registry.register(
            "open_rules",
            "Allow rules standing for active grants",
            open_rules.clone(),
        );
        let expiry_lag = Histogram::new([0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]);
        registry.register(
            "expiry_lag_seconds",
            "Time from a grant's expiresAt to its rules being closed",
            expiry_lag.clone(),
        );
        let overdue = Gauge::default();
        registry.register(
            "grants_overdue",
            "Grants past their expiresAt with a rule still standing (or not closed yet): alert on it",
            overdue.clone(),
        );
        let undecodable = Family::<KindLabels, Gauge>::default();
        registry.register(
            "undecodable_objects",
            "Objects the API server admitted that the operator cannot decode, skipped (by kind)",
            undecodable.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let inventory_nsgs = Gauge::default();
        registry.register(
            "inventory_nsgs",
            "NSGs recorded in the inventory (every NSG this install has written)",
            inventory_nsgs.clone(),
        );
        let sweep_failures = Counter::default();
        registry.register(
            "sweep_failures",
            "Inventoried NSGs the orphan sweep could not sync (or an inventory it could not read)",
            sweep_failures.clone(),
        );
        let webhook_admissions = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhook_admissions",
            "Admission requests answered by the webhook, by path and result (allowed, refused, invalid)",
            webhook_admissions.clone(),
        );
        let open_grants = Family::<OpenGrantLabels, Gauge>::default();
        registry.register(
            "open_grants",
            "Active grants by namespace and VM (the VM's name)",
            open_grants.clone(),
        );
        let band_usage = Family::<BandLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "band_usage_ratio",
            "How full each priority band of each NSG is after its last sync (1 = full; above 1, rules found no priority)",
            band_usage.clone(),
        );
        let azure_reachable = Gauge::default();
        azure_reachable.set(1);
        registry.register(
            "azure_reachable",
            "0 since a reconcile found Azure unreachable (connection, timeout) or refusing the credential; 1 again after a reconcile succeeds",
            azure_reachable.clone(),
        );
        let webhook_certificate_expiry = Gauge::default();
        registry.register(
            "webhook_certificate_expiry_timestamp_seconds",
            "When the self-managed webhook serving certificate expires (Unix time; 0 when not self-managed)",
            webhook_certificate_expiry.clone(),
        );
        let notifications = Family::<ResultLabels, Counter>::default();
        registry.register(
            "notifications",
            "Notifications by result: sent, failed (refused by the receiver or retries exhausted), dropped (queue full), refused (an invalid target Secret)",
            notifications.clone(),
        );
        let nsg_rounds = Family::<ResultLabels, Counter>::default();
        registry.register(
            "nsg_rounds",
            "Syncs of one NSG that answered the grants waiting on it, by result (ok, or the error's category)",
            nsg_rounds.clone(),
        );
        let nsgs_in_rounds = Gauge::default();
        registry.register(
            "nsgs_in_rounds",
            "NSGs being synced or waiting for a sync that grants asked for",
            nsgs_in_rounds.clone(),
        );
        let nsgs_spacing_out = Gauge::default();
        registry.register(
            "nsgs_spacing_out",
            "NSG syncs holding back their opens until the NSG's last write is old enough, as the subscription's write budget runs low",
            nsgs_spacing_out.clone(),
        );
        let nsg_spacing_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "nsg_spacing_seconds",
            "Time NSG syncs held back their opens to space out writes as the write budget ran low",
            nsg_spacing_seconds.clone(),
        );
        if let Some(stats) = azure {
            registry.register_collector(Box::new(AzureRequests(stats)));
        }
        Arc::new(Telemetry {
            registry,
            reconciles,
            reconcile_duration,
            grants,
            open_rules,
            expiry_lag,
            overdue,
            undecodable,
            leader,
            inventory_nsgs,
            sweep_failures,
            webhook_admissions,
            open_grants,
            band_usage,
            azure_reachable,
            webhook_certificate_expiry,
            notifications,
            nsg_rounds,
            nsgs_in_rounds,
            nsgs_spacing_out,
            nsg_spacing_seconds,
            caches_synced: AtomicBool::new(false),
            standby: AtomicBool::new(false),
        })
    }

    pub fn reconciled(&self, controller: &'static str, result: &'static str, seconds: f64) {
        self.reconciles
            .get_or_create(&ReconcileLabels { controller, result })
            .inc();
        self.reconcile_duration
            .get_or_create(&ControllerLabels { controller })
            .observe(seconds);
    }

    pub fn grant_closed_at_expiry(&self, lag_seconds: f64) {
        self.expiry_lag.observe(lag_seconds.max(0.0));
    }

    pub fn observe_world(&self, world: &World) {
        for phase in PHASES {
            let n = world
                .grants
                .iter()
                .filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(phase))
                .count();
            self.grants
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .set(n as i64);
        }
        let open: usize = world
            .grants
            .iter()
            .filter_map(|g| g.status.as_ref())
            .filter(|s| s.phase == Some(GrantPhase::Active))
            .map(|s| s.rules.len())
            .sum();
        self.open_rules.set(open as i64);
        self.observe_open_grants(world);
        let now = jiff::Timestamp::now();
        let overdue = world
            .grants
            .iter()
            .filter_map(|g| g.status.as_ref())
            .filter(|s| s.expires_at.as_ref().is_some_and(|e| e.0 <= now) && s.holds_access_open())
            .count();
        self.overdue.set(overdue as i64);
    }

    /// Active grants counted by namespace and VM name. Rebuilt from the world each time, so a
    /// VM whose last grant closed leaves the metric.
    fn observe_open_grants(&self, world: &World) {
        let mut counts: std::collections::HashMap<OpenGrantLabels, i64> = Default::default();
        for g in &world.grants {
            let Some(status) = g
                .status
                .as_ref()
                .filter(|s| s.phase == Some(GrantPhase::Active))
            else {
                continue;
            };
            let vm = status
                .granted
                .as_ref()
                .map_or(g.spec.virtual_machine.as_str(), |a| {
                    a.virtual_machine.as_str()
                });
            let labels = OpenGrantLabels {
                namespace: g.metadata.namespace.clone().unwrap_or_default(),
                virtual_machine: vm.rsplit('/').next().unwrap_or(vm).to_string(),
            };
            *counts.entry(labels).or_default() += 1;
        }
        self.open_grants.clear();
        for (labels, n) in counts {
            self.open_grants.get_or_create(&labels).set(n);
        }
    }

    /// How full the NSG's bands are after its last sync.
    pub fn set_band_usage(&self, nsg_id: &str, usage: crate::plan::BandUsage) {
        for (band, share) in [("allow", usage.allow), ("deny", usage.deny)] {
            self.band_usage
                .get_or_create(&BandLabels {
                    nsg: nsg_id.to_ascii_lowercase(),
                    band,
                })
                .set(share);
        }
    }

    /// An NSG that no longer exists: its band series go, rather than stay at their last value.
    pub fn forget_nsg(&self, nsg_id: &str) {
        let nsg = nsg_id.to_ascii_lowercase();
        for band in ["allow", "deny"] {
            self.band_usage.remove(&BandLabels {
                nsg: nsg.clone(),
                band,
            });
        }
    }

    pub fn set_webhook_certificate_expiry(&self, not_after: jiff::Timestamp) {
        self.webhook_certificate_expiry.set(not_after.as_second());
    }

    /// How many objects of `kind` are skipped because they do not decode.
    pub fn set_undecodable(&self, kind: &'static str, count: usize) {
        self.undecodable
            .get_or_create(&KindLabels { kind })
            .set(count as i64);
    }

    pub fn set_inventory_nsgs(&self, count: usize) {
        self.inventory_nsgs.set(count as i64);
    }

    pub fn sweep_failed(&self) {
        self.sweep_failures.inc();
    }

    /// One admission request answered: `path` `/mutate` or `/validate`, `result` `allowed`,
    /// `refused` or `invalid` (not an AdmissionReview).
    pub fn webhook_admission(&self, path: &'static str, result: &'static str) {
        self.webhook_admissions
            .get_or_create(&WebhookLabels { path, result })
            .inc();
    }

    /// One NSG round finished with `result` (`ok` or an error category); `busy` NSGs are being
    /// synced or wait for a sync.
    pub fn nsg_round(&self, result: &'static str, busy: usize) {
        self.nsg_rounds
            .get_or_create(&ResultLabels { result })
            .inc();
        self.nsgs_in_rounds.set(busy as i64);
    }

    pub fn set_nsgs_in_rounds(&self, busy: usize) {
        self.nsgs_in_rounds.set(busy as i64);
    }

    /// An NSG sync begins to space out its opens.
    pub fn spacing_out_began(&self) {
        self.nsgs_spacing_out.inc();
    }

    /// An NSG sync has spaced out its opens for `waited` (or was cancelled while it did).
    pub fn spacing_out_ended(&self, waited: std::time::Duration) {
        self.nsgs_spacing_out.dec();
        self.nsg_spacing_seconds.inc_by(waited.as_secs_f64());
    }

    pub fn nsgs_spacing_out(&self) -> i64 {
        self.nsgs_spacing_out.get()
    }

    /// One notification (or refused target) with `result` `sent`, `failed`, `dropped` or
    /// `refused`.
    pub fn notification(&self, result: &'static str) {
        self.notifications
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn notifications(&self, result: &'static str) -> u64 {
        self.notifications
            .get_or_create(&ResultLabels { result })
            .get()
    }

    pub fn sweep_failures(&self) -> u64 {
        self.sweep_failures.get()
    }

    pub fn overdue_grants(&self) -> i64 {
        self.overdue.get()
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
        self.standby.store(!leader, Ordering::Relaxed);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    pub fn set_caches_synced(&self, synced: bool) {
        self.caches_synced.store(synced, Ordering::Relaxed);
    }

    pub fn set_azure_reachable(&self, reachable: bool) {
        self.azure_reachable.set(i64::from(reachable));
    }

    /// Ready: a standby is ready to take over; the leader once its caches are synced and Azure
    /// answered its last call.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.standby.load(Ordering::Relaxed) {
            return Ok(());
        }
        if !self.caches_synced.load(Ordering::Relaxed) {
            return Err("caches not synced yet");
        }
        if self.azure_reachable.get() == 0 {
            return Err("Azure is not reachable");
        }
        Ok(())
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::azure::BudgetKind;

    #[test]
    fn pacing_is_exported_per_kind() {
        let stats = AzureStats::new();
        stats.record_paced(BudgetKind::Read, std::time::Duration::from_millis(1500));
        let text = Telemetry::new(Some(stats)).encode().unwrap();
        assert!(
            text.contains("portcullis_azure_paced_seconds_total{kind=\"read\"} 1.5"),
            "{text}"
        );
        assert!(text.contains("portcullis_azure_paced_requests_total{kind=\"read\"} 1"));
        assert!(text.contains("portcullis_azure_paced_seconds_total{kind=\"write\"} 0"));
        assert!(text.contains("portcullis_azure_paced_requests_total{kind=\"delete\"} 0"));
    }
}
