//! Reads across tiers through the real `silt-core`: a partition whose older segments live only
//! in the Parquet archive (archived with the tiering library, then deleted locally) replays
//! from offset 0 byte for byte with kcat, answers ListOffsets by timestamp from the archive,
//! and `silt consume --from-beginning` sees every record.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use silt_log::batch::{BatchSpec, Compression, Header, Record, encode_batch};
use silt_log::{LogConfig, LogManager, TopicConfig};
use silt_tests::cli::{json_lines, silt_ok};
use silt_tests::core::Core;
use silt_tiering::{ArchiveStore, Manifest, OffloadPolicy, offload_next};

const TOPIC: &str = "history";
const RECORDS: i64 = 3000;
const PER_BATCH: i64 = 10;

fn record(offset: i64, base_ts: i64) -> Record {
    Record {
        timestamp: base_ts + offset * 7,
        key: Some(Bytes::from(format!("device-{}", offset % 17))),
        value: Some(Bytes::from(format!(
            "{{\"n\":{offset},\"t\":{}.{}}}",
            offset % 40,
            offset % 10
        ))),
        headers: if offset % 4 == 0 {
            vec![]
        } else {
            vec![
                Header {
                    key: "src".into(),
                    value: Some(Bytes::from(format!("edge-{}", offset % 3))),
                },
                Header {
                    key: "seq".into(),
                    value: Some(Bytes::from(offset.to_string())),
                },
            ]
        },
    }
}

/// What kcat prints for a record with `-f '%o|%k|%s|%h|%T\n'`.
fn kcat_line(offset: i64, record: &Record) -> String {
    let text = |bytes: &Option<Bytes>| String::from_utf8(bytes.clone().unwrap().to_vec()).unwrap();
    let headers: Vec<String> = record
        .headers
        .iter()
        .map(|header| format!("{}={}", header.key, text(&header.value)))
        .collect();
    format!(
        "{offset}|{}|{}|{}|{}\n",
        text(&record.key),
        text(&record.value),
        headers.join(","),
        record.timestamp
    )
}

/// Writes the partition with small segments, archives the closed ones into `objects`, deletes
/// them locally; returns the local start offset.
fn build_tiered_data_dir(data: &Path, objects: &Path, base_ts: i64) -> u64 {
    let mut config = LogConfig::new(data);
    config.fs_reserve_bytes = 0;
    config.topic_defaults = TopicConfig::default()
        .with_overrides(
            [("segment.bytes", "16384")]
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect::<BTreeMap<_, _>>()
                .iter(),
        )
        .unwrap();
    let manager = LogManager::open(config).unwrap();
    manager.ensure_topic(TOPIC, 1).unwrap();
    let log = manager.partition(TOPIC, 0).unwrap();
    for first in (0..RECORDS).step_by(PER_BATCH as usize) {
        let records: Vec<Record> = (first..first + PER_BATCH)
            .map(|offset| record(offset, base_ts))
            .collect();
        let spec = BatchSpec {
            compression: if first % 20 == 0 {
                Compression::Zstd
            } else {
                Compression::None
            },
            ..BatchSpec::default()
        };
        let mut batch = BytesMut::new();
        encode_batch(&spec, &records, &mut batch).unwrap();
        log.append(&mut batch).unwrap();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = ArchiveStore::open(&format!("file://{}", objects.display())).unwrap();
    let mut manifest = Manifest::new(TOPIC, 0);
    let policy = OffloadPolicy {
        object_bytes_target: 40 << 10,
        max_wait_ms: 0,
    };
    let later = silt_log::now_ms() + 3_600_000;
    runtime.block_on(async {
        while offload_next(&store, &log, &mut manifest, &policy, later)
            .await
            .unwrap()
            .is_some()
        {}
    });
    assert!(manifest.objects.len() >= 2, "{manifest:?}");
    let archived_below = u64::try_from(manifest.next_offset().unwrap()).unwrap();
    log.delete_local_before(archived_below).unwrap();
    let local_start = log.local_start_offset();
    assert!(
        local_start > 0 && local_start < RECORDS as u64,
        "{local_start}"
    );
    assert_eq!(log.log_start_offset(), 0);
    manager.close().unwrap();
    local_start
}

fn kcat(args: &[&str]) -> String {
    let output = std::process::Command::new("kcat")
        .args(args)
        .output()
        .expect("kcat is installed (scripts/test installs it)");
    assert!(
        output.status.success(),
        "kcat {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn kcat_replays_from_offset_zero_across_both_tiers_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let objects = dir.path().join("objects");
    let base_ts = silt_log::now_ms() - 3_600_000;
    let local_start = build_tiered_data_dir(&data, &objects, base_ts);

    let store_url = format!("file://{}", objects.display());
    // The records are an hour old: compaction would rewrite the library's objects under the
    // replay (it has its own tests).
    let core = Core::start(
        &data,
        &[
            "--object-store",
            &store_url,
            "--set",
            "tiering.compact=false",
        ],
    );
    let b = core.kafka.to_string();

    let replay = kcat(&[
        "-C",
        "-b",
        &b,
        "-t",
        TOPIC,
        "-p",
        "0",
        "-o",
        "0",
        "-e",
        "-f",
        "%o|%k|%s|%h|%T\n",
    ]);
    let expected: String = (0..RECORDS)
        .map(|offset| kcat_line(offset, &record(offset, base_ts)))
        .collect();
    let got: Vec<&str> = replay.lines().collect();
    assert_eq!(got.len(), RECORDS as usize, "local start {local_start}");
    for (line, want) in got.iter().zip(expected.lines()) {
        assert_eq!(*line, want);
    }
    assert_eq!(replay, expected);

    // From an offset inside the archive, and from inside a batch.
    let from = kcat(&[
        "-C",
        "-b",
        &b,
        "-t",
        TOPIC,
        "-p",
        "0",
        "-o",
        "1234",
        "-c",
        "5",
        "-f",
        "%o|%k|%s|%h|%T\n",
    ]);
    let want: String = (1234..1239)
        .map(|offset| kcat_line(offset, &record(offset, base_ts)))
        .collect();
    assert_eq!(from, want);

    // ListOffsets by timestamp: one in the archive, one in the local tier.
    for offset in [777, local_start as i64 + 3] {
        let ts = base_ts + offset * 7 - 3;
        let answer = kcat(&["-Q", "-b", &b, "-t", &format!("{TOPIC}:0:{ts}")]);
        assert!(
            answer.contains(&format!("offset {offset}")),
            "timestamp {ts}: {answer}"
        );
    }

    // Our own consumer, from the beginning (300 records: the test harness reads its stdout
    // only once it exits, so the output must fit a pipe's buffer).
    let consumed = json_lines(&silt_ok(
        &[
            "consume",
            "--bootstrap",
            &b,
            "--topic",
            TOPIC,
            "--from-beginning",
            "--max-messages",
            "300",
            "--timeout-ms",
            "30000",
        ],
        b"",
    ));
    assert_eq!(consumed.len(), 300);
    for (index, value) in consumed.iter().enumerate() {
        let want = record(index as i64, base_ts);
        assert_eq!(value["offset"].as_i64(), Some(index as i64));
        assert_eq!(
            value["value"].as_str().map(str::as_bytes),
            want.value.as_deref()
        );
    }
    core.stop();
}
