//! Admin routes for fault scenarios beyond `/_emulator/faults`: change the network topology
//! under the operator as a person with the portal would (move a NIC to another NSG or detach
//! it; give it another private IP, as a deallocate and restart of its VM does), and make the
//! next async operations end `Failed`. No ARM validation, async
//! operation, throttling or counting for these calls themselves.

use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;

use crate::App;
use crate::model;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/_emulator/nic", post(set_nic_nsg))
        .route("/_emulator/operations", post(fail_operations))
}

fn admin_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

#[derive(Deserialize)]
struct IdQuery {
    id: String,
}

/// `{"networkSecurityGroup": "<NSG name in the NIC's resource group>" | null,
///   "privateIPAddress": "<ip>", "ipConfiguration": "<name>"}`; each optional, absent =
/// unchanged. The address goes to the named IP configuration, else the primary one.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NicUpdate {
    /// Absent: unchanged; `null`: detach.
    #[serde(default, deserialize_with = "present")]
    network_security_group: Option<Option<String>>,
    #[serde(rename = "privateIPAddress", default)]
    private_ip_address: Option<String>,
    #[serde(default)]
    ip_configuration: Option<String>,
}

/// A field that is present (even as `null`) is `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces/{nic}`
/// (case-insensitive) into (s, rg, nic).
fn parse_nic_id(id: &str) -> Option<(String, String, String)> {
    let segs: Vec<&str> = id.trim_matches('/').split('/').collect();
    let lit = |i: usize, s: &str| segs.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
    (segs.len() == 8
        && lit(0, "subscriptions")
        && lit(2, "resourceGroups")
        && lit(4, "providers")
        && lit(5, "Microsoft.Network")
        && lit(6, "networkInterfaces"))
    .then(|| {
        (
            segs[1].to_string(),
            segs[3].to_string(),
            segs[7].to_string(),
        )
    })
}

/// Moves a NIC to another NSG of its resource group, or detaches it (`null`); and/or gives one
/// of its IP configurations another private address within its subnet.
async fn set_nic_nsg(State(app): State<App>, Query(q): Query<IdQuery>, body: Bytes) -> Response {
    let Some((sub, rg, nic)) = parse_nic_id(&q.id) else {
        return admin_error(
            StatusCode::BAD_REQUEST,
            format!("not a network interface id: {}", q.id),
        );
    };
    let update: NicUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
    };
    let ip = match update.private_ip_address.as_deref().map(str::parse) {
        None => None,
        Some(Ok(ip)) => Some::<std::net::IpAddr>(ip),
        Some(Err(_)) => {
            return admin_error(
                StatusCode::BAD_REQUEST,
                "privateIPAddress is not an IP address",
            );
        }
    };
    let mut g = app.inner.lock();
    g.settle(Instant::now());
    let Some(r) = g.world.sub_mut(&sub).and_then(|s| s.rg_mut(&rg)) else {
        return admin_error(StatusCode::NOT_FOUND, "no such resource group");
    };
    let nsg = match update.network_security_group {
        None => None,
        Some(Some(name)) => match r.nsg(&name) {
            Some(n) => Some(Some(n.name.clone())),
            None => {
                return admin_error(
                    StatusCode::NOT_FOUND,
                    format!("no network security group {name} in {rg}"),
                );
            }
        },
        Some(None) => Some(None),
    };
    let prefixes: Vec<(String, String, String)> = r
        .vnets
        .iter()
        .flat_map(|v| {
            v.subnets
                .iter()
                .map(|s| (v.name.clone(), s.name.clone(), s.address_prefix.clone()))
        })
        .collect();
    let Some(n) = r
        .nics
        .iter_mut()
        .find(|n| n.name.eq_ignore_ascii_case(&nic))
    else {
        return admin_error(StatusCode::NOT_FOUND, format!("no such NIC {}", q.id));
    };
    let etag = model::new_etag();
    if let Some(ip) = ip {
        let wanted = update.ip_configuration.as_deref();
        let Some(c) = n.ip_configurations.iter_mut().find(|c| match wanted {
            Some(name) => c.name.eq_ignore_ascii_case(name),
            None => c.primary,
        }) else {
            return admin_error(
                StatusCode::NOT_FOUND,
                format!("no such IP configuration on {}", q.id),
            );
        };
        let in_subnet = prefixes.iter().any(|(v, s, prefix)| {
            v.eq_ignore_ascii_case(&c.vnet)
                && s.eq_ignore_ascii_case(&c.subnet)
                && prefix
                    .parse::<ipnet::IpNet>()
                    .is_ok_and(|net| net.contains(&ip))
        });
        if !in_subnet {
            return admin_error(
                StatusCode::BAD_REQUEST,
                format!("{ip} is not in subnet {}/{}", c.vnet, c.subnet),
            );
        }
        c.private_ip_address = ip.to_string();
        c.etag = etag.clone();
        tracing::info!(nic = %q.id, ipconfig = %c.name, %ip, "topology: NIC's private IP changed");
    }
    if let Some(nsg) = nsg {
        n.nsg = nsg;
        tracing::info!(nic = %q.id, "topology: NIC's network security group changed");
    }
    n.etag = etag;
    g.save_logged();
    StatusCode::NO_CONTENT.into_response()
}

/// `{"failNext": N}`: the next N async operations (rule or NSG PUT/DELETE) are accepted as
/// usual and end `Failed`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OperationFaults {
    fail_next: u32,
}

async fn fail_operations(State(app): State<App>, body: Bytes) -> Response {
    let f: OperationFaults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
    };
    app.inner.lock().fail_next_ops = f.fail_next;
    tracing::info!(fail_next = f.fail_next, "async operations will fail");
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_ids() {
        assert_eq!(
            parse_nic_id(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/nic"
            ),
            Some(("s".into(), "rg".into(), "nic".into()))
        );
        assert_eq!(
            parse_nic_id(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/x"
            ),
            None
        );
        assert_eq!(parse_nic_id("/subscriptions/s"), None);
    }
}
