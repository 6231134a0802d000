//! `shoal-loadtest`: benchmarks for Shoal.

use clap::{Parser, Subcommand};

mod pps;

#[derive(Debug, Parser)]
#[command(name = "shoal-loadtest", about = "Benchmarks for Shoal")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Packets per second through the datapath drivers (needs root; uses namespaces).
    Pps(pps::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Pps(args) => pps::run(args),
    }
}
