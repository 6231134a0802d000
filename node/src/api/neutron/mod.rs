//! Network v2.0 (Neutron) under `/network` as devstack lays it out: networks, subnets, ports,
//! security groups and rules, routers and floating IPs, quotas, tags, the versions document and
//! the extension list. Each handler translates the request into a `shoal_network` call and the
//! answer (or the `NetworkError`) into Neutron's body; the rules live in the service crate.

mod agents;
mod floating_ips;
mod networks;
mod ports;
mod quotas;
mod routers;
mod security_groups;
mod subnet_pools;
mod subnets;

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use shoal_network::{Caller, ErrorClass, NetworkError, Tagged};

use super::error::{ApiError, ApiResult};
use super::{AppState, Auth};
use shoal_identity::has_role;

pub const PREFIX: &str = "/network/v2.0";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/network", get(versions))
        .route("/network/", get(versions))
        .route(PREFIX, get(resources))
        .route(&format!("{PREFIX}/"), get(resources))
        .route(&format!("{PREFIX}/extensions"), get(extensions))
        .route(&format!("{PREFIX}/extensions/{{alias}}"), get(extension))
        .route(
            &format!("{PREFIX}/service-providers"),
            get(service_providers),
        )
        .merge(agents::routes())
        .merge(networks::routes())
        .merge(subnets::routes())
        .merge(subnet_pools::routes())
        .merge(ports::routes())
        .merge(security_groups::routes())
        .merge(quotas::routes())
        .merge(routers::routes())
        .merge(floating_ips::routes())
        .route(
            &format!("{PREFIX}/networks/{{id}}/tags"),
            tags(Tagged::Network),
        )
        .route(
            &format!("{PREFIX}/subnets/{{id}}/tags"),
            tags(Tagged::Subnet),
        )
        .route(&format!("{PREFIX}/ports/{{id}}/tags"), tags(Tagged::Port))
        .route(
            &format!("{PREFIX}/security-groups/{{id}}/tags"),
            tags(Tagged::SecurityGroup),
        )
        .route(
            &format!("{PREFIX}/routers/{{id}}/tags"),
            tags(Tagged::Router),
        )
        .route(
            &format!("{PREFIX}/floatingips/{{id}}/tags"),
            tags(Tagged::FloatingIp),
        )
        .route(
            &format!("{PREFIX}/routers/{{id}}/tags/{{tag}}"),
            tag(Tagged::Router),
        )
        .route(
            &format!("{PREFIX}/floatingips/{{id}}/tags/{{tag}}"),
            tag(Tagged::FloatingIp),
        )
        .route(
            &format!("{PREFIX}/networks/{{id}}/tags/{{tag}}"),
            tag(Tagged::Network),
        )
        .route(
            &format!("{PREFIX}/subnets/{{id}}/tags/{{tag}}"),
            tag(Tagged::Subnet),
        )
        .route(
            &format!("{PREFIX}/subnetpools/{{id}}/tags"),
            tags(Tagged::SubnetPool),
        )
        .route(
            &format!("{PREFIX}/subnetpools/{{id}}/tags/{{tag}}"),
            tag(Tagged::SubnetPool),
        )
        .route(
            &format!("{PREFIX}/ports/{{id}}/tags/{{tag}}"),
            tag(Tagged::Port),
        )
        .route(
            &format!("{PREFIX}/security-groups/{{id}}/tags/{{tag}}"),
            tag(Tagged::SecurityGroup),
        )
}

/// The caller as the network service's policy sees it.
pub(crate) fn caller(auth: &Auth) -> Caller {
    Caller {
        project_id: auth.0.project_id.clone(),
        admin: has_role(&auth.0, "admin"),
        member: has_role(&auth.0, "member"),
    }
}

/// A service error in Neutron's body with its status; a 500 keeps its text in the log only.
pub(crate) fn net_err(e: NetworkError) -> ApiError {
    let status = match e.class() {
        ErrorClass::BadRequest => StatusCode::BAD_REQUEST,
        ErrorClass::Forbidden => StatusCode::FORBIDDEN,
        ErrorClass::NotFound => StatusCode::NOT_FOUND,
        ErrorClass::Conflict => StatusCode::CONFLICT,
        ErrorClass::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorClass::Unknown => StatusCode::GATEWAY_TIMEOUT,
        ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string()).neutron(e.neutron_type())
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).neutron("HTTPBadRequest")
}

