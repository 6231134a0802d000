//! The node's HTTP API: every service under a path prefix on the `--api` address, as devstack
//! lays them out (`/identity/v3`, `/compute/v2.1`, `/image`; later `/network`, `/volume/v3`),
//! plus Shoal's own admin surface under `/shoal/v1` and Prometheus metrics at `/metrics`.
//!
//! Any node answers any request; nothing here depends on which node leads Raft.

pub mod admin;
pub mod compute;
pub mod compute_admin;
pub mod compute_aggregates;
pub mod compute_keypairs;
pub mod error;
pub mod identity;
pub mod identity_admin;
pub mod image;
pub mod image_file;
pub mod image_record;
pub mod metrics;
pub mod placement;
pub mod policy;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
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
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(identity::routes())
        .merge(identity_admin::routes())
        .merge(compute::routes())
        .merge(compute_admin::routes())
        .merge(compute_aggregates::routes())
        .merge(compute_keypairs::routes())
        .merge(image::routes())
        .merge(admin::routes())
        .merge(metrics::routes())
        .merge(placement::routes())
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the API until `shutdown` resolves, then drains open requests: plain HTTP, or HTTPS
/// with `tls`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(config) => {
            // axum gives `ConnectInfo<SocketAddr>` to a `tap_io` listener whose address is a
            // `SocketAddr`; the tap itself does nothing.
            let listener =
                axum::serve::ListenerExt::tap_io(tls::TlsListener::new(listener, config)?, |_| {});
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
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
        match state.identity.validate(token) {
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
