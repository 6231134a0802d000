//! Identity v3 resources: domains, projects, users, roles, grants on projects and on the
//! system, and `role_assignments`, as Keystone serves them to `openstack
//! domain|project|user|role ...`.
//!
//! Reads pass a read barrier first, so a project created through one node is listed by the
//! next request to any other.

use shoal_state::tables;
use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::body::parse;
use crate::api::error::{ApiError, ApiResult};
use shoal_identity::policy;

use crate::api::{AppState, Auth};
use shoal_identity::resources::{Assignment, ProjectUpdate, ResourceError, UserUpdate};
use shoal_identity::{Domain, Project, Role, User, DEFAULT_DOMAIN_ID, DEFAULT_DOMAIN_NAME};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/identity/v3/projects",
            get(list_projects).post(create_project),
        )
        .route(
            "/identity/v3/projects/{id}",
            get(show_project)
                .patch(update_project)
                .delete(delete_project),
        )
        .route(
            "/identity/v3/projects/{id}/tags",
            get(list_tags).put(replace_tags).delete(delete_tags),
        )
        .route(
            "/identity/v3/projects/{id}/tags/{tag}",
            get(check_tag)
                .head(check_tag)
                .put(add_tag)
                .delete(remove_tag),
        )
        .route("/identity/v3/users", get(list_users).post(create_user))
        .route(
            "/identity/v3/users/{id}",
            get(show_user).patch(update_user).delete(delete_user),
        )
        .route("/identity/v3/users/{id}/password", post(change_password))
        .route("/identity/v3/users/{id}/projects", get(user_projects))
        .route("/identity/v3/roles", get(list_roles).post(create_role))
        .route(
            "/identity/v3/roles/{id}",
            get(show_role).patch(update_role).delete(delete_role),
        )
        .route(
            "/identity/v3/projects/{project}/users/{user}/roles",
            get(list_project_grants),
        )
        .route(
            "/identity/v3/projects/{project}/users/{user}/roles/{role}",
            put(grant)
                .get(check_grant)
                .head(check_grant)
                .delete(revoke_grant),
        )
        .route(
            "/identity/v3/system/users/{user}/roles",
            get(list_system_grants),
        )
        .route(
            "/identity/v3/system/users/{user}/roles/{role}",
            put(grant_system)
                .get(check_system_grant)
                .head(check_system_grant)
                .delete(revoke_system_grant),
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
            ResourceError::Invalid(_) => ApiError::bad_request(e.to_string()),
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
        "enabled": p.enabled, "is_domain": false, "parent_id": p.domain_id, "tags": p.tags,
        "options": {},
        "links": {"self": format!("{}/identity/v3/projects/{}", state.base_url, p.id)},
    })
}

fn user_json(state: &AppState, u: &User) -> Value {
    let mut v = Value::Object(u.extra.clone());
    let fixed = json!({
        "id": u.id, "name": u.name, "domain_id": u.domain_id, "enabled": u.enabled,
        "default_project_id": u.default_project_id, "password_expires_at": null, "options": {},
        "links": {"self": format!("{}/identity/v3/users/{}", state.base_url, u.id)},
    });
    if let (Some(out), Value::Object(fixed)) = (v.as_object_mut(), fixed) {
        out.extend(fixed);
    }
    v
}

