//! The archive as analysts see it: real DuckDB and pyarrow (from the test venv that
//! `scripts/test` builds) query a `file://` archive written by `ArchiveWriter`, in place, with
//! Hive partitioning, and find the records, the footer metadata, statistics and a page index.

use std::path::PathBuf;
use std::process::Command;

use bytes::{Bytes, BytesMut};
use silt_log::batch::{BatchSpec, Compression, Header, Record, encode_batch};
use silt_tiering::{ArchiveStore, ArchiveWriter};

/// The venv's Python: `SILT_PYTHON`, else `<workspace>/.venv/bin/python`.
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("SILT_PYTHON") {
        return path.into();
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        path.exists(),
        "{} is missing: run scripts/test (it builds the venv with duckdb and pyarrow)",
        path.display()
    );
    path
}

const CHECK: &str = r#"
import json, sys, glob
import duckdb, pyarrow.parquet as pq

root = sys.argv[1]
files = sorted(glob.glob(f"{root}/**/*.parquet", recursive=True))
out = {"files": len(files)}
con = duckdb.connect()
out["duckdb"] = con.execute(
    f"""select count(*), min("offset"), max("offset"), any_value(topic), min(partition),
               count(distinct "date"), sum(len(headers)), count(*) filter (where key is null),
               min(timestamp)::varchar
        from read_parquet('{root}/**/*.parquet', hive_partitioning = true)"""
).fetchone()
out["duckdb_filtered"] = con.execute(
    f"""select count(*) from read_parquet('{root}/**/*.parquet', hive_partitioning = true)
        where "offset" between 100 and 199 and decode(value) like '%reading%'"""
).fetchone()[0]
out["duckdb_header"] = con.execute(
    f"""select headers[1].key, decode(headers[1].value)
        from read_parquet('{root}/**/*.parquet') where "offset" = 1"""
).fetchone()
f = pq.ParquetFile(files[0])
meta = f.metadata
out["footer"] = {k.decode(): v.decode() for k, v in meta.metadata.items() if k.startswith(b"silt.")}
out["row_groups"] = meta.num_row_groups
column = meta.row_group(0).column(0)
out["offset_stats"] = [column.statistics.min, column.statistics.max]
out["page_index"] = [column.has_offset_index, column.has_column_index]
out["compression"] = column.compression
out["timestamp_type"] = str(f.schema_arrow.field("timestamp").type)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_and_pyarrow_query_the_archive_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("objects");
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();

    // 1,000 records in batches of 10; every third record has no key.
    let mut writer = ArchiveWriter::new(store, "mqtt", 0, 0, 999).unwrap();
    for batch_index in 0..100i64 {
        let records: Vec<Record> = (0..10i64)
            .map(|n| {
                let offset = batch_index * 10 + n;
                Record {
                    // 2026-11-22T00:00:00Z plus one second per record.
                    timestamp: 1_795_305_600_000 + offset * 1000,
                    key: (offset % 3 != 0).then(|| Bytes::from(format!("sensors/{}", offset % 4))),
                    value: Some(Bytes::from(format!("{{\"reading\":{offset}}}"))),
                    headers: vec![Header {
                        key: "mqtt.qos".into(),
                        value: Some(Bytes::from_static(b"1")),
                    }],
                }
            })
            .collect();
        let spec = BatchSpec {
            base_offset: batch_index * 10,
            compression: Compression::Zstd,
            ..BatchSpec::default()
        };
        let mut bytes = BytesMut::new();
        encode_batch(&spec, &records, &mut bytes).unwrap();
        writer.push_batch(&bytes).await.unwrap();
    }
    writer.finish().await.unwrap();

    let output = Command::new(python())
        .args(["-c", CHECK])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(got["files"], 1);
    assert_eq!(
        got["duckdb"],
        serde_json::json!([
            1000,
            0,
            999,
            "mqtt",
            0,
            1,
            1000,
            334,
            "2026-11-22 00:00:00+00"
        ]),
        "{got}"
    );
    assert_eq!(got["duckdb_filtered"], 100, "{got}");
    assert_eq!(got["duckdb_header"], serde_json::json!(["mqtt.qos", "1"]));
    assert_eq!(
        got["footer"],
        serde_json::json!({
            "silt.format": "1",
            "silt.topic": "mqtt",
            "silt.partition": "0",
            "silt.base_offset": "0",
            "silt.last_offset": "999",
            "silt.records": "1000",
            "silt.min_timestamp_ms": "1795305600000",
            "silt.max_timestamp_ms": "1795306599000",
        })
    );
    assert_eq!(got["row_groups"], 1);
    assert_eq!(got["offset_stats"], serde_json::json!([0, 999]));
    assert_eq!(got["page_index"], serde_json::json!([true, true]));
    assert_eq!(got["compression"], "ZSTD");
    assert_eq!(got["timestamp_type"], "timestamp[us, tz=UTC]");
}
