//! ARM handlers: path dispatch (case-insensitive), api-version check, faults, auth,
//! throttling, per-NSG write serialisation, async operations, paging.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ArmError;
use crate::faults::FaultAction;
use crate::model::{self, DELETING, Nsg, Rule, SUCCEEDED, UPDATING};
use crate::server::DropConnection;
use crate::state::{Inner, OpKind, RequestRecord, parse_rule_props};
use crate::throttle::{BucketKind, Take};
use crate::validate::{self, Violation};
use crate::{API_VERSION, App, COMPUTE_API_VERSION};

/// Middleware: records every non-admin request (method, path with query, status, time).
pub async fn record(State(app): State<App>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let admin = req.uri().path().starts_with("/_emulator");
    let started = Instant::now();
    let resp = next.run(req).await;
    if !admin {
        let status = if resp.extensions().get::<DropConnection>().is_some() {
            0
        } else {
            resp.status().as_u16()
        };
        tracing::debug!(%method, %path, status, elapsed_us = started.elapsed().as_micros() as u64, "request");
        let now = jiff::Timestamp::now();
        app.inner.lock().record(RequestRecord {
            method,
            path,
            status,
            at: now.to_string(),
            at_unix_ms: now.as_millisecond(),
        });
    }
    resp
}

struct Ctx {
    base: String,
    now: Instant,
    query: Vec<(String, String)>,
    /// The `If-Match` request header, when sent.
    if_match: Option<String>,
}

impl Ctx {
    fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

fn base_url(app: &App, headers: &HeaderMap) -> String {
    headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .map_or_else(|| app.base_url.clone(), |h| format!("http://{h}"))
}

/// The ARM fallback handler.
pub async fn handle(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let is_write = method == Method::PUT || method == Method::DELETE || method == Method::PATCH;
    let (latency, action) = {
        let mut g = app.inner.lock();
        let action = g.faults.decide(is_write, fastrand::f64);
        if action != FaultAction::None {
            g.stats.faults_injected += 1;
        }
        let latency = if g.faults.writes_only && !is_write {
            0
        } else {
            g.faults.latency_ms
        };
        (latency, action)
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let mut resp = match action {
        FaultAction::None => dispatch(&app, &method, &uri, &headers, &body, is_write),
        FaultAction::Drop => {
            tracing::info!(%method, %uri, "fault: dropping connection");
            let mut r = Response::new(Body::empty());
            r.extensions_mut().insert(DropConnection);
            r
        }
        FaultAction::Error(status) => {
            let (status, code, msg) = if status == 503 {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "The service is temporarily unavailable. Please retry later.",
                )
            } else {
                (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    "InternalServerError",
                    "An error occurred while processing the request (injected fault).",
                )
            };
            tracing::info!(%method, %uri, status = status.as_u16(), "fault: error");
            ArmError::new(status, code, msg).into_response()
        }
        FaultAction::Throttle {
            retry_after_secs,
            code,
        } => {
            tracing::info!(%method, %uri, "fault: 429");
            ArmError::new(
                StatusCode::TOO_MANY_REQUESTS,
                &code,
                "The request was throttled (injected fault). Please retry later.",
            )
            .with_retry_after(retry_after_secs)
            .into_response()
        }
    };
    let id = uuid::Uuid::new_v4().to_string();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-ms-request-id", v.clone());
        resp.headers_mut().insert("x-ms-correlation-request-id", v);
    }
    resp
}

fn dispatch(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    is_write: bool,
) -> Response {
    let now = Instant::now();
    let mut g = app.inner.lock();
    if let Err(e) = crate::auth::check_bearer(&g, headers) {
        g.stats.auth_failures += 1;
        return e.into_response();
    }
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let ctx = Ctx {
        base: base_url(app, headers),
        now,
        query,
        if_match: headers
            .get("if-match")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string()),
    };
    // Each resource provider has its own api-versions: Compute for VMs, Network for the rest.
    let (namespace, api_version) = if is_compute_path(uri.path()) {
        ("Microsoft.Compute", COMPUTE_API_VERSION)
    } else {
        ("Microsoft.Network", API_VERSION)
    };
    match ctx.query("api-version") {
        None => {
            return ArmError::bad_request(
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
            .into_response();
        }
        Some(v) if v != api_version => {
            return ArmError::bad_request(
                "InvalidApiVersionParameter",
                format!(
                    "The api-version '{v}' is invalid. The supported versions are '{api_version}'."
                ),
            )
            .into_response();
        }
        Some(_) => {}
    }
    g.settle(now);
    let segs: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let Some(route) = Route::parse(&segs) else {
        return ArmError::new(
            StatusCode::NOT_FOUND,
            "InvalidResourceType",
            format!(
                "The resource type could not be found in the namespace '{namespace}' for api version '{api_version}' (path {}).",
                uri.path()
            ),
        )
        .into_response();
    };
    if let Some(resp) = nsg_fault(&mut g, &route, method, is_write) {
        return resp;
    }
    if is_write {
        write(&mut g, &ctx, route, method, body)
    } else if *method == Method::GET {
        g.stats.reads += 1;
        if route.is_topology() {
            g.stats.topology_reads += 1;
        }
        let sub = subscription_of(&route);
        let remaining = match charge(&mut g, &sub, BucketKind::Read, now) {
            Ok(remaining) => remaining,
            Err(retry_after_secs) => {
                g.stats.reads_throttled += 1;
                return throttled(&sub, BucketKind::Read, retry_after_secs);
            }
        };
        let mut resp = read(&mut g, &ctx, route).unwrap_or_else(IntoResponse::into_response);
        insert_header(&mut resp, BucketKind::Read.header(), &remaining.to_string());
        resp
    } else {
        method_not_allowed(method)
    }
}

