//! What a persistent session keeps across a restart of `silt-edge` beyond its subscriptions
//! and queue: a will whose delay was still running (MQTT 5.0 §3.1.3.2: the server may defer
//! it to the restart) is published once after a SIGTERM restart and after a kill -9 restart,
//! never twice, and not at all when the client reconnects within the delay; and messages
//! queued for an offline 5.0 subscriber come back with the Subscription Identifiers (and
//! QoS) they would have had without the restart.
//!
//! silt-edge only: Mosquitto keeps neither across a restart without its persistence file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use silt_tests::mqtt::client::SubscribeOpts;
use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::{
    Client, ClientOptions, Message, MqttBroker, Version, Will, skip_unless_silt,
};
use tokio::time::Instant;

fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    (dir, data)
}

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// A persistent 5.0 (or 3.1.1 clean-session-false) client with a QoS 1 will on `topic`.
fn with_will(client_id: &str, topic: &str, delay_secs: Option<u32>) -> ClientOptions {
    ClientOptions {
        will: Some(Will {
            topic: topic.to_string(),
            payload: format!("{client_id} is gone").into_bytes(),
            qos: 1,
            retain: false,
            delay_secs,
        }),
        ..ClientOptions::persistent(client_id)
    }
}

/// A persistent subscriber to `wills/#`: it gets the will even when it fires before the
/// subscriber is back after the restart.
async fn watcher(version: Version, broker: &MqttBroker) -> Client {
    let mut watcher =
        Client::connect(version, broker.mqtt, ClientOptions::persistent("watcher")).await;
    if !watcher.connack.session_present {
        assert_eq!(watcher.subscribe("wills/#", 1).await, 1);
    }
    watcher
}

/// Records of the log whose MQTT topic is `topic`; the node must be stopped.
fn log_records_on(data: &Path, topic: &str) -> usize {
    dump_topic(data, "mqtt")
        .iter()
        .filter(|record| record.header("mqtt.topic") == Some(topic))
        .count()
}

/// Messages the watcher gets before a sentinel published now.
async fn before_sentinel(
    version: Version,
    broker: &MqttBroker,
    watcher: &mut Client,
) -> Vec<String> {
    let mut publisher = Client::connect_clean(version, broker.mqtt, "sentinel").await;
    publisher
        .publish_acked("wills/end", 1, false, "sentinel")
        .await;
    publisher.disconnect().await;
    watcher
        .recv_until("wills/end")
        .await
        .into_iter()
        .map(|message| format!("{}: {}", message.topic, message.text()))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Sigterm,
    Kill9,
}

