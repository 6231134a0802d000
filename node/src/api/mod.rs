//! The node's HTTP API: every service under a path prefix on the `--api` address, as devstack
//! lays them out (`/identity/v3`, `/compute/v2.1`, `/image`, `/network`; later `/volume/v3`),
//! plus Shoal's own admin surface under `/shoal/v1` and Prometheus metrics at `/metrics`.
//!
//! Any node answers any request; nothing here depends on which node leads Raft.

pub mod admin;
pub mod compute;
pub mod compute_admin;
pub mod compute_aggregates;
pub mod compute_keypairs;
pub mod error;
pub mod http_server;
pub mod identity;
pub mod identity_admin;
pub mod image;
pub mod image_file;
pub mod image_record;
pub mod metrics;
pub mod neutron;
pub mod nova;
pub mod placement;
pub mod policy;
pub mod tls;
pub mod validate;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::Router;
use error::ApiError;
use shoal_consensus::cluster::Cluster;

use crate::identity::token::Claims;
use crate::identity::{has_role, Identity};
use crate::images::ImageStore;

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
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(identity::routes())
        .merge(identity_admin::routes())
        .merge(compute::routes())
        .merge(compute_admin::routes())
        .merge(compute_aggregates::routes())
        .merge(compute_keypairs::routes())
        .merge(nova::servers::routes())
        .merge(image::routes())
        .merge(admin::routes())
        .merge(metrics::routes())
        .merge(placement::routes())
        .merge(neutron::routes())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(edge))
        .with_state(state)
}

/// What every request goes through first and every answer last:
/// - a `Content-Length` over the cap of an ordinary call is refused with 413 before the body
///   is read (image uploads have their own cap in the image service);
/// - answers that axum makes itself (an unknown path, a method not allowed, a body that is not
///   valid JSON or that was cut off) are put in the API's own error shape, so clients always
///   get the body their API defines.
async fn edge(
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
    let resp = next.run(req).await;
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
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                Err(ApiError::unauthorized(format!(
                    "the token is not valid: {e}"
                )))
            }
        }
    }
}
