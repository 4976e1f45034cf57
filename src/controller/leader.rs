//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas exactly one
//! writes to Azure. The holder renews every `renew_interval`; a standby takes the Lease once it
//! has not been renewed for `lease_duration`. A holder that cannot renew within
//! `renew_deadline` gives up before anyone else may take over.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

use super::Error;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_interval: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        LeaseConfig {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_interval: Duration::from_secs(2),
        }
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), Error> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election: could not read or take the lease"),
            }
            tokio::time::sleep(self.cfg.retry_interval).await;
        }
    }

    /// Renews the Lease until it is lost; returns then. The caller must stop writing at once.
    pub async fn hold(&self) -> Error {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.retry_interval).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => {
                    return Error::LeadershipLost("another replica holds the lease".into());
                }
                Err(e) => warn!(error = %e, "leader election: renewal failed"),
            }
            if last_renewed.elapsed() >= self.cfg.renew_deadline {
                return Error::LeadershipLost(format!(
                    "lease not renewed for {:?}",
                    last_renewed.elapsed()
                ));
            }
        }
    }

    /// Takes the Lease if it is free, expired or ours; true when we hold it afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, Error> {
        let now = Timestamp::now();
        let duration_secs = self.cfg.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str());
        if !ours {
            let held_for = spec
                .lease_duration_seconds
                .map(|s| i64::from(s.max(0)))
                .unwrap_or(0);
            let expired = match (&spec.holder_identity, &spec.renew_time) {
                (Some(h), Some(renewed)) if !h.is_empty() => {
                    now.duration_since(renewed.0).as_secs() >= held_for
                }
                _ => true,
            };
            if !expired {
                return Ok(false);
            }
        }
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(self.cfg.identity.clone());
        new_spec.lease_duration_seconds = Some(duration_secs);
        new_spec.renew_time = Some(MicroTime(now));
        if !ours {
            new_spec.acquire_time = Some(MicroTime(now));
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec = Some(new_spec);
        // `replace` carries the resourceVersion we read: a concurrent taker gets a conflict.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