/// Whether the path is under `providers/Microsoft.Compute` (case-insensitive, as ARM).
fn is_compute_path(path: &str) -> bool {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    segs.windows(2).any(|w| {
        w[0].eq_ignore_ascii_case("providers") && w[1].eq_ignore_ascii_case("Microsoft.Compute")
    })
}

fn method_not_allowed(method: &Method) -> Response {
    ArmError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("The requested resource does not support http method '{method}'."),
    )
    .into_response()
}

/// The ARM paths the emulator serves (names as given in the path).
#[derive(Debug, Clone)]
enum Route<'a> {
    NsgsInSub(&'a str),
    NicsInSub(&'a str),
    Operation {
        sub: &'a str,
        id: &'a str,
        result: bool,
    },
    NsgsInRg(&'a str, &'a str),
    Nsg(&'a str, &'a str, &'a str),
    Rules(&'a str, &'a str, &'a str),
    Rule(&'a str, &'a str, &'a str, &'a str),
    DefaultRules(&'a str, &'a str, &'a str),
    DefaultRule(&'a str, &'a str, &'a str, &'a str),
    NicsInRg(&'a str, &'a str),
    Nic(&'a str, &'a str, &'a str),
    Subnets(&'a str, &'a str, &'a str),
    Subnet(&'a str, &'a str, &'a str, &'a str),
    /// `Microsoft.Compute/virtualMachines` of a resource group (GET only, paged).
    VmsInRg(&'a str, &'a str),
    /// `Microsoft.Compute/virtualMachines/{vm}` (GET only).
    Vm(&'a str, &'a str, &'a str),
}

impl<'a> Route<'a> {
    /// A read of where VMs are (VMs, NICs, subnets), not of NSGs or operations.
    fn is_topology(&self) -> bool {
        matches!(
            self,
            Route::NicsInSub(_)
                | Route::NicsInRg(..)
                | Route::Nic(..)
                | Route::Subnets(..)
                | Route::Subnet(..)
                | Route::VmsInRg(..)
                | Route::Vm(..)
        )
    }

    fn parse(segs: &[&'a str]) -> Option<Route<'a>> {
        let lit = |i: usize, s: &str| segs.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
        let seg = |i: usize| segs.get(i).copied().filter(|s| !s.is_empty());
        if !lit(0, "subscriptions") {
            return None;
        }
        let sub = seg(1)?;
        if lit(2, "providers") && lit(3, "Microsoft.Network") {
            return match segs.len() {
                5 if lit(4, "networkSecurityGroups") => Some(Route::NsgsInSub(sub)),
                5 if lit(4, "networkInterfaces") => Some(Route::NicsInSub(sub)),
                8 if lit(4, "locations")
                    && (lit(6, "operations") || lit(6, "operationResults")) =>
                {
                    Some(Route::Operation {
                        sub,
                        id: seg(7)?,
                        result: lit(6, "operationResults"),
                    })
                }
                _ => None,
            };
        }
        if lit(2, "resourceGroups")
            && lit(4, "providers")
            && lit(5, "Microsoft.Compute")
            && lit(6, "virtualMachines")
        {
            return match segs.len() {
                7 => Some(Route::VmsInRg(sub, seg(3)?)),
                8 => Some(Route::Vm(sub, seg(3)?, seg(7)?)),
                _ => None,
            };
        }
        if !(lit(2, "resourceGroups") && lit(4, "providers") && lit(5, "Microsoft.Network")) {
            return None;
        }
        let rg = seg(3)?;
        if lit(6, "networkSecurityGroups") {
            return match segs.len() {
                7 => Some(Route::NsgsInRg(sub, rg)),
                8 => Some(Route::Nsg(sub, rg, seg(7)?)),
                9 if lit(8, "securityRules") => Some(Route::Rules(sub, rg, seg(7)?)),
                10 if lit(8, "securityRules") => Some(Route::Rule(sub, rg, seg(7)?, seg(9)?)),
                9 if lit(8, "defaultSecurityRules") => Some(Route::DefaultRules(sub, rg, seg(7)?)),
                10 if lit(8, "defaultSecurityRules") => {
                    Some(Route::DefaultRule(sub, rg, seg(7)?, seg(9)?))
                }
                _ => None,
            };
        }
        if lit(6, "networkInterfaces") {
            return match segs.len() {
                7 => Some(Route::NicsInRg(sub, rg)),
                8 => Some(Route::Nic(sub, rg, seg(7)?)),
                _ => None,
            };
        }
        if lit(6, "virtualNetworks") && lit(8, "subnets") {
            return match segs.len() {
                9 => Some(Route::Subnets(sub, rg, seg(7)?)),
                10 => Some(Route::Subnet(sub, rg, seg(7)?, seg(9)?)),
                _ => None,
            };
        }
        None
    }
}

impl Route<'_> {
    /// (subscription, resource group, NSG) for routes on one NSG or its rules.
    fn nsg(&self) -> Option<(&str, &str, &str)> {
        match *self {
            Route::Nsg(s, r, n)
            | Route::Rules(s, r, n)
            | Route::Rule(s, r, n, _)
            | Route::DefaultRules(s, r, n)
            | Route::DefaultRule(s, r, n, _) => Some((s, r, n)),
            _ => None,
        }
    }

    /// The ARM id the request addresses (as written in the path), for routes on one NSG.
    fn resource_id(&self) -> Option<String> {
        let (s, r, n) = self.nsg()?;
        let nsg = format!(
            "/subscriptions/{s}/resourceGroups/{r}/providers/Microsoft.Network/networkSecurityGroups/{n}"
        );
        Some(match *self {
            Route::Rules(..) => format!("{nsg}/securityRules"),
            Route::Rule(_, _, _, x) => format!("{nsg}/securityRules/{x}"),
            Route::DefaultRules(..) => format!("{nsg}/defaultSecurityRules"),
            Route::DefaultRule(_, _, _, x) => format!("{nsg}/defaultSecurityRules/{x}"),
            _ => nsg,
        })
    }
}

/// A persistent per-NSG fault that answers this request, if one is set.
fn nsg_fault(
    g: &mut Inner,
    route: &Route<'_>,
    method: &Method,
    is_write: bool,
) -> Option<Response> {
    if g.nsg_faults.is_empty() {
        return None;
    }
    let (s, r, n) = route.nsg()?;
    let key = crate::locks::normalise(&format!(
        "/subscriptions/{s}/resourceGroups/{r}/providers/Microsoft.Network/networkSecurityGroups/{n}"
    ));
    let fault = g
        .nsg_faults
        .iter()
        .find(|f| f.key() == key && f.applies(is_write))?
        .clone();
    let resource_id = route.resource_id()?;
    let action = if *method == Method::DELETE {
        "delete"
    } else if *method == Method::GET {
        "read"
    } else {
        "write"
    };
    let (code, message) = fault.code_and_message(&resource_id, action);
    // Counted like the global faults: the request never reached the resource provider.
    g.stats.faults_injected += 1;
    tracing::info!(%method, nsg = %fault.nsg, status = fault.status, %code, "per-NSG fault");
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut err = ArmError::new(status, &code, message);
    if fault.status == 429 || fault.status == 503 {
        err = err.with_retry_after(g.config.retry_after_secs);
    }
    Some(err.into_response())
}

/// `If-Match` on a write: `*` needs the resource to exist; any other value must equal its etag.
fn check_if_match(ctx: &Ctx, current: Option<&str>, resource_id: &str) -> Result<(), ArmError> {
    let Some(wanted) = ctx.if_match.as_deref() else {
        return Ok(());
    };
    let ok = match current {
        Some(etag) => wanted == "*" || wanted == etag,
        None => false,
    };
    if ok {
        return Ok(());
    }
    let detail = match current {
        Some(etag) => format!(
            "Etag provided in if-match header {wanted} does not match etag {etag} of resource {resource_id} in NRP data store."
        ),
        None => format!(
            "Etag provided in if-match header {wanted} does not match: resource {resource_id} does not exist in NRP data store."
        ),
    };
    Err(ArmError::new(
        StatusCode::PRECONDITION_FAILED,
        "PreconditionFailed",
        "Precondition failed.",
    )
    .with_detail("PreconditionFailedEtagMismatch", detail))
}

fn not_found(code: &str, message: String) -> ArmError {
    ArmError::new(StatusCode::NOT_FOUND, code, message)
}

fn sub_of<'w>(g: &'w Inner, sub: &str) -> Result<&'w model::Subscription, ArmError> {
    g.world.sub(sub).ok_or_else(|| {
        not_found(
            "SubscriptionNotFound",
            format!("The subscription '{sub}' could not be found."),
        )
    })
}

fn rg_of<'w>(
    g: &'w Inner,
    sub: &str,
    rg: &str,
) -> Result<(&'w model::Subscription, &'w model::ResourceGroup), ArmError> {
    let s = sub_of(g, sub)?;
    let r = s.rg(rg).ok_or_else(|| {
        not_found(
            "ResourceGroupNotFound",
            format!("Resource group '{rg}' could not be found."),
        )
    })?;
    Ok((s, r))
}

fn resource_not_found(kind: &str, name: &str, rg: &str) -> ArmError {
    provider_resource_not_found("Microsoft.Network", kind, name, rg)
}

fn provider_resource_not_found(provider: &str, kind: &str, name: &str, rg: &str) -> ArmError {
    not_found(
        "ResourceNotFound",
        format!(
            "The Resource '{provider}/{kind}/{name}' under resource group '{rg}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"
        ),
    )
}

type Found<'w> = (&'w model::Subscription, &'w model::ResourceGroup, &'w Nsg);

fn nsg_of<'w>(g: &'w Inner, sub: &str, rg: &str, nsg: &str) -> Result<Found<'w>, ArmError> {
    let (s, r) = rg_of(g, sub, rg)?;
    let n = r
        .nsg(nsg)
        .ok_or_else(|| resource_not_found("networkSecurityGroups", nsg, rg))?;
    Ok((s, r, n))
}

fn json_ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// Pages `items` by the configured page size; `path` is the list's canonical path.
fn page(g: &Inner, ctx: &Ctx, items: Vec<Value>, path: &str) -> Result<Response, ArmError> {
    page_at(g, ctx, items, path, API_VERSION)
}

/// [`page`] for a provider with another api-version (the `nextLink` carries it).
fn page_at(
    g: &Inner,
    ctx: &Ctx,
    items: Vec<Value>,
    path: &str,
    api_version: &str,
) -> Result<Response, ArmError> {
    let skip = match ctx.query("$skipToken") {
        None => 0,
        Some(t) => t.parse::<usize>().map_err(|_| {
            ArmError::bad_request(
                "InvalidSkipToken",
                format!("The skip token '{t}' is invalid."),
            )
        })?,
    };
    let size = g.config.page_size.max(1);
    let total = items.len();
    let value: Vec<Value> = items.into_iter().skip(skip).take(size).collect();
    let mut body = json!({ "value": value });
    if skip.saturating_add(size) < total {
        body["nextLink"] = json!(format!(
            "{}{path}?api-version={api_version}&$skipToken={}",
            ctx.base,
            skip + size
        ));
    }
    Ok(json_ok(body))
}

fn read(g: &mut Inner, ctx: &Ctx, route: Route<'_>) -> Result<Response, ArmError> {
    match route {
        Route::NsgsInSub(sub) => {
            let s = sub_of(g, sub)?;
            let items = s
                .resource_groups
                .iter()
                .flat_map(|r| r.nsgs.iter().map(move |n| model::nsg_json(s, r, n)))
                .collect();
            let path = format!(
                "/subscriptions/{}/providers/Microsoft.Network/networkSecurityGroups",
                s.id
            );
            page(g, ctx, items, &path)
        }
        Route::NicsInSub(sub) => {
            let s = sub_of(g, sub)?;
            let items = s
                .resource_groups
                .iter()
                .flat_map(|r| r.nics.iter().map(move |n| model::nic_json(s, r, n)))
                .collect();
            let path = format!(
                "/subscriptions/{}/providers/Microsoft.Network/networkInterfaces",
                s.id
            );
            page(g, ctx, items, &path)
        }
        Route::Operation { sub, id, result } => {
            g.stats.operation_polls += 1;
            let op = g
                .ops
                .get(&id.to_ascii_lowercase())
                .filter(|op| op.subscription.eq_ignore_ascii_case(sub))
                .ok_or_else(|| not_found("NotFound", format!("Operation {id} was not found.")))?;
            let retry = g.config.retry_after_secs;
            if op.done && op.failed {
                let error = json!({
                    "code": "InternalServerError",
                    "message": "An error occurred while processing the operation (injected by the emulator).",
                });
                return Ok(if result {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        axum::Json(json!({ "error": error })),
                    )
                        .into_response()
                } else {
                    json_ok(json!({ "status": "Failed", "error": error }))
                });
            }
            if result {
                if op.done {
                    Ok(StatusCode::NO_CONTENT.into_response())
                } else {
                    let url = format!(
                        "{}/subscriptions/{}/providers/Microsoft.Network/locations/{}/operationResults/{}?api-version={API_VERSION}",
                        ctx.base, op.subscription, op.location, op.id
                    );
                    let mut r = StatusCode::ACCEPTED.into_response();
                    insert_header(&mut r, "location", &url);
                    insert_header(&mut r, "retry-after", &retry.to_string());
                    Ok(r)
                }
            } else if op.done {
                Ok(json_ok(json!({ "status": SUCCEEDED })))
            } else {
                let mut r = json_ok(json!({ "status": "InProgress" }));
                insert_header(&mut r, "retry-after", &retry.to_string());
                Ok(r)
            }
        }
        Route::NsgsInRg(sub, rg) => {
            let (s, r) = rg_of(g, sub, rg)?;
            let items = r.nsgs.iter().map(|n| model::nsg_json(s, r, n)).collect();
            let path = format!(
                "{}/providers/Microsoft.Network/networkSecurityGroups",
                model::rg_id(s, r)
            );
            page(g, ctx, items, &path)
        }
        Route::Nsg(sub, rg, nsg) => {
            let (s, r, n) = nsg_of(g, sub, rg, nsg)?;
            let mut resp = json_ok(model::nsg_json(s, r, n));
            insert_header(&mut resp, "etag", &n.etag);
            Ok(resp)
        }
        Route::Rules(sub, rg, nsg) => {
            let (s, r, n) = nsg_of(g, sub, rg, nsg)?;
            let id = model::nsg_id(s, r, &n.name);
            let items = n.rules.iter().map(|x| model::rule_json(&id, x)).collect();
            page(g, ctx, items, &format!("{id}/securityRules"))
        }
        Route::Rule(sub, rg, nsg, rule) => {
            let (s, r, n) = nsg_of(g, sub, rg, nsg)?;
            let id = model::nsg_id(s, r, &n.name);
            let x = n.rule(rule).ok_or_else(|| {
                not_found(
                    "NotFound",
                    format!("Resource {id}/securityRules/{rule} not found."),
                )
            })?;
            let mut resp = json_ok(model::rule_json(&id, x));
            insert_header(&mut resp, "etag", &x.etag);
            Ok(resp)
        }
        Route::DefaultRules(sub, rg, nsg) => {
            let (s, r, n) = nsg_of(g, sub, rg, nsg)?;
            let id = model::nsg_id(s, r, &n.name);
            let items = model::default_rules_json(&id, &n.etag);
            page(g, ctx, items, &format!("{id}/defaultSecurityRules"))
        }
        Route::DefaultRule(sub, rg, nsg, rule) => {
            let (s, r, n) = nsg_of(g, sub, rg, nsg)?;
            let id = model::nsg_id(s, r, &n.name);
            model::default_rules_json(&id, &n.etag)
                .into_iter()
                .find(|v| {
                    v["name"]
                        .as_str()
                        .is_some_and(|x| x.eq_ignore_ascii_case(rule))
                })
                .map(json_ok)
                .ok_or_else(|| {
                    not_found(
                        "NotFound",
                        format!("Resource {id}/defaultSecurityRules/{rule} not found."),
                    )
                })
        }
        Route::NicsInRg(sub, rg) => {
            let (s, r) = rg_of(g, sub, rg)?;
            let items = r.nics.iter().map(|n| model::nic_json(s, r, n)).collect();
            let path = format!(
                "{}/providers/Microsoft.Network/networkInterfaces",
                model::rg_id(s, r)
            );
            page(g, ctx, items, &path)
        }
        Route::Nic(sub, rg, nic) => {
            let (s, r) = rg_of(g, sub, rg)?;
            let n = r
                .nic(nic)
                .ok_or_else(|| resource_not_found("networkInterfaces", nic, rg))?;
            Ok(json_ok(model::nic_json(s, r, n)))
        }
        Route::Subnets(sub, rg, vnet) => {
            let (s, r) = rg_of(g, sub, rg)?;
            let v = r
                .vnet(vnet)
                .ok_or_else(|| resource_not_found("virtualNetworks", vnet, rg))?;
            let items = v
                .subnets
                .iter()
                .map(|x| model::subnet_json(s, r, v, x))
                .collect();
            let path = format!(
                "{}/providers/Microsoft.Network/virtualNetworks/{}/subnets",
                model::rg_id(s, r),
                v.name
            );
            page(g, ctx, items, &path)
        }
        Route::Subnet(sub, rg, vnet, subnet) => {
            let (s, r) = rg_of(g, sub, rg)?;
            let v = r
                .vnet(vnet)
                .ok_or_else(|| resource_not_found("virtualNetworks", vnet, rg))?;
            let x = model::find(&v.subnets, subnet, |x| &x.name).ok_or_else(|| {
                resource_not_found(
                    "virtualNetworks/subnets",
                    &format!("{}/{subnet}", v.name),
                    rg,
                )
            })?;
            Ok(json_ok(model::subnet_json(s, r, v, x)))
        }
        Route::VmsInRg(sub, rg) => {
            let (s, r) = rg_of(g, sub, rg)?;
            let nics = g.world.nic_ids_by_vm();
            let items = r
                .vms
                .iter()
                .map(|v| {
                    let id = model::vm_id(s, r, &v.name).to_ascii_lowercase();
                    let of_vm = nics.get(&id).map(Vec::as_slice).unwrap_or_default();
                    model::vm_json_with_nics(s, r, v, of_vm)
                })
                .collect();
            let path = format!(
                "{}/providers/Microsoft.Compute/virtualMachines",
                model::rg_id(s, r)
            );
            page_at(g, ctx, items, &path, COMPUTE_API_VERSION)
        }
        Route::Vm(sub, rg, vm) => {
            let (s, r) = rg_of(g, sub, rg)?;
            let v = r.vm(vm).ok_or_else(|| {
                provider_resource_not_found("Microsoft.Compute", "virtualMachines", vm, rg)
            })?;
            Ok(json_ok(model::vm_json(&g.world, s, r, v)))
        }
    }
}

fn insert_header(resp: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

fn subscription_of(route: &Route<'_>) -> String {
    match route {
        Route::NsgsInSub(s)
        | Route::NicsInSub(s)
        | Route::Operation { sub: s, .. }
        | Route::NsgsInRg(s, _)
        | Route::Nsg(s, _, _)
        | Route::Rules(s, _, _)
        | Route::Rule(s, _, _, _)
        | Route::DefaultRules(s, _, _)
        | Route::DefaultRule(s, _, _, _)
        | Route::NicsInRg(s, _)
        | Route::Nic(s, _, _)
        | Route::Subnets(s, _, _)
        | Route::Subnet(s, _, _, _)
        | Route::VmsInRg(s, _)
        | Route::Vm(s, _, _) => (*s).to_string(),
    }
}

/// Takes a token from the subscription's bucket of `kind`: the whole tokens left, or the
/// seconds until one is back when the bucket is empty.
fn charge(g: &mut Inner, sub: &str, kind: BucketKind, now: Instant) -> Result<u64, u64> {
    match g.bucket(sub, kind, now).take(now) {
        Take::Allowed { remaining } => Ok(remaining),
        Take::Throttled { retry_after_secs } => {
            tracing::info!(subscription = %sub, kind = kind.word(), retry_after_secs, "subscription requests throttled");
            Err(retry_after_secs)
        }
    }
}

/// ARM's 429 for an empty subscription bucket: `Retry-After`, the remaining header at 0.
fn throttled(sub: &str, kind: BucketKind, retry_after_secs: u64) -> Response {
    let mut r = ArmError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "SubscriptionRequestsThrottled",
        format!(
            "Number of '{}' requests for subscription '{sub}' exceeded the limit. Please try again after '{retry_after_secs}' seconds.",
            kind.word()
        ),
    )
    .with_retry_after(retry_after_secs)
    .into_response();
    insert_header(&mut r, kind.header(), "0");
    r
}

/// Every ARM write: counts, subscription throttling (DELETEs on their own bucket, as ARM), the
/// remaining-writes or remaining-deletes header.
fn write(g: &mut Inner, ctx: &Ctx, route: Route<'_>, method: &Method, body: &[u8]) -> Response {
    g.stats.write_attempts += 1;
    let sub = subscription_of(&route);
    let kind = if *method == Method::DELETE {
        BucketKind::Delete
    } else {
        BucketKind::Write
    };
    let remaining = match charge(g, &sub, kind, ctx.now) {
        Ok(remaining) => remaining,
        Err(retry_after_secs) => {
            g.stats.throttled += 1;
            return throttled(&sub, kind, retry_after_secs);
        }
    };
    let locked = match route.resource_id() {
        Some(id) => crate::locks::check(&g.locks, &id, *method == Method::DELETE),
        None => Ok(()),
    };
    let result = match (locked, &route, method.as_str()) {
        (Err(e), _, _) => Err(e),
        (Ok(()), Route::Rule(s, r, n, x), "PUT") => put_rule(g, ctx, s, r, n, x, body),
        (Ok(()), Route::Rule(s, r, n, x), "DELETE") => delete_rule(g, ctx, s, r, n, x),
        (Ok(()), Route::Nsg(s, r, n), "PUT") => put_nsg(g, ctx, s, r, n, body),
        (Ok(()), Route::Nsg(s, r, n), "DELETE") => delete_nsg(g, ctx, s, r, n),
        (Ok(()), Route::Nsg(s, r, n), "PATCH") => patch_nsg(g, ctx, s, r, n, body),
        _ => Err(ArmError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("The requested resource does not support http method '{method}'."),
        )),
    };
    let mut resp = match result {
        Ok(r) => {
            g.stats.writes += 1;
            r
        }
        Err(e) => {
            if e.status == StatusCode::TOO_MANY_REQUESTS {
                g.stats.conflicts += 1;
            } else {
                g.stats.rejected += 1;
            }
            tracing::info!(%method, code = %e.code, status = e.status.as_u16(), "write refused: {}", e.message);
            e.into_response()
        }
    };
    insert_header(&mut resp, kind.header(), &remaining.to_string());
    resp
}

