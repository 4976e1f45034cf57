//! The objects admission decisions depend on, read from the API server with the operator's
//! client (fresh reads, not a cache: a decision on a stale grant could admit what it should not).

use async_trait::async_trait;
use kube::api::{Api, ListParams};

use crate::admission::{Lookup, LookupError};
use crate::api::{AccessApproval, AccessGrant, JitPolicy};

#[derive(Clone)]
pub struct KubeLookup {
    client: kube::Client,
}

impl KubeLookup {
    pub fn new(client: kube::Client) -> KubeLookup {
        KubeLookup { client }
    }
}

fn error(what: String, e: kube::Error) -> LookupError {
    LookupError {
        what,
        message: e.to_string(),
    }
}

#[async_trait]
impl Lookup for KubeLookup {
    async fn grant(&self, namespace: &str, name: &str) -> Result<Option<AccessGrant>, LookupError> {
        let api: Api<AccessGrant> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map_err(|e| error(format!("AccessGrant {namespace}/{name}"), e))
    }

    async fn policy(&self, namespace: &str, name: &str) -> Result<Option<JitPolicy>, LookupError> {
        let api: Api<JitPolicy> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map_err(|e| error(format!("JitPolicy {namespace}/{name}"), e))
    }

    async fn approvals(
        &self,
        namespace: &str,
        grant: &str,
    ) -> Result<Vec<AccessApproval>, LookupError> {
        // Custom resources support no field selector on spec fields: list and filter.
        let api: Api<AccessApproval> = Api::namespaced(self.client.clone(), namespace);
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| error(format!("AccessApprovals in {namespace}"), e))?;
        Ok(list
            .items
            .into_iter()
            .filter(|a| a.spec.grant_ref.name == grant)
            .collect())
    }
}
