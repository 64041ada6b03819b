//! `silt bench mqtt`: publish throughput and acknowledgement latency of any MQTT broker.
//!
//! `--clients` connections each publish `--payload`-byte messages to their own topic at
//! `--qos`, with up to `--inflight` unacknowledged at QoS 1/2, for `--duration` (or until
//! `--messages` in all). A run's clock starts once every client has its CONNACK and stops at
//! the last client's last acknowledgement (QoS 1/2) or PINGRESP (QoS 0, see [`load`]).
//! Throughput is confirmed messages over that time; latency is from the write carrying a
//! PUBLISH to the read carrying its PUBACK (QoS 1) or PUBCOMP (QoS 2). Each figure is reported
//! per run and as the median of the measured runs, after `--warmup` runs that are shown but
//! not counted. `--json` prints one JSON object instead, for scripts (`scripts/bench-mqtt`).
//!
//! The same numbers against two brokers on the same machine, in alternating runs, are what
//! BENCHMARKS.md compares.
//!
//! # Layout
//! - [`codec`]: the packets sent and received, in 3.1.1 or 5, over rumqttc's codec.
//! - [`load`]: one client's connection and publish loop.
//! - [`histogram`]: the latency histogram (bounded memory, bounded relative error).

mod codec;
mod histogram;
mod load;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use serde::Serialize;

use self::codec::{Codec, ConnectSpec, Protocol};
use self::histogram::Histogram;
use self::load::{Client, Stop};

/// The largest `--payload`: a benchmark of small sensor messages has no use for more, and it
/// bounds the write buffers.
const PAYLOAD_BYTES_MAX: u32 = 1 << 20;
/// The longest `--topic` prefix; MQTT allows 65,535 bytes for the whole name.
const TOPIC_PREFIX_BYTES_MAX: usize = 1024;
/// The most `--clients`: each holds a latency histogram and socket buffers.
const CLIENTS_MAX: u16 = 1000;
/// Keep-alive sent in CONNECT. A run publishes continuously, so it never expires; it only
/// guards against a client that stalls between runs.
const KEEP_ALIVE_S: u16 = 60;

#[derive(Debug, Args)]
pub(crate) struct MqttBench {
    /// Broker address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    addr: String,
    /// Concurrent connections; client i publishes to topic PREFIX/i.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=i64::from(CLIENTS_MAX)))]
    clients: u16,
    /// Unacknowledged QoS 1/2 publishes per client (packet ids in flight). In MQTT 5 it is
    /// lowered to the broker's Receive Maximum if that is smaller. Unused at QoS 0.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    inflight: u16,
    /// Quality of service of every publish: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload bytes per message.
    #[arg(long, value_name = "BYTES", default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=i64::from(PAYLOAD_BYTES_MAX)))]
    payload: u32,
    /// How long each run publishes, such as 10s, 500ms or 2m; publishes in flight at the end
    /// are still awaited.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Messages per run, across all clients, instead of --duration.
    #[arg(long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    messages: Option<u64>,
    /// MQTT protocol version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1", value_parser = parse_protocol)]
    protocol: Protocol,
    /// User name sent in CONNECT.
    #[arg(long, env = "SILT_BENCH_MQTT_USERNAME")]
    username: Option<String>,
    /// Password sent in CONNECT (better from the environment than the command line).
    #[arg(
        long,
        env = "SILT_BENCH_MQTT_PASSWORD",
        requires = "username",
        hide_env_values = true
    )]
    password: Option<String>,
    /// Topic prefix; client i publishes to PREFIX/i.
    #[arg(long, value_name = "PREFIX", default_value = "silt-bench")]
    topic: String,
    /// Measured runs; the medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Runs before the measured ones, shown but not counted (connections, caches and the
    /// broker's allocations settle).
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// How long to wait for any reply the broker owes (CONNACK, an acknowledgement, PINGRESP)
    /// before counting the client as failed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Threads running the load clients; 0 means one per CPU. On a small machine shared with
    /// the broker, fewer leaves it more CPU (the load is the same for every broker either way).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object with every run and the medians instead of a table.
    #[arg(long)]
    json: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
struct RunFigures {
    /// Publishes confirmed: acknowledged with success (QoS 1/2), or sent before the final
    /// PINGRESP (QoS 0).
    messages: u64,
    elapsed_s: f64,
    msgs_per_s: f64,
    /// Payload megabytes (10^6) per second.
    mb_per_s: f64,
    /// Acknowledgement latency percentiles in microseconds; absent at QoS 0.
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    max_us: Option<f64>,
    /// The smallest in-flight window any client got (see `--inflight`).
    window: u16,
    /// Publishes refused by the broker plus clients that failed.
    errors: u64,
    first_error: Option<String>,
}

/// Medians of the measured runs.
#[derive(Debug, Clone, Serialize)]
struct Medians {
    msgs_per_s: f64,
    mb_per_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    max_us: Option<f64>,
}

