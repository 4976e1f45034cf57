//! Entra ID token endpoint (client credentials with a secret or a federated assertion), a
//! managed identity (IMDS / App Service style) endpoint, and the bearer check for ARM calls.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::App;
use crate::error::ArmError;
use crate::state::Inner;

/// Lifetime of issued tokens, seconds.
const TOKEN_LIFETIME_SECS: u64 = 3599;

pub const ASSERTION_TYPE_CLIENT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const ASSERTION_TYPE_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

pub fn routes() -> Router<App> {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route("/metadata/identity/oauth2/token", get(managed_identity))
}

fn aad_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    let now = jiff::Timestamp::now();
    let body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {description}\r\nTrace ID: {}\r\nTimestamp: {now}", uuid::Uuid::new_v4()),
        "error_codes": [code],
        "timestamp": now.to_string(),
        "trace_id": uuid::Uuid::new_v4().to_string(),
        "correlation_id": uuid::Uuid::new_v4().to_string(),
    });
    (status, axum::Json(body)).into_response()
}

fn issue(inner: &mut Inner, grant: &str) -> String {
    let token = format!(
        "emu.{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    inner.tokens.insert(token.clone());
    inner.stats.tokens_issued += 1;
    *inner
        .stats
        .tokens_by_grant
        .entry(grant.to_string())
        .or_default() += 1;
    token
}

/// `POST /{tenant}/oauth2/v2.0/token`, form-encoded client credentials flow.
async fn token(State(app): State<App>, Path(tenant): Path<String>, body: Bytes) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let field = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let mut g = app.inner.lock();
    let refuse = |g: &mut Inner, r: Response| {
        g.stats.token_failures += 1;
        r
    };
    match field("grant_type") {
        Some("client_credentials") => {}
        Some(other) => {
            let r = aad_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                &format!("The app requested an unsupported grant type '{other}'."),
            );
            return refuse(&mut g, r);
        }
        None => {
            let r = aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            );
            return refuse(&mut g, r);
        }
    }
    let Some(client_id) = field("client_id") else {
        let r = aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        );
        return refuse(&mut g, r);
    };
    g.stats.last_client_id = Some(client_id.to_string());
    if let Some((want_id, _)) = &g.credentials
        && want_id != client_id
    {
        let r = aad_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'."
            ),
        );
        return refuse(&mut g, r);
    }
    let grant = match (field("client_secret"), field("client_assertion")) {
        (Some(secret), None) => {
            if let Some((_, want_secret)) = &g.credentials
                && want_secret != secret
            {
                let r = aad_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                );
                return refuse(&mut g, r);
            }
            "client_secret"
        }
        (None, Some(assertion)) => {
            match field("client_assertion_type") {
                Some(ASSERTION_TYPE_CLIENT) | Some(ASSERTION_TYPE_GRANT) => {}
                _ => {
                    let r = aad_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        50027,
                        "Invalid client_assertion_type; expected urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
                    );
                    return refuse(&mut g, r);
                }
            }
            g.stats.last_client_assertion = Some(assertion.to_string());
            *g.stats
                .tokens_by_assertion
                .entry(assertion.to_string())
                .or_default() += 1;
            "client_assertion"
        }
        (Some(_), Some(_)) => {
            let r = aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                90014,
                "Only one of client_secret and client_assertion may be given.",
            );
            return refuse(&mut g, r);
        }
        (None, None) => {
            let r = aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            );
            return refuse(&mut g, r);
        }
    };
    let token = issue(&mut g, grant);
    tracing::info!(%tenant, %client_id, grant, "issued access token");
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": TOKEN_LIFETIME_SECS,
        "ext_expires_in": TOKEN_LIFETIME_SECS,
        "access_token": token,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct MiQuery {
    resource: Option<String>,
    client_id: Option<String>,
}

/// `GET /metadata/identity/oauth2/token?resource=...` with `Metadata: true` (IMDS) or an
/// `X-IDENTITY-HEADER` (App Service).
async fn managed_identity(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<MiQuery>,
) -> Response {
    let has_metadata = headers
        .get("metadata")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let has_identity_header = headers.contains_key("x-identity-header");
    let mut g = app.inner.lock();
    if !has_metadata && !has_identity_header {
        g.stats.token_failures += 1;
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_request", "error_description": "Required metadata header not specified"})),
        )
            .into_response();
    }
    let Some(resource) = q.resource.filter(|r| !r.is_empty()) else {
        g.stats.token_failures += 1;
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_request", "error_description": "Required query variable 'resource' is missing"})),
        )
            .into_response();
    };
    let token = issue(&mut g, "managed_identity");
    let now = jiff::Timestamp::now().as_second();
    let lifetime = TOKEN_LIFETIME_SECS as i64;
    axum::Json(json!({
        "access_token": token,
        "client_id": q.client_id.unwrap_or_else(|| "00000000-0000-0000-0000-00000000abcd".into()),
        "expires_in": lifetime.to_string(),
        "expires_on": (now + lifetime).to_string(),
        "ext_expires_in": lifetime.to_string(),
        "not_before": now.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    }))
    .into_response()
}

/// Checks `Authorization: Bearer <token>` against the issued tokens.
pub fn check_bearer(inner: &Inner, headers: &HeaderMap) -> Result<(), ArmError> {
    let Some(value) = headers.get("authorization") else {
        return Err(ArmError::new(
            StatusCode::UNAUTHORIZED,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
        ));
    };
    let value = value.to_str().unwrap_or_default();
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(ArmError::new(
                StatusCode::UNAUTHORIZED,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is provided in an invalid format.",
            ));
        }
    };
    if inner.tokens.contains(token) {
        Ok(())
    } else {
        Err(ArmError::new(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "The access token is invalid.",
        ))
    }
}
