//! Identity v3 resources: projects, users, roles, grants and `role_assignments`, as Keystone
//! serves them to `openstack project|user|role ...`.
//!
//! Reads pass a read barrier first, so a project created through one node is listed by the
//! next request to any other.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::identity::parse_body;
use super::{policy, AppState, Auth};
use crate::identity::resources::{Assignment, ResourceError};
use crate::identity::{
    Domain, Project, Role, User, DEFAULT_DOMAIN_ID, DEFAULT_DOMAIN_NAME, T_DOMAINS,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/identity/v3/projects",
            get(list_projects).post(create_project),
        )
        .route(
            "/identity/v3/projects/{id}",
            get(show_project).delete(delete_project),
        )
        .route("/identity/v3/users", get(list_users).post(create_user))
        .route(
            "/identity/v3/users/{id}",
            get(show_user).delete(delete_user),
        )
        .route("/identity/v3/roles", get(list_roles))
        .route("/identity/v3/roles/{id}", get(show_role))
        .route(
            "/identity/v3/projects/{project}/users/{user}/roles/{role}",
            put(grant).head(check_grant).delete(revoke_grant),
        )
        .route("/identity/v3/role_assignments", get(list_assignments))
        .route(
            "/identity/v3/domains",
            get(list_domains).post(create_domain),
        )
        .route(
            "/identity/v3/domains/{id}",
            get(show_domain).patch(update_domain).delete(delete_domain),
        )
}

impl From<ResourceError> for ApiError {
    fn from(e: ResourceError) -> Self {
        match e {
            ResourceError::NameTaken { .. } | ResourceError::Raced => {
                ApiError::conflict(e.to_string())
            }
            ResourceError::NotFound { .. } => ApiError::not_found(e.to_string()),
            ResourceError::Busy(_) => ApiError::unavailable(e.to_string()),
            ResourceError::Refused(_) => ApiError::forbidden(e.to_string()),
            ResourceError::InUse(_) => ApiError::conflict(e.to_string()),
            ResourceError::Cluster(e) => e.into(),
        }
    }
}

type Params = Query<HashMap<String, String>>;

fn domain_name(id: &str) -> &str {
    if id == DEFAULT_DOMAIN_ID {
        DEFAULT_DOMAIN_NAME
    } else {
        id
    }
}

fn project_json(state: &AppState, p: &Project) -> Value {
    json!({
        "id": p.id, "name": p.name, "domain_id": p.domain_id, "description": p.description,
        "enabled": p.enabled, "is_domain": false, "parent_id": p.domain_id, "tags": [],
        "options": {},
        "links": {"self": format!("{}/identity/v3/projects/{}", state.base_url, p.id)},
    })
}

fn user_json(state: &AppState, u: &User) -> Value {
    json!({
        "id": u.id, "name": u.name, "domain_id": u.domain_id, "enabled": u.enabled,
        "default_project_id": u.default_project_id, "password_expires_at": null, "options": {},
        "links": {"self": format!("{}/identity/v3/users/{}", state.base_url, u.id)},
    })
}

fn role_json(state: &AppState, r: &Role) -> Value {
    json!({
        "id": r.id, "name": r.name, "domain_id": null, "description": null, "options": {},
        "links": {"self": format!("{}/identity/v3/roles/{}", state.base_url, r.id)},
    })
}

fn list_json(state: &AppState, key: &str, items: Vec<Value>) -> Json<Value> {
    Json(json!({
        key: items,
        "links": {"self": format!("{}/identity/v3/{key}", state.base_url), "next": null, "previous": null},
    }))
}

/// Keystone's list filters that the client sends: `name`, `domain_id` and `enabled`.
fn matches(q: &HashMap<String, String>, name: &str, domain_id: &str, enabled: bool) -> bool {
    q.get("name").is_none_or(|n| n == name)
        && q.get("domain_id").is_none_or(|d| d == domain_id)
        && q.get("enabled").is_none_or(|e| {
            let want = !matches!(e.to_ascii_lowercase().as_str(), "false" | "0" | "no");
            want == enabled
        })
}

fn require_identity_admin(auth: &Auth) -> ApiResult<()> {
    if policy::can_write_identity(&auth.0) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "changing projects, users and role assignments needs the admin role",
        ))
    }
}

async fn holds_role_on(state: &AppState, user_id: &str, project_id: &str) -> ApiResult<bool> {
    Ok(!state
        .identity
        .roles_on_project(user_id, project_id)
        .await?
        .is_empty())
}

