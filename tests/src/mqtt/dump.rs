//! `silt-edge dump` run on a stopped node's data directory, its JSON lines parsed into records,
//! so tests can check what the log holds.

use std::path::Path;

use serde_json::Value;

use crate::{command, silt_edge};

/// One record as `silt-edge dump` prints it. Keys, values and header values that are not
/// UTF-8 keep the dump's `{"base64": ...}` form as the text `base64:...`; test payloads are
/// text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, Option<String>)>,
}

impl DumpRecord {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.as_deref())
    }

    /// Every value of the headers named `name`, in order.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(key, _)| key == name)
            .filter_map(|(_, value)| value.as_deref())
            .collect()
    }
}

/// Every record of log topic `topic`, partition by partition in offset order, read with
/// `silt-edge dump --data-dir DIR --topic TOPIC`. The node must be stopped.
///
/// # Panics
/// If the dump fails (the topic does not exist, say) or prints something that is not a record.
pub fn dump_topic(data_dir: &Path, topic: &str) -> Vec<DumpRecord> {
    let output = command(&silt_edge())
        .arg("dump")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--topic", topic])
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot run silt-edge dump");
    assert!(
        output.status.success(),
        "silt-edge dump --topic {topic} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("dump prints UTF-8")
        .lines()
        .map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> DumpRecord {
    let json: Value =
        serde_json::from_str(line).unwrap_or_else(|error| panic!("{error} in {line:?}"));
    let number = |field: &str| {
        json[field]
            .as_i64()
            .unwrap_or_else(|| panic!("no integer {field} in {line:?}"))
    };
    let headers = json["headers"]
        .as_array()
        .unwrap_or_else(|| panic!("no headers array in {line:?}"))
        .iter()
        .map(|pair| {
            let name = pair[0]
                .as_str()
                .unwrap_or_else(|| panic!("a header without a name in {line:?}"));
            (name.to_string(), bytes_text(&pair[1], line))
        })
        .collect();
    DumpRecord {
        topic: json["topic"]
            .as_str()
            .unwrap_or_else(|| panic!("no topic in {line:?}"))
            .to_string(),
        partition: u32::try_from(number("partition")).expect("a partition fits u32"),
        offset: number("offset"),
        timestamp: number("timestamp"),
        key: bytes_text(&json["key"], line),
        value: bytes_text(&json["value"], line),
        headers,
    }
}

fn bytes_text(value: &Value, line: &str) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        Value::Object(map) => match map.get("base64").and_then(Value::as_str) {
            Some(encoded) => Some(format!("base64:{encoded}")),
            None => panic!("bytes as an object without base64 in {line:?}"),
        },
        other => panic!("bytes as {other} in {line:?}"),
    }
}
