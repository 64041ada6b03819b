//! `silt`: the command-line tool. Today it holds the storage benchmark; the client commands
//! (`produce`, `consume`, `topic`, `group`, `tier`, `dev`) arrive with the core node.

mod bench;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "silt", version, about = "Silt: event streaming for the edge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure Silt against a baseline on this machine.
    Bench {
        #[command(subcommand)]
        target: bench::BenchTarget,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { target } => bench::run(target),
    }
}