fn violation(v: Violation) -> ArmError {
    ArmError::bad_request(v.code, v.message)
}

/// Azure's words (the HTTP status is not documented; 400 as for the other limits).
fn too_many_rules() -> ArmError {
    ArmError::bad_request(
        validate::TOO_MANY_RULES,
        format!(
            "A security group cannot have more than {} security rules.",
            validate::MAX_RULES_PER_NSG
        ),
    )
}

fn busy_check(g: &Inner, nsg: &Nsg, ctx: &Ctx, what: &str) -> Result<(), ArmError> {
    if let Some((op, until)) = &nsg.pending
        && *until > ctx.now
    {
        return Err(ArmError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RetryableErrorDueToAnotherOperation",
            format!(
                "Operation {what} on network security group {} cannot be performed because another operation ({op}) on this or a dependent resource is in progress. Retry the request later.",
                nsg.name
            ),
        )
        .with_retry_after(g.config.retry_after_secs));
    }
    Ok(())
}

fn parse_body(body: &[u8]) -> Result<Value, ArmError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ArmError::bad_request(
            "InvalidRequestFormat",
            format!("Cannot parse the request: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(ArmError::bad_request(
            "InvalidRequestFormat",
            "Cannot parse the request: the body must be a JSON object.",
        ));
    }
    Ok(v)
}

