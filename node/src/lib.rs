//! The Shoal node as a library: the HTTP edge of every API (`api`), the node's config, the
//! wiring that starts a node's services (`server`), the metadata service, the `dev` cluster
//! runner and the client commands. The `shoal` binary (`main.rs`) is only its command line;
//! tests use this crate to drive the API and the services in-process.
//!
//! This crate is the top of the dependency graph: the service crates (`shoal-identity`,
//! `shoal-images`, `shoal-compute`, `shoal-network`) sit under it on `shoal-state`, and nothing
//! depends on it. Only `api` speaks HTTP.

pub mod api;
pub mod client;
pub mod config;
pub mod dev;
pub mod logging;
pub mod metadata;
pub mod server;
