//! The Compute API (Nova v2.1) resources that sit on the `shoal-compute` service crate.
//! Older Compute API resources still live in `api/compute*.rs` until they move here.

pub mod servers;
