//! `silt consume`: records of one topic as JSON lines on stdout, alone or as a group member.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{
    BrokerId, FetchRequest, TopicName,
    fetch_request::{FetchPartition, FetchTopic},
};
use kafka_protocol::protocol::StrBytes;
use tokio::time::Instant;

use super::{Common, KafkaError, connect, time::parse_rfc3339};
use crate::kafka::group::{self, Heartbeat, Member};
use crate::kafka::records::{RecordLine, decode_fetched};
use crate::kafka::{Cluster, EARLIEST, LATEST, TopicMeta};

/// Fetch v13 names topics by id.
const FETCH_VERSION: i16 = 12;
/// How long the broker may hold a fetch that found nothing; bounds how late Ctrl-C, a
/// heartbeat or `--timeout-ms` is noticed.
const FETCH_MAX_WAIT: Duration = Duration::from_millis(500);
/// Kafka's consumer defaults.
const FETCH_MAX_BYTES: i32 = 50 << 20;
const PARTITION_MAX_BYTES: i32 = 1 << 20;
/// A group member commits what it has printed this often, and when it stops.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// Replays at least this long get a progress bar (when stderr is a terminal).
const PROGRESS_MIN_RECORDS: u64 = 10_000;
/// Pause before fetching again after a partition answered a retriable error, so a broker
/// failing the same way is not asked in a tight loop.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// A retriable partition error that persists is reported at most this often.
const RETRY_REPORT_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub(crate) struct ConsumeArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    topic: String,
    /// Read only this partition (not with --group).
    #[arg(long, conflicts_with = "group")]
    partition: Option<u32>,
    /// Start at the oldest record (for a group: where it has committed nothing).
    #[arg(long, conflicts_with_all = ["offset", "from_time"])]
    from_beginning: bool,
    /// Start at this offset in each partition read (not with --group).
    #[arg(long, conflicts_with_all = ["from_time", "group"])]
    offset: Option<i64>,
    /// Start at the first record at or after this time, e.g. 2026-11-22T06:00:00Z (not with
    /// --group).
    #[arg(long, conflicts_with = "group", value_parser = parse_rfc3339)]
    from_time: Option<i64>,
    /// Consume as a member of this group: partitions are shared with its other members, and
    /// the offsets printed are committed.
    #[arg(long)]
    group: Option<String>,
    /// Stop after this many records.
    #[arg(long)]
    max_messages: Option<u64>,
    /// Stop when no record has arrived for this long.
    #[arg(long)]
    timeout_ms: Option<u64>,
}

/// Where a partition without a committed or explicit start begins.
#[derive(Debug, Clone, Copy)]
enum Reset {
    Earliest,
    Latest,
}

pub(crate) async fn run(args: ConsumeArgs) -> Result<(), KafkaError> {
    let stop = Arc::new(AtomicBool::new(false));
    spawn_stop_on_signal(stop.clone());
    let mut cluster = connect(&args.common).await?;
    let topic = cluster.topic(&args.topic, false).await?;
    let reset = if args.from_beginning {
        Reset::Earliest
    } else {
        Reset::Latest
    };
    let mut consumer = Consumer {
        topic,
        positions: BTreeMap::new(),
        reset,
        printed: 0,
        progress: None,
        retry_reported: None,
    };
    let mut member = None;
    match &args.group {
        Some(group) => {
            let joined = Member::join(&mut cluster, group, &args.topic).await?;
            consumer
                .assign(&mut cluster, Some((&joined, group)), &args)
                .await?;
            member = Some(joined);
        }
        None => consumer.assign(&mut cluster, None, &args).await?,
    }
    consumer.start_progress(&mut cluster).await?;

    let result = consumer
        .run(&mut cluster, member.as_mut(), &args, &stop)
        .await;
    if let Some(progress) = &consumer.progress {
        progress.finish_and_clear();
    }
    if let Some(member) = member {
        // Commit what was printed, then leave so the others take over at once.
        let committed = member
            .commit(&mut cluster, &consumer.positions)
            .await
            .or_else(ignore_rebalance);
        let left = member.leave(&mut cluster).await;
        if result.is_ok() {
            committed.and(left)?;
        }
    }
    eprintln!("silt: consumed {} record(s)", consumer.printed);
    match result {
        Err(KafkaError::OutputClosed) => Ok(()),
        other => other,
    }
}

