//! `batchcat`: turns raw Kafka RecordBatch v2 bytes into JSON lines and back, for interop tests
//! with other Kafka codecs and for looking inside segment files.
//!
//! ```text
//! batchcat decode < batches.bin
//!     one JSON object per record, from one or more concatenated batches
//! batchcat encode [--zstd] [--log-append-time] [--transactional] [--base-offset N]
//!                 [--partition-leader-epoch N] [--producer-id N] [--producer-epoch N]
//!                 [--base-sequence N] < records.jsonl > batch.bin
//!     one batch from JSON lines {"timestamp", "key_hex", "value_hex", "headers"}
//! ```
//!
//! Keys and values are hex strings, or null for Kafka's null; headers are `[key, value_hex]`
//! pairs whose value may be null.

use std::io::{Read, Write};
use std::process::ExitCode;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{Value, json};
use silt_log::batch::{
    BatchHeader, BatchSpec, Compression, DecodeLimits, Header, Record, TimestampType, batches,
    decode_records, encode_batch,
};

/// Largest batch `decode` accepts: this reads local files, not untrusted peers, so it allows
/// far more than a broker would.
const TOOL_BATCH_BYTES_MAX: usize = 256 << 20;
/// Largest decompressed records section `decode` accepts.
const TOOL_DECOMPRESSED_BYTES_MAX: usize = 1 << 30;

const USAGE: &str = "usage: batchcat decode < batches.bin\n       \
    batchcat encode [--zstd] [--log-append-time] [--transactional] [--base-offset N] \
    [--partition-leader-epoch N] [--producer-id N] [--producer-epoch N] [--base-sequence N] \
    < records.jsonl > batch.bin";

/// One line of `encode` input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputRecord {
    timestamp: i64,
    #[serde(default)]
    key_hex: Option<String>,
    #[serde(default)]
    value_hex: Option<String>,
    #[serde(default)]
    headers: Vec<(String, Option<String>)>,
}