fn rule_props_from(v: &Value, rule_id: &str) -> Result<model::RuleProps, ArmError> {
    match v.get("properties") {
        Some(p) if p.is_object() => {}
        _ => {
            return Err(ArmError::bad_request(
                "InvalidRequestFormat",
                format!("Cannot parse the request: security rule {rule_id} has no properties."),
            ));
        }
    }
    let props = parse_rule_props(v).map_err(|m| {
        ArmError::bad_request(
            "InvalidRequestFormat",
            format!("Cannot parse the request: {m}"),
        )
    })?;
    validate::validate_rule(rule_id, &props).map_err(violation)
}

struct Accepted {
    status: StatusCode,
    body: Option<Value>,
    op: crate::state::Operation,
    location: bool,
}

fn accepted(g: &Inner, ctx: &Ctx, a: Accepted) -> Response {
    let mut r = match a.body {
        Some(b) => (a.status, axum::Json(b)).into_response(),
        None => a.status.into_response(),
    };
    let prefix = format!(
        "{}/subscriptions/{}/providers/Microsoft.Network/locations/{}",
        ctx.base, a.op.subscription, a.op.location
    );
    insert_header(
        &mut r,
        "azure-asyncoperation",
        &format!("{prefix}/operations/{}?api-version={API_VERSION}", a.op.id),
    );
    if a.location {
        insert_header(
            &mut r,
            "location",
            &format!(
                "{prefix}/operationResults/{}?api-version={API_VERSION}",
                a.op.id
            ),
        );
    }
    insert_header(
        &mut r,
        "retry-after",
        &g.config.retry_after_secs.to_string(),
    );
    r
}