fn role_json(state: &AppState, r: &Role) -> Value {
    json!({
        "id": r.id, "name": r.name, "domain_id": null, "description": r.description,
        "options": {},
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
    if state
        .cluster
        .get(tables::DOMAINS, domain_id)
        .await?
        .is_none()
    {
        return Err(ApiError::bad_request(format!(
            "domain {domain_id} does not exist; `openstack domain list` shows the domains"
        )));
    }
    Ok(())
}

/// Keystone's name limits: users 255 characters, projects (and domains) 64.
fn name_limit(kind: &str) -> usize {
    if kind == "user" || kind == "role" {
        255
    } else {
        64
    }
}

fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    let max = name_limit(kind);
    shoal_state::validate::text(&format!("the {kind} name"), name, max, false)
        .map_err(ApiError::bad_request)?;
    if name.contains('/') {
        return Err(ApiError::bad_request(format!(
            "the {kind} name must be 1 to {max} characters and may not contain '/'"
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
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// Keystone's tag rules: 1 to 255 characters, no `/` or `,` (they separate tags in URLs and
/// filters), at most 80, each once.
fn check_tags(tags: &[String]) -> ApiResult<()> {
    for t in tags {
        check_tag_text(t)?;
    }
    if tags.len() > shoal_identity::resources::MAX_PROJECT_TAGS {
        return Err(ApiError::bad_request(format!(
            "a project may have at most {} tags",
            shoal_identity::resources::MAX_PROJECT_TAGS
        )));
    }
    let unique: std::collections::HashSet<&String> = tags.iter().collect();
    if unique.len() != tags.len() {
        return Err(ApiError::bad_request("project tags must be unique"));
    }
    Ok(())
}

fn check_tag_text(t: &str) -> ApiResult<()> {
    shoal_state::validate::text("a project tag", t, 255, false).map_err(ApiError::bad_request)?;
    if t.contains('/') || t.contains(',') {
        return Err(ApiError::bad_request(
            "a project tag may not contain '/' or ','",
        ));
    }
    Ok(())
}

/// Keystone's tag filters on project lists: `tags` (all of), `tags-any`, `not-tags` (not all
/// of), `not-tags-any` (none of), each a comma-separated list.
fn tags_match(q: &HashMap<String, String>, tags: &[String]) -> bool {
    let list = |k: &str| -> Option<Vec<&str>> {
        q.get(k)
            .map(|v| v.split(',').filter(|t| !t.is_empty()).collect())
    };
    let has = |t: &&str| tags.iter().any(|x| x == t);
    list("tags").is_none_or(|w| w.iter().all(has))
        && list("tags-any").is_none_or(|w| w.iter().any(has))
        && list("not-tags").is_none_or(|w| !w.iter().all(has))
        && list("not-tags-any").is_none_or(|w| !w.iter().any(has))
}

async fn create_project(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Response> {
    require_identity_admin(&auth)?;
    let body: ProjectCreateBody = parse(&body)?;
    let p = body.project;
    check_name("project", &p.name)?;
    let domain_id = p.domain_id.unwrap_or_else(|| DEFAULT_DOMAIN_ID.to_owned());
    let tags = p.tags.unwrap_or_default();
    check_tags(&tags)?;
    check_domain(&state, &domain_id).await?;
    let project = state
        .identity
        .create_project(
            &p.name,
            &domain_id,
            p.description.as_deref().unwrap_or(""),
            p.enabled.unwrap_or(true),
            tags,
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
    // Keystone's `identity:list_projects`: every project, to those who read identity. Anyone
    // else lists their own with `/v3/auth/projects` (`openstack project list --my-projects`)
    // or `/v3/users/{id}/projects`.
    if !policy::can_read_identity(&auth.0) {
        return Err(ApiError::forbidden(
            "listing all projects needs the admin role or a reader on the system; \
             `openstack project list --my-projects` lists yours",
        ));
    }
    state.cluster.read_barrier().await?;
    let projects = state.identity.list_projects().await?;
    let items = projects
        .iter()
        // A project's parent is its domain (projects do not nest here), as `parent_id` shows.
        .filter(|p| matches(&q, &p.name, &p.domain_id, p.enabled) && tags_match(&q, &p.tags))
        .filter(|p| {
            q.get("parent_id")
                .is_none_or(|parent| *parent == p.domain_id)
        })
        .map(|p| project_json(&state, p))
        .collect();
    Ok(list_json(&state, "projects", items))
}

async fn show_project(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let project = readable_project(&state, &auth, &id).await?;
    Ok(Json(json!({"project": project_json(&state, &project)})))
}

/// The `{"<kind>": {...}}` object of an update body.
fn update_fields(body: &Bytes, kind: &str) -> ApiResult<serde_json::Map<String, Value>> {
    let mut v: Value = parse(body)?;
    match v.get_mut(kind).map(Value::take) {
        Some(Value::Object(m)) => Ok(m),
        _ => Err(ApiError::bad_request(format!(
            "the request body must be {{\"{kind}\": {{...}}}}"
        ))),
    }
}

fn take_string(m: &mut serde_json::Map<String, Value>, key: &str) -> ApiResult<Option<String>> {
    match m.remove(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request(format!("{key} must be a string"))),
    }
}

fn take_bool(m: &mut serde_json::Map<String, Value>, key: &str) -> ApiResult<Option<bool>> {
    match m.remove(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(ApiError::bad_request(format!(
            "{key} must be true or false"
        ))),
    }
}

/// A field that may be sent back unchanged but not changed (`domain_id`, `id`).
fn same_or_absent(
    m: &mut serde_json::Map<String, Value>,
    key: &str,
    current: &str,
) -> ApiResult<()> {
    match m.remove(key) {
        None => Ok(()),
        Some(Value::String(s)) if s == current => Ok(()),
        Some(_) => Err(ApiError::bad_request(format!("{key} may not be changed"))),
    }
}

async fn update_project(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    require_identity_admin(&auth)?;
    let mut m = update_fields(&body, "project")?;
    let current = state
        .identity
        .get_project(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("could not find project {id}")))?;
    same_or_absent(&mut m, "domain_id", &current.domain_id)?;
    same_or_absent(&mut m, "id", &current.id)?;
    let tags = match m.remove("tags") {
        None => None,
        Some(v) => {
            let tags: Vec<String> = serde_json::from_value(v)
                .map_err(|_| ApiError::bad_request("tags must be a list of strings"))?;
            check_tags(&tags)?;
            Some(tags)
        }
    };
    let u = ProjectUpdate {
        name: take_string(&mut m, "name")?,
        description: take_string(&mut m, "description")?,
        enabled: take_bool(&mut m, "enabled")?,
        tags,
        ..ProjectUpdate::default()
    };
    if let Some(n) = &u.name {
        check_name("project", n)?;
    }
    if let Some(d) = &u.description {
        shoal_state::validate::text("the project description", d, 65_535, true)
            .map_err(ApiError::bad_request)?;
    }
    if u.enabled == Some(false) && auth.0.project_id.as_deref() == Some(id.as_str()) {
        return Err(ApiError::forbidden(
            "a token may not disable the project it is scoped to",
        ));
    }
    let project = state.identity.update_project(&id, u).await?;
    Ok(Json(json!({"project": project_json(&state, &project)})))
}

async fn readable_project(state: &AppState, auth: &Auth, id: &str) -> ApiResult<Project> {
    state.cluster.read_barrier().await?;
    let project = state
        .identity
        .get_project(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("could not find project {id}")))?;
    if !policy::can_read_project(&auth.0, holds_role_on(state, &auth.0.user_id, id).await?) {
        return Err(ApiError::forbidden(format!(
            "you may not read project {id}"
        )));
    }
    Ok(project)
}

async fn list_tags(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let p = readable_project(&state, &auth, &id).await?;
    Ok(Json(json!({"tags": p.tags})))
}

async fn check_tag(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let p = readable_project(&state, &auth, &id).await?;
    if p.tags.contains(&tag) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "project {id} has no tag {tag}"
        )))
    }
}

#[derive(Deserialize)]
struct TagsBody {
    tags: Vec<String>,
}

async fn set_tags(state: &AppState, auth: &Auth, id: &str, u: ProjectUpdate) -> ApiResult<Project> {
    require_identity_admin(auth)?;
    Ok(state.identity.update_project(id, u).await?)
}

async fn replace_tags(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    require_identity_admin(&auth)?;
    let body: TagsBody = parse(&body)?;
    check_tags(&body.tags)?;
    let u = ProjectUpdate {
        tags: Some(body.tags),
        ..ProjectUpdate::default()
    };
    let p = set_tags(&state, &auth, &id, u).await?;
    Ok(Json(json!({"tags": p.tags})))
}

async fn delete_tags(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let u = ProjectUpdate {
        tags: Some(Vec::new()),
        ..ProjectUpdate::default()
    };
    set_tags(&state, &auth, &id, u).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn add_tag(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<Response> {
    require_identity_admin(&auth)?;
    check_tag_text(&tag)?;
    let u = ProjectUpdate {
        add_tag: Some(tag.clone()),
        ..ProjectUpdate::default()
    };
    set_tags(&state, &auth, &id, u).await?;
    // Keystone answers 201 with the tag's location and no body (the API-WG tags guideline).
    let location = format!("{}/identity/v3/projects/{id}/tags/{tag}", state.base_url);
    let mut resp = StatusCode::CREATED.into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    Ok(resp)
}

async fn remove_tag(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let u = ProjectUpdate {
        remove_tag: Some(tag),
        ..ProjectUpdate::default()
    };
    set_tags(&state, &auth, &id, u).await?;
    Ok(StatusCode::NO_CONTENT)
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
    /// Anything else (`email`, `description`, ...) is kept and returned, as Keystone does.
    #[serde(flatten)]
    extra: serde_json::Map<String, Value>,
}

/// Attributes a client may send back from a user it read but that are not its to set.
const USER_READ_ONLY: [&str; 5] = ["id", "links", "options", "password_expires_at", "domain"];

fn user_extra(mut extra: serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    for k in USER_READ_ONLY {
        extra.remove(k);
    }
    extra
}

async fn check_default_project(state: &AppState, pid: &str) -> ApiResult<()> {
    if state.identity.get_project(pid).await?.is_none() {
        return Err(ApiError::bad_request(format!(
            "default_project_id {pid} is not an existing project"
        )));
    }
    Ok(())
}

async fn create_user(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Response> {
    require_identity_admin(&auth)?;
    let body: UserCreateBody = parse(&body)?;
    let u = body.user;
    check_name("user", &u.name)?;
    let domain_id = u.domain_id.unwrap_or_else(|| DEFAULT_DOMAIN_ID.to_owned());
    // Keystone answers 404 for a user in a domain that does not exist.
    if state
        .cluster
        .get(tables::DOMAINS, &domain_id)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "could not find domain {domain_id}"
        )));
    }
    if let Some(pid) = &u.default_project_id {
        check_default_project(&state, pid).await?;
    }
    let user = state
        .identity
        .create_user(
            &u.name,
            &domain_id,
            u.password.as_deref(),
            u.default_project_id,
            u.enabled.unwrap_or(true),
            user_extra(u.extra),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"user": user_json(&state, &user)})),
    )
        .into_response())
}

