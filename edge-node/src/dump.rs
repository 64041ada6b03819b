//! `silt-edge dump`: prints the records of a stopped node's data directory as JSON lines.
//!
//! The output format is an interface (scripts parse it), so it is fixed here and in the
//! command's help: one object per record with the fields `topic`, `partition`, `offset`,
//! `timestamp`, `key`, `value` and `headers`, in that order. Bytes that are valid UTF-8 are a
//! JSON string; other bytes are `{"base64": "..."}` (standard alphabet, padded), so a value
//! never changes meaning with its content; null stays null. Headers are `[key, value]` pairs in
//! record order, repeated keys kept.
//!
//! Dump opens the directory with [`LogManager::open`], as the node does, because that is the
//! one reader that checks what it reads; it therefore needs the directory to itself and closes
//! it cleanly when done, so a dump never turns a clean directory into one that needs recovery.

use std::fmt;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use silt_log::batch::{self, DecodeLimits};
use silt_log::{LogConfig, LogError, LogManager, PartitionLog};

use crate::cli::DumpArgs;

/// Exit status when the data directory cannot be opened or read.
const EXIT_FAILED: u8 = 1;
/// Exit status for bad usage: clap's, and a topic or partition that does not exist.
const EXIT_USAGE: u8 = 2;
/// Most bytes asked of one partition read; a larger batch still comes back whole.
const READ_BYTES_MAX: usize = 1 << 20;
/// Stdout buffer: one write per this many bytes of JSON rather than one per record.
const OUTPUT_BUFFER_BYTES: usize = 64 << 10;
/// The file `LogManager::open` writes into a new data directory (see the on-disk format in
/// ARCHITECTURE.md). Dump looks for it first so that a mistyped path is an error rather than
/// a new, empty data directory.
const META_FILE: &str = "meta.json";

/// Why a dump stopped early.
#[derive(Debug)]
pub(crate) enum DumpError {
    /// The arguments name something the data directory does not have.
    Usage(String),
    /// The data directory could not be opened, read or closed.
    Failed(String),
    /// Stdout was closed by its reader (EPIPE): not a failure, the reader has what it wanted.
    OutputClosed,
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DumpError::Usage(message) | DumpError::Failed(message) => f.write_str(message),
            DumpError::OutputClosed => f.write_str("stdout was closed"),
        }
    }
}

impl DumpError {
    fn output(error: io::Error) -> DumpError {
        if error.kind() == io::ErrorKind::BrokenPipe {
            DumpError::OutputClosed
        } else {
            DumpError::Failed(format!("cannot write to stdout: {error}"))
        }
    }
}