fn put_rule(
    g: &mut Inner,
    ctx: &Ctx,
    sub: &str,
    rg: &str,
    nsg: &str,
    rule: &str,
    body: &[u8],
) -> Result<Response, ArmError> {
    let (s, r, n) = nsg_of(g, sub, rg, nsg)?;
    let (sub_id, rg_name, nsg_name, location) = (
        s.id.clone(),
        r.name.clone(),
        n.name.clone(),
        n.location.clone(),
    );
    let nsg_id = model::nsg_id(s, r, &n.name);
    busy_check(g, n, ctx, "PutSecurityRuleOperation")?;
    let rule_id = format!("{nsg_id}/securityRules/{rule}");
    check_if_match(ctx, n.rule(rule).map(|x| x.etag.as_str()), &rule_id)?;
    validate::validate_rule_name(rule).map_err(violation)?;
    let v = parse_body(body)?;
    let props = rule_props_from(&v, &rule_id)?;
    validate::check_conflicts(
        &rule_id,
        rule,
        &props,
        n.rules.iter().map(|x| (x.name.as_str(), &x.props)),
    )
    .map_err(violation)?;
    let exists = n.rule(rule).is_some();
    if !exists && n.rules.len() >= validate::MAX_RULES_PER_NSG {
        return Err(too_many_rules());
    }
    validate::check_address_limit(
        &nsg_id,
        n.rules
            .iter()
            .filter(|x| !x.name.eq_ignore_ascii_case(rule))
            .map(|x| &x.props)
            .chain([&props]),
    )
    .map_err(violation)?;
    let Some(n) = g.world.nsg_mut(&sub_id, &rg_name, &nsg_name) else {
        return Err(resource_not_found("networkSecurityGroups", nsg, rg));
    };
    let etag = model::new_etag();
    let stored = match n.rule_mut(rule) {
        Some(existing) => {
            existing.props = props;
            existing.etag = etag;
            existing.provisioning_state = UPDATING.into();
            existing.clone()
        }
        None => {
            let new = Rule {
                name: rule.to_string(),
                etag,
                provisioning_state: UPDATING.into(),
                props,
            };
            n.rules.push(new.clone());
            new
        }
    };
    n.etag = model::new_etag();
    n.provisioning_state = UPDATING.into();
    let op = g.start_op(
        ctx.now,
        &sub_id,
        &rg_name,
        &nsg_name,
        &location,
        OpKind::RulePut {
            rule: stored.name.clone(),
        },
    );
    g.save_logged();
    tracing::info!(rule = %rule_id, created = !exists, "security rule written");
    Ok(accepted(
        g,
        ctx,
        Accepted {
            status: if exists {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            },
            body: Some(model::rule_json(&nsg_id, &stored)),
            op,
            location: false,
        },
    ))
}