async fn check_domain(state: &AppState, domain_id: &str) -> ApiResult<()> {
    if state.cluster.get(T_DOMAINS, domain_id).await?.is_none() {
        return Err(ApiError::bad_request(format!(
            "domain {domain_id} does not exist; `openstack domain list` shows the domains"
        )));
    }
    Ok(())
}

fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    super::validate::text(&format!("the {kind} name"), name, 64, false)
        .map_err(ApiError::bad_request)?;
    if name.contains('/') {
        return Err(ApiError::bad_request(format!(
            "the {kind} name must be 1 to 64 characters and may not contain '/'"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
struct ProjectCreateBody {
    project: ProjectCreate,
}

#[derive(Deserialize)]
struct ProjectCreate {
    name: String,
    #[serde(default)]
    domain_id: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
}

async fn create_project(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Response> {
    require_identity_admin(&auth)?;
    let body: ProjectCreateBody = parse_body(&body)?;
    let p = body.project;
    check_name("project", &p.name)?;
    let domain_id = p.domain_id.unwrap_or_else(|| DEFAULT_DOMAIN_ID.to_owned());
    check_domain(&state, &domain_id).await?;
    let project = state
        .identity
        .create_project(
            &p.name,
            &domain_id,
            p.description.as_deref().unwrap_or(""),
            p.enabled.unwrap_or(true),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"project": project_json(&state, &project)})),
    )
        .into_response())
}

async fn list_projects(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Params,
) -> ApiResult<Json<Value>> {
    state.cluster.read_barrier().await?;
    let projects = if policy::can_read_project(&auth.0, false) {
        state.identity.list_projects().await?
    } else {
        state.identity.projects_of_user(&auth.0.user_id).await?
    };
    let items = projects
        .iter()
        .filter(|p| matches(&q, &p.name, &p.domain_id, p.enabled))
        .map(|p| project_json(&state, p))
        .collect();
    Ok(list_json(&state, "projects", items))
}

async fn show_project(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    state.cluster.read_barrier().await?;
    let not_found = || ApiError::not_found(format!("could not find project {id}"));
    let project = state
        .identity
        .get_project(&id)
        .await?
        .ok_or_else(not_found)?;
    // Hide whether a project exists from those who may not read it, as Keystone does.
    if !policy::can_read_project(&auth.0, holds_role_on(&state, &auth.0.user_id, &id).await?) {
        return Err(ApiError::forbidden(format!(
            "you may not read project {id}"
        )));
    }
    Ok(Json(json!({"project": project_json(&state, &project)})))
}

async fn delete_project(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    require_identity_admin(&auth)?;
    if auth.0.project_id.as_deref() == Some(id.as_str()) {
        return Err(ApiError::forbidden(
            "a token may not delete the project it is scoped to",
        ));
    }
    state.identity.delete_project(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct UserCreateBody {
    user: UserCreate,
}

#[derive(Deserialize)]
struct UserCreate {
    name: String,
    #[serde(default)]
    domain_id: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    default_project_id: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
}

async fn create_user(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Response> {
    require_identity_admin(&auth)?;
    let body: UserCreateBody = parse_body(&body)?;
    let u = body.user;
    check_name("user", &u.name)?;
    let domain_id = u.domain_id.unwrap_or_else(|| DEFAULT_DOMAIN_ID.to_owned());
    check_domain(&state, &domain_id).await?;
    if let Some(pid) = &u.default_project_id {
        if state.identity.get_project(pid).await?.is_none() {
            return Err(ApiError::bad_request(format!(
                "default_project_id {pid} is not an existing project"
            )));
        }
    }
    let user = state
        .identity
        .create_user(
            &u.name,
            &domain_id,
            u.password.as_deref(),
            u.default_project_id,
            u.enabled.unwrap_or(true),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"user": user_json(&state, &user)})),
    )
        .into_response())
}

async fn list_users(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Params,
) -> ApiResult<Json<Value>> {
    state.cluster.read_barrier().await?;
    let items = state
        .identity
        .list_users()
        .await?
        .iter()
        .filter(|u| policy::can_read_user(&auth.0, &u.id))
        .filter(|u| matches(&q, &u.name, &u.domain_id, u.enabled))
        .map(|u| user_json(&state, u))
        .collect();
    Ok(list_json(&state, "users", items))
}

async fn show_user(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    state.cluster.read_barrier().await?;
    if !policy::can_read_user(&auth.0, &id) {
        return Err(ApiError::forbidden(format!("you may not read user {id}")));
    }
    let user = state
        .identity
        .get_user(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("could not find user {id}")))?;
    Ok(Json(json!({"user": user_json(&state, &user)})))
}