struct Consumer {
    topic: TopicMeta,
    /// Next offset to read, per assigned partition.
    positions: BTreeMap<i32, i64>,
    reset: Reset,
    printed: u64,
    progress: Option<ProgressBar>,
    /// When a retriable partition error was last reported on stderr.
    retry_reported: Option<Instant>,
}

impl Consumer {
    /// Sets the partitions to read and where each starts.
    async fn assign(
        &mut self,
        cluster: &mut Cluster,
        group: Option<(&Member, &String)>,
        args: &ConsumeArgs,
    ) -> Result<(), KafkaError> {
        self.positions.clear();
        let partitions: Vec<i32> = match (group, args.partition) {
            (Some((member, _)), _) => member.assignment.clone(),
            (None, Some(partition)) => {
                let partition = partition as i32;
                if !self
                    .topic
                    .partitions
                    .iter()
                    .any(|p| p.partition == partition)
                {
                    return Err(KafkaError::Unsupported(format!(
                        "topic {:?} has no partition {partition} (it has {})",
                        self.topic.name,
                        self.topic.partitions.len()
                    )));
                }
                vec![partition]
            }
            (None, None) => self.topic.partitions.iter().map(|p| p.partition).collect(),
        };
        if partitions.is_empty() {
            return Ok(());
        }
        let mut starts: HashMap<i32, Option<i64>> = match (group, args.offset, args.from_time) {
            (Some((_, group)), _, _) => {
                let coordinator = cluster.coordinator(group).await?;
                group::committed(cluster, coordinator, group, &self.topic.name, &partitions).await?
            }
            (None, Some(offset), _) => {
                if offset < 0 {
                    return Err(KafkaError::Unsupported(
                        "--offset must not be negative".into(),
                    ));
                }
                partitions.iter().map(|&p| (p, Some(offset))).collect()
            }
            (None, None, Some(time)) => {
                // No record that recent: start at the end, as Kafka's consumers do.
                let found = cluster.list_offsets(&self.topic, &partitions, time).await?;
                let latest = cluster
                    .list_offsets(&self.topic, &partitions, LATEST)
                    .await?;
                partitions
                    .iter()
                    .map(|p| {
                        (
                            *p,
                            found
                                .get(p)
                                .copied()
                                .flatten()
                                .or(latest.get(p).copied().flatten()),
                        )
                    })
                    .collect()
            }
            (None, None, None) => HashMap::new(),
        };
        let missing: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| starts.get(p).copied().flatten().is_none())
            .collect();
        if !missing.is_empty() {
            let resets = self.reset_offsets(cluster, &missing).await?;
            starts.extend(resets.into_iter().map(|(p, o)| (p, Some(o))));
        }
        for partition in partitions {
            let start = starts.get(&partition).copied().flatten().unwrap_or(0);
            self.positions.insert(partition, start);
        }
        Ok(())
    }

    async fn reset_offsets(
        &self,
        cluster: &mut Cluster,
        partitions: &[i32],
    ) -> Result<HashMap<i32, i64>, KafkaError> {
        let timestamp = match self.reset {
            Reset::Earliest => EARLIEST,
            Reset::Latest => LATEST,
        };
        let offsets = cluster
            .list_offsets(&self.topic, partitions, timestamp)
            .await?;
        Ok(offsets
            .into_iter()
            .map(|(p, o)| (p, o.unwrap_or(0)))
            .collect())
    }

    /// A progress bar for a long replay, when stderr is a terminal.
    async fn start_progress(&mut self, cluster: &mut Cluster) -> Result<(), KafkaError> {
        if !std::io::stderr().is_terminal() || self.positions.is_empty() {
            return Ok(());
        }
        let partitions: Vec<i32> = self.positions.keys().copied().collect();
        let ends = cluster
            .list_offsets(&self.topic, &partitions, LATEST)
            .await?;
        let backlog: u64 = self
            .positions
            .iter()
            .map(|(p, start)| {
                let end = ends.get(p).copied().flatten().unwrap_or(*start);
                end.saturating_sub(*start).max(0) as u64
            })
            .sum();
        if backlog >= PROGRESS_MIN_RECORDS {
            let bar = ProgressBar::new(backlog);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {pos}/{len} records [{bar:30}] {per_sec} eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            self.progress = Some(bar);
        }
        Ok(())
    }

    async fn run(
        &mut self,
        cluster: &mut Cluster,
        mut member: Option<&mut Member>,
        args: &ConsumeArgs,
        stop: &AtomicBool,
    ) -> Result<(), KafkaError> {
        let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
        let mut last_record = Instant::now();
        let mut last_heartbeat = Instant::now();
        let mut last_commit = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed)
                || args.max_messages.is_some_and(|max| self.printed >= max)
            {
                return Ok(());
            }
            if args
                .timeout_ms
                .is_some_and(|ms| last_record.elapsed() >= Duration::from_millis(ms))
            {
                eprintln!(
                    "silt: no record for {} ms; stopping",
                    args.timeout_ms.unwrap_or(0)
                );
                return Ok(());
            }
            if let Some(member) = member.as_deref_mut() {
                if last_commit.elapsed() >= COMMIT_INTERVAL {
                    member
                        .commit(cluster, &self.positions)
                        .await
                        .or_else(ignore_rebalance)?;
                    last_commit = Instant::now();
                }
                if last_heartbeat.elapsed() >= group::HEARTBEAT_INTERVAL {
                    last_heartbeat = Instant::now();
                    if member.heartbeat(cluster).await? == Heartbeat::Rejoin {
                        // Commit what this generation printed while it still may, then rejoin.
                        member
                            .commit(cluster, &self.positions)
                            .await
                            .or_else(ignore_rebalance)?;
                        member.rejoin(cluster).await?;
                        let group = args.group.clone().unwrap_or_default();
                        self.assign(cluster, Some((member, &group)), args).await?;
                        continue;
                    }
                }
            }
            if self.positions.is_empty() {
                // A member with no partitions (more members than partitions) just heartbeats.
                tokio::time::sleep(FETCH_MAX_WAIT).await;
                continue;
            }
            let got = self.fetch_once(cluster, args, &mut stdout).await?;
            if got > 0 {
                last_record = Instant::now();
            }
        }
    }

    /// One Fetch from each leader; returns how many records were printed.
    async fn fetch_once(
        &mut self,
        cluster: &mut Cluster,
        args: &ConsumeArgs,
        out: &mut impl std::io::Write,
    ) -> Result<u64, KafkaError> {
        let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for &partition in self.positions.keys() {
            let leader = self
                .topic
                .partitions
                .iter()
                .find(|p| p.partition == partition)
                .map_or(-1, |p| p.leader);
            by_leader.entry(leader).or_default().push(partition);
        }
        let mut printed = 0;
        let mut refresh = false;
        let mut retry = false;
        for (leader, partitions) in by_leader {
            if leader < 0 {
                refresh = true;
                continue;
            }
            let request = FetchRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_max_wait_ms(FETCH_MAX_WAIT.as_millis() as i32)
                .with_min_bytes(1)
                .with_max_bytes(FETCH_MAX_BYTES)
                .with_isolation_level(0)
                .with_session_id(0)
                .with_session_epoch(-1)
                .with_topics(vec![
                    FetchTopic::default()
                        .with_topic(TopicName(StrBytes::from_string(self.topic.name.clone())))
                        .with_partitions(
                            partitions
                                .iter()
                                .map(|&partition| {
                                    FetchPartition::default()
                                        .with_partition(partition)
                                        .with_current_leader_epoch(-1)
                                        .with_fetch_offset(self.positions[&partition])
                                        .with_last_fetched_epoch(-1)
                                        .with_log_start_offset(-1)
                                        .with_partition_max_bytes(PARTITION_MAX_BYTES)
                                })
                                .collect(),
                        ),
                ]);
            let response = match cluster.broker(leader).await {
                Ok(connection) => {
                    connection
                        .call(&request, FETCH_VERSION, FETCH_MAX_WAIT)
                        .await
                }
                Err(error) => Err(error),
            };
            let response = match response {
                Ok((response, _)) => response,
                Err(error) if error.is_retriable() => {
                    eprintln!("silt: fetch from broker {leader} failed, retrying: {error}");
                    cluster.drop_connection(Some(leader));
                    refresh = true;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            KafkaError::check(response.error_code, || {
                format!("Fetch from broker {leader}")
            })?;
            for topic in &response.responses {
                for data in &topic.partitions {
                    let partition = data.partition_index;
                    let Some(&position) = self.positions.get(&partition) else {
                        continue;
                    };
                    match ResponseError::try_from_code(data.error_code) {
                        None => {}
                        Some(ResponseError::OffsetOutOfRange) => {
                            if args.offset.is_some() && args.group.is_none() {
                                let low = cluster
                                    .list_offsets(&self.topic, &[partition], EARLIEST)
                                    .await?;
                                let high = cluster
                                    .list_offsets(&self.topic, &[partition], LATEST)
                                    .await?;
                                let (low, high) = (
                                    low.get(&partition).copied().flatten().unwrap_or(0),
                                    high.get(&partition).copied().flatten().unwrap_or(0),
                                );
                                return Err(KafkaError::Unsupported(format!(
                                    "offset {position} of {}[{partition}] is out of range: the partition \
                                     holds offsets from {low} up to (not including) {high}",
                                    self.topic.name
                                )));
                            }
                            let reset = self.reset_offsets(cluster, &[partition]).await?;
                            let to = reset.get(&partition).copied().unwrap_or(0);
                            eprintln!(
                                "silt: offset {position} of {}[{partition}] is out of range; resetting to {to}",
                                self.topic.name
                            );
                            self.positions.insert(partition, to);
                            continue;
                        }
                        Some(error) if error.is_retriable() => {
                            if self
                                .retry_reported
                                .is_none_or(|at| at.elapsed() >= RETRY_REPORT_INTERVAL)
                            {
                                eprintln!(
                                    "silt: fetching {}[{partition}] at offset {position}: {error}; retrying",
                                    self.topic.name
                                );
                                self.retry_reported = Some(Instant::now());
                            }
                            refresh = true;
                            retry = true;
                            continue;
                        }
                        Some(_) => {
                            return Err(KafkaError::from_code(
                                data.error_code,
                                format!("fetching {}[{partition}]", self.topic.name),
                            ));
                        }
                    }
                    let Some(bytes) = data.records.as_ref().filter(|b| !b.is_empty()) else {
                        continue;
                    };
                    let fetched = decode_fetched(bytes, position)?;
                    for record in &fetched.records {
                        if args.max_messages.is_some_and(|max| self.printed >= max) {
                            break;
                        }
                        let line = RecordLine::new(&self.topic.name, partition, record);
                        let written = serde_json::to_writer(&mut *out, &line)
                            .map_err(std::io::Error::from)
                            .and_then(|()| out.write_all(b"\n"));
                        if let Err(error) = written {
                            return Err(output_error(error));
                        }
                        self.positions.insert(partition, record.offset + 1);
                        self.printed += 1;
                        printed += 1;
                    }
                    if args.max_messages.is_none_or(|max| self.printed < max) {
                        // Past control batches and records filtered out as well.
                        let next = fetched.next_offset.max(self.positions[&partition]);
                        self.positions.insert(partition, next);
                    }
                }
            }
            out.flush().map_err(output_error)?;
        }
        if let Some(progress) = &self.progress {
            progress.inc(printed);
        }
        if refresh {
            self.topic = cluster.topic(&self.topic.name, false).await?;
        }
        if retry && printed == 0 {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Ok(printed)
    }
}

/// stdout closing (`| head`) ends the command like a normal stop; other errors are errors.
fn output_error(error: std::io::Error) -> KafkaError {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        KafkaError::OutputClosed
    } else {
        KafkaError::Io(format!("writing to stdout: {error}"))
    }
}

/// A commit refused because the group is rebalancing is retried by the next generation.
fn ignore_rebalance(error: KafkaError) -> Result<(), KafkaError> {
    match error.code() {
        Some(code) if [22, 25, 27].contains(&code) => Ok(()),
        _ => Err(error),
    }
}

/// Sets `stop` on Ctrl-C or SIGTERM, so the loop commits, leaves its group and exits.
fn spawn_stop_on_signal(stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match terminate.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminated => {}
        }
        stop.store(true, Ordering::Relaxed);
    });
}