fn delete_rule(
    g: &mut Inner,
    ctx: &Ctx,
    sub: &str,
    rg: &str,
    nsg: &str,
    rule: &str,
) -> Result<Response, ArmError> {
    let (s, r, n) = nsg_of(g, sub, rg, nsg)?;
    let (sub_id, rg_name, nsg_name, location) = (
        s.id.clone(),
        r.name.clone(),
        n.name.clone(),
        n.location.clone(),
    );
    busy_check(g, n, ctx, "DeleteSecurityRuleOperation")?;
    check_if_match(
        ctx,
        n.rule(rule).map(|x| x.etag.as_str()),
        &format!("{}/securityRules/{rule}", model::nsg_id(s, r, &n.name)),
    )?;
    if n.rule(rule).is_none() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let Some(n) = g.world.nsg_mut(&sub_id, &rg_name, &nsg_name) else {
        return Err(resource_not_found("networkSecurityGroups", nsg, rg));
    };
    let mut canonical = rule.to_string();
    if let Some(x) = n.rule_mut(rule) {
        x.provisioning_state = DELETING.into();
        canonical = x.name.clone();
    }
    n.etag = model::new_etag();
    n.provisioning_state = UPDATING.into();
    let op = g.start_op(
        ctx.now,
        &sub_id,
        &rg_name,
        &nsg_name,
        &location,
        OpKind::RuleDelete { rule: canonical },
    );
    g.save_logged();
    tracing::info!(nsg = %nsg_name, %rule, "security rule delete accepted");
    Ok(accepted(
        g,
        ctx,
        Accepted {
            status: StatusCode::ACCEPTED,
            body: None,
            op,
            location: true,
        },
    ))
}

