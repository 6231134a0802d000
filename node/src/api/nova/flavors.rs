//! Compute v2.1 (Nova) under `/compute/v2.1`: version discovery and flavors with their extra
//! specs, as `openstack flavor ...` uses them.
//!
//! Microversions are negotiated by `version.rs`; the version documents name its range.
//! Request bodies are checked against the fields Nova accepts: an unknown field is a 400.

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use shoal_compute::error::ComputeError;
use shoal_compute::flavor::{check_spec, spec_value, Flavor, FlavorCreateBody, Flavors};

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use crate::api::nova::version::{microversion, Microversion, MAX, MIN, V2_7};
use crate::api::{AppState, Auth};
use shoal_identity::has_role;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/compute", get(versions))
        .route("/compute/", get(versions))
        .route("/compute/v2.1", get(version))
        .route("/compute/v2.1/", get(version))
        .route("/compute/v2.1/extensions", get(list_extensions))
        .route("/compute/v2.1/extensions/{alias}", get(show_extension))
        .route("/compute/v2", get(version_v20))
        .route("/compute/v2/", get(version_v20))
        .route(
            "/compute/v2.1/flavors",
            get(list_flavors).post(create_flavor),
        )
        .route("/compute/v2.1/flavors/detail", get(list_flavors_detail))
        .route(
            "/compute/v2.1/flavors/{id}",
            get(show_flavor).delete(delete_flavor),
        )
        .route(
            "/compute/v2.1/flavors/{id}/os-flavor-access",
            get(list_flavor_access),
        )
        .route("/compute/v2.1/flavors/{id}/action", post(flavor_action))
        .route(
            "/compute/v2.1/flavors/{id}/os-extra_specs",
            get(list_extra_specs).post(create_extra_specs),
        )
        .route(
            "/compute/v2.1/flavors/{id}/os-extra_specs/{key}",
            get(show_extra_spec)
                .put(update_extra_spec)
                .delete(delete_extra_spec),
        )
        .layer(middleware::from_fn(microversion))
}

fn v21_entry(state: &AppState) -> Value {
    json!({
        "id": "v2.1", "status": "CURRENT", "version": MAX.to_string(), "min_version": MIN.to_string(),
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{}/compute/v2.1/", state.base_url)}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}],
    })
}

/// The legacy v2.0 root, which Nova lists first and serves as 2.1 without microversions.
fn v20_entry(state: &AppState) -> Value {
    json!({
        "id": "v2.0", "status": "SUPPORTED", "version": "", "min_version": "",
        "updated": "2011-01-21T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{}/compute/v2/", state.base_url)}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2"}],
    })
}

async fn versions(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "versions": [v20_entry(&state), v21_entry(&state)] }))
}

async fn version_v20(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "version": v20_entry(&state) }))
}

async fn version(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "version": v21_entry(&state) }))
}

/// The v2.1 extensions Shoal serves, as Nova's static `/extensions` document names them
/// (name, alias, description). The document is informational: the API is versioned by
/// microversions now, but clients still read it.
const EXTENSIONS: [(&str, &str, &str); 17] = [
    (
        "Aggregates",
        "os-aggregates",
        "Admin-only aggregate administration.",
    ),
    (
        "AvailabilityZone",
        "os-availability-zone",
        "1. Add availability_zone to the Create Server API. 2. Add availability zones describing.",
    ),
    (
        "ConsoleOutput",
        "os-console-output",
        "Console log output support, with tailing ability.",
    ),
    (
        "ExtendedServerAttributes",
        "OS-EXT-SRV-ATTR",
        "Extended Server Attributes support.",
    ),
    ("ExtendedStatus", "OS-EXT-STS", "Extended Status support."),
    ("FlavorAccess", "os-flavor-access", "Flavor access support."),
    (
        "FlavorExtraData",
        "OS-FLV-EXT-DATA",
        "Provide additional data for flavors.",
    ),
    (
        "FlavorExtraSpecs",
        "os-flavor-extra-specs",
        "Flavors extra specs support.",
    ),
    (
        "FlavorManage",
        "os-flavor-manage",
        "Flavor create/delete API support.",
    ),
    ("Flavors", "flavors", "Flavors Extension."),
    ("Hosts", "os-hosts", "Admin-only host administration."),
    (
        "Hypervisors",
        "os-hypervisors",
        "Admin-only hypervisor administration.",
    ),
    ("Keypairs", "os-keypairs", "Keypair Support."),
    ("Quotas", "os-quota-sets", "Quotas management support."),
    (
        "QuotaClasses",
        "os-quota-class-sets",
        "Quota classes management support.",
    ),
    ("ServerGroups", "os-server-groups", "Server group support."),
    ("Services", "os-services", "Services support."),
];

