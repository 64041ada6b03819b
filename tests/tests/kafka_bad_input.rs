//! The Kafka listener against bad input, over real sockets to the real `silt-core`: garbage
//! and truncated frames and oversized lengths close only the offending connection; an
//! unknown api or an unsupported version gets UNSUPPORTED_VERSION (35) and the connection
//! stays usable; ApiVersions at a version we do not know answers at v0 with our versions.
//! Clients that open too many connections, or claim large requests and never finish them,
//! are held to `kafka.max_connections` and `kafka.queued_max_request_bytes`.

use std::time::{Duration, Instant};

use silt_tests::core::Core;
use silt_tests::kafka::{Answer, RawKafka, Reader, fetch_v4_body, value_batch};
use silt_tests::uplink::metric_sum;

const UNSUPPORTED_VERSION: i16 = 35;
const API_VERSIONS: i16 = 18;
const METADATA: i16 = 3;
const FETCH: i16 = 1;

/// Sends ApiVersions v0 and checks the answer, proving the connection still works.
fn assert_api_versions_works(kafka: &mut RawKafka) {
    let correlation_id = kafka.send(API_VERSIONS, 0, false, &[]);
    let response = kafka.read_response();
    let mut reader = Reader { bytes: &response };
    assert_eq!(reader.i32(), correlation_id);
    assert_eq!(reader.i16(), 0, "error code");
    let count = reader.i32();
    let apis: Vec<(i16, i16, i16)> = (0..count)
        .map(|_| (reader.i16(), reader.i16(), reader.i16()))
        .collect();
    assert!(apis.contains(&(API_VERSIONS, 0, 4)), "{apis:?}");
    assert!(
        apis.iter().any(|(key, _, _)| *key == 0),
        "Produce is advertised"
    );
}

#[test]
fn unknown_apis_and_versions_get_an_error_code_not_a_closed_connection() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(&dir.path().join("data"), &[]);
    let mut kafka = RawKafka::connect(core.kafka);

    // An api key no Kafka has.
    let correlation_id = kafka.send(999, 0, false, &[]);
    let response = kafka.read_response();
    let mut reader = Reader { bytes: &response };
    assert_eq!(reader.i32(), correlation_id);
    assert_eq!(reader.i16(), UNSUPPORTED_VERSION);
    assert_api_versions_works(&mut kafka);

    // A known api we do not implement (DescribeAcls, 29).
    let correlation_id = kafka.send(29, 1, false, &[]);
    let response = kafka.read_response();
    let mut reader = Reader { bytes: &response };
    assert_eq!(reader.i32(), correlation_id);
    assert_eq!(reader.i16(), UNSUPPORTED_VERSION);

    // Metadata at a version above what we advertise.
    let correlation_id = kafka.send(METADATA, 99, true, &[]);
    let response = kafka.read_response();
    let mut reader = Reader { bytes: &response };
    assert_eq!(reader.i32(), correlation_id);
    assert_eq!(reader.i16(), UNSUPPORTED_VERSION);

    // ApiVersions v127 (a future client): answered at v0, error 35, with our versions.
    let correlation_id = kafka.send(API_VERSIONS, 127, true, &[0, 0, 0]);
    let response = kafka.read_response();
    let mut reader = Reader { bytes: &response };
    assert_eq!(reader.i32(), correlation_id);
    assert_eq!(reader.i16(), UNSUPPORTED_VERSION);
    assert!(reader.i32() > 10, "the v0 body lists our apis");
    assert_api_versions_works(&mut kafka);
    core.stop();
}

#[test]
fn broken_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(
        &dir.path().join("data"),
        &["--set", "kafka.max_request_bytes=1MiB"],
    );

    // A length over kafka.max_request_bytes: closed before any of it is buffered.
    let mut kafka = RawKafka::connect(core.kafka);
    kafka.send_bytes(&(64i32 << 20).to_be_bytes());
    assert_eq!(kafka.read_answer(), Answer::Closed);

    // A negative length.
    let mut kafka = RawKafka::connect(core.kafka);
    kafka.send_bytes(&(-5i32).to_be_bytes());
    assert_eq!(kafka.read_answer(), Answer::Closed);

    // Garbage: a frame whose header claims Metadata v1, then a client id longer than the
    // frame, then noise.
    let mut kafka = RawKafka::connect(core.kafka);
    let mut frame = 40i32.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0, 3, 0, 1, 0, 0, 0, 9, 0x7f, 0xff]);
    frame.extend_from_slice(&[0xa5; 30]);
    kafka.send_bytes(&frame);
    assert_eq!(kafka.read_answer(), Answer::Closed);

    // A truncated request: Produce v3 whose topic array promises more than the frame holds.
    let mut kafka = RawKafka::connect(core.kafka);
    kafka.send(
        0,
        3,
        false,
        &[0xff, 0xff, 0, 1, 0, 0, 0x75, 0x30, 0, 0, 0, 5],
    );
    assert_eq!(kafka.read_answer(), Answer::Closed);

    // A frame that stops half-way, then the client leaves: nothing to answer, no harm done.
    let mut kafka = RawKafka::connect(core.kafka);
    kafka.send_bytes(&[0, 0, 0, 100, 0, 18]);
    drop(kafka);

    // The broker still serves everyone else.
    let mut kafka = RawKafka::connect(core.kafka);
    assert_api_versions_works(&mut kafka);
    core.stop();
}

