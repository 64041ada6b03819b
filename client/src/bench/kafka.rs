//! `silt bench kafka`: produce and consume throughput of any Kafka-protocol broker, beside the
//! raw disk write bandwidth and the loopback TCP bandwidth of this machine, measured in the
//! same run.
//!
//! Produce: `--producers` connections each send batches of `--batch-records` records with
//! acks=all, one request in flight per connection, until `--total-bytes` of values are written;
//! the broker's fsyncs are shared between them (group commit). Consume: one connection fetches
//! every partition from where the run began to the end as a Kafka consumer does (the next
//! Fetch in flight while the last response is checked; `--partition-max-bytes` and
//! `--fetch-max-bytes` default to librdkafka's and the Java client's 1 MiB and 50 MiB),
//! checking every batch's CRC and that the records and batch bytes read are exactly those
//! produced, in `--runs` passes; the first pass may read the disk, later ones read the page
//! cache, and the median of all passes but the first is the page-cache figure.

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
    /// Fetch's `max_bytes` (Kafka consumers' `fetch.max.bytes`; the broker caps it).
    #[arg(long, default_value_t = 50 << 20)]
    fetch_max_bytes: i32,
    /// Fetch's per-partition `max_bytes` (consumers' `max.partition.fetch.bytes`).
    #[arg(long, default_value_t = 1 << 20)]
    partition_max_bytes: i32,
    /// kcat passes reading the topic after ours, as a second reference (0: none). It prints
    /// one offset per record, which the bench counts.
    #[arg(long, default_value_t = 3)]
    kcat_runs: usize,
    /// The kcat binary.
    #[arg(long, default_value = "kcat")]
    kcat: PathBuf,
    /// Directory on the broker's disk, for the raw write baseline.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