/// Why the tool stopped: bad arguments print the usage, anything else a message.
#[derive(Debug)]
enum Failure {
    Usage(String),
    Input(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("batchcat: {message}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Input(message)) => {
            eprintln!("batchcat: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), Failure> {
    let Some((command, options)) = args.split_first() else {
        return Err(Failure::Usage("missing command".to_owned()));
    };
    let output = match command.as_str() {
        "decode" => {
            if let Some(extra) = options.first() {
                return Err(Failure::Usage(format!(
                    "decode takes no options, got {extra}"
                )));
            }
            decode(&read_stdin()?)?
        }
        "encode" => {
            let spec = parse_spec(options)?;
            encode(&spec, &read_stdin()?)?
        }
        other => return Err(Failure::Usage(format!("unknown command {other}"))),
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&output)
        .and_then(|()| stdout.flush())
        .map_err(|error| Failure::Input(format!("cannot write standard output: {error}")))
}

fn read_stdin() -> Result<Vec<u8>, Failure> {
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut input)
        .map_err(|error| Failure::Input(format!("cannot read standard input: {error}")))?;
    Ok(input)
}

fn parse_spec(options: &[String]) -> Result<BatchSpec, Failure> {
    let mut spec = BatchSpec::default();
    let mut options = options.iter();
    while let Some(option) = options.next() {
        match option.as_str() {
            "--zstd" => spec.compression = Compression::Zstd,
            "--log-append-time" => spec.timestamp_type = TimestampType::LogAppendTime,
            "--transactional" => spec.is_transactional = true,
            "--base-offset" => spec.base_offset = number(option, options.next())?,
            "--partition-leader-epoch" => {
                spec.partition_leader_epoch = number(option, options.next())?;
            }
            "--producer-id" => spec.producer_id = number(option, options.next())?,
            "--producer-epoch" => spec.producer_epoch = number(option, options.next())?,
            "--base-sequence" => spec.base_sequence = number(option, options.next())?,
            other => return Err(Failure::Usage(format!("unknown option {other}"))),
        }
    }
    Ok(spec)
}

fn number<T: std::str::FromStr>(option: &str, value: Option<&String>) -> Result<T, Failure> {
    let value = value.ok_or_else(|| Failure::Usage(format!("{option} needs a value")))?;
    value
        .parse()
        .map_err(|_| Failure::Usage(format!("{option}: {value} is not a valid number here")))
}

fn decode(input: &[u8]) -> Result<Vec<u8>, Failure> {
    let limits = DecodeLimits {
        max_batch_bytes: TOOL_BATCH_BYTES_MAX,
        max_decompressed_bytes: TOOL_DECOMPRESSED_BYTES_MAX,
    };
    let mut output = Vec::new();
    let mut iter = batches(input, limits.max_batch_bytes);
    loop {
        let at = iter.position();
        let Some(item) = iter.next() else {
            break;
        };
        let (header, batch) =
            item.map_err(|error| Failure::Input(format!("bad batch at byte {at}: {error}")))?;
        let records = decode_records(&header, batch, &limits)
            .map_err(|error| Failure::Input(format!("bad batch at byte {at}: {error}")))?;
        for record in records {
            let line = json!({
                "offset": record.offset,
                "timestamp": record.timestamp,
                "key_hex": record.key.as_deref().map(to_hex),
                "value_hex": record.value.as_deref().map(to_hex),
                "headers": record
                    .headers
                    .iter()
                    .map(|header| json!([header.key, header.value.as_deref().map(to_hex)]))
                    .collect::<Vec<Value>>(),
                "base_offset": header.base_offset,
                "partition_leader_epoch": header.partition_leader_epoch,
                "producer_id": header.producer_id,
                "producer_epoch": header.producer_epoch,
                "base_sequence": header.base_sequence,
                "is_transactional": header.is_transactional(),
                "is_control": header.is_control(),
                "timestamp_type": timestamp_type_name(&header),
                "compression": compression_name(&header),
            });
            output.extend_from_slice(line.to_string().as_bytes());
            output.push(b'\n');
        }
    }
    let rest = input.len() - iter.position();
    if rest > 0 {
        return Err(Failure::Input(format!(
            "input ends inside a batch: {rest} bytes after byte {} are not a whole batch",
            iter.position()
        )));
    }
    Ok(output)
}

fn encode(spec: &BatchSpec, input: &[u8]) -> Result<Vec<u8>, Failure> {
    let text = std::str::from_utf8(input)
        .map_err(|_| Failure::Input("input is not UTF-8 JSON lines".to_owned()))?;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = index + 1;
        let fail = |message: String| Failure::Input(format!("line {line_number}: {message}"));
        let parsed: InputRecord =
            serde_json::from_str(line).map_err(|error| fail(error.to_string()))?;
        let mut headers = Vec::with_capacity(parsed.headers.len());
        for (key, value_hex) in parsed.headers {
            let value = optional_hex(value_hex.as_deref()).map_err(&fail)?;
            headers.push(Header { key, value });
        }
        records.push(Record {
            timestamp: parsed.timestamp,
            key: optional_hex(parsed.key_hex.as_deref()).map_err(&fail)?,
            value: optional_hex(parsed.value_hex.as_deref()).map_err(&fail)?,
            headers,
        });
    }
    let mut output = BytesMut::new();
    encode_batch(spec, &records, &mut output)
        .map_err(|error| Failure::Input(format!("cannot encode: {error}")))?;
    Ok(output.to_vec())
}

fn timestamp_type_name(header: &BatchHeader) -> &'static str {
    match header.timestamp_type() {
        TimestampType::CreateTime => "create_time",
        TimestampType::LogAppendTime => "log_append_time",
    }
}

fn compression_name(header: &BatchHeader) -> &'static str {
    match header.compression() {
        Ok(Compression::None) => "none",
        Ok(Compression::Gzip) => "gzip",
        Ok(Compression::Snappy) => "snappy",
        Ok(Compression::Lz4) => "lz4",
        Ok(Compression::Zstd) => "zstd",
        Err(_) => "unknown",
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

fn optional_hex(hex: Option<&str>) -> Result<Option<Bytes>, String> {
    hex.map(from_hex).transpose()
}

fn from_hex(hex: &str) -> Result<Bytes, String> {
    if !hex.len().is_multiple_of(2) {
        return Err(format!("hex string of odd length {}", hex.len()));
    }
    let digit = |byte: u8| -> Result<u8, String> {
        char::from(byte)
            .to_digit(16)
            .map(|value| value as u8)
            .ok_or_else(|| format!("{:?} is not a hex digit", char::from(byte)))
    };
    hex.as_bytes()
        .chunks_exact(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect::<Result<Vec<u8>, String>>()
        .map(Bytes::from)
}