/// The object under `key` of a request body, decoded as `T`. Unknown attributes are refused as
/// Neutron refuses them.
pub(super) fn body<T: DeserializeOwned>(bytes: &Bytes, key: &str) -> ApiResult<T> {
    let mut v: Value = crate::api::body::parse(bytes)?;
    let inner = v
        .get_mut(key)
        .filter(|i| i.is_object())
        .map(Value::take)
        .ok_or_else(|| bad(format!("Unable to find '{key}' in request body")))?;
    decode(inner)
}

/// A request body that is the object itself (`add_router_interface`), decoded as `T`.
pub(super) fn decode_object<T: DeserializeOwned>(bytes: &Bytes) -> ApiResult<T> {
    let v: Value = crate::api::body::parse(bytes)?;
    if !v.is_object() {
        return Err(bad("the request body must be a JSON object"));
    }
    decode(v)
}

/// The most objects one bulk create may carry.
pub(super) const MAX_BULK: usize = 1000;

/// A create body: `{key: {...}}`, or Neutron's bulk form `{keys: [{...}, ...]}` (the second
/// value says which, for the answer's shape).
pub(super) fn bodies<T: DeserializeOwned>(bytes: &Bytes, key: &str) -> ApiResult<(Vec<T>, bool)> {
    let mut v: Value = crate::api::body::parse(bytes)?;
    let plural = format!("{key}s");
    match v.get_mut(&plural).map(Value::take) {
        Some(Value::Array(items)) if v.get(key).is_none() => {
            if items.is_empty() || items.len() > MAX_BULK {
                return Err(bad(format!(
                    "a bulk create carries 1 to {MAX_BULK} {plural}, not {}",
                    items.len()
                )));
            }
            let decoded = items
                .into_iter()
                .map(|i| {
                    if i.is_object() {
                        decode(i)
                    } else {
                        Err(bad(format!("every item of '{plural}' must be an object")))
                    }
                })
                .collect::<ApiResult<Vec<T>>>()?;
            Ok((decoded, true))
        }
        Some(_) if v.get(key).is_none() => Err(bad(format!("'{plural}' must be a list"))),
        _ => Ok((vec![body(bytes, key)?], false)),
    }
}

fn decode<T: DeserializeOwned>(inner: Value) -> ApiResult<T> {
    serde_json::from_value(inner).map_err(|e| {
        let text = e.to_string();
        match text.strip_prefix("unknown field `") {
            Some(rest) => bad(format!(
                "Unrecognized attribute(s) '{}'",
                rest.split('`').next().unwrap_or_default()
            )),
            None => bad(format!("Invalid input for the request body: {text}")),
        }
    })
}

/// Creates every request in turn, as Neutron's emulated bulk does: when one fails, the ones
/// already made are deleted again and the failure is the answer. Answers 201 with `{key: ..}`
/// for a single create and `{keys: [..]}` for a bulk one.
pub(super) async fn create_all<R, T, C, D>(
    key: &str,
    (reqs, bulk): (Vec<R>, bool),
    mut create: impl FnMut(R) -> C,
    mut delete: impl FnMut(T) -> D,
    view: impl Fn(&T) -> Value,
) -> ApiResult<Response>
where
    C: std::future::Future<Output = ApiResult<T>>,
    D: std::future::Future<Output = ApiResult<()>>,
{
    let mut made = Vec::with_capacity(reqs.len());
    for req in reqs {
        match create(req).await {
            Ok(t) => made.push(t),
            Err(e) => {
                for t in made.into_iter().rev() {
                    if let Err(undo) = delete(t).await {
                        tracing::warn!(error = %undo.message, "undoing a bulk create");
                    }
                }
                return Err(e);
            }
        }
    }
    let items: Vec<Value> = made.iter().map(view).collect();
    Ok(if bulk {
        (
            StatusCode::CREATED,
            Json(json!({ format!("{key}s"): items })),
        )
            .into_response()
    } else {
        created(key, items.into_iter().next().unwrap_or_default())
    })
}

