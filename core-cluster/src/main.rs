//! silt-core: the core cluster node binary. It answers `--version` and `--help`; the node
//! itself (metadata, replication, uplink server, Kafka broker) arrives with its own crates.

use clap::Parser;

/// Silt core node: cluster metadata, partition replication, the uplink server and the Kafka
/// broker.
#[derive(Debug, Parser)]
#[command(name = "silt-core", version, arg_required_else_help = true)]
struct Cli {}

fn main() {
    Cli::parse();
}
