//! [`AdminClient`]: a thin async client over the admin API, so tests need no raw HTTP.

use serde::de::DeserializeOwned;

use crate::error::EmulatorError;
use crate::faults::{Faults, NsgFault};
use crate::locks::{Lock, LockLevel};
use crate::state::{ConfigUpdate, RequestRecord, Stats};

#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// `base_url` is the emulator's root, e.g. `http://127.0.0.1:8480`.
    pub fn new(base_url: &str) -> Self {
        Self {
            base: base_url.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/_emulator/{path}", self.base)
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, EmulatorError> {
        let status = resp.status();
        if status.is_success() {
            Ok(resp)
        } else {
            let body = resp.text().await.unwrap_or_default();
            Err(EmulatorError::Admin {
                status: status.as_u16(),
                body,
            })
        }
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, EmulatorError> {
        let resp = self.http.get(self.url(path)).query(query).send().await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn stats(&self) -> Result<Stats, EmulatorError> {
        self.get_json("stats", &[]).await
    }

    /// Resets every counter in [`Stats`].
    pub async fn reset_stats(&self) -> Result<(), EmulatorError> {
        Self::check(self.http.delete(self.url("stats")).send().await?).await?;
        Ok(())
    }

    pub async fn requests(&self) -> Result<Vec<RequestRecord>, EmulatorError> {
        self.get_json("requests", &[]).await
    }

    pub async fn clear_requests(&self) -> Result<(), EmulatorError> {
        Self::check(self.http.delete(self.url("requests")).send().await?).await?;
        Ok(())
    }

    pub async fn set_faults(&self, f: &Faults) -> Result<(), EmulatorError> {
        Self::check(self.http.post(self.url("faults")).json(f).send().await?).await?;
        Ok(())
    }

    pub async fn clear_faults(&self) -> Result<(), EmulatorError> {
        Self::check(self.http.delete(self.url("faults")).send().await?).await?;
        Ok(())
    }

    /// Sets (or replaces) a persistent fault on one NSG: every ARM request on the NSG or its
    /// rules (writes only, when `writes_only`) is answered with its status until cleared.
    pub async fn set_nsg_fault(&self, f: &NsgFault) -> Result<(), EmulatorError> {
        Self::check(
            self.http
                .post(self.url("nsg-faults"))
                .json(f)
                .send()
                .await?,
        )
        .await?;
        Ok(())
    }

    /// Clears the persistent fault of one NSG.
    pub async fn clear_nsg_fault(&self, nsg_id: &str) -> Result<(), EmulatorError> {
        let resp = self
            .http
            .delete(self.url("nsg-faults"))
            .query(&[("nsg", nsg_id)])
            .send()
            .await?;
        Self::check(resp).await?;
        Ok(())
    }

    /// Clears every per-NSG fault.
    pub async fn clear_nsg_faults(&self) -> Result<(), EmulatorError> {
        Self::check(self.http.delete(self.url("nsg-faults")).send().await?).await?;
        Ok(())
    }

    /// Puts a management lock on `scope` (a resource group or resource id).
    pub async fn set_lock(&self, scope: &str, level: LockLevel) -> Result<(), EmulatorError> {
        let lock = Lock {
            scope: scope.to_string(),
            level,
        };
        Self::check(self.http.post(self.url("locks")).json(&lock).send().await?).await?;
        Ok(())
    }

    /// Removes the locks on `scope`.
    pub async fn clear_lock(&self, scope: &str) -> Result<(), EmulatorError> {
        let resp = self
            .http
            .delete(self.url("locks"))
            .query(&[("scope", scope)])
            .send()
            .await?;
        Self::check(resp).await?;
        Ok(())
    }

    /// Removes every lock.
    pub async fn clear_locks(&self) -> Result<(), EmulatorError> {
        Self::check(self.http.delete(self.url("locks")).send().await?).await?;
        Ok(())
    }

    /// Deletes an NSG at once, detaching it from its NICs and subnets first; an error when it
    /// does not exist.
    pub async fn delete_nsg_directly(&self, nsg_id: &str) -> Result<(), EmulatorError> {
        let resp = self
            .http
            .delete(self.url("nsg"))
            .query(&[("id", nsg_id)])
            .send()
            .await?;
        Self::check(resp).await?;
        Ok(())
    }

    /// Changes runtime knobs; returns the resulting configuration.
    pub async fn set_config(&self, c: &ConfigUpdate) -> Result<ConfigUpdate, EmulatorError> {
        let resp = self.http.post(self.url("config")).json(c).send().await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// Drift: creates or replaces a rule directly (`{"properties":{...}}` or bare properties).
    pub async fn put_rule_directly(
        &self,
        rule_id: &str,
        rule: &serde_json::Value,
    ) -> Result<(), EmulatorError> {
        self.send_rule(self.http.put(self.url("rule")), rule_id, rule)
            .await
    }

    /// Someone else's write just before the next PUT of the rule's NSG (see
    /// `POST /_emulator/interleave`).
    pub async fn interleave_rule(
        &self,
        rule_id: &str,
        rule: &serde_json::Value,
    ) -> Result<(), EmulatorError> {
        self.send_rule(self.http.post(self.url("interleave")), rule_id, rule)
            .await
    }

    async fn send_rule(
        &self,
        request: reqwest::RequestBuilder,
        rule_id: &str,
        rule: &serde_json::Value,
    ) -> Result<(), EmulatorError> {
        let resp = request.query(&[("id", rule_id)]).json(rule).send().await?;
        Self::check(resp).await?;
        Ok(())
    }

    /// Drift: deletes a rule directly; an error when it does not exist.
    pub async fn delete_rule_directly(&self, rule_id: &str) -> Result<(), EmulatorError> {
        let resp = self
            .http
            .delete(self.url("rule"))
            .query(&[("id", rule_id)])
            .send()
            .await?;
        Self::check(resp).await?;
        Ok(())
    }

    /// The NSG's non-default security rules as ARM JSON.
    pub async fn rules(&self, nsg_id: &str) -> Result<Vec<serde_json::Value>, EmulatorError> {
        self.get_json("rules", &[("nsg", nsg_id)]).await
    }

    /// The full state dump (`GET /_emulator/state`).
    pub async fn state(&self) -> Result<serde_json::Value, EmulatorError> {
        self.get_json("state", &[]).await
    }

    /// Topology: moves a NIC to another NSG of its resource group (`Some(name)`) or detaches
    /// it (`None`), as a NIC update in the portal would.
    pub async fn set_nic_nsg(
        &self,
        nic_id: &str,
        nsg_name: Option<&str>,
    ) -> Result<(), EmulatorError> {
        let resp = self
            .http
            .post(self.url("nic"))
            .query(&[("id", nic_id)])
            .json(&serde_json::json!({ "networkSecurityGroup": nsg_name }))
            .send()
            .await?;
        Self::check(resp).await?;
        Ok(())
    }

    /// Topology: gives the NIC's IP configuration `ip_configuration` (`None`: the primary one)
    /// the private address `ip`, as a deallocate and restart of its VM can. The address must
    /// lie in the configuration's subnet.
    pub async fn set_nic_private_ip(
        &self,
        nic_id: &str,
        ip_configuration: Option<&str>,
        ip: &str,
    ) -> Result<(), EmulatorError> {
        let mut body = serde_json::json!({ "privateIPAddress": ip });
        if let Some(name) = ip_configuration {
            body["ipConfiguration"] = serde_json::json!(name);
        }
        let resp = self
            .http
            .post(self.url("nic"))
            .query(&[("id", nic_id)])
            .json(&body)
            .send()
            .await?;
        Self::check(resp).await?;
        Ok(())
    }

    /// The next `n` async operations are accepted as usual and end `Failed`.
    pub async fn fail_next_operations(&self, n: u32) -> Result<(), EmulatorError> {
        let resp = self
            .http
            .post(self.url("operations"))
            .json(&serde_json::json!({ "failNext": n }))
            .send()
            .await?;
        Self::check(resp).await?;
        Ok(())
    }
}
