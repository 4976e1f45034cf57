//! Status writes through server-side apply: the whole status, owned by one field manager.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Error;
use super::context::FIELD_MANAGER;

pub async fn apply_status<K>(api: &Api<K>, obj: &K, status: &impl Serialize) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api
        .patch_status(&obj.name_any(), &pp, &Patch::Apply(&patch))
        .await?)
}
