//! The stamp key's Secret: 32 random bytes, created by whichever replica comes first and read
//! back by the others, so every replica signs and checks stamps with the same key.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::info;

use super::{WebhookError, already_exists};
use crate::admission::StampKey;

/// The Secret's data key.
pub const DATA_KEY: &str = "key";

/// Reads the stamp key from the Secret `namespace/name`, creating it with a fresh random key
/// when it does not exist. Two replicas racing both end up with the key that was stored first.
/// The key itself is never logged.
pub async fn load_or_create_stamp_key(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<StampKey, WebhookError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let what = || format!("Secret {namespace}/{name}");
    if let Some(secret) = api
        .get_opt(name)
        .await
        .map_err(|e| WebhookError::kube(what(), e))?
    {
        return key_of(&secret, namespace, name);
    }
    let fresh = StampKey::generate().map_err(|e| WebhookError::StampKey(e.to_string()))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "portcullis".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            DATA_KEY.to_string(),
            ByteString(fresh.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %what(), "created the stamp key");
            Ok(fresh)
        }
        // Another replica won the race: its key is the one.
        Err(e) if already_exists(&e) => {
            let secret = api
                .get(name)
                .await
                .map_err(|e| WebhookError::kube(what(), e))?;
            key_of(&secret, namespace, name)
        }
        Err(e) => Err(WebhookError::kube(what(), e)),
    }
}

fn key_of(secret: &Secret, namespace: &str, name: &str) -> Result<StampKey, WebhookError> {
    let bad = |problem: String| WebhookError::BadSecret {
        namespace: namespace.to_string(),
        name: name.to_string(),
        problem,
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY))
        .ok_or_else(|| bad(format!("no `{DATA_KEY}` in its data")))?;
    StampKey::new(bytes.0.clone()).map_err(|e| bad(e.to_string()))
}
