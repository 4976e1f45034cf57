//! The admin API under `/_emulator/` (no authentication): stats, request log, faults (global
//! and per NSG), management locks, runtime config, direct rule edits ("drift"), deleting an NSG
//! out from under its users, and a state dump.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::App;
use crate::faults::{Faults, NsgFault};
use crate::locks::{self, Lock};
use crate::model;
use crate::state::{ConfigUpdate, Stats, parse_rule_props};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/_emulator/health", get(|| async { "ok" }))
        .route("/_emulator/stats", get(stats).delete(reset_stats))
        .route("/_emulator/requests", get(requests).delete(clear_requests))
        .route(
            "/_emulator/faults",
            get(get_faults).post(set_faults).delete(clear_faults),
        )
        .route(
            "/_emulator/nsg-faults",
            get(get_nsg_faults)
                .post(set_nsg_fault)
                .delete(clear_nsg_faults),
        )
        .route(
            "/_emulator/locks",
            get(get_locks).post(set_lock).delete(clear_locks),
        )
        .route("/_emulator/nsg", axum::routing::delete(delete_nsg))
        .route("/_emulator/config", get(get_config).post(set_config))
        .route(
            "/_emulator/rule",
            get(get_rule).put(put_rule).delete(delete_rule),
        )
        .route("/_emulator/rules", get(rules))
        .route("/_emulator/interleave", axum::routing::post(interleave))
        .route("/_emulator/state", get(dump))
}

fn admin_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn stats(State(app): State<App>) -> Response {
    axum::Json(app.inner.lock().stats.clone()).into_response()
}

async fn reset_stats(State(app): State<App>) -> Response {
    app.inner.lock().stats = Stats::default();
    StatusCode::NO_CONTENT.into_response()
}

async fn requests(State(app): State<App>) -> Response {
    let g = app.inner.lock();
    let list: Vec<_> = g.requests.iter().cloned().collect();
    axum::Json(list).into_response()
}

async fn clear_requests(State(app): State<App>) -> Response {
    app.inner.lock().requests.clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn get_faults(State(app): State<App>) -> Response {
    axum::Json(app.inner.lock().faults.clone()).into_response()
}

async fn set_faults(State(app): State<App>, body: Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, format!("invalid faults: {e}")),
    };
    if !(0.0..=1.0).contains(&faults.error_rate) || !(0.0..=1.0).contains(&faults.drop_rate) {
        return admin_error(
            StatusCode::BAD_REQUEST,
            "error_rate and drop_rate must be within 0..1",
        );
    }
    tracing::info!(?faults, "faults set");
    app.inner.lock().faults = faults.clone();
    axum::Json(faults).into_response()
}

async fn clear_faults(State(app): State<App>) -> Response {
    app.inner.lock().faults = Faults::default();
    StatusCode::NO_CONTENT.into_response()
}

async fn get_nsg_faults(State(app): State<App>) -> Response {
    axum::Json(app.inner.lock().nsg_faults.clone()).into_response()
}

/// Sets (or replaces) the persistent fault of one NSG.
async fn set_nsg_fault(State(app): State<App>, body: Bytes) -> Response {
    let fault: NsgFault = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, format!("invalid NSG fault: {e}")),
    };
    if model::parse_nsg_id(&fault.nsg).is_none() {
        return admin_error(
            StatusCode::BAD_REQUEST,
            format!("not a network security group id: {}", fault.nsg),
        );
    }
    if !(400..=599).contains(&fault.status) {
        return admin_error(StatusCode::BAD_REQUEST, "status must be within 400..=599");
    }
    tracing::info!(?fault, "NSG fault set");
    let mut g = app.inner.lock();
    let key = fault.key();
    g.nsg_faults.retain(|f| f.key() != key);
    g.nsg_faults.push(fault.clone());
    axum::Json(fault).into_response()
}

#[derive(Deserialize)]
struct OptionalNsgQuery {
    nsg: Option<String>,
}