fn extension_json(name: &str, alias: &str, description: &str) -> Value {
    json!({
        "name": name, "alias": alias, "description": description, "links": [],
        "namespace": "http://docs.openstack.org/compute/ext/fake_xml",
        "updated": "2014-12-03T00:00:00Z",
    })
}

async fn list_extensions(auth: Auth) -> ApiResult<Json<Value>> {
    need(&auth, "reader")?;
    let list: Vec<Value> = EXTENSIONS
        .iter()
        .map(|(n, a, d)| extension_json(n, a, d))
        .collect();
    Ok(Json(json!({ "extensions": list })))
}

async fn show_extension(auth: Auth, Path(alias): Path<String>) -> ApiResult<Json<Value>> {
    need(&auth, "reader")?;
    let (n, a, d) = EXTENSIONS
        .iter()
        .find(|(_, a, _)| *a == alias)
        .ok_or_else(|| {
            ApiError::not_found(format!("extension {alias} could not be found")).nova()
        })?;
    Ok(Json(json!({ "extension": extension_json(n, a, d) })))
}

fn need(auth: &Auth, role: &str) -> ApiResult<()> {
    auth.require(role).map_err(ApiError::nova)
}

/// Any API error, in Nova's body shape.
pub(crate) fn nova_err(e: impl Into<ApiError>) -> ApiError {
    e.into().nova()
}

fn flavor_links(state: &AppState, id: &str) -> Value {
    json!([
        {"rel": "self", "href": format!("{}/compute/v2.1/flavors/{id}", state.base_url)},
        {"rel": "bookmark", "href": format!("{}/compute/flavors/{id}", state.base_url)},
    ])
}

fn flavor_json(state: &AppState, f: &Flavor) -> Value {
    json!({
        "id": f.id, "name": f.name, "vcpus": f.vcpus, "ram": f.ram, "disk": f.disk,
        // Below 2.75 Nova shows no swap as "" rather than 0.
        "OS-FLV-EXT-DATA:ephemeral": f.ephemeral,
        "swap": if f.swap == 0 { json!("") } else { json!(f.swap) },
        "rxtx_factor": f.rxtx_factor,
        "os-flavor-access:is_public": f.is_public, "OS-FLV-DISABLED:disabled": false,
        "links": flavor_links(state, &f.id),
    })
}

fn flavors(state: &AppState) -> Flavors {
    Flavors::new(&state.state)
}

fn caller(auth: &Auth) -> (bool, Option<&str>) {
    (has_role(&auth.0, "admin"), auth.0.project_id.as_deref())
}