/// `{"key": value}` with 200.
pub(super) fn one(key: &str, value: Value) -> Response {
    Json(json!({ key: value })).into_response()
}

/// `{"key": value}` with 201.
pub(super) fn created(key: &str, value: Value) -> Response {
    (StatusCode::CREATED, Json(json!({ key: value }))).into_response()
}

pub(super) fn timestamp(secs: u64) -> String {
    // Neutron prints whole seconds.
    let full = shoal_state::time::iso8601(secs);
    format!("{}Z", full.split('.').next().unwrap_or(&full))
}

/// The query string as Neutron reads it: a key may repeat (its values are alternatives).
pub(super) type Params = Query<Vec<(String, String)>>;

/// Keys that shape a listing rather than filter it.
const CONTROL: [&str; 6] = [
    "fields",
    "limit",
    "marker",
    "sort_key",
    "sort_dir",
    "page_reverse",
];

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

/// Whether `item`'s `attr` matches one of `wanted`, with Neutron's conversions: booleans
/// as `true`/`True`/`1`, lists matching when they hold the value, `null` as empty.
fn matches(item: &Value, attr: &str, wanted: &[&str]) -> bool {
    let Some(v) = item.get(attr) else {
        // Neutron without filter validation ignores filters on attributes it does not have.
        return true;
    };
    let norm = |s: &str| match s {
        "True" | "1" => "true".to_owned(),
        "False" | "0" => "false".to_owned(),
        "None" => String::new(),
        other => other.to_owned(),
    };
    match v {
        Value::Array(items) => wanted
            .iter()
            .any(|w| items.iter().any(|i| text_of(i).as_deref() == Some(*w))),
        Value::Bool(_) => wanted.iter().any(|w| text_of(v) == Some(norm(w))),
        _ => wanted.iter().any(|w| {
            let t = text_of(v);
            t.as_deref() == Some(*w) || (v.is_null() && norm(w).is_empty())
        }),
    }
}

/// Ports' `fixed_ips=ip_address=...`, `fixed_ips=subnet_id=...` and
/// `fixed_ips=ip_address_substr=...`: a port matches when one of its addresses meets every
/// kind given.
fn matches_fixed_ips(item: &Value, conditions: &[&str]) -> ApiResult<bool> {
    let mut by_kind: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for c in conditions {
        let (k, v) = c.split_once('=').ok_or_else(|| {
            bad(format!(
                "Invalid fixed_ips filter {c:?}: use ip_address=, subnet_id= or ip_address_substr="
            ))
        })?;
        if !["ip_address", "subnet_id", "ip_address_substr"].contains(&k) {
            return Err(bad(format!("Invalid fixed_ips filter key {k:?}: use ip_address, subnet_id or ip_address_substr")));
        }
        by_kind.entry(k).or_default().push(v);
    }
    let Some(ips) = item.get("fixed_ips").and_then(Value::as_array) else {
        return Ok(false);
    };
    Ok(ips.iter().any(|ip| {
        by_kind.iter().all(|(k, vals)| {
            let field = if *k == "ip_address_substr" {
                "ip_address"
            } else {
                k
            };
            let have = ip[field].as_str().unwrap_or_default();
            vals.iter().any(|v| {
                if *k == "ip_address_substr" {
                    have.contains(v)
                } else {
                    have == *v
                }
            })
        })
    }))
}

