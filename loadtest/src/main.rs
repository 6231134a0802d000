//! `shoal-loadtest`: benchmarks for Shoal. Each scenario is a subcommand in its own module;
//! results are printed as tables or, with `--json`, one JSON object per line, and the ones kept
//! go into docs/benchmarks.md with the command that produced them.
//!
//! It drives clusters from outside, over their public APIs and processes, and calls libraries
//! (scheduler, disk) directly: it must never depend on the `shoal` node crate.

mod api;
mod boot;
mod converge;
mod etcd;
mod faults;
mod image;
mod ipam;
mod overlay;
mod placement;
mod pps;
mod procs;
mod raft;
mod report;
mod schedule;
mod shoal_client;
mod uring;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "shoal-loadtest", about = "Benchmarks for Shoal", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Token validation and flavor listing under concurrent clients, with Raft and disk
    /// activity of the nodes measured around each phase.
    Api(api::Args),
    /// Raft write throughput, latency and leader failover: Shoal against etcd.
    Raft(raft::Args),
    /// A cluster under a nemesis (kills, pauses, partitions) for a chosen time: how soon
    /// writes are acknowledged again after each kind of fault.
    Faults(faults::Args),
    /// Scheduling decisions per second of the shoal-scheduler library over synthetic hosts.
    Schedule(schedule::Args),
    /// Placement claims per second through Raft on a `shoal dev` cluster, with conflict retries.
    Placement(placement::Args),
    /// Servers created through the Compute API until ACTIVE, on a `shoal dev` cluster whose
    /// compute agents drive libvirt's test hypervisor; no double booking checked at the end.
    Boot(boot::Args),
    /// qcow2 overlay creation: shoal-disk against `qemu-img create`.
    Overlay(overlay::Args),
    /// Image pull from two holders against `cp`, and a boot storm of every node pulling at once,
    /// on a local cluster of `shoal` processes.
    Image(image::Args),
    /// Writing an image file through the io_uring writer against `cp`.
    Uring(uring::Args),
    /// Packets per second through the datapath drivers in network namespaces (root).
    Pps(pps::Args),
    /// Port creates per second through the Network API of every node onto one subnet (or a
    /// nearly-full one), with no address held twice checked at the end.
    Ipam(ipam::Args),
    /// From a port create bound to node A until node B's datapath forwards to it (root:
    /// `shoal dev --netns`), with the eBPF or the kernel driver.
    Converge(converge::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Api(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(api::run(args)),
        Command::Raft(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(raft::run(args)),
        Command::Faults(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(faults::run(args)),
        // The scheduler benchmark measures one core: no runtime, no other threads.
        Command::Schedule(args) => schedule::run(&args),
        Command::Placement(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(placement::run(args)),
        Command::Image(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(image::run(args)),
        Command::Boot(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(boot::run(args)),
        Command::Overlay(args) => overlay::run(args),
        Command::Uring(args) => uring::run(args),
        Command::Pps(args) => pps::run(args),
        Command::Ipam(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(ipam::run(args)),
        Command::Converge(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(converge::run(args)),
    }
}
