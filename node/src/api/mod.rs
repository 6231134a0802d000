//! The node's HTTP API: every service under a path prefix on the `--api` address, as devstack
//! lays them out (`/identity/v3`, `/compute/v2.1`, `/image`, `/network`; later `/volume/v3`),
//! plus Shoal's own admin surface under `/shoal/v1` and Prometheus metrics at `/metrics`.
//!
//! Any node answers any request; nothing here depends on which node leads Raft.

pub mod body;
pub mod error;
pub mod glance;
pub mod http_server;
pub mod keystone;
pub mod metrics;
pub mod neutron;
pub mod nova;
pub mod shoal;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::Router;
use error::ApiError;
use shoal_consensus::cluster::Cluster;

use shoal_identity::token::Claims;
use shoal_identity::{has_role, Identity};
use shoal_images::ImageStore;

/// An OpenStack API this node serves.
#[derive(Debug)]
pub struct Service {
    /// The catalog `type` (`compute`) and `name` (`nova`).
    pub kind: &'static str,
    pub name: &'static str,
    /// Every path of the API starts with this.
    pub prefix: &'static str,
    /// The path the catalog's endpoints name (Nova's carries its version).
    pub endpoint: &'static str,
    /// The error body its clients expect.
    pub errors: error::ErrorApi,
}

/// Every OpenStack API a node serves: the catalog is built from this list, and the edge picks
/// an error's shape from it. Paths outside it (`/shoal/v1`, `/metrics`) answer Keystone's.
pub const SERVICES: [Service; 4] = [
    Service {
        kind: "identity",
        name: "keystone",
        prefix: "/identity",
        endpoint: "/identity",
        errors: error::ErrorApi::Keystone,
    },
    Service {
        kind: "compute",
        name: "nova",
        prefix: "/compute",
        endpoint: "/compute/v2.1",
        errors: error::ErrorApi::Nova,
    },
    Service {
        kind: "image",
        name: "glance",
        prefix: "/image",
        endpoint: "/image",
        errors: error::ErrorApi::Glance,
    },
    Service {
        kind: "network",
        name: "neutron",
        prefix: "/network",
        endpoint: "/network",
        errors: error::ErrorApi::Neutron,
    },
];

/// Request bodies larger than this are refused before they are read in full.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct AppState {
    pub cluster: Cluster,
    /// The same keyspace through typed tables (`shoal-state`).
    pub state: shoal_state::State,
    pub identity: Identity,
    pub metrics: Arc<metrics::Metrics>,
    /// Base URL of this node's API, used in the service catalog.
    pub base_url: String,
    pub region: String,
    /// Image bytes on this node and where the rest of the cluster keeps them.
    pub images: ImageStore,
    /// Where this node's compute agent keeps instance directories (console logs).
    pub instances_path: std::path::PathBuf,
    /// Neutron's resources (`shoal-network`), behind `/network`.
    pub network: shoal_network::NetworkService,
    /// The scheduler's host view, kept current by watches (`shoal_compute::host_view`).
    pub hosts: shoal_compute::host_view::HostView,
    /// How long a deleted server's tombstone is shown (`[compute]
    /// deleted_server_retention_secs`).
    pub deleted_server_retention: std::time::Duration,
    /// `[compute] allow_resize_to_same_host`: the scheduler may keep a resized server's host.
    pub allow_resize_to_same_host: bool,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(keystone::routes())
        .merge(nova::routes())
        .merge(glance::routes())
        .merge(neutron::routes())
        .merge(shoal::routes())
        .merge(metrics::routes())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(edge))
        .with_state(state)
}

/// What every request goes through first and every answer last:
/// - a `Content-Length` over the cap of an ordinary call is refused with 413 before the body
///   is read (image uploads have their own cap in the image service);
/// - every error answer is put in the shape of the API the path belongs to: a handler's
///   [`ApiError`] (one mapping per API, `error::Shape::for_path`), and the answers axum makes
///   itself (an unknown path, a method not allowed, a body cut off), so clients always get the
///   body their API defines;
/// - every answer carries a request id, `x-openstack-request-id` (and Nova's
///   `x-compute-request-id` under `/compute`), as every OpenStack service sends; a 500 keeps
///   the id its log line was written under.
async fn edge(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let compute = req.uri().path().starts_with("/compute");
    let ours = RequestId(format!("req-{}", uuid::Uuid::new_v4()));
    req.extensions_mut().insert(ours.clone());
    let mut resp = shape_errors(req, next).await;
    let h = resp.headers_mut();
    let id = match h.get("x-openstack-request-id") {
        Some(id) => id.clone(),
        None => axum::http::HeaderValue::from_str(&ours.0).expect("a uuid is a valid header value"),
    };
    if compute {
        h.insert("x-compute-request-id", id.clone());
    }
    h.insert("x-openstack-request-id", id);
    resp
}