fn matches_tags(item: &Value, key: &str, values: &[&str]) -> bool {
    let have: Vec<&str> = item["tags"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let wanted: Vec<&str> = values.iter().flat_map(|v| v.split(',')).collect();
    let all = wanted.iter().all(|w| have.contains(w));
    let any = wanted.iter().any(|w| have.contains(w));
    match key {
        "tags" => all,
        "tags-any" => any,
        "not-tags" => !all,
        _ => !any,
    }
}

/// Applies a listing's filters, sorting, paging and `fields` to `items` and wraps them as
/// `{collection: [...]}` (with `{collection}_links` when a page was cut).
pub(super) fn listing(
    collection: &str,
    mut items: Vec<Value>,
    params: &[(String, String)],
    base: &str,
) -> ApiResult<Response> {
    let mut filters: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in params {
        filters.entry(k.as_str()).or_default().push(v.as_str());
    }
    let mut kept = Vec::with_capacity(items.len());
    for item in items.drain(..) {
        let mut ok = true;
        for (k, vals) in &filters {
            ok = match *k {
                k if CONTROL.contains(&k) => true,
                "fixed_ips" => matches_fixed_ips(&item, vals)?,
                "tags" | "tags-any" | "not-tags" | "not-tags-any" => matches_tags(&item, k, vals),
                "tenant_id" | "project_id" => matches(&item, "project_id", vals),
                _ => matches(&item, k, vals),
            };
            if !ok {
                break;
            }
        }
        if ok {
            kept.push(item);
        }
    }
    let mut items = kept;
    if let Some(keys) = filters.get("sort_key") {
        let dirs = filters.get("sort_dir").cloned().unwrap_or_default();
        let keys: Vec<(&str, bool)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, dirs.get(i).is_some_and(|d| *d == "desc")))
            .collect();
        items.sort_by(|a, b| {
            for (k, desc) in &keys {
                let o = text_of(&a[*k]).cmp(&text_of(&b[*k]));
                let o = if *desc { o.reverse() } else { o };
                if o.is_ne() {
                    return o;
                }
            }
            std::cmp::Ordering::Equal
        });
    }
    if let Some(marker) = filters.get("marker").and_then(|m| m.first()) {
        if let Some(pos) = items.iter().position(|i| i["id"] == *marker) {
            items.drain(..=pos);
        }
    }
    let mut links = Vec::new();
    if let Some(limit) = filters.get("limit").and_then(|l| l.first()) {
        let limit: usize = limit.parse().map_err(|_| {
            bad(format!(
                "Invalid limit {limit:?}: a whole number is expected"
            ))
        })?;
        if limit > 0 && items.len() > limit {
            items.truncate(limit);
            let last = items.last().map(|i| i["id"].clone()).unwrap_or_default();
            let last = last.as_str().unwrap_or_default();
            links.push(json!({
                "rel": "next",
                "href": format!("{base}{PREFIX}/{collection}?limit={limit}&marker={last}"),
            }));
        }
    }
    if let Some(fields) = filters.get("fields") {
        let fields: Vec<&str> = fields.iter().flat_map(|f| f.split(',')).collect();
        for item in &mut items {
            if let Value::Object(map) = item {
                map.retain(|k, _| fields.contains(&k.as_str()));
            }
        }
    }
    let mut out = Map::new();
    out.insert(collection.to_owned(), Value::Array(items));
    if !links.is_empty() {
        out.insert(format!("{collection}_links"), Value::Array(links));
    }
    Ok(Json(Value::Object(out)).into_response())
}

/// `fields=` on a single resource.
pub(super) fn pick_fields(mut item: Value, params: &[(String, String)]) -> Value {
    let fields: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "fields")
        .flat_map(|(_, v)| v.split(','))
        .collect();
    if !fields.is_empty() {
        if let Value::Object(map) = &mut item {
            map.retain(|k, _| fields.contains(&k.as_str()));
        }
    }
    item
}

async fn versions(State(state): State<AppState>) -> Response {
    Json(json!({"versions": [{
        "id": "v2.0",
        "status": "CURRENT",
        "links": [{"rel": "self", "href": format!("{}{PREFIX}/", state.base_url)}],
    }]}))
    .into_response()
}

async fn resources(State(state): State<AppState>) -> Response {
    let list: Vec<Value> = [
        ("network", "networks"),
        ("subnet", "subnets"),
        ("subnetpool", "subnetpools"),
        ("port", "ports"),
        ("security_group", "security-groups"),
        ("security_group_rule", "security-group-rules"),
        ("quota", "quotas"),
        ("router", "routers"),
        ("floatingip", "floatingips"),
    ]
    .iter()
    .map(|(name, collection)| {
        json!({
            "name": name,
            "collection": collection,
            "links": [{"rel": "self", "href": format!("{}{PREFIX}/{collection}", state.base_url)}],
        })
    })
    .collect();
    Json(json!({ "resources": list })).into_response()
}

