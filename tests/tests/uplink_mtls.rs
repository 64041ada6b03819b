//! Mutual TLS on the uplink: `silt-core issue-cert` issues an edge certificate from the core's
//! development CA; with `uplink.client_ca` set, an edge presenting it ships, an edge claiming
//! another id with it is refused, and an edge without a certificate cannot connect.

use std::path::Path;
use std::time::{Duration, Instant};

use silt_tests::core::{Core, field_addr};
use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::{MqttBroker, skip_unless_silt};
use silt_tests::uplink::{core_ca, metric_sum, publish_numbered, start_edge, wait_drained};
use silt_tests::{command, silt_core};

const TIMEOUT: Duration = Duration::from_secs(30);

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

fn issue_cert(core_dir: &Path, edge_id: &str, out: &Path) {
    let output = command(&silt_core())
        .arg("issue-cert")
        .arg("--data-dir")
        .arg(core_dir)
        .args(["--edge-id", edge_id])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "issue-cert failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Waits until the edge's stderr shows the uplink refused or failing, with `needle`.
fn wait_for_log(edge: &mut MqttBroker, needle: &str) {
    edge.process().wait_for_stderr(needle, TIMEOUT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_need_their_own_certificate_when_mutual_tls_is_on() {
    if !skip_unless_silt("uplink_mtls") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    // First start creates the CA; the second requires client certificates from it.
    blocking(|| Core::start(&core_dir, &[]).stop());
    let ca = core_ca(&core_dir);
    let certs = dir.path().join("certs");
    blocking(|| issue_cert(&core_dir, "edge-a", &certs));
    let client_ca = format!("uplink.client_ca={}", ca.display());
    let core = blocking(|| Core::start(&core_dir, &["--set", &client_ca]));
    let uplink = field_addr(&core.started_line, "uplink=");
    let cert = certs.join("edge-a.pem").display().to_string();
    let key = certs.join("edge-a-key.pem").display().to_string();

    // The right edge ships.
    let mut good = blocking(|| {
        start_edge(
            &dir.path().join("good"),
            "edge-a",
            uplink,
            &certs.join("ca.pem"),
            &[("uplink.cert", &cert), ("uplink.key", &key)],
        )
    });
    let acked = publish_numbered(good.mqtt, "mtls-good", "sensor/good", 0, 20).await;
    assert_eq!(acked.len(), 20);
    blocking(|| wait_drained(&good, TIMEOUT));

    // Another edge id with edge-a's certificate is refused by the core.
    let mut impostor = blocking(|| {
        start_edge(
            &dir.path().join("impostor"),
            "edge-b",
            uplink,
            &ca,
            &[("uplink.cert", &cert), ("uplink.key", &key)],
        )
    });
    assert_eq!(
        publish_numbered(impostor.mqtt, "mtls-bad", "sensor/bad", 0, 5)
            .await
            .len(),
        5
    );
    blocking(|| wait_for_log(&mut impostor, "the client certificate is not for edge"));

    // No certificate at all: the handshake fails.
    let mut anonymous =
        blocking(|| start_edge(&dir.path().join("anon"), "edge-c", uplink, &ca, &[]));
    assert_eq!(
        publish_numbered(anonymous.mqtt, "mtls-anon", "sensor/anon", 0, 5)
            .await
            .len(),
        5
    );
    blocking(|| wait_for_log(&mut anonymous, "uplink down"));
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert_eq!(
            metric_sum(
                &blocking(|| anonymous.metrics()),
                "silt_uplink_acked_bytes_total"
            ),
            0.0
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for edge in [&mut good, &mut impostor, &mut anonymous] {
        blocking(|| edge.stop());
    }
    blocking(|| core.stop());
    let records = blocking(|| dump_topic(&core_dir, "mqtt"));
    assert_eq!(records.len(), 20, "only edge-a's records reach the core");
    assert!(
        records
            .iter()
            .all(|record| record.header("silt.edge") == Some("edge-a"))
    );
}