async fn update_user(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    require_identity_admin(&auth)?;
    let mut m = update_fields(&body, "user")?;
    let current = state
        .identity
        .get_user(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("could not find user {id}")))?;
    same_or_absent(&mut m, "domain_id", &current.domain_id)?;
    let default_project_id = match m.remove("default_project_id") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(pid)) => {
            check_default_project(&state, &pid).await?;
            Some(Some(pid))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "default_project_id must be a string or null",
            ))
        }
    };
    let u = UserUpdate {
        name: take_string(&mut m, "name")?,
        password: match m.remove("password") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => Some(p),
            Some(_) => return Err(ApiError::bad_request("password must be a string")),
        },
        enabled: take_bool(&mut m, "enabled")?,
        default_project_id,
        extra: user_extra(m),
    };
    if let Some(n) = &u.name {
        check_name("user", n)?;
    }
    if u.enabled == Some(false) && auth.0.user_id == id {
        return Err(ApiError::forbidden("a user may not disable themselves"));
    }
    let user = state.identity.update_user(&id, u).await?;
    Ok(Json(json!({"user": user_json(&state, &user)})))
}

#[derive(Deserialize)]
struct PasswordChangeBody {
    user: PasswordChange,
}

#[derive(Deserialize)]
struct PasswordChange {
    password: String,
    original_password: String,
}