/// The extensions that really work here; the client checks some before it calls.
const EXTENSIONS: [(&str, &str, &str); 30] = [
    ("allowed-address-pairs", "Allowed Address Pairs", "Provides allowed address pairs"),
    ("default-subnetpools", "Default Subnetpools", "Provides ability to mark and use a subnetpool as the default."),
    ("binding", "Port Binding", "Expose port bindings of a virtual port to external application"),
    ("external-net", "Neutron external network", "Adds external network attribute to network resource."),
    ("ext-gw-mode", "Neutron L3 Configurable external gateway mode", "Extension of the router abstraction for specifying whether SNAT should occur on the external gateway"),
    ("extra_dhcp_opt", "Neutron Extra DHCP options", "Extra options configuration for DHCP. For example PXE boot options to DHCP clients can be specified (e.g. tftp-server, server-ip-address, bootfile-name)"),
    ("extraroute", "Neutron Extra Route", "Extra routes configuration for L3 router"),
    ("ip-substring-filtering", "IP address substring filtering", "Provides IP address substring filtering when listing ports"),
    ("net-mtu", "Network MTU", "Provides MTU attribute for a network resource."),
    ("network_availability_zone", "Network Availability Zone", "Availability zone support for network."),
    ("pagination", "Pagination support", "Extension that indicates that pagination is enabled."),
    ("port-security", "Port Security", "Provides port security"),
    ("port-security-groups-filtering", "Port filtering on security groups", "Provides security groups filtering when listing ports"),
    ("project-id", "project_id field enabled", "Extension that indicates that project_id field is enabled."),
    ("provider", "Provider Network", "Expose mapping of virtual networks to physical networks"),
    ("quota_details", "Quota details management support", "Expose functions for quotas usage statistics per project"),
    ("quotas", "Quota management support", "Expose functions for quotas management per project"),
    ("router", "Neutron L3 Router", "Router abstraction for basic L3 forwarding between L2 Neutron networks and access to external networks via a NAT gateway."),
    ("service-type", "Neutron Service Type Management", "API for retrieving service providers for Neutron advanced services"),
    ("security-group", "security-group", "The security groups extension."),
    ("sorting", "Sorting support", "Extension that indicates that sorting is enabled."),
    ("standard-attr-description", "standard-attr-description", "Extension to add descriptions to standard attributes"),
    ("standard-attr-revisions", "Resource revision numbers", "This extension will display the revision number of neutron resources."),
    ("standard-attr-tag", "Tag support for resources with standard attribute: subnet, trunk, network_segment_range, router, network, policy, subnetpool, port, security_group, floatingip", "Enables to set tag on resources with standard attribute."),
    ("tag", "Tag support", "Enables to set tag on resources."),
    ("standard-attr-timestamp", "Resource timestamps", "Adds created_at and updated_at fields to all Neutron resources that have Neutron standard attributes."),
    ("stateful-security-group", "Stateful security group", "Indicates if the security group is stateful or not"),
    ("subnet_allocation", "Subnet Allocation", "Enables allocation of subnets from a subnet pool"),
    ("subnetpool-prefix-ops", "Subnet Pool Prefix Operations", "Provides support for adjusting the prefix list of subnet pools"),
    ("subnet-external-network", "Subnet External Network", "Informs if the subnet is associated with a router:external network"),
];

/// `GET /v2.0/service-providers`: the one provider of each service Shoal serves. Routers
/// (`L3_ROUTER_NAT`) are Shoal's own distributed routers (docs/network.md).
async fn service_providers(
    State(state): State<AppState>,
    _auth: Auth,
    q: Params,
) -> ApiResult<Response> {
    let providers =
        vec![json!({"service_type": "L3_ROUTER_NAT", "name": "shoal", "default": true})];
    listing("service_providers", providers, &q.0, &state.base_url)
}

fn extension_json((alias, name, description): (&str, &str, &str)) -> Value {
    json!({
        "alias": alias,
        "name": name,
        "description": description,
        "updated": "2013-01-01T00:00:00-00:00",
        "links": [],
    })
}

async fn extensions(_auth: Auth) -> Response {
    let list: Vec<Value> = EXTENSIONS.iter().copied().map(extension_json).collect();
    Json(json!({ "extensions": list })).into_response()
}

