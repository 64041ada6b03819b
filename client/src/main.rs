//! `silt`: the command-line tool. It talks to a Silt core (or any Kafka-protocol broker) with
//! `topic`, `produce`, `consume`, `group` and `tier`, and measures Silt with `bench`.

mod bench;
mod cmd;
mod kafka;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "silt", version, about = "Silt: event streaming for the edge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        command: cmd::topic::TopicCommand,
    },
    /// Send lines from stdin as records.
    Produce(cmd::produce::ProduceArgs),
    /// Print records as JSON lines: topic, partition, offset, timestamp, key, value, headers.
    /// Bytes that are valid UTF-8 are strings, others `{"base64": ...}`.
    Consume(cmd::consume::ConsumeArgs),
    /// List and describe consumer groups, and reset their offsets.
    Group {
        #[command(subcommand)]
        command: cmd::group::GroupCommand,
    },
    /// Show how a core tiers a topic to the object store.
    Tier {
        #[command(subcommand)]
        command: cmd::tier::TierCommand,
    },
    /// Run a whole Silt here: an edge (MQTT on 127.0.0.1:1883) shipping to a core (Kafka on
    /// 127.0.0.1:9092) over the uplink, with a local directory as the object store.
    Dev(cmd::dev::DevArgs),
    /// Measure Silt against a baseline on this machine.
    Bench {
        #[command(subcommand)]
        target: bench::BenchTarget,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench { target } => bench::run(target),
        Command::Topic { command } => block_on(cmd::topic::run(command)),
        Command::Produce(args) => block_on(cmd::produce::run(args)),
        Command::Consume(args) => block_on(cmd::consume::run(args)),
        Command::Group { command } => block_on(cmd::group::run(command)),
        Command::Tier { command } => block_on(cmd::tier::run(command)),
        Command::Dev(args) => block_on(cmd::dev::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("silt: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one cluster command on a single-threaded runtime: the CLI does one thing at a time.
fn block_on(command: impl Future<Output = Result<(), cmd::KafkaError>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(command)?)
}