/// NSG `properties` the emulator models or computes (read-only ones are ignored on PUT).
const NSG_MODELLED_PROPERTIES: &[&str] = &[
    "provisioningState",
    "resourceGuid",
    "flushConnection",
    "securityRules",
    "defaultSecurityRules",
    "networkInterfaces",
    "subnets",
    "flowLogs",
];

fn put_nsg(
    g: &mut Inner,
    ctx: &Ctx,
    sub: &str,
    rg: &str,
    nsg: &str,
    body: &[u8],
) -> Result<Response, ArmError> {
    g.interleave(sub, rg, nsg);
    let (s, r) = rg_of(g, sub, rg)?;
    let (sub_id, rg_name) = (s.id.clone(), r.name.clone());
    let existing = r.nsg(nsg);
    if let Some(n) = existing {
        busy_check(g, n, ctx, "PutNetworkSecurityGroupOperation")?;
    }
    validate::validate_rule_name(nsg).map_err(violation)?;
    let nsg_name = existing.map_or_else(|| nsg.to_string(), |n| n.name.clone());
    let nsg_id = model::nsg_id(s, r, &nsg_name);
    check_if_match(ctx, existing.map(|n| n.etag.as_str()), &nsg_id)?;
    let v = parse_body(body)?;
    let location = v
        .get("location")
        .and_then(Value::as_str)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| {
            ArmError::bad_request(
                "LocationRequired",
                "The location property is required for this definition.",
            )
        })?
        .to_string();
    let tags = match v.get("tags") {
        None | Some(Value::Null) => None,
        Some(t) if t.is_object() => Some(t.clone()),
        Some(_) => {
            return Err(ArmError::bad_request(
                "InvalidRequestFormat",
                "Cannot parse the request: tags must be an object.",
            ));
        }
    };
    let flush_connection = match v.pointer("/properties/flushConnection") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ArmError::bad_request(
                "InvalidRequestFormat",
                "Cannot parse the request: flushConnection must be a boolean.",
            ));
        }
    };
    // Properties the emulator does not model are kept; read-only ones are ignored, as ARM does.
    let extra_properties: serde_json::Map<String, Value> = v
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| {
            p.iter()
                .filter(|(k, _)| !NSG_MODELLED_PROPERTIES.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let rule_values = match v.pointer("/properties/securityRules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => {
            return Err(ArmError::bad_request(
                "InvalidRequestFormat",
                "Cannot parse the request: securityRules must be an array.",
            ));
        }
    };
    if rule_values.len() > validate::MAX_RULES_PER_NSG {
        return Err(too_many_rules());
    }
    let mut rules: Vec<Rule> = Vec::with_capacity(rule_values.len());
    for rv in &rule_values {
        let name = rv.get("name").and_then(Value::as_str).unwrap_or_default();
        let rule_id = format!("{nsg_id}/securityRules/{name}");
        validate::validate_rule_name(name).map_err(violation)?;
        if rules.iter().any(|x| x.name.eq_ignore_ascii_case(name)) {
            return Err(ArmError::bad_request(
                "InvalidRequestFormat",
                format!("Cannot parse the request: duplicate security rule name {name}."),
            ));
        }
        let props = rule_props_from(rv, &rule_id)?;
        validate::check_conflicts(
            &rule_id,
            name,
            &props,
            rules.iter().map(|x| (x.name.as_str(), &x.props)),
        )
        .map_err(violation)?;
        rules.push(Rule {
            name: name.to_string(),
            etag: String::new(),
            provisioning_state: UPDATING.into(),
            props,
        });
    }
    validate::check_address_limit(&nsg_id, rules.iter().map(|x| &x.props)).map_err(violation)?;
    let created = existing.is_none();
    let Some(rgm) = g.world.sub_mut(&sub_id).and_then(|s| s.rg_mut(&rg_name)) else {
        return Err(resource_not_found("networkSecurityGroups", nsg, rg));
    };
    let etag = model::new_etag();
    for x in &mut rules {
        x.etag = etag.clone();
    }
    match model::find_mut(&mut rgm.nsgs, &nsg_name, |n| &n.name) {
        Some(n) => {
            n.location = location.clone();
            n.tags = tags;
            n.flush_connection = flush_connection;
            n.extra_properties = extra_properties;
            n.rules = rules;
            n.etag = etag;
            n.provisioning_state = UPDATING.into();
        }
        None => rgm.nsgs.push(Nsg {
            name: nsg_name.clone(),
            location: location.clone(),
            resource_guid: model::new_guid(),
            etag,
            provisioning_state: UPDATING.into(),
            tags,
            flush_connection,
            extra_properties,
            rules,
            pending: None,
        }),
    }
    let op = g.start_op(
        ctx.now,
        &sub_id,
        &rg_name,
        &nsg_name,
        &location,
        OpKind::NsgPut,
    );
    g.save_logged();
    let (s, r, n) = nsg_of(g, &sub_id, &rg_name, &nsg_name)?;
    let body = model::nsg_json(s, r, n);
    tracing::info!(nsg = %nsg_id, created, "network security group written");
    Ok(accepted(
        g,
        ctx,
        Accepted {
            status: if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            body: Some(body),
            op,
            location: false,
        },
    ))
}

