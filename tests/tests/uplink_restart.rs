//! The core's restart cost: after a clean stop, the uplink's dedup state comes from the
//! checkpoint written at shutdown and the restarted core scans no records to rebuild it;
//! without the checkpoint it scans the whole topic. Exactly once holds either way. And an
//! edge restarted on a data directory made anew (a new card) gets its new records shipped,
//! not taken for duplicates of the old log's offsets; so does an edge whose data directory
//! was restored from a backup, with or without its uplink state, and two edges running one
//! copied card image at once.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use silt_tests::core::{Core, field_addr};
use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::skip_unless_silt;
use silt_tests::uplink::{
    check_exactly_once, collect_acked, core_ca, metric_sum, publish_numbered,
    start_core_behind_proxy_with_edge, start_edge, start_publishers, wait_drained,
};

const CLIENTS: usize = 3;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const EDGE_ID: &str = "edge-restart";
const CORE_ARGS: [&str; 2] = ["--set", "kafka.default_partitions=3"];

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// Publishes `from..to` on every client (topic `sensor/<client>`) and records what was acked.
async fn publish(
    mqtt: std::net::SocketAddr,
    from: u64,
    to: u64,
    acked: &mut HashMap<String, Vec<u64>>,
) {
    collect_acked(
        start_publishers(mqtt, "uplink-restart", CLIENTS, from, to),
        acked,
    )
    .await;
}

/// Records the restarted core scanned to rebuild its dedup state.
fn scanned(core: &Core) -> f64 {
    metric_sum(&core.metrics(), "silt_uplink_dedup_scanned_records_total")
}

/// Checks the stopped core's records of `mqtt`: every acknowledged message exactly once,
/// `per_client` of them from each client. Returns the edge logs they name.
fn check_stored(
    core_dir: &Path,
    acked: &HashMap<String, Vec<u64>>,
    per_client: usize,
) -> HashSet<String> {
    let records = blocking(|| dump_topic(core_dir, "mqtt"));
    assert_eq!(
        check_exactly_once(&records, EDGE_ID, acked),
        CLIENTS * per_client
    );
    records
        .iter()
        .map(|record| {
            record
                .header("silt.edge.log")
                .expect("every record names its edge log")
                .to_string()
        })
        .collect()
}

