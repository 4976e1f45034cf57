//! Configuration -> token credential.
//!
//! - Client secret: `azure_identity::ClientSecretCredential` (accepts an `http://` authority).
//! - Workload identity: our own [`FederatedTokenFileCredential`], which re-reads the projected
//!   service-account token file on every token request (AKS rotates it; the 0.21
//!   `WorkloadIdentityCredential` reads it once).
//! - Managed identity: [`ImdsCredential`], a small IMDS client (system- or user-assigned); the
//!   0.21 crate only exposes a system-assigned one, with a fixed endpoint.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use azure_core::auth::{AccessToken, Secret, TokenCredential};
use azure_core::error::{Error as CoreError, ErrorKind};
use azure_core::{HttpClient, Method, Request, Url};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use super::error::AzureError;

pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Refresh a cached token this long before it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(300);

/// How the operator authenticates to Azure.
#[derive(Clone, PartialEq, Eq)]
pub enum CredentialConfig {
    ClientSecret {
        tenant_id: String,
        client_id: String,
        client_secret: String,
    },
    WorkloadIdentity {
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
    },
    ManagedIdentity {
        client_id: Option<String>,
    },
}

impl std::fmt::Debug for CredentialConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialConfig::ClientSecret {
                tenant_id,
                client_id,
                ..
            } => f
                .debug_struct("ClientSecret")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("client_secret", &"<redacted>")
                .finish(),
            CredentialConfig::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            } => f
                .debug_struct("WorkloadIdentity")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("token_file", token_file)
                .finish(),
            CredentialConfig::ManagedIdentity { client_id } => f
                .debug_struct("ManagedIdentity")
                .field("client_id", client_id)
                .finish(),
        }
    }
}

impl CredentialConfig {
    /// Reads `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and `AZURE_CLIENT_SECRET` or
    /// `AZURE_FEDERATED_TOKEN_FILE` (the variables the AKS workload-identity webhook injects).
    /// With neither a secret nor a token file: managed identity (with `AZURE_CLIENT_ID` as the
    /// user-assigned identity when set).
    pub fn from_env() -> Result<Self, AzureError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`from_env`](Self::from_env), with an injectable lookup (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, AzureError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let secret = get("AZURE_CLIENT_SECRET");
        let token_file = get("AZURE_FEDERATED_TOKEN_FILE");
        let client_id = get("AZURE_CLIENT_ID");
        if secret.is_none() && token_file.is_none() {
            return Ok(CredentialConfig::ManagedIdentity { client_id });
        }
        let missing = |k: &str| {
            AzureError::Credential(format!(
                "{k} must be set with AZURE_CLIENT_SECRET or AZURE_FEDERATED_TOKEN_FILE"
            ))
        };
        let tenant_id = get("AZURE_TENANT_ID").ok_or_else(|| missing("AZURE_TENANT_ID"))?;
        let client_id = client_id.ok_or_else(|| missing("AZURE_CLIENT_ID"))?;
        Ok(match (secret, token_file) {
            (Some(client_secret), _) => CredentialConfig::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
            },
            (None, Some(file)) => CredentialConfig::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file: PathBuf::from(file),
            },
            (None, None) => CredentialConfig::ManagedIdentity {
                client_id: Some(client_id),
            },
        })
    }
}

/// `AZURE_AUTHORITY_HOST`, or the public cloud's.
pub fn authority_host_from_env() -> Result<Url, AzureError> {
    let raw = std::env::var("AZURE_AUTHORITY_HOST")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_string());
    Url::parse(&raw)
        .map_err(|e| AzureError::InvalidInput(format!("AZURE_AUTHORITY_HOST {raw:?}: {e}")))
}

/// Builds the credential for `cfg`. `authority_host` is where Entra ID lives
/// (`https://login.microsoftonline.com`, or an emulator).
pub fn build_credential(
    cfg: &CredentialConfig,
    authority_host: &Url,
    http: Arc<dyn HttpClient>,
) -> Result<Arc<dyn TokenCredential>, AzureError> {
    Ok(match cfg {
        CredentialConfig::ClientSecret {
            tenant_id,
            client_id,
            client_secret,
        } => Arc::new(azure_identity::ClientSecretCredential::new(
            http,
            authority_host.clone(),
            tenant_id.clone(),
            client_id.clone(),
            client_secret.clone(),
        )),
        CredentialConfig::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
        } => Arc::new(FederatedTokenFileCredential::new(
            http,
            authority_host.clone(),
            tenant_id.clone(),
            client_id.clone(),
            token_file.clone(),
        )?),
        CredentialConfig::ManagedIdentity { client_id } => {
            let endpoint = Url::parse(IMDS_ENDPOINT)
                .map_err(|e| AzureError::InvalidInput(format!("IMDS endpoint: {e}")))?;
            Arc::new(ImdsCredential::new(http, endpoint, client_id.clone()))
        }
    })
}

