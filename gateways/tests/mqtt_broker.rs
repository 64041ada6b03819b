//! The broker in-process, over real sockets and a real log, with rumqttc as the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use silt_gateways::mqtt::RouteTable;
use silt_gateways::mqtt::server::{
    BoxFuture, Broker, BrokerConfig, IngestError, IngestPort, IngestReceipt, IngestRequest, Limits,
};
use silt_log::batch::{BatchSpec, encode_batch};
use silt_log::{LogConfig, LogManager};

/// The simplest real port: one batch per record, appended (and fsync'd) on a blocking thread.
struct DirectLog(Arc<LogManager>);

impl IngestPort for DirectLog {
    fn submit(&self, request: IngestRequest) -> BoxFuture<'_, Result<IngestReceipt, IngestError>> {
        let log = self.0.clone();
        Box::pin(async move {
            let (done, receipt) = tokio::sync::oneshot::channel();
            tokio::task::spawn_blocking(move || {
                let result = (|| {
                    let info = log
                        .ensure_topic(&request.log_topic, 1)
                        .map_err(|e| IngestError::Failed(e.to_string()))?;
                    let partition =
                        silt_log::partitioner::partition_for_key(&request.key, info.partitions);
                    let mut batch = BytesMut::new();
                    encode_batch(&BatchSpec::default(), &[request.record], &mut batch)
                        .map_err(|e| IngestError::Failed(e.to_string()))?;
                    log.partition(&request.log_topic, partition)
                        .and_then(|p| p.append(&mut batch))
                        .map_err(|e| IngestError::Failed(e.to_string()))?;
                    Ok(())
                })();
                let _ = done.send(result);
            });
            Ok(receipt)
        })
    }
}

struct Node {
    broker: Broker,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    log: Arc<LogManager>,
}

async fn start() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let log = LogManager::open(LogConfig::new(dir.path().join("log"))).unwrap();
    let config = BrokerConfig {
        limits: Limits::default(),
        allow_anonymous: true,
        password_file: None,
        acl_file: None,
        state_dir: dir.path().join("mqtt"),
        routes: RouteTable::default(),
    };
    let broker = Broker::open(config, Arc::new(DirectLog(log.clone()))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    broker.serve(listener, None);
    Node {
        broker,
        addr,
        _dir: dir,
        log,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_publish_and_subscribe_round_trip() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let node = start().await;
    let mut options = MqttOptions::new("sub", node.addr.ip().to_string(), node.addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    client.subscribe("a/+", QoS::AtLeastOnce).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut published = false;
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("timed out")
            .unwrap();
        match event {
            Event::Incoming(Packet::SubAck(_)) if !published => {
                published = true;
                client
                    .publish("a/b", QoS::AtLeastOnce, false, "hello")
                    .await
                    .unwrap();
            }
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(p.topic, "a/b");
                assert_eq!(&p.payload[..], b"hello");
                break;
            }
            _ => {}
        }
    }
    let partition = node.log.partition("mqtt", 0).unwrap();
    assert_eq!(partition.log_end_offset(), 1);
    node.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_and_subscribe_round_trip() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let node = start().await;
    let mut options = MqttOptions::new("sub5", node.addr.ip().to_string(), node.addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    client.subscribe("a/#", QoS::ExactlyOnce).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut published = false;
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("timed out")
            .unwrap();
        match event {
            Event::Incoming(Packet::SubAck(_)) if !published => {
                published = true;
                client
                    .publish("a/b/c", QoS::ExactlyOnce, false, "hello")
                    .await
                    .unwrap();
            }
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(&p.topic[..], b"a/b/c");
                assert_eq!(&p.payload[..], b"hello");
                break;
            }
            _ => {}
        }
    }
    node.broker.shutdown().await;
}