/// Clears the fault of `?nsg=<id>`, or every NSG fault without a query.
async fn clear_nsg_faults(State(app): State<App>, Query(q): Query<OptionalNsgQuery>) -> Response {
    let mut g = app.inner.lock();
    match q.nsg {
        Some(id) => {
            let key = locks::normalise(&id);
            g.nsg_faults.retain(|f| f.key() != key);
        }
        None => g.nsg_faults.clear(),
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn get_locks(State(app): State<App>) -> Response {
    axum::Json(app.inner.lock().locks.clone()).into_response()
}

/// Sets a lock; a second lock of the same level on the same scope is a no-op.
async fn set_lock(State(app): State<App>, body: Bytes) -> Response {
    let lock: Lock = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, format!("invalid lock: {e}")),
    };
    let segs = lock.scope.trim().trim_matches('/').split('/').count();
    if !lock.scope.trim().starts_with("/subscriptions/") || segs < 2 {
        return admin_error(
            StatusCode::BAD_REQUEST,
            format!(
                "not a scope (subscription, resource group or resource id): {}",
                lock.scope
            ),
        );
    }
    tracing::info!(?lock, "lock set");
    let mut g = app.inner.lock();
    let key = locks::normalise(&lock.scope);
    if !g
        .locks
        .iter()
        .any(|l| locks::normalise(&l.scope) == key && l.level == lock.level)
    {
        g.locks.push(lock.clone());
    }
    axum::Json(lock).into_response()
}

#[derive(Deserialize)]
struct OptionalScopeQuery {
    scope: Option<String>,
}