const PRODUCE_VERSION: i16 = 9;
const FETCH_VERSION: i16 = 12;
/// Kafka's TOPIC_ALREADY_EXISTS.
const TOPIC_ALREADY_EXISTS: i16 = 36;
/// A consumer's Fetch wait when no data is there (kafka-python's and librdkafka's
/// `fetch.wait.max.ms` is 500).
const FETCH_WAIT: Duration = Duration::from_millis(500);
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
    let produced = Consumed {
        batch_bytes: sent * template.len() as u64,
        records: sent * options.batch_records as u64,
    };
    for run in 0..options.runs {
        let (consumed, elapsed) = consume_pass(
            &mut cluster,
            options,
            &leaders,
            &start_offsets,
            &end_offsets,
        )
        .await?;
        if consumed != produced {
            bail!(
                "consume pass {} read {} records in {} batch bytes; {} records in {} bytes were produced",
                run + 1,
                consumed.records,
                consumed.batch_bytes,
                produced.records,
                produced.batch_bytes
            );
        }
        let bytes = consumed.batch_bytes;
        let mb_s = super::mb_per_s(bytes, elapsed);
        println!(
            "consume pass {}: {} records, {bytes} B in {:.3} s: {mb_s:.0} MB/s",
            run + 1,
            consumed.records,
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
    if options.kcat_runs > 0 {
        let fresh = start_offsets
            .values()
            .all(|offset| offset.unwrap_or(0) == 0);
        if fresh {
            kcat_reference(options, produced, cached)?;
        } else {
            println!("kcat: skipped (it reads the whole topic; use a fresh --topic)");
        }
    }
    Ok(())
}

/// kcat (librdkafka) reading the whole topic to its end with its default consumer settings
/// and printing nothing, timed from start to exit, as a second reference; every record must
/// arrive (`-c` stops it at the count, `-e` at the end, and it must not stop early).
fn kcat_reference(options: &KafkaBench, produced: Consumed, ours_mb_s: f64) -> anyhow::Result<()> {
    let mut figures = Vec::new();
    for run in 0..options.kcat_runs {
        let started = Instant::now();
        let output = std::process::Command::new(&options.kcat)
            .args(["-C", "-b", &options.bootstrap, "-t", &options.topic])
            .args(["-o", "beginning", "-e", "-q", "-f", "%o\n"])
            .args(["-c", &produced.records.to_string()])
            .stdin(std::process::Stdio::null())
            .output();
        let output = match output {
            Ok(output) => output,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                println!("kcat: skipped ({} not found)", options.kcat.display());
                return Ok(());
            }
            Err(error) => return Err(error).context("running kcat"),
        };
        let elapsed = started.elapsed();
        if !output.status.success() {
            bail!(
                "kcat failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let records = output.stdout.iter().filter(|byte| **byte == b'\n').count() as u64;
        if records != produced.records {
            bail!(
                "kcat read {records} records; {} were produced",
                produced.records
            );
        }
        let mb_s = super::mb_per_s(produced.batch_bytes, elapsed);
        println!(
            "kcat pass {}: {records} records in {:.3} s: {mb_s:.0} MB/s",
            run + 1,
            elapsed.as_secs_f64()
        );
        figures.push(mb_s);
    }
    let kcat = super::median(figures.iter().copied());
    println!(
        "kcat (page cache, median of {}): {kcat:.0} MB/s = {:.2} GiB/s; silt bench reads {:.2}x as fast",
        figures.len(),
        kcat * 1e6 / f64::from(1u32 << 30),
        ours_mb_s / kcat
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

/// What one consume pass read and checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Consumed {
    /// Bytes of whole batches, headers included.
    batch_bytes: u64,
    records: u64,
}

impl Consumed {
    fn add(&mut self, other: Consumed) {
        self.batch_bytes += other.batch_bytes;
        self.records += other.records;
    }
}

/// Fetches every partition from its start to its end offset, as a consumer does: the next
/// Fetch is sent as soon as a response's batch headers give the next offsets, and the
/// response is checked (every batch's CRC-32C, records counted) on another thread while the
/// next one is on its way.
async fn consume_pass(
    cluster: &mut Cluster,
    options: &KafkaBench,
    leaders: &BTreeMap<i32, i32>,
    start: &std::collections::HashMap<i32, Option<i64>>,
    end: &std::collections::HashMap<i32, Option<i64>>,
) -> anyhow::Result<(Consumed, Duration)> {
    let mut positions: BTreeMap<i32, i64> = leaders
        .keys()
        .map(|p| (*p, start[p].unwrap_or(0)))
        .collect();
    let ends: BTreeMap<i32, i64> = leaders.keys().map(|p| (*p, end[p].unwrap_or(0))).collect();
    let leader = *leaders
        .values()
        .next()
        .context("a topic with no partitions")?;
    let connection = cluster.broker(leader).await?;
    let mut consumed = Consumed::default();
    let started = Instant::now();
    let mut in_flight = match fetch_request(options, &positions, &ends) {
        Some(request) => Some(connection.send(&request, FETCH_VERSION).await?),
        None => None,
    };
    let mut checking: Option<tokio::task::JoinHandle<anyhow::Result<Consumed>>> = None;
    while let Some(sent) = in_flight.take() {
        let response = connection.receive::<FetchRequest>(sent, FETCH_WAIT).await?;
        let mut record_sets = Vec::new();
        for topic in &response.responses {
            for data in &topic.partitions {
                crate::kafka::KafkaError::check(data.error_code, || {
                    format!("fetching partition {}", data.partition_index)
                })?;
                let Some(records) = &data.records else {
                    continue;
                };
                if let Some(next) = next_offset(records)? {
                    positions.insert(data.partition_index, next);
                }
                record_sets.push(records.clone());
            }
        }
        if let Some(request) = fetch_request(options, &positions, &ends) {
            in_flight = Some(connection.send(&request, FETCH_VERSION).await?);
        }
        if let Some(previous) = checking.take() {
            consumed.add(previous.await??);
        }
        checking = Some(tokio::task::spawn_blocking(move || check(&record_sets)));
    }
    if let Some(previous) = checking.take() {
        consumed.add(previous.await??);
    }
    Ok((consumed, started.elapsed()))
}

/// The Fetch for every partition not yet at its end, `None` when all are.
fn fetch_request(
    options: &KafkaBench,
    positions: &BTreeMap<i32, i64>,
    ends: &BTreeMap<i32, i64>,
) -> Option<FetchRequest> {
    let partitions: Vec<FetchPartition> = positions
        .iter()
        .filter(|(partition, offset)| **offset < ends[partition])
        .map(|(partition, offset)| {
            FetchPartition::default()
                .with_partition(*partition)
                .with_current_leader_epoch(-1)
                .with_fetch_offset(*offset)
                .with_last_fetched_epoch(-1)
                .with_log_start_offset(-1)
                .with_partition_max_bytes(options.partition_max_bytes)
        })
        .collect();
    if partitions.is_empty() {
        return None;
    }
    Some(
        FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(FETCH_WAIT.as_millis() as i32)
            .with_min_bytes(1)
            .with_max_bytes(options.fetch_max_bytes)
            .with_session_epoch(-1)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(options.topic.clone())))
                    .with_partitions(partitions),
            ]),
    )
}

/// The offset after the last whole batch of a record set, from the batch headers alone (the
/// CRCs are checked later, off the fetch loop); `None` when it holds no whole batch.
fn next_offset(records: &[u8]) -> anyhow::Result<Option<i64>> {
    let mut rest = records;
    let mut next = None;
    while let Some(header) = batch::BatchHeader::parse(rest).context("a fetched batch header")? {
        let Some(after) = rest.get(header.total_len()..) else {
            break; // A partial batch at the end, as Kafka may send.
        };
        next = Some(header.last_offset() + 1);
        rest = after;
    }
    Ok(next)
}

/// Checks every batch's CRC-32C, as a consumer does, and counts the batches' bytes and
/// records.
fn check(record_sets: &[Bytes]) -> anyhow::Result<Consumed> {
    let mut consumed = Consumed::default();
    for records in record_sets {
        for item in batch::batches(records, usize::MAX) {
            let (header, batch_bytes) = item.context("a fetched batch failed its checks")?;
            consumed.batch_bytes += batch_bytes.len() as u64;
            consumed.records += header.record_count as u64;
        }
    }
    Ok(consumed)
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
