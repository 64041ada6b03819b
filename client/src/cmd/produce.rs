//! `silt produce`: lines from stdin become records of one topic.
//!
//! The producer is idempotent when the broker supports it (InitProducerId), as Kafka's
//! producers are by default: a batch retried after a lost connection or a leader change keeps
//! its sequence, so the broker drops the duplicate. Without idempotence a batch is retried only
//! after errors that say it was not written.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use kafka_protocol::messages::{
    InitProducerIdRequest, ProduceRequest, ProducerId, TopicName,
    produce_request::{PartitionProduceData, TopicProduceData},
};
use kafka_protocol::protocol::StrBytes;
use silt_log::batch::Record;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Common, KafkaError, connect};
use crate::kafka::{Cluster, TopicMeta, records};

/// Produce v10+ only adds tagged fields; v13 names topics by id.
const PRODUCE_VERSION: i16 = 9;
const INIT_PRODUCER_ID_VERSION: i16 = 4;
/// A batch closes before its records would pass this many bytes (keys, values and each
/// record's framing), so it stays under a broker's default 1 MB `max.message.bytes`...
const BATCH_BYTES: usize = 1_000_000;
/// A record's framing at most: length, attributes, timestamp and offset deltas, key and value
/// lengths, header count, as varints.
const RECORD_OVERHEAD_BYTES: usize = 32;
/// ...or this many records...
const BATCH_RECORDS: usize = 10_000;
/// ...or when stdin has nothing more for this long (typing at a terminal, a slow pipe).
const LINGER: Duration = Duration::from_millis(5);
/// How long a batch is retried before the command gives up.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// The broker's own wait for acks=all.
const PRODUCE_TIMEOUT_MS: i32 = 30_000;

#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    topic: String,
    /// The key of every record.
    #[arg(long, conflicts_with = "keyed")]
    key: Option<String>,
    /// Each line is `key<TAB>value`.
    #[arg(long)]
    keyed: bool,
    /// Acknowledgements to wait for: `all` (or -1), `1` or `0`.
    #[arg(long, default_value = "all", value_parser = parse_acks)]
    acks: i16,
}

fn parse_acks(text: &str) -> Result<i16, String> {
    match text {
        "all" | "-1" => Ok(-1),
        "1" => Ok(1),
        "0" => Ok(0),
        _ => Err(format!("expected all, -1, 1 or 0, got {text:?}")),
    }
}

struct Producer {
    cluster: Cluster,
    topic: TopicMeta,
    acks: i16,
    /// Producer id and epoch when the broker supports idempotence.
    idempotence: Option<(i64, i16)>,
    /// Next sequence per partition.
    sequences: BTreeMap<i32, i32>,
    /// Records without a key go to one partition per batch, the next one each time.
    sticky: usize,
}

pub(crate) async fn run(args: ProduceArgs) -> Result<(), KafkaError> {
    let mut cluster = connect(&args.common).await?;
    let topic = cluster.topic(&args.topic, true).await?;
    let idempotence = init_producer_id(&mut cluster).await?;
    let mut producer = Producer {
        cluster,
        topic,
        acks: args.acks,
        idempotence,
        sequences: BTreeMap::new(),
        sticky: 0,
    };
    let mut lines = BufReader::new(tokio::io::stdin());
    let mut pending: BTreeMap<i32, Vec<Record>> = BTreeMap::new();
    let (mut pending_bytes, mut pending_records) = (0usize, 0usize);
    let (mut produced, mut line_number) = (0u64, 0u64);
    let mut line = Vec::new();
    let result: Result<(), KafkaError> = async {
        loop {
            line.clear();
            let read = if pending_records == 0 {
                Some(lines.read_until(b'\n', &mut line).await)
            } else {
                tokio::time::timeout(LINGER, lines.read_until(b'\n', &mut line))
                    .await
                    .ok()
            };
            let at_end = match read {
                // Nothing more within the linger: send what is waiting, then read on.
                None => {
                    produced += producer.flush(&mut pending).await?;
                    (pending_bytes, pending_records) = (0, 0);
                    continue;
                }
                Some(Ok(0)) => true,
                Some(Ok(_)) => false,
                Some(Err(error)) => return Err(KafkaError::Io(format!("reading stdin: {error}"))),
            };
            if at_end {
                produced += producer.flush(&mut pending).await?;
                return Ok(());
            }
            line_number += 1;
            let record = match parse_line(&line, &args, line_number) {
                Ok(record) => record,
                Err(error) => {
                    // The lines before the bad one are sent; the error names the bad one.
                    produced += producer.flush(&mut pending).await?;
                    return Err(error);
                }
            };
            let record_bytes = record.key.as_ref().map_or(0, Bytes::len)
                + record.value.as_ref().map_or(0, Bytes::len)
                + RECORD_OVERHEAD_BYTES;
            if pending_records > 0 && pending_bytes + record_bytes > BATCH_BYTES {
                produced += producer.flush(&mut pending).await?;
                (pending_bytes, pending_records) = (0, 0);
            }
            pending_bytes += record_bytes;
            pending_records += 1;
            let partition = producer.partition_for(&record);
            pending.entry(partition).or_default().push(record);
            if pending_records >= BATCH_RECORDS {
                produced += producer.flush(&mut pending).await?;
                (pending_bytes, pending_records) = (0, 0);
            }
        }
    }
    .await;
    eprintln!(
        "silt: produced {produced} record(s) to topic {:?}",
        args.topic
    );
    result
}

