//! The Image API (Glance v2) under `/image`: the thin HTTP edge over `shoal-images` (the image
//! records and their rules in `shoal_images::record` and `::policy`, the bytes in its store).
//!
//! - `images.rs`: version discovery, records (create, list, show, JSON patch, delete), tags,
//!   members, deactivate/reactivate;
//! - `file.rs`: image data upload and download;
//! - `schema.rs`: the JSON schemas glanceclient reads.

pub mod file;
pub mod images;
pub mod schema;

pub use images::routes;
