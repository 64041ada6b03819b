//! `silt tier status`: a core's tiering per partition, read from its admin port
//! (`GET /v1/tier/status/<topic>`), printed as a table or, with `--json`, as the core's JSON.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::KafkaError;

/// Largest admin response read; a topic's status is well under a megabyte even with
/// thousands of partitions.
const RESPONSE_BYTES_MAX: u64 = 16 << 20;

#[derive(Debug, Subcommand)]
pub(crate) enum TierCommand {
    /// Per partition: log start and local start offsets, high watermark, archived objects and
    /// bytes, upload lag, and the last upload error.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The core's admin address (`admin_listen`), `host:port`.
    #[arg(long, env = "SILT_ADMIN", default_value = "127.0.0.1:9645")]
    admin: String,
    #[arg(long)]
    topic: String,
    /// Print the core's JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Give up if the core does not answer within this long.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    timeout_ms: u64,
}

/// The core's answer, as far as the table needs it.
#[derive(Debug, Deserialize)]
struct TopicStatus {
    topic: String,
    store: String,
    backpressure: bool,
    partitions: Vec<PartitionStatus>,
}

#[derive(Debug, Deserialize)]
struct PartitionStatus {
    partition: u32,
    log_start_offset: u64,
    local_start_offset: u64,
    high_watermark: u64,
    archived_objects: u64,
    archived_bytes: u64,
    upload_lag_records: u64,
    upload_lag_bytes: u64,
    last_error: Option<String>,
}

pub(crate) async fn run(command: TierCommand) -> Result<(), KafkaError> {
    match command {
        TierCommand::Status(args) => status(args).await,
    }
}

async fn status(args: StatusArgs) -> Result<(), KafkaError> {
    if args.topic.is_empty() || !args.topic.bytes().all(is_topic_byte) {
        return Err(KafkaError::Unsupported(format!(
            "invalid topic name {:?}: letters, digits, '.', '_' and '-' only",
            args.topic
        )));
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let path = format!("/v1/tier/status/{}", args.topic);
    let (code, body) = tokio::time::timeout(timeout, get(&args.admin, &path))
        .await
        .map_err(|_| KafkaError::Timeout(format!("waiting for {} to answer", args.admin)))??;
    let text = String::from_utf8_lossy(&body);
    if code != 200 {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| value["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        return Err(KafkaError::Unsupported(format!(
            "{} answered {code}: {message}",
            args.admin
        )));
    }
    if args.json {
        println!("{}", text.trim_end());
        return Ok(());
    }
    let status: TopicStatus = serde_json::from_slice(&body).map_err(|error| {
        KafkaError::Protocol(format!(
            "{} sent a status that is not ours: {error}",
            args.admin
        ))
    })?;
    print_table(&status);
    Ok(())
}

fn is_topic_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-')
}

fn print_table(status: &TopicStatus) {
    println!(
        "Topic: {}\tStore: {}\tBackpressure: {}",
        status.topic,
        status.store,
        if status.backpressure { "on" } else { "off" }
    );
    println!(
        "{:>9} {:>12} {:>12} {:>14} {:>8} {:>14} {:>11} {:>14}  LAST ERROR",
        "PARTITION",
        "LOG START",
        "LOCAL START",
        "HIGH WATERMARK",
        "OBJECTS",
        "ARCHIVED BYTES",
        "LAG RECORDS",
        "LAG BYTES"
    );
    for partition in &status.partitions {
        println!(
            "{:>9} {:>12} {:>12} {:>14} {:>8} {:>14} {:>11} {:>14}  {}",
            partition.partition,
            partition.log_start_offset,
            partition.local_start_offset,
            partition.high_watermark,
            partition.archived_objects,
            partition.archived_bytes,
            partition.upload_lag_records,
            partition.upload_lag_bytes,
            partition.last_error.as_deref().unwrap_or("-")
        );
    }
}

/// One HTTP/1.1 GET; the admin port answers one request per connection and closes it.
async fn get(admin: &str, path: &str) -> Result<(u16, Vec<u8>), KafkaError> {
    let addr: SocketAddr = tokio::net::lookup_host(admin)
        .await
        .map_err(|error| KafkaError::Io(format!("cannot resolve {admin}: {error}")))?
        .next()
        .ok_or_else(|| KafkaError::Io(format!("{admin} resolves to no address")))?;
    let io = |what: &str, error: std::io::Error| KafkaError::Io(format!("{what} {admin}: {error}"));
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|error| io("cannot connect to", error))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| io("cannot send to", error))?;
    let mut bytes = Vec::new();
    stream
        .take(RESPONSE_BYTES_MAX)
        .read_to_end(&mut bytes)
        .await
        .map_err(|error| io("cannot read from", error))?;
    parse_response(&bytes)
        .ok_or_else(|| KafkaError::Protocol(format!("{admin} did not answer HTTP/1.1")))
}

/// The status code and body of a whole HTTP/1.1 response.
fn parse_response(bytes: &[u8]) -> Option<(u16, Vec<u8>)> {
    let head_len = bytes.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..head_len]).ok()?;
    let code = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((code, bytes[head_len + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_and_garbage_does_not() {
        assert_eq!(
            parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"),
            Some((404, b"{}".to_vec()))
        );
        assert_eq!(parse_response(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_response(b"HTTP/1.1 abc\r\n\r\n"), None);
    }
}