/// A per-scopes token cache that refreshes [`EXPIRY_MARGIN`] before expiry. Concurrent callers
/// share one refresh.
#[derive(Debug, Default)]
struct TokenCache {
    tokens: Mutex<HashMap<Vec<String>, AccessToken>>,
}

impl TokenCache {
    async fn get_or_fetch<F, Fut>(
        &self,
        scopes: &[&str],
        fetch: F,
    ) -> azure_core::Result<AccessToken>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = azure_core::Result<AccessToken>>,
    {
        let key: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let mut tokens = self.tokens.lock().await;
        if let Some(t) = tokens.get(&key)
            && t.expires_on > OffsetDateTime::now_utc() + EXPIRY_MARGIN
        {
            return Ok(t.clone());
        }
        let token = fetch().await?;
        tokens.insert(key, token.clone());
        Ok(token)
    }

    async fn clear(&self) {
        self.tokens.lock().await.clear();
    }
}

/// The token endpoint's answer (Entra ID and IMDS differ in number-vs-string fields).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
}

fn as_i64(v: &Option<serde_json::Value>) -> Option<i64> {
    match v.as_ref()? {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl TokenResponse {
    fn into_access_token(self) -> AccessToken {
        let now = OffsetDateTime::now_utc();
        let expires_on = if let Some(secs) = as_i64(&self.expires_in) {
            now + Duration::from_secs(secs.max(0).unsigned_abs())
        } else if let Some(at) =
            as_i64(&self.expires_on).and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        {
            at
        } else {
            // Unknown lifetime: treat as short-lived so it is refreshed soon.
            now + EXPIRY_MARGIN + Duration::from_secs(60)
        };
        AccessToken::new(Secret::new(self.access_token), expires_on)
    }
}

async fn execute_token_request(
    http: &dyn HttpClient,
    req: &Request,
    what: &str,
) -> azure_core::Result<AccessToken> {
    let rsp = http.execute_request(req).await.map_err(|e| {
        CoreError::with_message(ErrorKind::Credential, || {
            format!(
                "{what}: token request failed: {}",
                super::error::error_chain(&e)
            )
        })
    })?;
    let (status, _headers, body) = rsp.deconstruct();
    let body = body.collect().await?;
    if !status.is_success() {
        let detail = super::error::ArmError::parse(&body)
            .map(|e| {
                format!(
                    "{} {}",
                    e.code.unwrap_or_default(),
                    e.message.unwrap_or_default()
                )
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(300).collect());
        let detail = if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
            && let Some(e) = v.get("error").and_then(|e| e.as_str())
        {
            // OAuth2 errors: {"error": "invalid_client", "error_description": "..."}
            let desc = v
                .get("error_description")
                .and_then(|d| d.as_str())
                .unwrap_or_default();
            format!("{e} {desc}")
        } else {
            detail
        };
        return Err(CoreError::with_message(ErrorKind::Credential, || {
            format!(
                "{what}: token endpoint answered {status}: {}",
                detail.trim()
            )
        }));
    }
    let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
        CoreError::with_message(ErrorKind::Credential, || {
            format!("{what}: unreadable token response: {e}")
        })
    })?;
    Ok(parsed.into_access_token())
}

/// Workload identity (federated credential): exchanges the Kubernetes service-account token in
/// `token_file` for an Entra ID token. The file is read again for every token request, so a
/// rotated token is picked up; tokens are cached until 5 minutes before they expire.
#[derive(Debug)]
pub struct FederatedTokenFileCredential {
    http: Arc<dyn HttpClient>,
    token_url: Url,
    client_id: String,
    token_file: PathBuf,
    cache: TokenCache,
}

impl FederatedTokenFileCredential {
    pub fn new(
        http: Arc<dyn HttpClient>,
        authority_host: Url,
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
    ) -> Result<Self, AzureError> {
        let mut token_url = authority_host.clone();
        token_url
            .path_segments_mut()
            .map_err(|_| {
                AzureError::InvalidInput(format!("invalid authority host {authority_host}"))
            })?
            .pop_if_empty()
            .extend([tenant_id.as_str(), "oauth2", "v2.0", "token"]);
        Ok(Self {
            http,
            token_url,
            client_id,
            token_file,
            cache: TokenCache::default(),
        })
    }

    /// The token endpoint this credential posts to.
    pub fn token_url(&self) -> &Url {
        &self.token_url
    }

    async fn fetch(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let assertion = std::fs::read_to_string(&self.token_file).map_err(|e| {
            CoreError::with_message(ErrorKind::Credential, || {
                format!(
                    "reading federated token file {}: {e}",
                    self.token_file.display()
                )
            })
        })?;
        let assertion = assertion.trim();
        if assertion.is_empty() {
            return Err(CoreError::with_message(ErrorKind::Credential, || {
                format!(
                    "federated token file {} is empty",
                    self.token_file.display()
                )
            }));
        }
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &self.client_id)
            .append_pair("scope", &scopes.join(" "))
            .append_pair("client_assertion_type", CLIENT_ASSERTION_TYPE)
            .append_pair("client_assertion", assertion)
            .append_pair("grant_type", "client_credentials")
            .finish();
        let mut req = Request::new(self.token_url.clone(), Method::Post);
        req.insert_header("content-type", "application/x-www-form-urlencoded");
        req.insert_header("accept", "application/json");
        req.set_body(form);
        tracing::debug!(token_url = %self.token_url, "requesting token with federated assertion");
        execute_token_request(self.http.as_ref(), &req, "workload identity").await
    }
}

