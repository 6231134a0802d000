//! Compute v2.1 (Nova) under `/compute/v2.1`: version discovery and flavors with their extra
//! specs, as `openstack flavor ...` uses them.
//!
//! Shoal serves microversion 2.1 only. A request naming another version is refused with 406,
//! as Nova refuses versions outside its range; every answer carries the version headers.
//! Request bodies are checked against the fields Nova 2.1 accepts: an unknown field is a 400.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_types::{Expect, Txn};

use shoal_state::{retry, DEFAULT_ATTEMPTS};

use super::error::{ApiError, ApiResult};
use super::{AppState, Auth};
use crate::identity::has_role;

pub const T_FLAVORS: &str = "flavors";
pub const T_FLAVOR_NAMES: &str = "flavor_names";

const MICROVERSION: &str = "2.1";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/compute", get(versions))
        .route("/compute/", get(versions))
        .route("/compute/v2.1", get(version))
        .route("/compute/v2.1/", get(version))
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

/// The version a request asks for, from either header Nova reads; `None` when it names none.
fn requested_version(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get("openstack-api-version")
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = v.split_whitespace();
        if parts
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("compute"))
        {
            return parts.next().map(str::to_owned);
        }
    }
    headers
        .get("x-openstack-nova-api-version")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
}

/// Whether Shoal serves the requested microversion.
fn version_supported(v: &str) -> bool {
    matches!(v, "2.1" | "latest")
}

pub(super) async fn microversion(req: Request, next: Next) -> Response {
    let asked = requested_version(req.headers());
    let mut resp = match asked {
        Some(v) if !version_supported(&v) => ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!("version {v} is not supported by the API; Shoal serves compute {MICROVERSION}"),
        )
        .nova()
        .into_response(),
        _ => next.run(req).await,
    };
    let h = resp.headers_mut();
    h.insert(
        "OpenStack-API-Version",
        HeaderValue::from_static("compute 2.1"),
    );
    h.insert(
        "X-OpenStack-Nova-API-Version",
        HeaderValue::from_static(MICROVERSION),
    );
    h.insert(
        "Vary",
        HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"),
    );
    resp
}

fn v21_entry(state: &AppState) -> Value {
    json!({
        "id": "v2.1", "status": "CURRENT", "version": MICROVERSION, "min_version": MICROVERSION,
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{}/compute/v2.1/", state.base_url)}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}],
    })
}

async fn versions(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "versions": [v21_entry(&state)] }))
}

async fn version(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "version": v21_entry(&state) }))
}

/// Parses a body in Nova's error shape; serde's message names the unknown or missing field.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("invalid input for the request body: {e}")).nova()
    })
}

fn need(auth: &Auth, role: &str) -> ApiResult<()> {
    auth.require(role).map_err(ApiError::nova)
}

