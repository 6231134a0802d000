//! `shoal-loadtest`: benchmarks for Shoal. Each subcommand is one scenario; results are
//! printed as a table or, with `--json`, one JSON object per line.

use clap::{Parser, Subcommand};

mod schedule;

#[derive(Debug, Parser)]
#[command(name = "shoal-loadtest", about = "Benchmarks for Shoal")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Scheduling decisions per second of the shoal-scheduler library over synthetic hosts.
    Schedule(schedule::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Schedule(args) => schedule::run(&args),
    }
}
