//! How long the pure planner takes to plan one NSG (desired rules from the cluster's objects,
//! then the diff against what Azure holds), by size. Prints a table of p50/p99 per plan.
//! `cargo bench --bench plan`

use std::time::{Duration, Instant};

use jiff::Timestamp;
use portcullis::api::{AccessGrant, JitPolicy};
use portcullis::plan::{Bands, Naming, NsgRule, desired_rules, plan_nsg};
use serde_json::json;

const NSG: &str =
    "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/nsg";

fn world(vms: usize, grants: usize, now: Timestamp) -> (Vec<JitPolicy>, Vec<AccessGrant>) {
    let vm = |i: usize| {
        format!(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm{i}"
        )
    };
    let spec_vms: Vec<_> = (0..vms)
        .map(|i| json!({"id": vm(i), "ports": [
            {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefixes": ["10.0.0.0/8"], "maxRequestAccessDuration": "PT3H"}
        ]}))
        .collect();
    let targets: Vec<_> = (0..vms)
        .map(|i| json!({"virtualMachine": vm(i), "privateIpAddresses": [format!("10.1.{}.{}", i / 250, i % 250 + 1)], "networkSecurityGroups": [NSG]}))
        .collect();
    let policy: JitPolicy = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "JitPolicy",
        "metadata": {"name": "p", "namespace": "ns", "uid": "policy-uid"},
        "spec": {"virtualMachines": spec_vms},
        "status": {"targets": targets, "conditions": []}
    }))
    .expect("policy");
    let activated = now - jiff::SignedDuration::from_mins(1);
    let expires = now + jiff::SignedDuration::from_mins(59);
    let grants = (0..grants)
        .map(|i| {
            serde_json::from_value(json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": "AccessGrant",
                "metadata": {"name": format!("g{i}"), "namespace": "ns", "uid": format!("grant-uid-{i}")},
                "spec": {"policyRef": {"name": "p"}, "virtualMachine": format!("vm{}", i % vms), "ports": [22],
                         "sourceAddressPrefix": format!("10.9.{}.{}/32", i / 250, i % 250 + 1), "duration": "PT1H",
                         "justification": "benchmark"},
                "status": {"phase": "Active", "activatedAt": activated.to_string(), "expiresAt": expires.to_string(),
                           "rules": [], "conditions": []}
            }))
            .expect("grant")
        })
        .collect();
    (vec![policy], grants)
}

fn foreign(n: usize) -> Vec<NsgRule> {
    use portcullis::plan::{Access, Direction, RuleProtocol};
    (0..n)
        .map(|i| NsgRule {
            name: format!("user-{i}"),
            description: String::new(),
            // Spread over both directions and the whole priority range, leaving gaps in the bands.
            priority: 200 + (i as u16 * 7) % 3800,
            direction: if i % 2 == 0 {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            access: Access::Allow,
            protocol: RuleProtocol::Tcp,
            source_address_prefixes: vec!["*".into()],
            source_port_ranges: vec!["*".into()],
            destination_address_prefixes: vec!["*".into()],
            destination_port_ranges: vec![format!("{}", 1000 + i)],
            provisioning_failed: false,
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let now = Timestamp::now();
    let bands = Bands::default();
    let naming = Naming::default();
    println!(
        "{:<44} {:>6} {:>10} {:>10} {:>8}",
        "case (one NSG)", "n", "p50 µs", "p99 µs", "writes"
    );
    for (vms, grants, foreign_rules) in [(10, 10, 10), (50, 50, 200), (90, 95, 800)] {
        let (policies, grant_objs) = world(vms, grants, now);
        let user = foreign(foreign_rules);
        for steady in [false, true] {
            let existing: Vec<NsgRule> = if steady {
                let desired = desired_rules(NSG, &policies, &grant_objs, now, &naming);
                let mut all = user.clone();
                all.extend(plan_nsg(&user, &desired, &bands, &naming).placed);
                all
            } else {
                user.clone()
            };
            let iterations = 200;
            let mut times = Vec::with_capacity(iterations);
            let mut writes = 0;
            for _ in 0..iterations {
                let started = Instant::now();
                let desired = desired_rules(NSG, &policies, &grant_objs, now, &naming);
                let plan = plan_nsg(&existing, &desired, &bands, &naming);
                times.push(started.elapsed());
                writes = plan.puts.len() + plan.deletes.len();
            }
            times.sort();
            let case = format!(
                "{vms} VMs, {grants} grants, {foreign_rules} user rules, {}",
                if steady { "steady" } else { "cold" }
            );
            println!(
                "{case:<44} {iterations:>6} {:>10.1} {:>10.1} {writes:>8}",
                percentile(&times, 0.5).as_secs_f64() * 1e6,
                percentile(&times, 0.99).as_secs_f64() * 1e6
            );
        }
    }
}