/// Any API error, in Nova's body shape.
pub(crate) fn nova_err(e: impl Into<ApiError>) -> ApiError {
    e.into().nova()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flavor {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    pub ram: u64,
    pub disk: u64,
    pub ephemeral: u64,
    pub swap: u64,
    pub rxtx_factor: f64,
    pub is_public: bool,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub extra_specs: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlavorCreateBody {
    flavor: FlavorCreate,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlavorCreate {
    name: String,
    #[serde(default)]
    id: Option<String>,
    ram: u64,
    vcpus: u32,
    disk: u64,
    #[serde(rename = "OS-FLV-EXT-DATA:ephemeral", default)]
    ephemeral: Option<u64>,
    #[serde(default)]
    swap: Option<u64>,
    #[serde(default)]
    rxtx_factor: Option<f64>,
    #[serde(rename = "os-flavor-access:is_public", default)]
    is_public: Option<bool>,
}

impl FlavorCreate {
    fn validate(self) -> Result<Flavor, String> {
        use super::validate::{int, text, MAX_INT};
        let name = self.name;
        text("name", &name, 255, false)?;
        if name.contains('/') {
            return Err("flavor name may not contain '/'".into());
        }
        int("vcpus", self.vcpus.into(), 1, MAX_INT)?;
        int("ram", self.ram, 1, MAX_INT)?;
        int("disk", self.disk, 0, MAX_INT)?;
        int(
            "OS-FLV-EXT-DATA:ephemeral",
            self.ephemeral.unwrap_or(0),
            0,
            MAX_INT,
        )?;
        int("swap", self.swap.unwrap_or(0), 0, MAX_INT)?;
        if let Some(id) = &self.id {
            text("id", id, 255, false)?;
        }
        let id = match self.id.as_deref() {
            None | Some("auto") => uuid::Uuid::new_v4().to_string(),
            Some(id) if !id.is_empty() && id.len() <= 255 && !id.contains('/') => id.to_owned(),
            Some(_) => {
                return Err("flavor id must be 1 to 255 characters without '/', or omitted".into())
            }
        };
        let rxtx_factor = self.rxtx_factor.unwrap_or(1.0);
        if !(rxtx_factor > 0.0 && rxtx_factor <= f64::from(f32::MAX)) {
            return Err(format!(
                "rxtx_factor must be a number above 0 and at most {}",
                f32::MAX
            ));
        }
        Ok(Flavor {
            id,
            name,
            vcpus: self.vcpus,
            ram: self.ram,
            disk: self.disk,
            ephemeral: self.ephemeral.unwrap_or(0),
            swap: self.swap.unwrap_or(0),
            rxtx_factor,
            is_public: self.is_public.unwrap_or(true),
            description: None,
            extra_specs: BTreeMap::new(),
        })
    }
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
        "OS-FLV-EXT-DATA:ephemeral": f.ephemeral, "swap": f.swap, "rxtx_factor": f.rxtx_factor,
        "os-flavor-access:is_public": f.is_public, "OS-FLV-DISABLED:disabled": false,
        "links": flavor_links(state, &f.id),
    })
}

async fn all_flavors(state: &AppState) -> ApiResult<Vec<Flavor>> {
    state.cluster.read_barrier().await.map_err(nova_err)?;
    let rows = state
        .cluster
        .list(T_FLAVORS, "", usize::MAX)
        .await
        .map_err(nova_err)?;
    let mut out = Vec::with_capacity(rows.len());
    for (key, row) in rows {
        let f: Flavor = serde_json::from_slice(&row.value).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("flavor {key} is stored corrupt: {e}"),
            )
            .nova()
        })?;
        out.push(f);
    }
    // Nova lists flavors by flavorid; sorting by memory then name reads better and is stable.
    out.sort_by(|a, b| (a.ram, a.vcpus, &a.name).cmp(&(b.ram, b.vcpus, &b.name)));
    Ok(out)
}

/// The flavor and the revision it was read at, for a conditional update.
async fn get_flavor(state: &AppState, id: &str) -> ApiResult<(Flavor, u64)> {
    state.cluster.read_barrier().await.map_err(nova_err)?;
    let row = state
        .cluster
        .get(T_FLAVORS, id)
        .await
        .map_err(nova_err)?
        .ok_or_else(|| ApiError::not_found(format!("flavor {id} could not be found")).nova())?;
    let f = serde_json::from_slice(&row.value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("flavor {id} is stored corrupt: {e}"),
        )
        .nova()
    })?;
    Ok((f, row.mod_revision))
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
    let value = serde_json::to_vec(&flavor).expect("flavors serialise");
    let txn = Txn::new()
        .when(T_FLAVORS, &flavor.id, Expect::Absent)
        .when(T_FLAVOR_NAMES, &flavor.name, Expect::Absent)
        .put(T_FLAVORS, &flavor.id, value)
        .put(T_FLAVOR_NAMES, &flavor.name, flavor.id.as_bytes().to_vec());
    let resp = state.cluster.write(txn).await.map_err(nova_err)?;
    if !resp.succeeded {
        let what = if resp.failed_precondition == Some(0) {
            format!("flavor with id {} already exists", flavor.id)
        } else {
            format!("flavor with name {} already exists", flavor.name)
        };
        return Err(ApiError::conflict(what).nova());
    }
    Ok(Json(json!({"flavor": flavor_json(&state, &flavor)})).into_response())
}

async fn list_flavors(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    need(&auth, "reader")?;
    let items: Vec<Value> = all_flavors(&state)
        .await?
        .iter()
        .filter(|f| f.is_public || has_role(&auth.0, "admin"))
        .map(|f| json!({"id": f.id, "name": f.name, "links": flavor_links(&state, &f.id)}))
        .collect();
    Ok(Json(json!({ "flavors": items })))
}

