//! `shoal-loadtest`: benchmarks for Shoal. Each subcommand prints its figures; the ones kept go
//! into docs/benchmarks.md with the command that produced them.

use clap::{Parser, Subcommand};

mod overlay;
mod uring;

#[derive(Debug, Parser)]
#[command(name = "shoal-loadtest", about = "Benchmarks for Shoal")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// qcow2 overlay creation: shoal-disk against `qemu-img create`.
    Overlay(overlay::Args),
    /// Writing an image file through the io_uring writer against `cp`.
    Uring(uring::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Overlay(args) => overlay::run(args),
        Command::Uring(args) => uring::run(args),
    }
}
