//! The Compute API (Nova v2.1) under `/compute`: the thin HTTP edge over `shoal-compute`.
//!
//! - `flavors.rs`: version discovery, extensions, flavors and their extra specs and access;
//! - `admin.rs`: quotas and limits, hypervisors, hosts and compute services;
//! - `aggregates.rs`: host aggregates, availability zones and server groups;
//! - `keypairs.rs`: key pairs;
//! - `images.rs`: the image proxy (`/images`), over the Image API's rows;
//! - `networks.rs`: the network proxies (`/os-networks`, `/os-tenant-networks`), over the
//!   Network API;
//! - `paging.rs`: `limit`/`marker` paging of the lists that gained it with a microversion;
//! - `version.rs`: microversion negotiation and the `Microversion` extractor;
//! - `servers.rs` and `server_meta.rs`: servers, their actions, metadata and addresses;
//! - `usage.rs`: `os-simple-tenant-usage` (live and deleted servers) and
//!   `os-server-external-events`.
//! - `migrations.rs`: rescue, resize, cold migration and `os-migrations`.
//! - `evacuate.rs`: `evacuate`, a server rebuilt elsewhere when its host is down.

pub mod admin;
pub mod aggregates;
pub mod evacuate;
pub mod flavors;
pub mod images;
pub mod keypairs;
pub mod migrations;
pub mod networks;
pub mod paging;
pub mod server_meta;
pub mod servers;
pub mod usage;
pub mod version;

use axum::Router;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(flavors::routes())
        .merge(admin::routes())
        .merge(aggregates::routes())
        .merge(keypairs::routes())
        .merge(images::routes())
        .merge(networks::routes())
        .merge(servers::routes())
        .merge(migrations::routes())
        .merge(server_meta::routes())
        .merge(usage::routes())
}