/// `POST /v3/users/{id}/password`: a password change that proves the old password
/// (`openstack user password set`). As in Keystone, knowing the original password is the
/// permission; attempts count against the login lockout. The user's tokens end.
async fn change_password(
    State(state): State<AppState>,
    _auth: Auth,
    extensions: axum::http::Extensions,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let source = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let body: PasswordChangeBody = parse(&body)?;
    let user = state
        .identity
        .get_user(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("could not find user {id}")))?;
    let ok = match state
        .identity
        .verify_user_password(&user, &body.user.original_password, source)
        .await
    {
        Ok(ok) => ok,
        Err(shoal_identity::AuthError::Cluster(e)) => return Err(e.into()),
        Err(shoal_identity::AuthError::Busy(e)) => {
            return Err(ApiError::unavailable(e.to_string()))
        }
        Err(_) => false,
    };
    if !ok {
        return Err(ApiError::unauthorized(
            "the original password is not correct",
        ));
    }
    let u = UserUpdate {
        password: Some(body.user.password),
        ..UserUpdate::default()
    };
    state.identity.update_user(&id, u).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v3/users/{id}/projects`: the projects the user holds a role on.
async fn user_projects(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Query(q): Params,
) -> ApiResult<Json<Value>> {
    if !policy::can_read_user(&auth.0, &id) {
        return Err(ApiError::forbidden(format!(
            "you may not list the projects of user {id}"
        )));
    }
    state.cluster.read_barrier().await?;
    if state.identity.get_user(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("could not find user {id}")));
    }
    let items: Vec<Value> = state
        .identity
        .projects_of_user(&id)
        .await?
        .iter()
        .filter(|p| matches(&q, &p.name, &p.domain_id, p.enabled))
        .map(|p| project_json(&state, p))
        .collect();
    Ok(Json(json!({
        "projects": items,
        "links": {"self": format!("{}/identity/v3/users/{id}/projects", state.base_url), "next": null, "previous": null},
    })))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    role: RoleFields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFields {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    domain_id: Option<String>,
    #[serde(default)]
    options: Option<Value>,
}

fn check_role_fields(f: &RoleFields) -> ApiResult<()> {
    if let Some(n) = &f.name {
        check_name("role", n)?;
    }
    if let Some(d) = &f.description {
        shoal_state::validate::text("the role description", d, 255, true)
            .map_err(ApiError::bad_request)?;
    }
    if f.domain_id.is_some() {
        return Err(ApiError::bad_request(
            "domain-specific roles are not supported; roles are global",
        ));
    }
    if f.options
        .as_ref()
        .is_some_and(|o| o.as_object().is_none_or(|m| !m.is_empty()))
    {
        return Err(ApiError::bad_request("role options are not supported"));
    }
    Ok(())
}

async fn create_role(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<Response> {
    require_identity_admin(&auth)?;
    let body: RoleBody = parse(&body)?;
    let f = body.role;
    check_role_fields(&f)?;
    let name = f
        .name
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("role.name is required"))?;
    let role = state.identity.create_role(name, f.description).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"role": role_json(&state, &role)})),
    )
        .into_response())
}

async fn update_role(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    require_identity_admin(&auth)?;
    let body: RoleBody = parse(&body)?;
    let f = body.role;
    check_role_fields(&f)?;
    let role = state
        .identity
        .update_role(&id, f.name.as_deref(), f.description)
        .await?;
    Ok(Json(json!({"role": role_json(&state, &role)})))
}

async fn delete_role(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    require_identity_admin(&auth)?;
    state.identity.delete_role(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v3/projects/{p}/users/{u}/roles`: the roles the user holds on the project.