fn delete_nsg(
    g: &mut Inner,
    ctx: &Ctx,
    sub: &str,
    rg: &str,
    nsg: &str,
) -> Result<Response, ArmError> {
    let (s, r) = rg_of(g, sub, rg)?;
    check_if_match(
        ctx,
        r.nsg(nsg).map(|n| n.etag.as_str()),
        &model::nsg_id(s, r, nsg),
    )?;
    let Some(n) = r.nsg(nsg) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    busy_check(g, n, ctx, "DeleteNetworkSecurityGroupOperation")?;
    let mut users: Vec<String> = r
        .nics
        .iter()
        .filter(|x| {
            x.nsg
                .as_deref()
                .is_some_and(|y| y.eq_ignore_ascii_case(nsg))
        })
        .map(|x| model::nic_id(s, r, &x.name))
        .collect();
    for v in &r.vnets {
        for x in &v.subnets {
            if x.nsg
                .as_deref()
                .is_some_and(|y| y.eq_ignore_ascii_case(nsg))
            {
                users.push(model::subnet_id(s, r, &v.name, &x.name));
            }
        }
    }
    if !users.is_empty() {
        return Err(ArmError::bad_request(
            "InUseNetworkSecurityGroupCannotBeDeleted",
            format!(
                "Network security group {} cannot be deleted because it is in use by the following resources: {}.",
                model::nsg_id(s, r, &n.name),
                users.join(", ")
            ),
        ));
    }
    let (sub_id, rg_name, nsg_name, location) = (
        s.id.clone(),
        r.name.clone(),
        n.name.clone(),
        n.location.clone(),
    );
    if let Some(n) = g.world.nsg_mut(&sub_id, &rg_name, &nsg_name) {
        n.provisioning_state = DELETING.into();
    }
    let op = g.start_op(
        ctx.now,
        &sub_id,
        &rg_name,
        &nsg_name,
        &location,
        OpKind::NsgDelete,
    );
    g.save_logged();
    Ok(accepted(
        g,
        ctx,
        Accepted {
            status: StatusCode::ACCEPTED,
            body: None,
            op,
            location: true,
        },
    ))
}

/// `PATCH` an NSG: update tags (synchronous, as Azure's UpdateTags).
fn patch_nsg(
    g: &mut Inner,
    ctx: &Ctx,
    sub: &str,
    rg: &str,
    nsg: &str,
    body: &[u8],
) -> Result<Response, ArmError> {
    let (s, r, n) = nsg_of(g, sub, rg, nsg)?;
    let (sub_id, rg_name, nsg_name) = (s.id.clone(), r.name.clone(), n.name.clone());
    busy_check(g, n, ctx, "UpdateNetworkSecurityGroupTagsOperation")?;
    let v = parse_body(body)?;
    let tags = match v.get("tags") {
        Some(t) if t.is_object() => t.clone(),
        _ => {
            return Err(ArmError::bad_request(
                "InvalidRequestFormat",
                "Cannot parse the request: a tags object is required.",
            ));
        }
    };
    if let Some(n) = g.world.nsg_mut(&sub_id, &rg_name, &nsg_name) {
        n.tags = Some(tags);
        n.etag = model::new_etag();
    }
    g.save_logged();
    let (s, r, n) = nsg_of(g, &sub_id, &rg_name, &nsg_name)?;
    Ok(json_ok(model::nsg_json(s, r, n)))
}