/// A will with a delay still running when the broker stops is published once after the
/// restart: the watcher gets it once, a second restart does not publish it again, and the log
/// holds it once.
async fn delayed_will_survives(version: Version, stop: Stop, delay_secs: Option<u32>) {
    if !skip_unless_silt("delayed wills across a restart") {
        return;
    }
    let (_dir, data) = data_dir();
    let mut broker = blocking(|| MqttBroker::start_silt(&data, &[]));
    let mut watcher = watcher(version, &broker).await;
    let doomed = format!("doomed-{version:?}-{stop:?}").to_lowercase();
    let topic = format!("wills/{doomed}");
    let mut client =
        Client::connect(version, broker.mqtt, with_will(&doomed, &topic, delay_secs)).await;
    // Creates the log topic, so that it can be read back even before the will.
    client.publish_acked("boot", 1, false, "up").await;

    // The will is not published while the broker goes down with a delay to wait (SIGTERM),
    // nor can it be (kill -9): it must come after the restart.
    match stop {
        Stop::Sigterm => blocking(|| broker.stop()),
        Stop::Kill9 => blocking(|| broker.kill()),
    }
    drop(client);
    drop(watcher);
    if stop == Stop::Sigterm && delay_secs.is_some_and(|secs| secs > 0) {
        assert_eq!(
            blocking(|| log_records_on(&data, &topic)),
            0,
            "a will with a delay was published at shutdown"
        );
    }
    let restarted = Instant::now();
    blocking(|| broker.start_again());
    watcher = self::watcher(version, &broker).await;
    assert!(watcher.connack.session_present);
    let will = watcher.recv().await;
    assert_eq!(will.topic, topic);
    assert_eq!(will.text(), format!("{doomed} is gone"));
    if stop == Stop::Kill9
        && let Some(secs) = delay_secs
    {
        // A connection alive at the crash counts its delay from the restart.
        let waited = restarted.elapsed();
        assert!(
            waited >= Duration::from_secs(u64::from(secs)),
            "a {secs} s will delay published the will {waited:?} after the restart began"
        );
    }
    assert_eq!(
        before_sentinel(version, &broker, &mut watcher).await,
        Vec::<String>::new(),
        "the will came twice"
    );

    // Published means cleared: another restart does not publish it again.
    blocking(|| broker.restart());
    let mut watcher = self::watcher(version, &broker).await;
    assert_eq!(
        before_sentinel(version, &broker, &mut watcher).await,
        Vec::<String>::new(),
        "the will was published again after a second restart"
    );
    blocking(|| broker.stop());
    assert_eq!(blocking(|| log_records_on(&data, &topic)), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_delayed_will_survives_a_sigterm_restart() {
    delayed_will_survives(Version::V5, Stop::Sigterm, Some(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_delayed_will_survives_a_kill9_restart() {
    delayed_will_survives(Version::V5, Stop::Kill9, Some(2)).await;
}

/// 3.1.1 has no will delay: a connection cut by kill -9 publishes its will at the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_will_of_a_connection_cut_by_kill9_is_published_after_the_restart() {
    delayed_will_survives(Version::V311, Stop::Kill9, None).await;
}

/// A client that reconnects within its will delay after a restart cancels the will.
async fn reconnect_cancels_the_will(stop: Stop) {
    if !skip_unless_silt("delayed wills across a restart") {
        return;
    }
    let (_dir, data) = data_dir();
    let mut broker = blocking(|| MqttBroker::start_silt(&data, &[]));
    let mut watcher = watcher(Version::V5, &broker).await;
    let returning = format!("returning-{stop:?}").to_lowercase();
    let topic = format!("wills/{returning}");
    // Long enough for a restart and a reconnect on a loaded machine.
    let delay = Duration::from_secs(10);
    let options = with_will(&returning, &topic, Some(delay.as_secs() as u32));
    let client = Client::connect(Version::V5, broker.mqtt, options.clone()).await;
    let stopped = Instant::now();
    match stop {
        Stop::Sigterm => blocking(|| broker.stop()),
        Stop::Kill9 => blocking(|| broker.kill()),
    }
    drop(client);
    drop(watcher);
    blocking(|| broker.start_again());
    let back = Client::connect(Version::V5, broker.mqtt, options).await;
    assert!(back.connack.session_present);
    assert!(
        stopped.elapsed() < delay,
        "the reconnect took longer than the will delay; the test proves nothing"
    );
    watcher = self::watcher(Version::V5, &broker).await;
    // A test about time: without the reconnect the will would be out by now (the delay
    // counts from the SIGTERM, or from the restart after kill -9).
    tokio::time::sleep_until(Instant::now() + delay + Duration::from_millis(500)).await;
    assert_eq!(
        before_sentinel(Version::V5, &broker, &mut watcher).await,
        Vec::<String>::new(),
        "a reconnect within the will delay cancels the will"
    );
    back.disconnect().await;
    blocking(|| broker.stop());
    assert_eq!(blocking(|| log_records_on(&data, &topic)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_after_a_sigterm_restart_cancels_the_will() {
    reconnect_cancels_the_will(Stop::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_after_a_kill9_restart_cancels_the_will() {
    reconnect_cancels_the_will(Stop::Kill9).await;
}

/// Messages queued for an offline 5.0 subscriber keep their Subscription Identifiers and
/// their QoS (the lower of the message's and the subscription's) across a restart: the same
/// as a twin subscriber that fetches its queue before the restart gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_keep_their_subscription_ids_across_a_restart() {
    if !skip_unless_silt("subscription ids across a restart") {
        return;
    }
    let (_dir, data) = data_dir();
    let mut broker = blocking(|| MqttBroker::start_silt(&data, &[]));
    let subscribe = |id: usize| SubscribeOpts {
        id: Some(id),
        ..SubscribeOpts::default()
    };
    for name in ["twin", "restarted"] {
        let mut subscriber =
            Client::connect(Version::V5, broker.mqtt, ClientOptions::persistent(name)).await;
        assert_eq!(subscriber.subscribe_with("ids/+", 1, subscribe(5)).await, 1);
        assert_eq!(subscriber.subscribe_with("ids/#", 2, subscribe(9)).await, 2);
        assert_eq!(
            subscriber.subscribe_with("ids/b/+", 1, subscribe(12)).await,
            1
        );
        subscriber.disconnect().await;
    }
    let mut publisher = Client::connect_clean(Version::V5, broker.mqtt, "publisher").await;
    publisher.publish_acked("ids/a", 2, false, "a").await;
    publisher.publish_acked("ids/b/c", 2, false, "b/c").await;
    publisher.publish_acked("ids/a", 1, false, "a again").await;
    publisher.disconnect().await;

    let summary = |messages: Vec<Message>| -> Vec<(String, u8, Vec<usize>)> {
        messages
            .into_iter()
            .map(|message| {
                let mut ids = message.subscription_ids.clone();
                ids.sort_unstable();
                (message.text(), message.qos, ids)
            })
            .collect()
    };
    let mut twin =
        Client::connect(Version::V5, broker.mqtt, ClientOptions::persistent("twin")).await;
    assert!(twin.connack.session_present);
    let expected = summary(twin.recv_many(3).await);
    assert_eq!(
        expected,
        [
            ("a".to_string(), 2, vec![5, 9]),
            ("b/c".to_string(), 2, vec![9, 12]),
            ("a again".to_string(), 1, vec![5, 9]),
        ]
    );
    twin.disconnect().await;

    blocking(|| broker.restart());
    let mut restarted = Client::connect(
        Version::V5,
        broker.mqtt,
        ClientOptions::persistent("restarted"),
    )
    .await;
    assert!(restarted.connack.session_present);
    assert_eq!(summary(restarted.recv_many(3).await), expected);
    restarted.disconnect().await;
}
