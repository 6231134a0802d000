//! `shoal-disk`: the on-disk formats and local disk I/O of a Shoal node.
//!
//! It owns the disk formats the Image API accepts and the check of every upload against its
//! declared format, the qcow2 v3 overlays that instance disks are (written natively, no `qemu-img`
//! process), the inspector that judges uploaded images before anything opens them, and the
//! io_uring writer that lays image chunks into files. It must never depend on the cluster:
//! no consensus, no network, no libvirt. Callers hand it paths and bytes.

pub mod cli;
pub mod formats;
pub mod qcow2;
pub mod uring;