/// The id the answer to this request carries in `x-openstack-request-id` (Nova's
/// `x-compute-request-id`), chosen before the handler runs so that a handler can record it
/// (the instance-action log names each action by its request id, as Nova does).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId(format!("req-{}", uuid::Uuid::new_v4()))))
    }
}

async fn shape_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = req.uri().path().to_owned();
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared {
        if len > MAX_BODY_BYTES as u64 && !http_server::is_bulk_upload(req.method(), &path) {
            return ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is {len} bytes; at most {MAX_BODY_BYTES} are accepted"),
            )
            .for_path(&path)
            .into_response();
        }
    }
    let mut resp = next.run(req).await;
    // An error a handler returned: its body in the shape of the API this path belongs to.
    if let Some(parts) = resp.extensions_mut().remove::<error::ErrorParts>() {
        let shape = error::Shape::for_path(&path, parts.status, parts.neutron_kind.as_deref());
        let body = error::render(&shape, parts.status, &parts.message);
        let (mut head, _) = resp.into_parts();
        head.headers.remove(axum::http::header::CONTENT_LENGTH);
        return axum::response::Response::from_parts(
            head,
            axum::body::Body::from(body.to_string()),
        );
    }
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // axum's own rejection texts are short and say what was wrong; keep a bounded prefix.
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => parts
            .status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_owned(),
    };
    let mut shaped = ApiError::new(parts.status, text)
        .for_path(&path)
        .into_response();
    for name in [
        axum::http::header::ALLOW,
        axum::http::header::WWW_AUTHENTICATE,
    ] {
        if let Some(v) = parts.headers.get(&name) {
            shaped.headers_mut().insert(name, v.clone());
        }
    }
    shaped
}

/// Serves the API until `shutdown` resolves, then drains open requests: plain HTTP, or HTTPS
/// with `tls`, with the connection, header and body limits of [`http_server`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: AppState,
    limits: http_server::Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    match tls {
        None => http_server::serve(listener, app, limits, shutdown).await,
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config)?;
            http_server::serve(listener, app, limits, shutdown).await
        }
    }
}

/// An authenticated caller: the claims of a valid `X-Auth-Token`.
#[derive(Debug, Clone)]
pub struct Auth(pub Claims);

impl Auth {
    pub fn require(&self, role: &str) -> Result<(), ApiError> {
        if has_role(&self.0, role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this action needs the {role} role"
            )))
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        self.require("admin")
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get("x-auth-token")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::unauthorized("the request you have made requires authentication")
            })?;
        state.metrics.token_validations.inc();
        match state.identity.validate_fresh(token).await {
            Ok(claims) => Ok(Auth(claims)),
            Err(e @ shoal_identity::token::TokenError::KeyRingBehind) => {
                Err(ApiError::unavailable(e.to_string()))
            }
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                Err(ApiError::unauthorized(format!(
                    "the token is not valid: {e}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    async fn answer(app: Router, path: &str) -> (StatusCode, Value) {
        let resp = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    /// One handler error, answered in the shape of whichever API the path belongs to.
    #[tokio::test]
    async fn errors_take_the_shape_of_the_api_called() {
        let missing = || async { ApiError::not_found("no such thing") };
        let typed = || async { ApiError::not_found("no network").neutron("NetworkNotFound") };
        let broken = || async { ApiError::internal("disk on fire at /var/lib/shoal") };
        let app = Router::new()
            .route("/compute/v2.1/x", get(missing))
            .route("/image/v2/x", get(missing))
            .route("/identity/v3/x", get(missing))
            .route("/network/v2.0/x", get(missing))
            .route("/network/v2.0/y", get(typed))
            .route("/compute/v2.1/boom", get(broken))
            .layer(axum::middleware::from_fn(edge));
        let (status, nova) = answer(app.clone(), "/compute/v2.1/x").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(nova["itemNotFound"]["message"], "no such thing");
        let (_, glance) = answer(app.clone(), "/image/v2/x").await;
        assert_eq!(
            (glance["code"].as_u64(), glance["title"].as_str()),
            (Some(404), Some("Not Found"))
        );
        let (_, keystone) = answer(app.clone(), "/identity/v3/x").await;
        assert_eq!(keystone["error"]["code"], 404);
        let (_, neutron) = answer(app.clone(), "/network/v2.0/x").await;
        assert_eq!(neutron["NeutronError"]["type"], "HTTPNotFound");
        let (_, neutron) = answer(app.clone(), "/network/v2.0/y").await;
        assert_eq!(neutron["NeutronError"]["type"], "NetworkNotFound");
        let (status, boom) = answer(app, "/compute/v2.1/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let text = boom["computeFault"]["message"].as_str().unwrap();
        assert!(
            !text.contains("disk on fire") && text.contains("req-"),
            "{text}"
        );
    }
}
