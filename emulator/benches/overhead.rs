//! Emulator overhead: p50/p90/p99 latency of rule GETs and rule PUTs over loopback with a
//! keep-alive client. Run with `cargo bench -p portcullis-azure-emulator`.

use std::time::{Duration, Instant};

use portcullis_azure_emulator::{EmulatorConfig, Fixture, spawn};
use serde_json::{Value, json};

const N: usize = 2000;
const SUB: &str = "00000000-0000-0000-0000-000000000001";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn row(kind: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let total: Duration = samples.iter().sum();
    println!(
        "{kind:<22} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.90).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        total.as_secs_f64() * 1e6 / samples.len().max(1) as f64,
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let fixture = Fixture::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/demo.yaml"
    )))?;
    let emu = spawn(
        EmulatorConfig {
            fixture,
            async_delay: Duration::ZERO,
            write_burst: 1_000_000,
            write_refill_per_sec: 1_000_000.0,
            ..EmulatorConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let base = emu.base_url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()?;
    let tok: Value = http
        .post(format!("{base}/t/oauth2/v2.0/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "bench"),
            ("client_secret", "x"),
        ])
        .send()
        .await?
        .json()
        .await?;
    let token = tok["access_token"].as_str().unwrap_or_default().to_string();
    let nsg = format!(
        "{base}/subscriptions/{SUB}/resourceGroups/rg-demo/providers/Microsoft.Network/networkSecurityGroups/nsg-vm1"
    );
    let get_url = format!("{nsg}/securityRules/allow-https?api-version=2024-03-01");
    let body = |port: usize| {
        json!({"properties": {"protocol": "Tcp", "sourceAddressPrefix": "203.0.113.7/32", "sourcePortRange": "*",
            "destinationAddressPrefix": "10.0.1.4", "destinationPortRange": (port % 65535).to_string(),
            "access": "Allow", "priority": 120, "direction": "Inbound"}})
    };

    // Warm-up.
    for _ in 0..100 {
        http.get(&get_url)
            .bearer_auth(&token)
            .send()
            .await?
            .bytes()
            .await?;
    }
    let mut gets = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        let r = http.get(&get_url).bearer_auth(&token).send().await?;
        let status = r.status();
        r.bytes().await?;
        gets.push(t.elapsed());
        assert_eq!(status, 200);
    }
    let mut puts = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        let r = http
            .put(format!(
                "{nsg}/securityRules/bench-rule?api-version=2024-03-01"
            ))
            .bearer_auth(&token)
            .json(&body(i))
            .send()
            .await?;
        let status = r.status();
        r.bytes().await?;
        puts.push(t.elapsed());
        assert!(status == 200 || status == 201, "PUT answered {status}");
    }
    let mut lists = Vec::with_capacity(N / 4);
    for _ in 0..N / 4 {
        let t = Instant::now();
        let r = http
            .get(format!("{nsg}/securityRules?api-version=2024-03-01"))
            .bearer_auth(&token)
            .send()
            .await?;
        r.bytes().await?;
        lists.push(t.elapsed());
    }
    println!("emulator overhead over loopback (keep-alive, sequential), microseconds");
    println!(
        "{:<22} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "request", "n", "p50", "p90", "p99", "mean"
    );
    row("GET securityRule", gets);
    row("PUT securityRule", puts);
    row("GET securityRules list", lists);
    emu.shutdown().await;
    Ok(())
}