/// Runs `silt-edge dump` with stdout as the output, and returns the process's exit status.
pub(crate) fn main(args: &DumpArgs) -> ExitCode {
    let mut out = BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, io::stdout().lock());
    match dump(args, &mut out) {
        Ok(()) | Err(DumpError::OutputClosed) => ExitCode::SUCCESS,
        Err(error @ DumpError::Usage(_)) => {
            eprintln!("silt-edge dump: {error}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(error @ DumpError::Failed(_)) => {
            eprintln!("silt-edge dump: {error}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Opens the data directory, writes the records `args` select to `out` as JSON lines, and
/// closes the directory cleanly, even when the dump itself stopped early.
pub(crate) fn dump(args: &DumpArgs, out: &mut impl Write) -> Result<(), DumpError> {
    let log = open(&args.data_dir)?;
    let result = dump_open(&log, args, out);
    let closed = log.close().map_err(|error| {
        DumpError::Failed(format!(
            "cannot close data directory {} cleanly: {error}",
            args.data_dir.display()
        ))
    });
    result.and(closed)
}

fn open(data_dir: &Path) -> Result<Arc<LogManager>, DumpError> {
    if !data_dir.join(META_FILE).is_file() {
        return Err(DumpError::Failed(format!(
            "{} is not a silt data directory: it has no {META_FILE}",
            data_dir.display()
        )));
    }
    // Only the data directory matters to a reader: topics keep their own config on disk, and
    // nothing is appended, so the budget and flush settings of the node are irrelevant.
    LogManager::open(LogConfig::new(data_dir)).map_err(|error| match error {
        LogError::Locked { path } => DumpError::Failed(format!(
            "data directory {} is in use by a running node; stop the node first, dump needs \
             the directory to itself",
            path.display()
        )),
        error => DumpError::Failed(format!(
            "cannot open data directory {}: {error}",
            data_dir.display()
        )),
    })
}

fn dump_open(log: &LogManager, args: &DumpArgs, out: &mut impl Write) -> Result<(), DumpError> {
    for partition in selected_partitions(log, args)? {
        dump_partition(&partition, out)?;
    }
    out.flush().map_err(DumpError::output)
}

/// The partitions `args` select, in output order.
fn selected_partitions(
    log: &LogManager,
    args: &DumpArgs,
) -> Result<Vec<Arc<PartitionLog>>, DumpError> {
    let topics = match &args.topic {
        None => log.topics(),
        Some(name) => match log.topic(name) {
            Some(topic) => vec![topic],
            None => {
                let names: Vec<String> = log.topics().into_iter().map(|t| t.name).collect();
                return Err(DumpError::Usage(format!(
                    "unknown topic {name:?}; the data directory has {}",
                    if names.is_empty() {
                        "no topics".to_string()
                    } else {
                        format!("topics {}", names.join(", "))
                    }
                )));
            }
        },
    };
    let mut partitions = Vec::new();
    for topic in topics {
        let numbers = match args.partition {
            Some(number) if number < topic.partitions => number..number + 1,
            Some(number) => {
                return Err(DumpError::Usage(format!(
                    "unknown partition {number} of topic {:?}, which has partitions 0 to {}",
                    topic.name,
                    topic.partitions - 1
                )));
            }
            None => 0..topic.partitions,
        };
        for number in numbers {
            let partition = log.partition(&topic.name, number).map_err(|error| {
                DumpError::Failed(format!(
                    "cannot open partition {number} of {:?}: {error}",
                    topic.name
                ))
            })?;
            partitions.push(partition);
        }
    }
    Ok(partitions)
}

/// Prints every record of `partition` from its first local offset to the end readers see.
fn dump_partition(partition: &PartitionLog, out: &mut impl Write) -> Result<(), DumpError> {
    let failed = |error: &dyn fmt::Display| {
        DumpError::Failed(format!(
            "cannot read partition {} of {:?}: {error}",
            partition.partition(),
            partition.topic()
        ))
    };
    // The log's own batches were checked on append and recovery; the read size bounds them
    // already, so only decompression needs the default limit.
    let limits = DecodeLimits {
        max_batch_bytes: usize::MAX,
        ..DecodeLimits::default()
    };
    // Below the local start, data lives only in a cold tier (none on an edge today).
    let mut offset = partition
        .log_start_offset()
        .max(partition.local_start_offset());
    loop {
        let slice = partition
            .read(offset, READ_BYTES_MAX)
            .map_err(|error| failed(&error))?;
        if slice.bytes.is_empty() {
            return Ok(());
        }
        let mut position = 0;
        while position < slice.bytes.len() {
            let Some((header, records, len)) =
                batch::decode_batch(&slice.bytes[position..], &limits)
                    .map_err(|error| failed(&error))?
            else {
                return Err(failed(&"a read returned a partial batch"));
            };
            position += len;
            let next = u64::try_from(header.last_offset())
                .ok()
                .and_then(|last| last.checked_add(1))
                .ok_or_else(|| failed(&"a batch has a negative last offset"))?;
            if !header.is_control() {
                for record in records.iter().filter(|r| r.offset >= offset as i64) {
                    write_record(partition, record, out)?;
                }
            }
            if next <= offset {
                return Err(failed(&format!(
                    "batch ending at offset {} does not move past offset {offset}",
                    next - 1
                )));
            }
            offset = next;
        }
    }
}

fn write_record(
    partition: &PartitionLog,
    record: &batch::DecodedRecord,
    out: &mut impl Write,
) -> Result<(), DumpError> {
    let line = RecordLine {
        topic: partition.topic(),
        partition: partition.partition(),
        offset: record.offset,
        timestamp: record.timestamp,
        key: record.key.as_deref().map(JsonBytes),
        value: record.value.as_deref().map(JsonBytes),
        headers: record
            .headers
            .iter()
            .map(|header| (header.key.as_str(), header.value.as_deref().map(JsonBytes)))
            .collect(),
    };
    serde_json::to_writer(&mut *out, &line).map_err(|error| match error.io_error_kind() {
        Some(kind) => DumpError::output(io::Error::from(kind)),
        None => DumpError::Failed(format!("cannot encode a record as JSON: {error}")),
    })?;
    out.write_all(b"\n").map_err(DumpError::output)
}

/// One output line. Field order is the output's field order.
#[derive(Debug, Serialize)]
struct RecordLine<'a> {
    topic: &'a str,
    partition: u32,
    offset: i64,
    timestamp: i64,
    key: Option<JsonBytes<'a>>,
    value: Option<JsonBytes<'a>>,
    headers: Vec<(&'a str, Option<JsonBytes<'a>>)>,
}

/// Bytes as JSON: a string when they are UTF-8, else `{"base64": "..."}`.
#[derive(Debug)]
struct JsonBytes<'a>(&'a [u8]);

impl Serialize for JsonBytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("base64", &BASE64.encode(self.0))?;
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use silt_log::batch::{BatchSpec, Header, Record, encode_batch};

    use super::*;

    fn args(data_dir: &Path, topic: Option<&str>, partition: Option<u32>) -> DumpArgs {
        DumpArgs {
            data_dir: data_dir.to_path_buf(),
            topic: topic.map(str::to_string),
            partition,
        }
    }

    fn append(log: &LogManager, topic: &str, partition: u32, records: &[Record]) {
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), records, &mut batch).unwrap();
        log.partition(topic, partition)
            .unwrap()
            .append(&mut batch)
            .unwrap();
    }

    fn record(timestamp: i64, key: Option<&[u8]>, value: Option<&[u8]>) -> Record {
        Record {
            timestamp,
            key: key.map(Bytes::copy_from_slice),
            value: value.map(Bytes::copy_from_slice),
            headers: Vec::new(),
        }
    }

    fn dump_to_string(args: &DumpArgs) -> Result<String, DumpError> {
        let mut out = Vec::new();
        dump(args, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn bytes_are_strings_when_utf8_and_base64_otherwise() {
        let line = RecordLine {
            topic: "t",
            partition: 3,
            offset: 9,
            timestamp: -1,
            key: None,
            value: Some(JsonBytes(&[0xff, 0x00, b'a'])),
            headers: vec![
                ("h", Some(JsonBytes("é\"\n".as_bytes()))),
                ("h", None),
                ("", Some(JsonBytes(b""))),
            ],
        };
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"topic":"t","partition":3,"offset":9,"timestamp":-1,"key":null,"value":{"base64":"/wBh"},"headers":[["h","é\"\n"],["h",null],["",""]]}"#
        );
    }

    #[test]
    fn dumps_from_the_requested_offsets_and_closes_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path())).unwrap();
        log.create_topic("b", 2, &Default::default()).unwrap();
        log.create_topic("a", 1, &Default::default()).unwrap();
        append(&log, "b", 1, &[record(5, Some(b"k"), Some(b"v"))]);
        append(
            &log,
            "a",
            0,
            &[record(1, None, Some(b"x")), record(2, Some(b"y"), None)],
        );
        log.close().unwrap();
        drop(log);

        let all = dump_to_string(&args(dir.path(), None, None)).unwrap();
        assert_eq!(
            all,
            concat!(
                r#"{"topic":"a","partition":0,"offset":0,"timestamp":1,"key":null,"value":"x","headers":[]}"#,
                "\n",
                r#"{"topic":"a","partition":0,"offset":1,"timestamp":2,"key":"y","value":null,"headers":[]}"#,
                "\n",
                r#"{"topic":"b","partition":1,"offset":0,"timestamp":5,"key":"k","value":"v","headers":[]}"#,
                "\n",
            )
        );
        assert!(dir.path().join(".clean_shutdown").exists());
        let only_b1 = dump_to_string(&args(dir.path(), Some("b"), Some(1))).unwrap();
        assert!(only_b1.starts_with(r#"{"topic":"b","partition":1,"offset":0,"#));
        assert_eq!(
            dump_to_string(&args(dir.path(), Some("b"), Some(0))).unwrap(),
            ""
        );
        assert!(dir.path().join(".clean_shutdown").exists());
    }

    #[test]
    fn unknown_topics_and_partitions_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path())).unwrap();
        log.create_topic("a", 2, &Default::default()).unwrap();
        log.close().unwrap();
        drop(log);

        let error = dump_to_string(&args(dir.path(), Some("nope"), None)).unwrap_err();
        assert!(matches!(error, DumpError::Usage(_)), "{error}");
        assert_eq!(
            error.to_string(),
            "unknown topic \"nope\"; the data directory has topics a"
        );
        let error = dump_to_string(&args(dir.path(), Some("a"), Some(2))).unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown partition 2 of topic \"a\", which has partitions 0 to 1"
        );
        assert!(
            dir.path().join(".clean_shutdown").exists(),
            "a failed dump still closes the directory cleanly"
        );
    }

    #[test]
    fn a_path_that_is_not_a_data_directory_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("typo");
        let error = dump_to_string(&args(&missing, None, None)).unwrap_err();
        assert!(matches!(error, DumpError::Failed(_)), "{error}");
        assert!(error.to_string().contains("has no meta.json"), "{error}");
        assert!(!missing.exists());
    }

    #[test]
    fn a_closed_output_stops_the_dump_quietly() {
        struct ClosedPipe;
        impl Write for ClosedPipe {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path())).unwrap();
        log.create_topic("a", 1, &Default::default()).unwrap();
        let header = Header {
            key: "h".into(),
            value: None,
        };
        let mut first = record(1, None, Some(b"x"));
        first.headers.push(header);
        append(&log, "a", 0, &[first]);
        log.close().unwrap();
        drop(log);

        let error = dump(&args(dir.path(), None, None), &mut ClosedPipe).unwrap_err();
        assert!(matches!(error, DumpError::OutputClosed), "{error}");
        assert!(dir.path().join(".clean_shutdown").exists());
    }
}