/// A line without its line ending, as a record.
fn parse_line(line: &[u8], args: &ProduceArgs, number: u64) -> Result<Record, KafkaError> {
    let mut text = line.strip_suffix(b"\n").unwrap_or(line);
    text = text.strip_suffix(b"\r").unwrap_or(text);
    let (key, value) = if args.keyed {
        let Some(tab) = text.iter().position(|&b| b == b'\t') else {
            return Err(KafkaError::Unsupported(format!(
                "line {number} has no TAB between key and value (--keyed); it and the lines after it were not sent"
            )));
        };
        (Some(Bytes::copy_from_slice(&text[..tab])), &text[tab + 1..])
    } else {
        (args.key.as_ref().map(|key| Bytes::from(key.clone())), text)
    };
    Ok(Record {
        timestamp: silt_log::now_ms(),
        key,
        value: Some(Bytes::copy_from_slice(value)),
        headers: Vec::new(),
    })
}

/// An idempotent producer id, or `None` when the broker does not offer idempotence.
async fn init_producer_id(cluster: &mut Cluster) -> Result<Option<(i64, i16)>, KafkaError> {
    let request = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(60_000)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let connection = cluster.any().await?;
    if connection
        .version::<InitProducerIdRequest>(INIT_PRODUCER_ID_VERSION)
        .is_err()
    {
        return Ok(None);
    }
    let (response, _) = connection
        .call(&request, INIT_PRODUCER_ID_VERSION, Duration::ZERO)
        .await?;
    KafkaError::check(response.error_code, || "InitProducerId".to_string())?;
    Ok(Some((response.producer_id.0, response.producer_epoch)))
}

impl Producer {
    fn partition_for(&mut self, record: &Record) -> i32 {
        let count = self.topic.partitions.len() as u32;
        match &record.key {
            Some(key) => silt_log::partitioner::partition_for_key(key, count) as i32,
            None => (self.sticky % count as usize) as i32,
        }
    }

    /// Sends every pending batch and returns how many records were acknowledged.
    async fn flush(&mut self, pending: &mut BTreeMap<i32, Vec<Record>>) -> Result<u64, KafkaError> {
        let mut sent = 0;
        for (partition, batch) in std::mem::take(pending) {
            sent += batch.len() as u64;
            self.send(partition, &batch).await?;
        }
        self.sticky = self.sticky.wrapping_add(1);
        Ok(sent)
    }

    async fn send(&mut self, partition: i32, batch: &[Record]) -> Result<(), KafkaError> {
        let sequence = *self.sequences.get(&partition).unwrap_or(&0);
        let producer = self.idempotence.map(|(id, epoch)| (id, epoch, sequence));
        let bytes = records::encode(batch, producer)?;
        let request = ProduceRequest::default()
            .with_acks(self.acks)
            .with_timeout_ms(PRODUCE_TIMEOUT_MS)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(self.topic.name.clone())))
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(partition)
                            .with_records(Some(bytes)),
                    ]),
            ]);
        let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
        let mut backoff = Duration::from_millis(100);
        loop {
            let error = match self.try_send(partition, &request).await {
                Ok(()) => break,
                Err(error) => error,
            };
            // Without idempotence, a lost connection leaves the batch's fate unknown: a retry
            // could write it twice, so say so instead.
            let ambiguous = matches!(error, KafkaError::Io(_) | KafkaError::Timeout(_));
            let retry = error.is_retriable() && (self.idempotence.is_some() || !ambiguous);
            if !retry || tokio::time::Instant::now() >= deadline {
                return Err(if ambiguous && self.idempotence.is_none() {
                    KafkaError::Io(format!(
                        "{error}; the last batch of {} record(s) may or may not have been written",
                        batch.len()
                    ))
                } else {
                    error
                });
            }
            eprintln!("silt: retrying a batch for partition {partition}: {error}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            self.topic = self.cluster.topic(&self.topic.name, true).await?;
        }
        if self.idempotence.is_some() {
            self.sequences.insert(
                partition,
                sequence.wrapping_add(batch.len() as i32) & i32::MAX,
            );
        }
        Ok(())
    }

    async fn try_send(
        &mut self,
        partition: i32,
        request: &ProduceRequest,
    ) -> Result<(), KafkaError> {
        let leader = self
            .topic
            .partitions
            .iter()
            .find(|p| p.partition == partition)
            .map(|p| p.leader)
            .ok_or_else(|| KafkaError::Protocol(format!("no partition {partition}")))?;
        let result = async {
            let connection = self.cluster.broker(leader).await?;
            if self.acks == 0 {
                // No response comes for acks=0; nothing to wait for.
                return connection.send_only(request, PRODUCE_VERSION).await;
            }
            let (response, _) = connection
                .call(
                    request,
                    PRODUCE_VERSION,
                    Duration::from_millis(PRODUCE_TIMEOUT_MS as u64),
                )
                .await?;
            for topic in &response.responses {
                for p in &topic.partition_responses {
                    if p.error_code != 0 {
                        let detail = p
                            .error_message
                            .as_ref()
                            .map(|m| format!(" ({})", m.as_str()));
                        return Err(KafkaError::from_code(
                            p.error_code,
                            format!(
                                "producing to {}[{}]{}",
                                self.topic.name,
                                p.index,
                                detail.unwrap_or_default()
                            ),
                        ));
                    }
                }
            }
            Ok(())
        }
        .await;
        if matches!(result, Err(KafkaError::Io(_) | KafkaError::Timeout(_))) {
            self.cluster.drop_connection(Some(leader));
        }
        // DUPLICATE_SEQUENCE_NUMBER: the broker already has this batch from a lost attempt.
        match result {
            Err(error) if error.code() == Some(46) => Ok(()),
            other => other,
        }
    }
}
