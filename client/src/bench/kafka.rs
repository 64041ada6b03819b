//! `silt bench kafka`: produce and consume throughput of any Kafka-protocol broker, beside the
//! raw disk write bandwidth and the loopback TCP bandwidth of this machine, measured in the
//! same run.
//!
//! Produce: `--producers` connections each send batches of `--batch-records` records with
//! acks=all, one request in flight per connection, until `--total-bytes` of values are written;
//! the broker's fsyncs are shared between them (group commit). Consume: one connection fetches
//! every partition from offset 0 to the end, checking every batch's CRC as a consumer does, in
//! `--runs` passes; the first pass may read the disk, later ones read the page cache, and the
//! median of all passes but the first is the page-cache figure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use clap::Args;
use kafka_protocol::messages::{
    BrokerId, FetchRequest, ProduceRequest, TopicName,
    fetch_request::{FetchPartition, FetchTopic},
    produce_request::{PartitionProduceData, TopicProduceData},
};
use kafka_protocol::protocol::StrBytes;
use silt_log::batch::{self, BatchSpec, Record};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::kafka::{Cluster, Connection, LATEST};

#[derive(Debug, Args)]
pub(crate) struct KafkaBench {
    /// The broker, `host:port`.
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Topic to write; created with `--partitions` if missing. Use a fresh one per run.
    #[arg(long, default_value = "silt-bench")]
    topic: String,
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Bytes of record values produced.
    #[arg(long, default_value_t = 1 << 30)]
    total_bytes: u64,
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    #[arg(long, default_value_t = 500)]
    batch_records: usize,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Consume passes.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Directory on the broker's disk, for the raw write baseline.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

const PRODUCE_VERSION: i16 = 9;
const FETCH_VERSION: i16 = 12;
/// Kafka's TOPIC_ALREADY_EXISTS.
const TOPIC_ALREADY_EXISTS: i16 = 36;
const FETCH_MAX_BYTES: i32 = 64 << 20;
const PARTITION_MAX_BYTES: i32 = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn run(options: &KafkaBench) -> anyhow::Result<()> {
    if options.record_bytes == 0
        || options.batch_records == 0
        || options.producers == 0
        || options.partitions == 0
    {
        bail!("--record-bytes, --batch-records, --producers and --partitions must be at least 1");
    }
    if options.runs < 2 {
        bail!("--runs must be at least 2: the first consume pass warms the page cache");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(options))
}

async fn bench(options: &KafkaBench) -> anyhow::Result<()> {
    let raw_mb_s = super::raw_write(&options.dir, options.total_bytes.min(1 << 30), 1 << 20)
        .context("measuring the raw disk")?;
    let loopback_mb_s = loopback(1 << 30).await.context("measuring loopback TCP")?;
    println!(
        "baseline: raw disk write+fsync {raw_mb_s:.0} MB/s, loopback TCP {loopback_mb_s:.0} MB/s"
    );

    let mut cluster = Cluster::connect(&options.bootstrap, TIMEOUT).await?;
    create_topic(&mut cluster, options).await?;
    let topic = cluster.topic(&options.topic, false).await?;
    let partitions: Vec<i32> = topic.partitions.iter().map(|p| p.partition).collect();
    let leaders: BTreeMap<i32, i32> = topic
        .partitions
        .iter()
        .map(|p| (p.partition, p.leader))
        .collect();
    let start_offsets = cluster.list_offsets(&topic, &partitions, LATEST).await?;

    // Produce.
    let value = Bytes::from(vec![b'x'; options.record_bytes]);
    let records: Vec<Record> = (0..options.batch_records)
        .map(|_| Record {
            timestamp: silt_log::now_ms(),
            key: None,
            value: Some(value.clone()),
            headers: vec![],
        })
        .collect();
    let mut template = BytesMut::new();
    batch::encode_batch(&BatchSpec::default(), &records, &mut template)?;
    let template = template.freeze();
    let batch_bytes = (options.record_bytes * options.batch_records) as u64;
    let batches = options.total_bytes.div_ceil(batch_bytes);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for producer in 0..options.producers {
        let bootstrap = options.bootstrap.clone();
        let topic_name = options.topic.clone();
        let template = template.clone();
        let leaders = leaders.clone();
        let count = batches / options.producers as u64
            + u64::from((producer as u64) < batches % options.producers as u64);
        tasks.push(tokio::spawn(async move {
            let mut cluster = Cluster::connect(&bootstrap, TIMEOUT).await?;
            cluster.topic(&topic_name, false).await?;
            let partitions: Vec<i32> = leaders.keys().copied().collect();
            for i in 0..count {
                let partition = partitions[(producer + i as usize) % partitions.len()];
                let request = ProduceRequest::default()
                    .with_acks(-1)
                    .with_timeout_ms(30_000)
                    .with_topic_data(vec![
                        TopicProduceData::default()
                            .with_name(TopicName(StrBytes::from_string(topic_name.clone())))
                            .with_partition_data(vec![
                                PartitionProduceData::default()
                                    .with_index(partition)
                                    .with_records(Some(template.clone())),
                            ]),
                    ]);
                let connection: &mut Connection = cluster.broker(leaders[&partition]).await?;
                let (response, _) = connection
                    .call(&request, PRODUCE_VERSION, Duration::ZERO)
                    .await?;
                for topic in &response.responses {
                    for p in &topic.partition_responses {
                        crate::kafka::KafkaError::check(p.error_code, || {
                            format!("producing to partition {}", p.index)
                        })?;
                    }
                }
            }
            Ok::<_, crate::kafka::KafkaError>(count)
        }));
    }
    let mut sent = 0;
    for task in tasks {
        sent += task.await??;
    }
    let produce_elapsed = started.elapsed();
    let produced_bytes = sent * batch_bytes;
    let produce_mb_s = super::mb_per_s(produced_bytes, produce_elapsed);
    println!(
        "produce: {} records of {} B in {:.2} s: {:.0} records/s, {produce_mb_s:.0} MB/s of values, {:.2}x raw disk",
        sent * options.batch_records as u64,
        options.record_bytes,
        produce_elapsed.as_secs_f64(),
        (sent * options.batch_records as u64) as f64 / produce_elapsed.as_secs_f64(),
        produce_mb_s / raw_mb_s,
    );

    // Consume.
    let end_offsets = cluster.list_offsets(&topic, &partitions, LATEST).await?;
    let mut figures = Vec::new();
    for run in 0..options.runs {
        let (bytes, elapsed) = consume_pass(
            &mut cluster,
            options,
            &leaders,
            &start_offsets,
            &end_offsets,
        )
        .await?;
        let mb_s = super::mb_per_s(bytes, elapsed);
        println!(
            "consume pass {}: {bytes} B in {:.3} s: {mb_s:.0} MB/s",
            run + 1,
            elapsed.as_secs_f64()
        );
        figures.push(mb_s);
    }
    let cached = super::median(figures[1..].iter().copied());
    println!(
        "consume (page cache, median of {}): {cached:.0} MB/s = {:.2} GiB/s, {:.2}x loopback TCP",
        figures.len() - 1,
        cached * 1e6 / f64::from(1u32 << 30),
        cached / loopback_mb_s
    );
    Ok(())
}

async fn create_topic(cluster: &mut Cluster, options: &KafkaBench) -> anyhow::Result<()> {
    let partitions = i32::try_from(options.partitions).context("--partitions is too large")?;
    match crate::cmd::topic::create_topic(cluster, &options.topic, partitions, -1, &[]).await {
        // The run appends to an existing topic.
        Err(error) if error.code() == Some(TOPIC_ALREADY_EXISTS) => Ok(()),
        other => Ok(other?),
    }
}

/// Fetches every partition from its start to its end offset; returns the batch bytes read.
async fn consume_pass(
    cluster: &mut Cluster,
    options: &KafkaBench,
    leaders: &BTreeMap<i32, i32>,
    start: &std::collections::HashMap<i32, Option<i64>>,
    end: &std::collections::HashMap<i32, Option<i64>>,
) -> anyhow::Result<(u64, Duration)> {
    let mut positions: BTreeMap<i32, i64> = leaders
        .keys()
        .map(|p| (*p, start[p].unwrap_or(0)))
        .collect();
    let ends: BTreeMap<i32, i64> = leaders.keys().map(|p| (*p, end[p].unwrap_or(0))).collect();
    let leader = *leaders
        .values()
        .next()
        .context("a topic with no partitions")?;
    let mut bytes = 0u64;
    let started = Instant::now();
    loop {
        let wanted: Vec<i32> = positions
            .iter()
            .filter(|(p, o)| **o < ends[p])
            .map(|(p, _)| *p)
            .collect();
        if wanted.is_empty() {
            break;
        }
        let request = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(500)
            .with_min_bytes(1)
            .with_max_bytes(FETCH_MAX_BYTES)
            .with_session_epoch(-1)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(options.topic.clone())))
                    .with_partitions(
                        wanted
                            .iter()
                            .map(|p| {
                                FetchPartition::default()
                                    .with_partition(*p)
                                    .with_current_leader_epoch(-1)
                                    .with_fetch_offset(positions[p])
                                    .with_last_fetched_epoch(-1)
                                    .with_log_start_offset(-1)
                                    .with_partition_max_bytes(PARTITION_MAX_BYTES)
                            })
                            .collect(),
                    ),
            ]);
        let (response, _) = cluster
            .broker(leader)
            .await?
            .call(&request, FETCH_VERSION, Duration::from_millis(500))
            .await?;
        for topic in &response.responses {
            for data in &topic.partitions {
                crate::kafka::KafkaError::check(data.error_code, || {
                    format!("fetching partition {}", data.partition_index)
                })?;
                let Some(records) = &data.records else {
                    continue;
                };
                for item in batch::batches(records, usize::MAX) {
                    let (header, batch_bytes) =
                        item.context("a fetched batch failed its checks")?;
                    bytes += batch_bytes.len() as u64;
                    positions.insert(data.partition_index, header.last_offset() + 1);
                }
            }
        }
    }
    Ok((bytes, started.elapsed()))
}

/// Loopback TCP bandwidth: `bytes` through one connection in 1 MiB writes.
async fn loopback(bytes: u64) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(total);
            }
            total += n as u64;
        }
    });
    let chunk = vec![0x5a_u8; 1 << 20];
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut written = 0;
    while written < bytes {
        stream.write_all(&chunk).await?;
        written += chunk.len() as u64;
    }
    stream.shutdown().await?;
    let read = reader.await??;
    let elapsed = started.elapsed();
    if read != written {
        bail!("loopback read {read} of {written} bytes");
    }
    Ok(super::mb_per_s(read, elapsed))
}