async fn extension(_auth: Auth, Path(alias): Path<String>) -> ApiResult<Response> {
    EXTENSIONS
        .iter()
        .copied()
        .find(|(a, _, _)| *a == alias)
        .map(|e| one("extension", extension_json(e)))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "Extension with alias {} does not exist",
                shoal_network::ip::shown(&alias)
            ))
            .neutron("ExtensionNotFound")
        })
}

/// `/{collection}/{id}/tags`: list, replace all, remove all.
fn tags(kind: Tagged) -> MethodRouter<AppState> {
    get(move |State(s): State<AppState>, auth: Auth, Path(id): Path<String>| async move {
        let c = caller(&auth);
        let tags = s.network.set_tags(&c, kind, &id, |_| {}).await.map_err(net_err)?;
        Ok::<_, ApiError>(Json(json!({ "tags": tags })).into_response())
    })
    .put(move |State(s): State<AppState>, auth: Auth, Path(id): Path<String>, bytes: Bytes| async move {
        let v: Value = crate::api::body::parse(&bytes)?;
        let new: Vec<String> = serde_json::from_value(v["tags"].clone())
            .map_err(|_| bad("the body must be {\"tags\": [\"...\"]}"))?;
        let c = caller(&auth);
        let tags = s
            .network
            .set_tags(&c, kind, &id, |t| *t = new.clone())
            .await
            .map_err(net_err)?;
        Ok::<_, ApiError>(Json(json!({ "tags": tags })).into_response())
    })
    .delete(move |State(s): State<AppState>, auth: Auth, Path(id): Path<String>| async move {
        let c = caller(&auth);
        s.network.set_tags(&c, kind, &id, Vec::clear).await.map_err(net_err)?;
        Ok::<_, ApiError>(StatusCode::NO_CONTENT.into_response())
    })
}