/// The `--json` output.
#[derive(Debug, Serialize)]
struct Report<'a> {
    addr: String,
    protocol: &'static str,
    qos: u8,
    clients: u16,
    inflight: u16,
    payload_bytes: u32,
    duration_s: Option<f64>,
    messages_per_run: Option<u64>,
    warmup: &'a [RunFigures],
    runs: &'a [RunFigures],
    median: Medians,
    errors: u64,
}

pub(crate) fn run(options: &MqttBench) -> anyhow::Result<()> {
    if options.topic.len() > TOPIC_PREFIX_BYTES_MAX {
        bail!("--topic is longer than {TOPIC_PREFIX_BYTES_MAX} bytes");
    }
    if options.topic.contains(['+', '#', '\0']) {
        bail!("--topic must not contain wildcards (+, #) or NUL: it names the topics published to");
    }
    for (name, value) in [
        ("--username", &options.username),
        ("--password", &options.password),
    ] {
        if value
            .as_ref()
            .is_some_and(|value| value.len() > usize::from(u16::MAX))
        {
            bail!("{name} is longer than MQTT's 65,535 bytes");
        }
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if options.threads > 0 {
        builder.worker_threads(options.threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(bench(options))
}

async fn bench(options: &MqttBench) -> anyhow::Result<()> {
    let addr = tokio::net::lookup_host(&options.addr)
        .await
        .with_context(|| format!("cannot resolve --addr {}", options.addr))?
        .next()
        .with_context(|| format!("--addr {} resolves to no address", options.addr))?;
    let payload = payload(options.payload as usize);
    if !options.json {
        print_header(options, addr);
    }
    let mut warmup = Vec::new();
    let mut measured = Vec::new();
    for index in 0..options.warmup + options.runs {
        let figures = one_run(options, addr, &payload, index).await?;
        let is_warmup = index < options.warmup;
        if !options.json {
            let label = if is_warmup {
                "warm".to_string()
            } else {
                (index - options.warmup + 1).to_string()
            };
            print_run(&label, &figures);
            if options.qos > 0 && figures.window < options.inflight {
                println!(
                    "       the broker's Receive Maximum lowered the window to {} in flight",
                    figures.window
                );
            }
        }
        if is_warmup {
            warmup.push(figures);
        } else {
            measured.push(figures);
        }
    }
    let median = Medians {
        msgs_per_s: median(measured.iter().map(|f| f.msgs_per_s)),
        mb_per_s: median(measured.iter().map(|f| f.mb_per_s)),
        p50_us: median_of_some(measured.iter().map(|f| f.p50_us)),
        p99_us: median_of_some(measured.iter().map(|f| f.p99_us)),
        max_us: median_of_some(measured.iter().map(|f| f.max_us)),
    };
    let errors: u64 = warmup.iter().chain(&measured).map(|f| f.errors).sum();
    if options.json {
        let report = Report {
            addr: addr.to_string(),
            protocol: options.protocol.name(),
            qos: options.qos,
            clients: options.clients,
            inflight: options.inflight,
            payload_bytes: options.payload,
            duration_s: options
                .messages
                .is_none()
                .then_some(options.duration.as_secs_f64()),
            messages_per_run: options.messages,
            warmup: &warmup,
            runs: &measured,
            median: median.clone(),
            errors,
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:>6} {:>12} {:>12} {:>8} {:>9} {:>9} {:>9}",
            "median",
            "",
            format!("{:.0}", median.msgs_per_s),
            format!("{:.2}", median.mb_per_s),
            ms(median.p50_us),
            ms(median.p99_us),
            ms(median.max_us),
        );
    }
    if errors > 0 {
        let first = warmup
            .iter()
            .chain(&measured)
            .find_map(|f| f.first_error.clone())
            .unwrap_or_default();
        bail!("{errors} errors (first: {first}); the figures above are not comparable");
    }
    Ok(())
}

/// Connects every client, then runs the load and gathers the figures.
async fn one_run(
    options: &MqttBench,
    addr: SocketAddr,
    payload: &Bytes,
    run_index: u32,
) -> anyhow::Result<RunFigures> {
    let mut connecting = Vec::with_capacity(usize::from(options.clients));
    for client in 0..options.clients {
        let codec = Codec::new(
            options.protocol,
            &format!("{}/{client}", options.topic),
            options.qos,
            payload.clone(),
        );
        let spec = ConnectSpec {
            // At most 23 bytes, the length every 3.1.1 broker must accept.
            client_id: format!("sb-{:x}-{run_index}-{client}", std::process::id()),
            keep_alive_s: KEEP_ALIVE_S,
            username: options.username.clone(),
            password: options.password.clone(),
            receive_maximum: u16::MAX,
        };
        let (inflight, timeout) = (options.inflight, options.timeout);
        connecting.push(tokio::spawn(async move {
            Client::connect(addr, codec, &spec, inflight, timeout).await
        }));
    }
    let mut clients = Vec::with_capacity(connecting.len());
    for (index, handle) in connecting.into_iter().enumerate() {
        let client = handle
            .await
            .context("a connecting task failed")?
            .with_context(|| format!("client {index} of {}", options.clients))?;
        clients.push(client);
    }
    let window = clients.iter().map(Client::window).min().unwrap_or(0);

    let started = Instant::now();
    let clients_count = u64::from(options.clients);
    let running: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(index, client)| {
            let stop = match options.messages {
                // An even share, the remainder spread over the first clients.
                Some(total) => Stop::After(
                    total / clients_count + u64::from((index as u64) < total % clients_count),
                ),
                None => Stop::At(started + options.duration),
            };
            tokio::spawn(client.run(options.qos, stop))
        })
        .collect();
    let mut latencies = Histogram::new();
    let mut messages = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut finished = started;
    for (index, handle) in running.into_iter().enumerate() {
        let outcome = handle.await.context("a load task failed")?;
        messages += outcome.completed;
        errors += outcome.failed;
        if let Some(reason) = outcome.first_failure {
            first_error.get_or_insert(format!("client {index}: {reason}"));
        }
        if let Some(error) = outcome.error {
            errors += 1;
            first_error.get_or_insert(format!("client {index}: {error}"));
        }
        latencies.merge(&outcome.latencies);
        finished = finished.max(outcome.finished);
    }
    let elapsed = finished
        .duration_since(started)
        .max(Duration::from_nanos(1));
    let micros = |latency: Option<Duration>| latency.map(|l| l.as_secs_f64() * 1e6);
    Ok(RunFigures {
        messages,
        elapsed_s: elapsed.as_secs_f64(),
        msgs_per_s: messages as f64 / elapsed.as_secs_f64(),
        mb_per_s: (messages * u64::from(options.payload)) as f64 / 1e6 / elapsed.as_secs_f64(),
        p50_us: micros(latencies.percentile(50.0)),
        p99_us: micros(latencies.percentile(99.0)),
        max_us: micros(latencies.max()),
        window,
        errors,
        first_error,
    })
}

fn print_header(options: &MqttBench, addr: SocketAddr) {
    let load = match options.messages {
        Some(messages) => format!("{messages} messages per run"),
        None => format!("{:?} per run", options.duration),
    };
    let window = if options.qos == 0 {
        String::new()
    } else {
        format!(" x {} in flight", options.inflight)
    };
    println!(
        "silt bench mqtt: {addr}, MQTT {}, QoS {}, {} clients{window}, {} B payloads, {load}, {} runs after {} warm-up",
        options.protocol.name(),
        options.qos,
        options.clients,
        options.payload,
        options.runs,
        options.warmup,
    );
    println!(
        "{:>6} {:>12} {:>12} {:>8} {:>9} {:>9} {:>9} {:>7}",
        "run", "messages", "msgs/s", "MB/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
}

fn print_run(label: &str, figures: &RunFigures) {
    println!(
        "{label:>6} {:>12} {:>12.0} {:>8.2} {:>9} {:>9} {:>9} {:>7}",
        figures.messages,
        figures.msgs_per_s,
        figures.mb_per_s,
        ms(figures.p50_us),
        ms(figures.p99_us),
        ms(figures.max_us),
        figures.errors,
    );
    if let Some(error) = &figures.first_error {
        println!("       first error: {error}");
    }
}

/// Microseconds as milliseconds for the table; `-` when there is no latency (QoS 0).
fn ms(micros: Option<f64>) -> String {
    micros.map_or_else(|| "-".into(), |micros| format!("{:.3}", micros / 1e3))
}

/// `bytes` of a fixed xorshift sequence: incompressible, the same every run.
fn payload(bytes: usize) -> Bytes {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    (0..bytes)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median of the values present; `None` when none is (QoS 0 has no latencies).
fn median_of_some(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let present: Vec<f64> = values.flatten().collect();
    (!present.is_empty()).then(|| median(present.into_iter()))
}

/// `3.1.1` (also `4`, its protocol level) or `5` (also `5.0`).
fn parse_protocol(text: &str) -> Result<Protocol, String> {
    match text {
        "3.1.1" | "4" => Ok(Protocol::V311),
        "5" | "5.0" => Ok(Protocol::V5),
        _ => Err(format!("expected 3.1.1 or 5, got {text:?}")),
    }
}

/// A duration with a unit: `250ms`, `10s`, `2m`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("expected a duration such as 10s or 500ms, got {text:?}"))?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1e3,
        "m" => number * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_reject_nonsense() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "0s", "10h", "-1s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn medians_of_runs() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median_of_some([None, None].into_iter()), None);
        assert_eq!(
            median_of_some([Some(5.0), Some(1.0), Some(3.0)].into_iter()),
            Some(3.0)
        );
    }
}