fn checkpoint_file(core_dir: &Path) -> std::path::PathBuf {
    let mut dir = core_dir.as_os_str().to_owned();
    dir.push(".uplink");
    Path::new(&dir).join("dedup").join("mqtt.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_rebuilds_dedup_state_from_its_checkpoint_not_a_scan() {
    if !skip_unless_silt("uplink_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    let (core, proxy, mut edge) =
        blocking(|| start_core_behind_proxy_with_edge(dir.path(), &CORE_ARGS, EDGE_ID));
    let mut acked = HashMap::new();

    publish(edge.mqtt, 0, 200, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    let total = (CLIENTS * 200) as f64;
    assert_eq!(
        blocking(|| scanned(&core)),
        0.0,
        "a new topic has nothing to scan"
    );
    blocking(|| core.stop());
    assert!(
        checkpoint_file(&core_dir).exists(),
        "a clean stop writes the checkpoint"
    );

    // Restarted from the checkpoint: the edge's next batch touches the topic, nothing is
    // scanned.
    let core = blocking(|| Core::start(&core_dir, &CORE_ARGS));
    proxy.set_target(field_addr(&core.started_line, "uplink="));
    publish(edge.mqtt, 200, 220, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    assert_eq!(
        blocking(|| scanned(&core)),
        0.0,
        "the checkpoint written at shutdown covers the whole topic"
    );
    blocking(|| core.stop());

    // Without the checkpoint the same restart scans every record of the topic.
    std::fs::remove_file(checkpoint_file(&core_dir)).unwrap();
    let core = blocking(|| Core::start(&core_dir, &CORE_ARGS));
    proxy.set_target(field_addr(&core.started_line, "uplink="));
    publish(edge.mqtt, 220, 230, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    assert_eq!(blocking(|| scanned(&core)), total + (CLIENTS * 20) as f64);

    blocking(|| edge.stop());
    blocking(|| core.stop());
    let records = blocking(|| dump_topic(&core_dir, "mqtt"));
    let distinct = check_exactly_once(&records, EDGE_ID, &acked);
    assert_eq!(distinct, CLIENTS * 230);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_whose_data_directory_was_made_anew_has_its_new_records_shipped() {
    if !skip_unless_silt("uplink_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    let edge_dir = dir.path().join("edge");
    let (core, proxy, mut edge) =
        blocking(|| start_core_behind_proxy_with_edge(dir.path(), &CORE_ARGS, EDGE_ID));
    let mut acked = HashMap::new();
    publish(edge.mqtt, 0, 200, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));

    // The data directory lost and made anew under the same edge id, its uplink state kept:
    // the new log counts offsets from 0 again, below where the old cursors and the core's
    // dedup state stand.
    blocking(|| edge.stop());
    std::fs::remove_dir_all(&edge_dir).unwrap();
    let start = || start_edge(&edge_dir, EDGE_ID, proxy.addr, &core_ca(&core_dir), &[]);
    edge = blocking(start);
    publish(edge.mqtt, 200, 300, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));

    // A new card: data and uplink state both gone.
    blocking(|| edge.stop());
    std::fs::remove_dir_all(&edge_dir).unwrap();
    let mut state_dir = edge_dir.as_os_str().to_owned();
    state_dir.push(".uplink");
    std::fs::remove_dir_all(&state_dir).unwrap();
    edge = blocking(start);
    publish(edge.mqtt, 300, 350, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    assert_eq!(
        blocking(|| metric_sum(&core.metrics(), "silt_uplink_duplicate_records_total")),
        0.0,
        "nothing of a new log is a duplicate of an old one's"
    );

    blocking(|| edge.stop());
    blocking(|| core.stop());
    let logs = check_stored(&core_dir, &acked, 350);
    assert_eq!(logs.len(), 3, "three edge logs: {logs:?}");
}

/// Replaces `to` with a copy of `from` (`cp -a`).
fn copy_dir(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap();
    }
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restored_from_a_backup_has_its_new_records_shipped() {
    if !skip_unless_silt("uplink_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    let edge_dir = dir.path().join("edge");
    let state_dir = dir.path().join("edge.uplink");
    let (backup_data, backup_state) = (dir.path().join("backup"), dir.path().join("backup.uplink"));
    let (core, proxy, mut edge) =
        blocking(|| start_core_behind_proxy_with_edge(dir.path(), &CORE_ARGS, EDGE_ID));
    let start = || start_edge(&edge_dir, EDGE_ID, proxy.addr, &core_ca(&core_dir), &[]);
    let mut acked = HashMap::new();
    publish(edge.mqtt, 0, 100, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    blocking(|| edge.stop());
    copy_dir(&edge_dir, &backup_data);
    copy_dir(&state_dir, &backup_state);
    edge = blocking(start);
    publish(edge.mqtt, 100, 200, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    blocking(|| edge.stop());

    // The data directory restored, its uplink state (beside it) not: the cursors stand past
    // the log's end. The edge sees it as it starts, before a record is appended, and ships
    // its new records, which reuse offsets the core has, under a new log id.
    copy_dir(&backup_data, &edge_dir);
    edge = blocking(start);
    publish(edge.mqtt, 200, 250, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    blocking(|| edge.stop());

    // Both restored: the edge cannot tell, but the core can, from the first frame of the
    // stream: the edge's log ends below what the core stores from it.
    copy_dir(&backup_data, &edge_dir);
    copy_dir(&backup_state, &state_dir);
    edge = blocking(start);
    publish(edge.mqtt, 250, 300, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    assert!(
        blocking(|| metric_sum(&core.metrics(), "silt_uplink_log_behind_total")) >= 1.0,
        "the core refused the restored log's stream"
    );

    blocking(|| edge.stop());
    blocking(|| core.stop());
    let logs = check_stored(&core_dir, &acked, 300);
    assert_eq!(logs.len(), 3, "the first log and two new ids: {logs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_from_one_copied_card_have_all_their_records_shipped() {
    if !skip_unless_silt("uplink_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    let edge_dir = dir.path().join("edge");
    let (copy_dir_path, copy_state) = (dir.path().join("copy"), dir.path().join("copy.uplink"));
    let (core, proxy, mut edge) =
        blocking(|| start_core_behind_proxy_with_edge(dir.path(), &CORE_ARGS, EDGE_ID));
    let mut acked = HashMap::new();
    publish(edge.mqtt, 0, 100, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    blocking(|| edge.stop());

    // The card imaged after the edge ran on it, and flashed to a second board: the same
    // edge id (a default hostname), log id and offsets. Its meta.json names the device the
    // edge last ran on; here both run on one machine, so the copy's is made another's.
    copy_dir(&edge_dir, &copy_dir_path);
    copy_dir(&dir.path().join("edge.uplink"), &copy_state);
    let meta_path = copy_dir_path.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    assert!(
        meta["host"].is_string(),
        "the edge recorded its device: {meta}"
    );
    meta["host"] = "0123456789abcdef".into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();

    // The copy runs first and ships new records at the log's next offsets. Then the
    // original, cut off from the core meanwhile (its uplink points at a port where nothing
    // answers), took more records than that: when it reconnects its log ends past what the
    // core has from the copy, so the core cannot tell. Only the copy's own check can: the
    // device it runs on is not the one its meta.json names.
    let ca = core_ca(&core_dir);
    let mut copy = blocking(|| start_edge(&copy_dir_path, EDGE_ID, proxy.addr, &ca, &[]));
    let copies: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let topic = format!("sensor/copy-{client}");
            let mqtt = copy.mqtt;
            tokio::spawn(async move {
                let id = format!("uplink-copy-{client}");
                let values = publish_numbered(mqtt, &id, &topic, 0, 100).await;
                (topic, values, 100)
            })
        })
        .collect();
    collect_acked(copies, &mut acked).await;
    blocking(|| wait_drained(&copy, DRAIN_TIMEOUT));

    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let cut_off = silent.local_addr().unwrap();
    edge = blocking(|| start_edge(&edge_dir, EDGE_ID, cut_off, &ca, &[]));
    publish(edge.mqtt, 100, 300, &mut acked).await;
    blocking(|| edge.stop());
    edge = blocking(|| start_edge(&edge_dir, EDGE_ID, proxy.addr, &ca, &[]));
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));

    blocking(|| copy.stop());
    blocking(|| edge.stop());
    blocking(|| core.stop());
    let logs = check_stored(&core_dir, &acked, 400);
    assert_eq!(
        logs.len(),
        2,
        "the original log and the copy's new id: {logs:?}"
    );
}