/// `/{collection}/{id}/tags/{tag}`: check, add, remove one tag.
fn tag(kind: Tagged) -> MethodRouter<AppState> {
    get(move |State(s): State<AppState>, auth: Auth, Path((id, tag)): Path<(String, String)>| async move {
        let c = caller(&auth);
        let tags = s.network.set_tags(&c, kind, &id, |_| {}).await.map_err(net_err)?;
        if tags.contains(&tag) {
            Ok(StatusCode::NO_CONTENT.into_response())
        } else {
            Err(ApiError::not_found(format!("Tag {} could not be found.", shoal_network::ip::shown(&tag))).neutron("TagNotFound"))
        }
    })
    .put(move |State(s): State<AppState>, auth: Auth, Path((id, tag)): Path<(String, String)>| async move {
        let c = caller(&auth);
        s.network
            .set_tags(&c, kind, &id, |t| t.push(tag.clone()))
            .await
            .map_err(net_err)?;
        Ok::<_, ApiError>(StatusCode::CREATED.into_response())
    })
    .delete(move |State(s): State<AppState>, auth: Auth, Path((id, tag)): Path<(String, String)>| async move {
        let c = caller(&auth);
        let mut found = false;
        s.network
            .set_tags(&c, kind, &id, |t| {
                let before = t.len();
                t.retain(|x| *x != tag);
                found = found || t.len() != before;
            })
            .await
            .map_err(net_err)?;
        if found {
            Ok(StatusCode::NO_CONTENT.into_response())
        } else {
            Err(ApiError::not_found(format!("Tag {} could not be found.", shoal_network::ip::shown(&tag))).neutron("TagNotFound"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(ip: &str, subnet: &str, tags: &[&str]) -> Value {
        json!({"id": ip, "name": "p", "admin_state_up": true, "tags": tags,
               "fixed_ips": [{"subnet_id": subnet, "ip_address": ip}], "security_groups": ["sg1"]})
    }

    fn ids(resp: Response) -> Vec<String> {
        let body =
            futures::executor::block_on(axum::body::to_bytes(resp.into_body(), 1 << 20)).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn filters_work_as_the_client_sends_them() {
        let items = vec![
            port("10.0.0.5", "s1", &["a", "b"]),
            port("10.0.0.6", "s2", &["b"]),
        ];
        let run =
            |p: &[(&str, &str)]| ids(listing("ports", items.clone(), &q(p), "http://x").unwrap());
        assert_eq!(run(&[("fixed_ips", "ip_address=10.0.0.5")]), ["10.0.0.5"]);
        assert_eq!(run(&[("fixed_ips", "subnet_id=s2")]), ["10.0.0.6"]);
        assert_eq!(
            run(&[
                ("fixed_ips", "subnet_id=s2"),
                ("fixed_ips", "ip_address=10.0.0.5")
            ]),
            Vec::<String>::new()
        );
        assert_eq!(
            run(&[("fixed_ips", "ip_address_substr=0.0.6")]),
            ["10.0.0.6"]
        );
        assert_eq!(run(&[("admin_state_up", "True")]).len(), 2);
        assert_eq!(run(&[("admin_state_up", "false")]).len(), 0);
        assert_eq!(run(&[("security_groups", "sg1")]).len(), 2);
        assert_eq!(run(&[("tags", "a,b")]), ["10.0.0.5"]);
        assert_eq!(run(&[("not-tags-any", "a")]), ["10.0.0.6"]);
        assert_eq!(run(&[("id", "10.0.0.5"), ("id", "10.0.0.6")]).len(), 2);
        assert_eq!(run(&[("limit", "1")]), ["10.0.0.5"]);
        assert_eq!(run(&[("marker", "10.0.0.5")]), ["10.0.0.6"]);
        assert_eq!(
            run(&[("sort_key", "id"), ("sort_dir", "desc")]),
            ["10.0.0.6", "10.0.0.5"]
        );
        assert!(listing("ports", items.clone(), &q(&[("fixed_ips", "mac=1")]), "").is_err());
        let only = pick_fields(
            items[0].clone(),
            &q(&[("fields", "id"), ("fields", "name")]),
        );
        assert_eq!(only, json!({"id": "10.0.0.5", "name": "p"}));
    }

    #[test]
    fn bodies_refuse_unknown_attributes_like_neutron() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct N {
            name: Option<String>,
        }
        let e = body::<N>(
            &Bytes::from_static(br#"{"network": {"colour": "red"}}"#),
            "network",
        )
        .unwrap_err();
        assert_eq!(e.message, "Unrecognized attribute(s) 'colour'");
        // The bulk form: every item is checked, an empty or non-list one refused.
        let (items, bulk) = bodies::<N>(
            &Bytes::from_static(br#"{"networks": [{}, {"name": "b"}]}"#),
            "network",
        )
        .unwrap();
        assert!(bulk);
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].name.as_deref(), Some("b"));
        for bad in [
            &br#"{"networks": []}"#[..],
            br#"{"networks": {}}"#,
            br#"{"networks": [{"colour": 1}]}"#,
            br#"{"networks": [1]}"#,
        ] {
            assert!(bodies::<N>(&Bytes::from(bad), "network").is_err());
        }
        let (one, bulk) =
            bodies::<N>(&Bytes::from_static(br#"{"network": {}}"#), "network").unwrap();
        assert!(!bulk && one.len() == 1);
        assert!(body::<N>(&Bytes::from_static(b"{}"), "network").is_err());
        assert!(body::<N>(
            &Bytes::from_static(br#"{"network": {"name": "x"}}"#),
            "network"
        )
        .is_ok());
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn service_errors_keep_their_type_and_status() {
        let e = net_err(NetworkError::OverQuota { resource: "port" });
        assert_eq!(e.status, StatusCode::CONFLICT);
        let body =
            futures::executor::block_on(axum::body::to_bytes(e.into_response().into_body(), 4096))
                .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["NeutronError"]["type"], "OverQuota");
        assert_eq!(
            v["NeutronError"]["message"],
            "Quota exceeded for resources: ['port']."
        );
        let internal = net_err(NetworkError::State(shoal_state::StateError::Corrupt {
            table: "ports",
            key: "secret-key".into(),
            reason: "bad bytes".into(),
        }));
        let body = futures::executor::block_on(axum::body::to_bytes(
            internal.into_response().into_body(),
            4096,
        ))
        .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("secret-key") && !text.contains("ports"),
            "{text}"
        );
        assert!(text.contains("HTTPInternalServerError"), "{text}");
    }
}