#[async_trait::async_trait]
impl TokenCredential for FederatedTokenFileCredential {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        self.cache.get_or_fetch(scopes, || self.fetch(scopes)).await
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        self.cache.clear().await;
        Ok(())
    }
}

/// Managed identity through the instance metadata service (IMDS): system-assigned, or the
/// user-assigned identity `client_id`.
#[derive(Debug)]
pub struct ImdsCredential {
    http: Arc<dyn HttpClient>,
    endpoint: Url,
    client_id: Option<String>,
    cache: TokenCache,
}

impl ImdsCredential {
    /// `endpoint`: normally [`IMDS_ENDPOINT`].
    pub fn new(http: Arc<dyn HttpClient>, endpoint: Url, client_id: Option<String>) -> Self {
        Self {
            http,
            endpoint,
            client_id,
            cache: TokenCache::default(),
        }
    }

    async fn fetch(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let [scope] = scopes else {
            return Err(CoreError::message(
                ErrorKind::Credential,
                "managed identity supports exactly one scope",
            ));
        };
        let resource = scope.strip_suffix("/.default").unwrap_or(scope);
        let mut url = self.endpoint.clone();
        url.query_pairs_mut()
            .append_pair("api-version", "2019-08-01")
            .append_pair("resource", resource);
        if let Some(id) = &self.client_id {
            url.query_pairs_mut().append_pair("client_id", id);
        }
        let mut req = Request::new(url, Method::Get);
        req.insert_header("metadata", "true");
        execute_token_request(self.http.as_ref(), &req, "managed identity").await
    }
}

#[async_trait::async_trait]
impl TokenCredential for ImdsCredential {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        self.cache.get_or_fetch(scopes, || self.fetch(scopes)).await
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        self.cache.clear().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn config_from_env() {
        let c = CredentialConfig::from_lookup(lookup(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_CLIENT_SECRET", "s"),
        ]))
        .unwrap();
        assert!(matches!(c, CredentialConfig::ClientSecret { .. }));
        assert!(!format!("{c:?}").contains("\"s\""));

        let c = CredentialConfig::from_lookup(lookup(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
        ]))
        .unwrap();
        assert_eq!(
            c,
            CredentialConfig::WorkloadIdentity {
                tenant_id: "t".into(),
                client_id: "c".into(),
                token_file: "/var/run/token".into()
            }
        );

        let c = CredentialConfig::from_lookup(lookup(&[("AZURE_CLIENT_ID", "c")])).unwrap();
        assert_eq!(
            c,
            CredentialConfig::ManagedIdentity {
                client_id: Some("c".into())
            }
        );
        let c = CredentialConfig::from_lookup(lookup(&[])).unwrap();
        assert_eq!(c, CredentialConfig::ManagedIdentity { client_id: None });

        let e = CredentialConfig::from_lookup(lookup(&[("AZURE_CLIENT_SECRET", "s")])).unwrap_err();
        assert_eq!(e.category(), "credential");
    }

    #[test]
    fn federated_token_url() {
        let http = azure_core::new_http_client();
        for host in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "https://login.microsoftonline.com",
        ] {
            let c = FederatedTokenFileCredential::new(
                http.clone(),
                Url::parse(host).unwrap(),
                "tenant".into(),
                "client".into(),
                "/tmp/x".into(),
            )
            .unwrap();
            assert!(
                c.token_url()
                    .as_str()
                    .ends_with("/tenant/oauth2/v2.0/token"),
                "{}",
                c.token_url()
            );
            assert!(!c.token_url().path().starts_with("//"));
        }
    }

    #[test]
    fn token_response_lifetimes() {
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":3600,"token_type":"Bearer"}"#)
                .unwrap();
        let t = t.into_access_token();
        assert!(t.expires_on > OffsetDateTime::now_utc() + Duration::from_secs(3500));
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_on":"4102444800"}"#).unwrap();
        assert_eq!(t.into_access_token().expires_on.year(), 2100);
    }
}