async fn list_flavors_detail(State(state): State<AppState>, auth: Auth) -> ApiResult<Json<Value>> {
    need(&auth, "reader")?;
    let items: Vec<Value> = all_flavors(&state)
        .await?
        .iter()
        .filter(|f| f.is_public || has_role(&auth.0, "admin"))
        .map(|f| flavor_json(&state, f))
        .collect();
    Ok(Json(json!({ "flavors": items })))
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

/// A flavor the caller may see: a non-public flavor is an admin's only (there are no
/// per-project access lists yet), and to anyone else it does not exist, as Nova answers.
async fn visible_flavor(state: &AppState, auth: &Auth, id: &str) -> ApiResult<Flavor> {
    let (f, _) = get_flavor(state, id).await?;
    if f.is_public || has_role(&auth.0, "admin") {
        Ok(f)
    } else {
        Err(ApiError::not_found(format!("flavor {id} could not be found")).nova())
    }
}

async fn delete_flavor(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    need(&auth, "admin")?;
    let (f, rev) = get_flavor(&state, &id).await?;
    let txn = Txn::new()
        .when(T_FLAVORS, &id, Expect::Revision(rev))
        .delete(T_FLAVORS, &id)
        .delete(T_FLAVOR_NAMES, &f.name);
    if !state.cluster.write(txn).await.map_err(nova_err)?.succeeded {
        return Err(
            ApiError::conflict(format!("flavor {id} changed while deleting; retry")).nova(),
        );
    }
    Ok(StatusCode::ACCEPTED)
}

/// Applies `change` to the flavor's extra specs with a compare-and-set on its revision.
async fn update_specs(
    state: &AppState,
    id: &str,
    change: impl Fn(&mut BTreeMap<String, String>) -> ApiResult<()>,
) -> ApiResult<BTreeMap<String, String>> {
    let flavors = state.state.table::<Flavor>(T_FLAVORS);
    retry(T_FLAVORS, id, DEFAULT_ATTEMPTS, || async {
        let (mut f, rev) = get_flavor(state, id).await?;
        change(&mut f.extra_specs)?;
        let written = flavors.put_at(id, &f, rev).await.map_err(nova_err)?;
        Ok(written.map(|_| f.extra_specs))
    })
    .await
    .map_err(ApiError::nova)
}

fn check_spec(key: &str, value: &str) -> ApiResult<()> {
    let key_ok = !key.is_empty()
        && key.len() <= 255
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_:. ".contains(c));
    if !key_ok {
        return Err(ApiError::bad_request(format!(
            "extra spec key {key:?} must be 1 to 255 characters of letters, digits, '-', '_', ':', '.' or space"
        ))
        .nova());
    }
    super::validate::text(&format!("extra spec {key}"), value, 255, true)
        .map_err(|m| ApiError::bad_request(m).nova())?;
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtraSpecsBody {
    extra_specs: BTreeMap<String, String>,
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
    for (k, v) in &body.extra_specs {
        check_spec(k, v)?;
    }
    update_specs(&state, &id, |specs| {
        specs.extend(body.extra_specs.clone());
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "extra_specs": body.extra_specs })))
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
    let body: BTreeMap<String, String> = parse(&body)?;
    let value = match body.get(&key) {
        Some(v) if body.len() == 1 => v.clone(),
        _ => {
            return Err(ApiError::bad_request(format!(
                "the body must hold exactly one item, named {key} as in the URL"
            ))
            .nova())
        }
    };
    check_spec(&key, &value)?;
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
        specs.remove(&key).map(|_| ()).ok_or_else(|| {
            ApiError::not_found(format!("flavor {id} has no extra spec {key}")).nova()
        })
    })
    .await?;
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(body: &str) -> Result<Flavor, String> {
        let b: FlavorCreateBody = serde_json::from_str(body).map_err(|e| e.to_string())?;
        b.flavor.validate()
    }

    #[test]
    fn flavor_bodies_are_checked() {
        let f =
            create(r#"{"flavor":{"name":"m1","ram":512,"vcpus":1,"disk":1,"id":null}}"#).unwrap();
        assert_eq!((f.name.as_str(), f.ram, f.is_public), ("m1", 512, true));
        assert_eq!(f.id.len(), 36);
        let err = create(r#"{"flavor":{"name":"m1","ram":512,"vcpus":1,"disk":1,"color":"red"}}"#)
            .unwrap_err();
        assert!(err.contains("unknown field `color`"), "{err}");
        assert!(create(r#"{"flavor":{"name":"m1","ram":512,"vcpus":0,"disk":1}}"#).is_err());
        assert!(create(r#"{"flavor":{"name":"","ram":512,"vcpus":1,"disk":1}}"#).is_err());
    }

    #[test]
    fn microversion_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(requested_version(&h), None);
        h.insert(
            "X-OpenStack-Nova-API-Version",
            HeaderValue::from_static("2.1"),
        );
        assert_eq!(requested_version(&h).as_deref(), Some("2.1"));
        h.insert(
            "OpenStack-API-Version",
            HeaderValue::from_static("compute 2.60"),
        );
        assert_eq!(requested_version(&h).as_deref(), Some("2.60"));
        assert!(!version_supported("2.60"));
        assert!(version_supported("2.1"));
        assert!(version_supported("latest"));
    }

    #[test]
    fn extra_spec_keys() {
        assert!(check_spec("hw:cpu_policy", "dedicated").is_ok());
        assert!(check_spec("bad/key", "x").is_err());
        assert!(check_spec("", "x").is_err());
    }
}
