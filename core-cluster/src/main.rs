//! silt-core: the core cluster node binary. It answers `--version` and `--help`; the node
//! itself (metadata, replication, uplink server, Kafka broker) arrives with its own crates.

// Wired into the node once the core skeleton lands.
#[allow(dead_code)]
mod tls;
#[allow(dead_code)]
mod uplink;

use clap::Parser;

/// Silt core node: cluster metadata, partition replication, the uplink server and the Kafka
/// broker.
#[derive(Debug, Parser)]
#[command(name = "silt-core", version, arg_required_else_help = true)]
struct Cli {}

fn main() {
    Cli::parse();
}
