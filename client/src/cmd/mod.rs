//! The `silt` commands that talk to a cluster: over the Kafka protocol, and `tier` over a
//! core's admin port.

pub(crate) mod consume;
pub(crate) mod dev;
pub(crate) mod group;
pub(crate) mod produce;
pub(crate) mod tier;
mod time;
pub(crate) mod topic;

use std::time::Duration;

use clap::Args;

use crate::kafka::Cluster;
pub(crate) use crate::kafka::KafkaError;

/// Flags every cluster command takes.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// Kafka-protocol address(es) of the cluster, `host:port[,host:port...]`.
    #[arg(long, env = "SILT_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Give up on a broker that does not answer for this long.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    request_timeout_ms: u64,
}

pub(crate) async fn connect(common: &Common) -> Result<Cluster, KafkaError> {
    Cluster::connect(
        &common.bootstrap,
        Duration::from_millis(common.request_timeout_ms),
    )
    .await
}
