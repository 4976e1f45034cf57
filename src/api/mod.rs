//! The custom resources: `JitPolicy`, `AccessGrant`, `AccessApproval` and the cluster-scoped
//! `JitScope` (group `portcullis.dev`, `v1alpha1`).
//!
//! Syntactic rules live in the OpenAPI schema (so the API server refuses malformed objects);
//! the controller enforces every one of them again, since v1.20-era servers and old clients
//! may not.

pub mod approval;
pub mod condition;
pub mod duration;
pub mod grant;
pub mod identity;
pub mod policy;
pub mod schema;
pub mod scope;

pub use approval::{AccessApproval, AccessApprovalSpec, Decision, GrantRef};
pub use grant::{
    AccessGrant, AccessGrantSpec, AccessGrantStatus, GRANT_FINALIZER, GrantPhase, GrantedAccess,
    GrantedPort, GrantedRule, PolicyRef, RecordedDecision,
};
pub use identity::{ApprovalPolicy, Subjects, UserRef};
pub use policy::{
    JitPolicy, JitPolicySpec, JitPolicyStatus, NotificationRef, PolicyPort, PolicyVirtualMachine,
    Protocol, ResolvedTarget,
};
pub use scope::{JitScope, JitScopeSpec};

pub const GROUP: &str = "portcullis.dev";

/// The CRDs as one multi-document YAML stream, exactly what `portcullis crd` prints and
/// `crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [
        JitPolicy::crd(),
        AccessGrant::crd(),
        AccessApproval::crd(),
        JitScope::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// Decodes one raw object as `K`. The type fields are filled in first: list items and admission
/// requests may lack them.
pub fn decode<K>(mut raw: kube::api::DynamicObject) -> Result<K, serde_json::Error>
where
    K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned,
{
    raw.types = Some(kube::api::TypeMeta {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
    });
    serde_json::from_value(serde_json::to_value(raw)?)
}
