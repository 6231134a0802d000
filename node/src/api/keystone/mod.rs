//! The Identity API (Keystone v3) under `/identity`: the thin HTTP edge over `shoal-identity`.
//!
//! - `auth.rs`: version discovery, password authentication, token validation and revocation,
//!   the catalog;
//! - `resources.rs`: domains, projects, users, roles and role assignments.

pub mod auth;
pub mod resources;

use axum::Router;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(auth::routes())
        .merge(resources::routes())
}