#[test]
fn an_array_claiming_billions_of_elements_is_refused_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(&dir.path().join("data"), &[]);
    // Metadata v1 whose topic array claims i32::MAX entries in a 4-byte body: the codec sizes
    // a vector from that count before reading one element (hundreds of GB). The node must
    // survive it and close only this connection.
    let mut kafka = RawKafka::connect(core.kafka);
    kafka.send(METADATA, 1, false, &i32::MAX.to_be_bytes());
    assert_eq!(kafka.read_answer(), Answer::Closed);
    // The same in a flexible version: a compact array of u32::MAX - 1 entries.
    let mut kafka = RawKafka::connect(core.kafka);
    kafka.send(METADATA, 9, true, &[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert_eq!(kafka.read_answer(), Answer::Closed);
    let mut kafka = RawKafka::connect(core.kafka);
    assert_api_versions_works(&mut kafka);
    core.stop();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(&dir.path().join("data"), &[]);
    let mut kafka = RawKafka::connect(core.kafka);
    let sent: Vec<i32> = (0..50)
        .map(|n| {
            if n % 2 == 0 {
                kafka.send(API_VERSIONS, 0, false, &[])
            } else {
                // Metadata v1 for no topics: an empty array.
                kafka.send(METADATA, 1, false, &[0, 0, 0, 0])
            }
        })
        .collect();
    for correlation_id in sent {
        let response = kafka.read_response();
        let mut reader = Reader { bytes: &response };
        assert_eq!(reader.i32(), correlation_id);
    }
    core.stop();
}

/// How long a test waits for the node's metrics to show something.
const METRIC_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits until the sum of metric `name` satisfies `done`; returns the value seen.
fn wait_for_metric(core: &Core, name: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + METRIC_TIMEOUT;
    loop {
        let value = metric_sum(&core.metrics(), name);
        if done(value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is still {value} after {METRIC_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection that sends the size prefix of a `claim`-byte request (ApiVersions v0), its
/// header and a tenth of it, and then nothing.
fn start_a_request_and_stop(core: &Core, claim: i32) -> RawKafka {
    let mut kafka = RawKafka::connect(core.kafka);
    let mut bytes = claim.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0, 18, 0, 0, 0, 0, 0, 1]);
    bytes.resize(4 + claim as usize / 10, 0);
    kafka.send_bytes(&bytes);
    kafka
}

/// A Metadata v4 request body for `count` topics with 200-byte names containing '!', which
/// no topic may have (each is answered with an error, none is created), and no auto-creation.
fn metadata_for_invalid_topics(count: usize) -> Vec<u8> {
    let mut body = (count as i32).to_be_bytes().to_vec();
    for n in 0..count {
        let name = format!("{n:0>199}!");
        body.extend_from_slice(&(name.len() as i16).to_be_bytes());
        body.extend_from_slice(name.as_bytes());
    }
    body.push(0); // allow_auto_topic_creation = false
    body
}

#[test]
fn large_requests_wait_for_request_memory_and_go_on_once_it_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(
        &dir.path().join("data"),
        &[
            "--set",
            "kafka.max_request_bytes=1MiB",
            "--set",
            "kafka.queued_max_request_bytes=2MiB",
        ],
    );
    // Two clients each start a request of 1,000,000 bytes and send a tenth of it: between
    // them they hold all but 97,144 bytes of the 2 MiB pool.
    let claim: i32 = 1_000_000;
    let mut holders: Vec<RawKafka> = (0..2)
        .map(|_| start_a_request_and_stop(&core, claim))
        .collect();
    let held = 2.0 * f64::from(claim + 4);
    wait_for_metric(&core, "silt_kafka_queued_request_bytes", |bytes| {
        bytes == held
    });

    // A whole, valid request of about 100 KB does not fit: it waits, unread.
    let mut waiting = RawKafka::connect(core.kafka);
    let correlation_id = waiting.send(METADATA, 4, false, &metadata_for_invalid_topics(500));
    wait_for_metric(&core, "silt_kafka_request_memory_waits_total", |waits| {
        waits >= 1.0
    });
    assert_eq!(
        metric_sum(&core.metrics(), "silt_kafka_queued_request_bytes"),
        held,
        "the waiting request took nothing"
    );

    // Small requests need no share: another client is served meanwhile.
    let mut small = RawKafka::connect(core.kafka);
    assert_api_versions_works(&mut small);

    // One holder leaves: its share comes back and the waiting request is answered.
    drop(holders.remove(0));
    let response = waiting.read_response();
    let mut reader = Reader { bytes: &response };
    assert_eq!(reader.i32(), correlation_id);

    // Once answered, a request's share is back too: only the last holder's is held.
    wait_for_metric(&core, "silt_kafka_queued_request_bytes", |bytes| {
        bytes == f64::from(claim + 4)
    });
    drop(holders);
    wait_for_metric(&core, "silt_kafka_queued_request_bytes", |bytes| {
        bytes == 0.0
    });
    assert_api_versions_works(&mut waiting);
    core.stop();
}

#[test]
fn connections_past_max_connections_are_closed_until_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(
        &dir.path().join("data"),
        &["--set", "kafka.max_connections=2"],
    );
    let mut first = RawKafka::connect(core.kafka);
    let mut second = RawKafka::connect(core.kafka);
    assert_api_versions_works(&mut first);
    assert_api_versions_works(&mut second);

    let mut third = RawKafka::connect(core.kafka);
    third.send(API_VERSIONS, 0, false, &[]);
    assert_eq!(third.read_answer(), Answer::Closed);
    wait_for_metric(&core, "silt_kafka_refused_connections_total", |refused| {
        refused >= 1.0
    });
    // The two inside the limit are still served.
    assert_api_versions_works(&mut first);
    assert_api_versions_works(&mut second);

    // Once one leaves, a new connection is let in (as soon as the listener has seen it end).
    drop(first);
    let deadline = Instant::now() + METRIC_TIMEOUT;
    loop {
        let mut kafka = RawKafka::connect(core.kafka);
        let correlation_id = kafka.send(API_VERSIONS, 0, false, &[]);
        if let Answer::Response(response) = kafka.read_answer() {
            let mut reader = Reader { bytes: &response };
            assert_eq!(reader.i32(), correlation_id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection let in after one of two left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    core.stop();
}

#[test]
fn a_client_that_stops_inside_a_large_request_is_closed_and_its_memory_freed() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough for the test to see the share held first, even on a slow machine.
    let core = Core::start(
        &dir.path().join("data"),
        &["--set", "kafka.connections_max_idle_ms=3000"],
    );
    // A request claiming 1,000,000 bytes, a tenth of them sent, then nothing.
    let claim: i32 = 1_000_000;
    let mut stalled = start_a_request_and_stop(&core, claim);
    wait_for_metric(&core, "silt_kafka_queued_request_bytes", |bytes| {
        bytes == f64::from(claim + 4)
    });
    assert_eq!(stalled.read_answer(), Answer::Closed);
    wait_for_metric(
        &core,
        "silt_kafka_idle_closed_connections_total",
        |closed| closed >= 1.0,
    );
    wait_for_metric(&core, "silt_kafka_queued_request_bytes", |bytes| {
        bytes == 0.0
    });
    // Clients that keep talking are served as before.
    let mut kafka = RawKafka::connect(core.kafka);
    assert_api_versions_works(&mut kafka);
    core.stop();
}

#[test]
fn a_client_that_stops_reading_its_responses_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(
        &dir.path().join("data"),
        &["--set", "kafka.connections_max_idle_ms=1000"],
    );
    // Ten batches of one 900 KB record each (under the 1 MiB batch limit).
    let mut producer = RawKafka::connect(core.kafka);
    let value = "v".repeat(900_000);
    for _ in 0..10 {
        let (error, _) = producer.produce("unread", &value_batch(None, &[value.as_str()]));
        assert_eq!(error, 0, "produce error");
    }
    // Gone before it could be idle: the one idle close counted below is the reader's.
    drop(producer);
    // Eight Fetches of all 9 MB, pipelined, and not a byte of their answers read: far more
    // than the two sockets' buffers hold, so the listener's write stops moving.
    let mut stopped = RawKafka::connect(core.kafka);
    for _ in 0..8 {
        stopped.send(
            FETCH,
            4,
            false,
            &fetch_v4_body("unread", 0, 0, 0, 1, 16 << 20),
        );
    }
    wait_for_metric(
        &core,
        "silt_kafka_idle_closed_connections_total",
        |closed| closed >= 1.0,
    );
    // The connection is closed: what the client reads ends before the eight answers do.
    let received = stopped.read_until_closed();
    assert!(received < 8 * 9_000_000, "{received} bytes of answers");
    // Clients that read their answers are served as before.
    let mut kafka = RawKafka::connect(core.kafka);
    assert_api_versions_works(&mut kafka);
    core.stop();
}