async fn list_project_grants(
    State(state): State<AppState>,
    auth: Auth,
    Path((project_id, user_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    if !policy::can_read_assignment(&auth.0, &user_id) {
        return Err(ApiError::forbidden(
            "you may not read these role assignments",
        ));
    }
    state.cluster.read_barrier().await?;
    if state.identity.get_project(&project_id).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "could not find project {project_id}"
        )));
    }
    let roles = state
        .identity
        .role_ids_on_project(&user_id, &project_id)
        .await?;
    roles_list(&state, roles).await
}

async fn roles_list(state: &AppState, roles: Vec<(String, String)>) -> ApiResult<Json<Value>> {
    let mut items = Vec::new();
    for (_, id) in roles {
        if let Some(r) = state.identity.get_role(&id).await? {
            items.push(role_json(state, &r));
        }
    }
    Ok(list_json(state, "roles", items))
}

async fn list_system_grants(
    State(state): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    if !policy::can_read_assignment(&auth.0, &user_id) {
        return Err(ApiError::forbidden(
            "you may not read these role assignments",
        ));
    }
    state.cluster.read_barrier().await?;
    if state.identity.get_user(&user_id).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "could not find user {user_id}"
        )));
    }
    let roles = state.identity.role_ids_on_system(&user_id).await?;
    roles_list(&state, roles).await
}

