//! Shoal's own API under `/shoal/v1`, admin only: cluster status, the raw `kv` table and
//! watches, join tokens, node removal, image prefetch (`admin.rs`), and compute hosts and
//! placements through the scheduler (`placement.rs`).

pub mod admin;
pub mod placement;

use axum::Router;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(admin::routes())
        .merge(placement::routes())
}
