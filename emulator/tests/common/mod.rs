//! Helpers shared by the emulator's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use portcullis_azure_emulator::{EmulatorConfig, Fixture, RunningEmulator, spawn};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

pub const SUB: &str = "00000000-0000-0000-0000-000000000001";
pub const RG: &str = "rg-demo";

pub fn demo_fixture() -> Fixture {
    Fixture::from_file(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/demo.yaml"
    )))
    .expect("demo fixture")
}

pub fn demo_config() -> EmulatorConfig {
    EmulatorConfig {
        fixture: demo_fixture(),
        ..EmulatorConfig::default()
    }
}

pub async fn start(config: EmulatorConfig) -> RunningEmulator {
    spawn(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator starts")
}

pub fn rg_path() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network")
}

pub fn nsg_path(nsg: &str) -> String {
    format!("{}/networkSecurityGroups/{nsg}", rg_path())
}

pub fn rule_path(nsg: &str, rule: &str) -> String {
    format!("{}/securityRules/{rule}", nsg_path(nsg))
}

/// A valid inbound TCP rule body.
pub fn rule_body(priority: i64, port: &str) -> Value {
    json!({
        "properties": {
            "protocol": "Tcp",
            "sourceAddressPrefix": "203.0.113.7/32",
            "sourcePortRange": "*",
            "destinationAddressPrefix": "10.0.1.4",
            "destinationPortRange": port,
            "access": "Allow",
            "priority": priority,
            "direction": "Inbound",
            "description": "portcullis test rule"
        }
    })
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn code(&self) -> String {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// A raw ARM client holding a token issued by the emulator.
pub struct Arm {
    pub base: String,
    pub http: reqwest::Client,
    pub token: String,
}

pub async fn token(http: &reqwest::Client, base: &str) -> String {
    let resp = http
        .post(format!("{base}/tenant-1/oauth2/v2.0/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "portcullis"),
            ("client_secret", "s3cret"),
            ("scope", "https://management.azure.com/.default"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

impl Arm {
    pub async fn login(base: &str) -> Arm {
        let http = reqwest::Client::new();
        let token = token(&http, base).await;
        Arm {
            base: base.to_string(),
            http,
            token,
        }
    }

    /// `path` relative to the base, api-version appended unless a query is present; or absolute.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else if path.contains('?') {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}?api-version=2024-03-01", self.base)
        }
    }

    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Resp {
        self.send_if_match(method, path, body, None).await
    }

    /// `send` with an `If-Match` header when `if_match` is given.
    pub async fn send_if_match(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Resp {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.token);
        if let Some(etag) = if_match {
            req = req.header("if-match", etag);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Resp {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn put_raw(&self, path: &str, body: &str) -> Resp {
        let resp = self
            .http
            .put(self.url(path))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// Polls an `Azure-AsyncOperation` URL until it reports Succeeded (deadline 10 s).
    pub async fn wait_op(&self, resp: &Resp) {
        let url = resp
            .header("azure-asyncoperation")
            .expect("Azure-AsyncOperation header");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.get(&url).await;
            assert_eq!(r.status, 200, "{r:?}");
            match r.body["status"].as_str() {
                Some("Succeeded") => return,
                Some("InProgress") => {}
                other => panic!("unexpected operation status {other:?}"),
            }
            assert!(
                Instant::now() < deadline,
                "operation did not finish in 10 s"
            );
            // Under the read bucket's refill (25 per s): polling every 10 ms drained its 250
            // tokens when a loaded machine stretched the operations, and the next poll got 429.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls `f` until it returns true, failing after `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
