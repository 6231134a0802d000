//! `shoal-loadtest`: benchmarks for Shoal. Each scenario is a subcommand in its own module;
//! results are printed as tables or JSON lines and recorded in docs/benchmarks.md.
//!
//! It drives clusters from outside, over their public APIs and processes: it must never
//! depend on the `shoal` node crate.

mod etcd;
mod procs;
mod raft;
mod report;
mod shoal_client;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "shoal-loadtest", about, version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Raft write throughput, latency and leader failover: Shoal against etcd.
    Raft(raft::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Raft(args) => raft::run(args).await,
    }
}