async fn grant_system(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, role_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    require_identity_admin(&auth)?;
    state.identity.grant_system(&user_id, &role_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn check_system_grant(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, role_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    if !policy::can_read_assignment(&auth.0, &user_id) {
        return Err(ApiError::forbidden("you may not read this role assignment"));
    }
    state.cluster.read_barrier().await?;
    let held = state
        .identity
        .role_ids_on_system(&user_id)
        .await?
        .iter()
        .any(|(_, id)| *id == role_id);
    if held {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("could not find the role assignment"))
    }
}

async fn revoke_system_grant(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, role_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    require_identity_admin(&auth)?;
    state.identity.revoke_system(&user_id, &role_id).await?;
    Ok(StatusCode::NO_CONTENT)
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
    // Domain and group assignments do not exist in Shoal: those filters match nothing.
    let unsupported = ["scope.domain.id", "group.id"];
    let none = unsupported.iter().any(|k| q.contains_key(*k));
    let system_only = q.contains_key("scope.system");
    state.cluster.read_barrier().await?;
    let names = flag(&q, "include_names");
    let mut items = Vec::new();
    let mut assignments = if none || system_only {
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
    let with_system = !none && !q.contains_key("scope.project.id");
    let mut system = if with_system {
        state.identity.list_system_assignments().await?
    } else {
        Vec::new()
    };
    system.sort();
    for (user_id, role_id) in system {
        if q.get("user.id").is_some_and(|u| *u != user_id)
            || q.get("role.id").is_some_and(|r| *r != role_id)
            || !policy::can_read_assignment(&auth.0, &user_id)
        {
            continue;
        }
        let mut role = json!({"id": role_id});
        let mut user = json!({"id": user_id});
        if names {
            if let Some(r) = state.identity.get_role(&role_id).await? {
                role["name"] = json!(r.name);
            }
            if let Some(u) = state.identity.get_user(&user_id).await? {
                user["name"] = json!(u.name);
                user["domain"] = json!({"id": u.domain_id, "name": domain_name(&u.domain_id)});
            }
        }
        items.push(json!({
            "role": role,
            "user": user,
            "scope": {"system": {"all": true}},
            "links": {"assignment": format!(
                "{}/identity/v3/system/users/{user_id}/roles/{role_id}",
                state.base_url
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
    let admin = policy::can_read_identity(&auth.0);
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
    if !policy::can_read_identity(&auth.0) && auth.0.domain_id != id {
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
        shoal_state::validate::text("the domain name", n, 64, false)
            .map_err(ApiError::bad_request)?;
    }
    if let Some(d) = &f.description {
        shoal_state::validate::text("the domain description", d, 255, true)
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
    let body: DomainBody = parse(&body)?;
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
    let body: DomainBody = parse(&body)?;
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