async fn delete_user(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    require_identity_admin(&auth)?;
    if auth.0.user_id == id {
        return Err(ApiError::forbidden("a user may not delete themselves"));
    }
    state.identity.delete_user(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_roles(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Params,
) -> ApiResult<Json<Value>> {
    if !policy::can_list_roles(&auth.0) {
        return Err(ApiError::forbidden("listing roles needs a scoped token"));
    }
    state.cluster.read_barrier().await?;
    let mut roles = state.identity.list_roles().await?;
    roles.sort_by(|a, b| a.name.cmp(&b.name));
    let items = roles
        .iter()
        .filter(|r| q.get("name").is_none_or(|n| *n == r.name))
        .map(|r| role_json(&state, r))
        .collect();
    Ok(list_json(&state, "roles", items))
}

async fn show_role(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if !policy::can_list_roles(&auth.0) {
        return Err(ApiError::forbidden("reading roles needs a scoped token"));
    }
    let role = state
        .identity
        .get_role(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("could not find role {id}")))?;
    Ok(Json(json!({"role": role_json(&state, &role)})))
}

async fn grant(
    State(state): State<AppState>,
    auth: Auth,
    Path((project_id, user_id, role_id)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    require_identity_admin(&auth)?;
    state
        .identity
        .grant(&Assignment {
            project_id,
            user_id,
            role_id,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn check_grant(
    State(state): State<AppState>,
    auth: Auth,
    Path((project_id, user_id, role_id)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    if !policy::can_read_assignment(&auth.0, &user_id) {
        return Err(ApiError::forbidden("you may not read this role assignment"));
    }
    state.cluster.read_barrier().await?;
    let a = Assignment {
        project_id,
        user_id,
        role_id,
    };
    if state.identity.has_grant(&a).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("could not find the role assignment"))
    }
}

async fn revoke_grant(
    State(state): State<AppState>,
    auth: Auth,
    Path((project_id, user_id, role_id)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    require_identity_admin(&auth)?;
    state
        .identity
        .revoke_grant(&Assignment {
            project_id,
            user_id,
            role_id,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether a Keystone boolean query flag is set (`?include_names`, `=1`, `=true`).
fn flag(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key)
        .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "false" | "0" | "no"))
}

async fn list_assignments(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Params,
) -> ApiResult<Json<Value>> {
    // Domain, system and group scopes do not exist in Shoal: those filters match nothing.
    let unsupported = ["scope.domain.id", "scope.system", "group.id"];
    let none = unsupported.iter().any(|k| q.contains_key(*k));
    state.cluster.read_barrier().await?;
    let names = flag(&q, "include_names");
    let mut items = Vec::new();
    let mut assignments = if none {
        Vec::new()
    } else {
        state.identity.list_assignments().await?
    };
    assignments.sort_by(|a, b| {
        (&a.project_id, &a.user_id, &a.role_id).cmp(&(&b.project_id, &b.user_id, &b.role_id))
    });
    for a in assignments {
        if q.get("user.id").is_some_and(|u| *u != a.user_id)
            || q.get("scope.project.id")
                .is_some_and(|p| *p != a.project_id)
            || q.get("role.id").is_some_and(|r| *r != a.role_id)
            || !policy::can_read_assignment(&auth.0, &a.user_id)
        {
            continue;
        }
        let mut role = json!({"id": a.role_id});
        let mut user = json!({"id": a.user_id});
        let mut project = json!({"id": a.project_id});
        if names {
            if let Some(r) = state.identity.get_role(&a.role_id).await? {
                role["name"] = json!(r.name);
            }
            if let Some(u) = state.identity.get_user(&a.user_id).await? {
                user["name"] = json!(u.name);
                user["domain"] = json!({"id": u.domain_id, "name": domain_name(&u.domain_id)});
            }
            if let Some(p) = state.identity.get_project(&a.project_id).await? {
                project["name"] = json!(p.name);
                project["domain"] = json!({"id": p.domain_id, "name": domain_name(&p.domain_id)});
            }
        }
        items.push(json!({
            "role": role,
            "user": user,
            "scope": {"project": project},
            "links": {"assignment": format!(
                "{}/identity/v3/projects/{}/users/{}/roles/{}",
                state.base_url, a.project_id, a.user_id, a.role_id
            )},
        }));
    }
    Ok(Json(json!({
        "role_assignments": items,
        "links": {"self": format!("{}/identity/v3/role_assignments", state.base_url), "next": null, "previous": null},
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_filters_follow_keystone_query_parameters() {
        let q: HashMap<String, String> = [("name".to_owned(), "demo".to_owned())].into();
        assert!(matches(&q, "demo", "default", true));
        assert!(!matches(&q, "other", "default", true));
        let q: HashMap<String, String> = [("enabled".to_owned(), "False".to_owned())].into();
        assert!(matches(&q, "x", "default", false));
        assert!(!matches(&q, "x", "default", true));
        assert!(matches(&HashMap::new(), "x", "d", false));
    }

    #[test]
    fn boolean_flags() {
        let q: HashMap<String, String> = [
            ("include_names".to_owned(), "True".to_owned()),
            ("effective".to_owned(), "".to_owned()),
            ("x".to_owned(), "0".to_owned()),
        ]
        .into();
        assert!(flag(&q, "include_names"));
        assert!(flag(&q, "effective"));
        assert!(!flag(&q, "x"));
        assert!(!flag(&q, "missing"));
    }
}

fn domain_json(state: &AppState, d: &Domain) -> Value {
    json!({
        "id": d.id, "name": d.name, "description": d.description, "enabled": d.enabled,
        "tags": [], "options": {},
        "links": {"self": format!("{}/identity/v3/domains/{}", state.base_url, d.id)},
    })
}

/// Keystone lets admins list every domain; anyone else sees the domain of their own token.
async fn list_domains(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Params,
) -> ApiResult<Json<Value>> {
    state.cluster.read_barrier().await?;
    let admin = policy::can_write_identity(&auth.0);
    let items = state
        .identity
        .list_domains()
        .await?
        .iter()
        .filter(|d| admin || d.id == auth.0.domain_id)
        .filter(|d| matches(&q, &d.name, &d.id, d.enabled))
        .map(|d| domain_json(&state, d))
        .collect();
    Ok(list_json(&state, "domains", items))
}

async fn show_domain(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    state.cluster.read_barrier().await?;
    if !policy::can_write_identity(&auth.0) && auth.0.domain_id != id {
        return Err(ApiError::forbidden(format!("you may not read domain {id}")));
    }
    let (d, _) = state
        .identity
        .get_domain(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("could not find domain {id}")))?;
    Ok(Json(json!({"domain": domain_json(&state, &d)})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainBody {
    domain: DomainFields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainFields {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    options: Option<Value>,
}

fn check_domain_fields(f: &DomainFields) -> ApiResult<()> {
    if let Some(n) = &f.name {
        super::validate::text("the domain name", n, 64, false).map_err(ApiError::bad_request)?;
    }
    if let Some(d) = &f.description {
        super::validate::text("the domain description", d, 255, true)
            .map_err(ApiError::bad_request)?;
    }
    let options_set = f
        .options
        .as_ref()
        .is_some_and(|o| o.as_object().is_none_or(|m| !m.is_empty()));
    if f.tags.as_ref().is_some_and(|t| !t.is_empty()) || options_set {
        return Err(ApiError::bad_request(
            "domain tags and options are not supported",
        ));
    }
    Ok(())
}

async fn create_domain(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Response> {
    require_identity_admin(&auth)?;
    let body: DomainBody = parse_body(&body)?;
    let f = body.domain;
    check_domain_fields(&f)?;
    let name = f
        .name
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("domain.name is required"))?;
    let d = state
        .identity
        .create_domain(
            name,
            f.description.as_deref().unwrap_or(""),
            f.enabled.unwrap_or(true),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"domain": domain_json(&state, &d)})),
    )
        .into_response())
}

async fn update_domain(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    require_identity_admin(&auth)?;
    let body: DomainBody = parse_body(&body)?;
    let f = body.domain;
    check_domain_fields(&f)?;
    if id == DEFAULT_DOMAIN_ID && f.enabled == Some(false) {
        return Err(ApiError::forbidden(
            "the default domain may not be disabled",
        ));
    }
    let d = state
        .identity
        .update_domain(&id, f.name.as_deref(), f.description.as_deref(), f.enabled)
        .await?;
    Ok(Json(json!({"domain": domain_json(&state, &d)})))
}

async fn delete_domain(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    require_identity_admin(&auth)?;
    if id == DEFAULT_DOMAIN_ID {
        return Err(ApiError::forbidden("the default domain may not be deleted"));
    }
    state.identity.delete_domain(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