/// Removes the locks on `?scope=<id>` (every level), or every lock without a query.
async fn clear_locks(State(app): State<App>, Query(q): Query<OptionalScopeQuery>) -> Response {
    let mut g = app.inner.lock();
    match q.scope {
        Some(scope) => {
            let key = locks::normalise(&scope);
            g.locks.retain(|l| locks::normalise(&l.scope) != key);
        }
        None => g.locks.clear(),
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Deletes an NSG at once, detaching it from every NIC and subnet first (what an admin
/// deleting it from under the operator amounts to). 404 when it does not exist.
async fn delete_nsg(State(app): State<App>, Query(q): Query<IdQuery>) -> Response {
    let Some((sub, rg, nsg)) = model::parse_nsg_id(&q.id) else {
        return admin_error(
            StatusCode::BAD_REQUEST,
            format!("not a network security group id: {}", q.id),
        );
    };
    let mut g = app.inner.lock();
    g.settle(Instant::now());
    let Some(r) = g.world.sub_mut(&sub).and_then(|s| s.rg_mut(&rg)) else {
        return admin_error(
            StatusCode::NOT_FOUND,
            format!("no such resource group for {}", q.id),
        );
    };
    let before = r.nsgs.len();
    r.nsgs.retain(|n| !n.name.eq_ignore_ascii_case(&nsg));
    if r.nsgs.len() == before {
        return admin_error(
            StatusCode::NOT_FOUND,
            format!("no such network security group {}", q.id),
        );
    }
    let uses = |x: &Option<String>| x.as_deref().is_some_and(|y| y.eq_ignore_ascii_case(&nsg));
    for nic in &mut r.nics {
        if uses(&nic.nsg) {
            nic.nsg = None;
        }
    }
    for subnet in r.vnets.iter_mut().flat_map(|v| v.subnets.iter_mut()) {
        if uses(&subnet.nsg) {
            subnet.nsg = None;
        }
    }
    g.save_logged();
    tracing::info!(nsg = %q.id, "NSG deleted directly");
    StatusCode::NO_CONTENT.into_response()
}

async fn get_config(State(app): State<App>) -> Response {
    axum::Json(app.inner.lock().config.view()).into_response()
}

async fn set_config(State(app): State<App>, body: Bytes) -> Response {
    let update: ConfigUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, format!("invalid config: {e}")),
    };
    let mut g = app.inner.lock();
    if let Some(ms) = update.async_delay_ms {
        g.config.async_delay = Duration::from_millis(ms);
    }
    if let Some(s) = update.retry_after_secs {
        g.config.retry_after_secs = s;
    }
    if let Some(p) = update.page_size {
        g.config.page_size = p.max(1);
    }
    let mut buckets_changed = false;
    let cfg = &mut g.config;
    for (value, slot) in [
        (update.write_burst, &mut cfg.write_burst),
        (update.delete_burst, &mut cfg.delete_burst),
        (update.read_burst, &mut cfg.read_burst),
    ] {
        if let Some(v) = value {
            *slot = v;
            buckets_changed = true;
        }
    }
    for (value, slot) in [
        (update.write_refill_per_sec, &mut cfg.write_refill_per_sec),
        (update.delete_refill_per_sec, &mut cfg.delete_refill_per_sec),
        (update.read_refill_per_sec, &mut cfg.read_refill_per_sec),
    ] {
        if let Some(v) = value {
            *slot = v.max(0.0);
            buckets_changed = true;
        }
    }
    if buckets_changed {
        // New limits start from full buckets.
        g.buckets.clear();
    }
    tracing::info!(config = ?g.config, "config changed");
    axum::Json(g.config.view()).into_response()
}

#[derive(Deserialize)]
struct IdQuery {
    id: String,
}

#[derive(Deserialize)]
struct NsgQuery {
    nsg: String,
}

async fn get_rule(State(app): State<App>, Query(q): Query<IdQuery>) -> Response {
    let Some(id) = model::parse_rule_id(&q.id) else {
        return admin_error(
            StatusCode::BAD_REQUEST,
            format!("not a security rule id: {}", q.id),
        );
    };
    let mut g = app.inner.lock();
    g.settle(Instant::now());
    let Some(sub) = g.world.sub(&id.subscription) else {
        return admin_error(StatusCode::NOT_FOUND, "no such subscription");
    };
    let Some(rg) = sub.rg(&id.resource_group) else {
        return admin_error(StatusCode::NOT_FOUND, "no such resource group");
    };
    let Some(nsg) = rg.nsg(&id.nsg) else {
        return admin_error(StatusCode::NOT_FOUND, "no such network security group");
    };
    match nsg.rule(&id.rule) {
        Some(r) => {
            axum::Json(model::rule_json(&model::nsg_id(sub, rg, &nsg.name), r)).into_response()
        }
        None => admin_error(StatusCode::NOT_FOUND, "no such rule"),
    }
}

/// The rule a `?id=` and JSON body name, or why not (a 400 for the caller).
fn rule_request(q: &IdQuery, body: &[u8]) -> Result<(model::RuleId, model::RuleProps), String> {
    let id =
        model::parse_rule_id(&q.id).ok_or_else(|| format!("not a security rule id: {}", q.id))?;
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let props = parse_rule_props(&v).map_err(|e| format!("invalid rule: {e}"))?;
    Ok((id, props))
}

/// Someone else's write between a caller's read and its write: the rule (`?id=` a rule id,
/// body as for `PUT /_emulator/rule`) is put into its NSG just before the next ARM PUT of that
/// NSG is handled, so a PUT with `If-Match` on the etag read before gets 412.
async fn interleave(State(app): State<App>, Query(q): Query<IdQuery>, body: Bytes) -> Response {
    match rule_request(&q, &body) {
        Ok(rule) => {
            app.inner.lock().interleaved.push(rule);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(why) => admin_error(StatusCode::BAD_REQUEST, why),
    }
}

/// Drift: create or replace a rule directly (no validation, async, throttling or counting).
async fn put_rule(State(app): State<App>, Query(q): Query<IdQuery>, body: Bytes) -> Response {
    let (id, props) = match rule_request(&q, &body) {
        Ok(rule) => rule,
        Err(why) => return admin_error(StatusCode::BAD_REQUEST, why),
    };
    let mut g = app.inner.lock();
    g.settle(Instant::now());
    if !g.put_rule_directly(&id, props) {
        return admin_error(
            StatusCode::NOT_FOUND,
            format!("no such network security group for {}", q.id),
        );
    }
    g.save_logged();
    tracing::info!(rule = %q.id, "drift: rule put directly");
    StatusCode::NO_CONTENT.into_response()
}

/// Drift: delete a rule directly. 404 when it does not exist.
async fn delete_rule(State(app): State<App>, Query(q): Query<IdQuery>) -> Response {
    let Some(id) = model::parse_rule_id(&q.id) else {
        return admin_error(
            StatusCode::BAD_REQUEST,
            format!("not a security rule id: {}", q.id),
        );
    };
    let mut g = app.inner.lock();
    g.settle(Instant::now());
    let Some(nsg) = g
        .world
        .nsg_mut(&id.subscription, &id.resource_group, &id.nsg)
    else {
        return admin_error(
            StatusCode::NOT_FOUND,
            format!("no such network security group for {}", q.id),
        );
    };
    let before = nsg.rules.len();
    nsg.rules.retain(|r| !r.name.eq_ignore_ascii_case(&id.rule));
    if nsg.rules.len() == before {
        return admin_error(StatusCode::NOT_FOUND, format!("no such rule {}", q.id));
    }
    nsg.etag = model::new_etag();
    g.save_logged();
    tracing::info!(rule = %q.id, "drift: rule deleted directly");
    StatusCode::NO_CONTENT.into_response()
}

/// The non-default rules of an NSG as ARM JSON.
async fn rules(State(app): State<App>, Query(q): Query<NsgQuery>) -> Response {
    let Some((sub, rg, nsg)) = model::parse_nsg_id(&q.nsg) else {
        return admin_error(
            StatusCode::BAD_REQUEST,
            format!("not a network security group id: {}", q.nsg),
        );
    };
    let mut g = app.inner.lock();
    g.settle(Instant::now());
    let found = g
        .world
        .sub(&sub)
        .and_then(|s| s.rg(&rg).map(|r| (s, r)))
        .and_then(|(s, r)| r.nsg(&nsg).map(|n| (s, r, n)));
    let Some((s, r, n)) = found else {
        return admin_error(
            StatusCode::NOT_FOUND,
            format!("no such network security group {}", q.nsg),
        );
    };
    let id = model::nsg_id(s, r, &n.name);
    let list: Vec<Value> = n.rules.iter().map(|x| model::rule_json(&id, x)).collect();
    axum::Json(list).into_response()
}

async fn dump(State(app): State<App>) -> Response {
    let mut g = app.inner.lock();
    g.settle(Instant::now());
    // When the state was as dumped: a reader timing changes (a close's lag) would otherwise
    // count the time spent writing and reading a large dump.
    let at = jiff::Timestamp::now().to_string();
    let subs: Vec<Value> = g
        .world
        .subscriptions
        .iter()
        .map(|s| {
            let rgs: Vec<Value> = s
                .resource_groups
                .iter()
                .map(|r| {
                    json!({
                        "name": r.name,
                        "location": r.location,
                        "networkSecurityGroups": r.nsgs.iter().map(|n| model::nsg_json(s, r, n)).collect::<Vec<_>>(),
                        "networkInterfaces": r.nics.iter().map(|n| model::nic_json(s, r, n)).collect::<Vec<_>>(),
                        "subnets": r.vnets.iter().flat_map(|v| v.subnets.iter().map(move |x| model::subnet_json(s, r, v, x))).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({ "id": s.id, "resourceGroups": rgs })
        })
        .collect();
    let pending = g.ops.values().filter(|o| !o.done).count();
    axum::Json(json!({
        "at": at,
        "config": g.config.view(),
        "faults": g.faults,
        "nsg_faults": g.nsg_faults,
        "locks": g.locks,
        "stats": g.stats,
        "pending_operations": pending,
        "subscriptions": subs,
    }))
    .into_response()
}