async fn create_flavor(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Response> {
    need(&auth, "admin")?;
    let body: FlavorCreateBody = parse(&body)?;
    let flavor = body
        .flavor
        .validate()
        .map_err(|m| ApiError::bad_request(m).nova())?;
    flavors(&state).create(&flavor).await?;
    Ok(Json(json!({"flavor": flavor_json(&state, &flavor)})).into_response())
}

async fn flavor_listing(
    state: &AppState,
    auth: &Auth,
    q: &HashMap<String, String>,
    path: &str,
    item: impl Fn(&Flavor) -> Value,
) -> ApiResult<Json<Value>> {
    need(auth, "reader")?;
    let (admin, project) = caller(auth);
    let (flavors, cut) =
        shoal_compute::flavor::select(flavors(state).all().await?, admin, project, q)
            .map_err(|m| ApiError::bad_request(m).nova())?;
    let mut body = json!({ "flavors": flavors.iter().map(item).collect::<Vec<_>>() });
    if let (true, Some(last)) = (cut, flavors.last()) {
        let limit = q.get("limit").map_or("", String::as_str);
        // Flavor ids hold letters, digits, '-', '_', '.' and spaces.
        let marker = last.id.replace(' ', "%20");
        body["flavors_links"] = json!([{
            "rel": "next",
            "href": format!("{}/compute/v2.1/{path}?limit={limit}&marker={marker}", state.base_url),
        }]);
    }
    Ok(Json(body))
}

async fn list_flavors(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    flavor_listing(
        &state,
        &auth,
        &q,
        "flavors",
        |f| json!({"id": f.id, "name": f.name, "links": flavor_links(&state, &f.id)}),
    )
    .await
}

async fn list_flavors_detail(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    flavor_listing(&state, &auth, &q, "flavors/detail", |f| {
        flavor_json(&state, f)
    })
    .await
}

async fn show_flavor(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    need(&auth, "reader")?;
    let f = visible_flavor(&state, &auth, &id).await?;
    Ok(Json(json!({"flavor": flavor_json(&state, &f)})))
}

/// A flavor the caller may see (to anyone else a non-public flavor does not exist).
async fn visible_flavor(state: &AppState, auth: &Auth, id: &str) -> ApiResult<Flavor> {
    let (admin, project) = caller(auth);
    Ok(flavors(state).visible(id, admin, project).await?)
}

async fn delete_flavor(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    need(&auth, "admin")?;
    flavors(&state).delete(&id).await?;
    Ok(StatusCode::ACCEPTED)
}

fn access_json(f: &Flavor) -> Value {
    let list: Vec<Value> = f
        .projects
        .iter()
        .map(|p| json!({"flavor_id": f.id, "tenant_id": p}))
        .collect();
    json!({ "flavor_access": list })
}

/// `GET /flavors/{id}/os-flavor-access`: the projects given a non-public flavor (admins).
async fn list_flavor_access(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    need(&auth, "admin")?;
    let f = flavors(&state).get(&id).await?.value;
    if f.is_public {
        return Err(ApiError::not_found("access list not available for public flavors").nova());
    }
    Ok(Json(access_json(&f)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tenant {
    tenant: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
enum FlavorAction {
    #[serde(rename = "addTenantAccess")]
    Add(Tenant),
    #[serde(rename = "removeTenantAccess")]
    Remove(Tenant),
}

/// `POST /flavors/{id}/action`: `addTenantAccess` / `removeTenantAccess` (admins), with a
/// compare-and-set on the flavor so concurrent grants all land.
async fn flavor_action(
    State(state): State<AppState>,
    auth: Auth,
    v: Microversion,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    need(&auth, "admin")?;
    let action: FlavorAction = parse(&body)?;
    let (add, project) = match action {
        FlavorAction::Add(t) => (true, t.tenant),
        FlavorAction::Remove(t) => (false, t.tenant),
    };
    let known = !project.is_empty()
        && project.len() <= 255
        && state
            .identity
            .get_project(&project)
            .await
            .map_err(nova_err)?
            .is_some();
    if add && !known {
        return Err(ApiError::bad_request(format!(
            "project {} does not exist",
            project.chars().take(64).collect::<String>()
        ))
        .nova());
    }
    let f = flavors(&state)
        .set_access(&id, &project, add, v >= V2_7)
        .await?;
    Ok(Json(access_json(&f)))
}

/// Applies `change` to the flavor's extra specs (a compare-and-set, retried).
async fn update_specs(
    state: &AppState,
    id: &str,
    change: impl Fn(&mut BTreeMap<String, String>) -> Result<(), ComputeError>,
) -> ApiResult<BTreeMap<String, String>> {
    let f = flavors(state)
        .modify(id, |f| change(&mut f.extra_specs))
        .await?;
    Ok(f.extra_specs)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtraSpecsBody {
    extra_specs: BTreeMap<String, Value>,
}

async fn list_extra_specs(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    need(&auth, "reader")?;
    let f = visible_flavor(&state, &auth, &id).await?;
    Ok(Json(json!({ "extra_specs": f.extra_specs })))
}

async fn create_extra_specs(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    need(&auth, "admin")?;
    let body: ExtraSpecsBody = parse(&body)?;
    let specs: BTreeMap<String, String> = body
        .extra_specs
        .iter()
        .map(|(k, v)| {
            let v = spec_value(k, v)?;
            check_spec(k, &v)?;
            Ok((k.clone(), v))
        })
        .collect::<Result<_, String>>()
        .map_err(|m| ApiError::bad_request(m).nova())?;
    update_specs(&state, &id, |stored| {
        stored.extend(specs.clone());
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "extra_specs": specs })))
}

async fn show_extra_spec(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    need(&auth, "reader")?;
    let f = visible_flavor(&state, &auth, &id).await?;
    let v = f.extra_specs.get(&key).ok_or_else(|| {
        ApiError::not_found(format!("flavor {id} has no extra spec {key}")).nova()
    })?;
    Ok(Json(json!({ key: v })))
}

async fn update_extra_spec(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    need(&auth, "admin")?;
    let body: BTreeMap<String, Value> = parse(&body)?;
    let value = match body.get(&key) {
        Some(v) if body.len() == 1 => spec_value(&key, v)
            .and_then(|v| check_spec(&key, &v).map(|()| v))
            .map_err(|m| ApiError::bad_request(m).nova())?,
        _ => {
            return Err(ApiError::bad_request(format!(
                "the body must hold exactly one item, named {key} as in the URL"
            ))
            .nova())
        }
    };
    update_specs(&state, &id, |specs| {
        specs.insert(key.clone(), value.clone());
        Ok(())
    })
    .await?;
    Ok(Json(json!({ key: value })))
}

async fn delete_extra_spec(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    need(&auth, "admin")?;
    update_specs(&state, &id, |specs| {
        specs
            .remove(&key)
            .map(|_| ())
            .ok_or_else(|| ComputeError::NotFound(format!("flavor {id} has no extra spec {key}")))
    })
    .await?;
    Ok(StatusCode::OK)
}
