//! The admin port: `GET /health` and `GET /metrics` over a deliberately small HTTP/1.1 server.
//!
//! The edge binary must stay small, so this is not hyper: each connection sends one request
//! head (at most [`http::HEAD_BYTES_MAX`] bytes, within [`HEAD_READ_TIMEOUT`]), gets one
//! response and is closed. At most [`CONNECTIONS_MAX`] connections are served at once; more are
//! closed on accept. Shutting the server down drops every connection, idle or not, so an open
//! admin connection never delays the node's stop.
//!
//! - `/health`: 200 `ok` while the node serves; 503 while it opens its log (`starting`) and
//!   once it is stopping (`shutting down`), so a probe stops routing to it first.
//! - `/metrics`: the Prometheus text format, with the log's numbers refreshed on each scrape.
//! - `/v1/tier/status/<topic>`: the topic's tiering, per partition, as JSON (`silt tier
//!   status`); 404 with a JSON `error` for an unknown topic or a node without tiering.
//! - Unknown paths get 404; known paths with a method other than GET or HEAD get 405.

use silt_gateways::admin_http as http;

use std::future::Future;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use silt_log::LogManager;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::telemetry;
use crate::tier::{StatusError, Tier};
use silt_gateways::admin_http::{HEAD_BYTES_MAX, HeadError, Method, Request, Response, Status};

/// Most admin connections served at once; a scraper and a probe or two need far fewer.
const CONNECTIONS_MAX: usize = 32;
/// How long a client has to send its whole request head.
const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After responding, how long unread request bytes are drained before closing, so that the
/// close does not reset the connection and destroy the response before the client reads it.
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bytes drained after responding.
const LINGER_BYTES_MAX: usize = 64 << 10;
/// Pause after a failed accept (out of file descriptors, say), so it is not a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Where the node is in its life, as `/health` reports it.
#[derive(Debug, Clone)]
pub(crate) enum NodeState {
    /// Opening (and possibly recovering) the data directory.
    Starting,
    Serving(Arc<LogManager>),
    /// Shutdown has begun; the log is being closed.
    Stopping(Arc<LogManager>),
}

impl NodeState {
    fn log(&self) -> Option<&Arc<LogManager>> {
        match self {
            NodeState::Starting => None,
            NodeState::Serving(log) | NodeState::Stopping(log) => Some(log),
        }
    }
}

/// Where the status endpoint's paths start; the topic name follows.
const TIER_STATUS_PREFIX: &str = "/v1/tier/status/";
/// Content type of the JSON answers.
const JSON: &str = "application/json";

/// The node's tiering as the admin server sees it: `None` when no object store is configured;
/// set once the log is open.
pub(crate) type TierSlot = Option<Arc<OnceLock<Arc<Tier>>>>;

/// What the admin server reports on.
#[derive(Debug)]
pub(crate) struct Admin {
    state: watch::Receiver<NodeState>,
    metrics: PrometheusHandle,
    tier: TierSlot,
}

impl Admin {
    pub(crate) fn new(
        state: watch::Receiver<NodeState>,
        metrics: PrometheusHandle,
        tier: TierSlot,
    ) -> Admin {
        Admin {
            state,
            metrics,
            tier,
        }
    }

    async fn respond(&self, request: &Request) -> Response {
        let path = request.path.as_str();
        let tier_topic = path.strip_prefix(TIER_STATUS_PREFIX);
        let known = matches!(path, "/health" | "/metrics") || tier_topic.is_some();
        if !known {
            return Response::status(Status::NotFound);
        }
        if request.method == Method::Other {
            return Response::status(Status::MethodNotAllowed);
        }
        match (path, tier_topic) {
            (_, Some(topic)) => self.tier_status(topic),
            ("/health", None) => self.health(),
            _ => self.metrics().await,
        }
    }

    fn tier_status(&self, topic: &str) -> Response {
        let json = |status: Status, body: serde_json::Value| Response {
            status,
            content_type: JSON,
            body: body.to_string().into_bytes(),
        };
        let error =
            |status: Status, message: String| json(status, serde_json::json!({ "error": message }));
        let Some(slot) = &self.tier else {
            return error(
                Status::NotFound,
                "tiering is off on this node: no object_store is configured".into(),
            );
        };
        let Some(tier) = slot.get() else {
            return error(Status::Unavailable, "the node is starting".into());
        };
        match tier.status(topic) {
            Ok(status) => json(
                Status::Ok,
                serde_json::to_value(status).expect("a status always serializes"),
            ),
            Err(failure @ (StatusError::UnknownTopic(_) | StatusError::Internal(_))) => {
                error(Status::NotFound, failure.to_string())
            }
        }
    }

    fn health(&self) -> Response {
        match &*self.state.borrow() {
            NodeState::Serving(_) => Response::text(Status::Ok, "ok\n"),
            NodeState::Starting => Response::text(Status::Unavailable, "starting\n"),
            NodeState::Stopping(_) => Response::text(Status::Unavailable, "shutting down\n"),
        }
    }

    async fn metrics(&self) -> Response {
        let log = self.state.borrow().log().cloned();
        let handle = self.metrics.clone();
        let tier = self.tier.as_ref().and_then(|slot| slot.get()).cloned();
        let rendered = tokio::task::spawn_blocking(move || {
            if let Some(log) = log {
                telemetry::refresh_log(&log);
            }
            if let Some(tier) = tier {
                tier.refresh();
            }
            handle.run_upkeep();
            handle.render()
        })
        .await;
        match rendered {
            Ok(text) => Response {
                status: Status::Ok,
                content_type: telemetry::CONTENT_TYPE,
                body: text.into_bytes(),
            },
            Err(error) => {
                tracing::error!(%error, "rendering metrics failed");
                Response::status(Status::InternalError)
            }
        }
    }
}

/// Serves the admin port on `listener` until `shutdown` completes, then drops every open
/// connection.
pub(crate) async fn serve(listener: TcpListener, admin: Admin, shutdown: impl Future<Output = ()>) {
    let admin = Arc::new(admin);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= CONNECTIONS_MAX {
                        tracing::debug!(%peer, "admin connection closed: too many open");
                        continue;
                    }
                    let admin = admin.clone();
                    connections.spawn(async move { handle_connection(stream, &admin).await });
                }
                Err(error) => {
                    tracing::warn!(%error, "admin listener cannot accept");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    connections.shutdown().await;
}

async fn handle_connection(mut stream: TcpStream, admin: &Admin) {
    let (method, response) = match timeout(HEAD_READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_elapsed) => (Method::Get, Response::status(Status::RequestTimeout)),
        // The client left before sending anything, or the connection broke: no one to answer.
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Ok(Ok(Some(Err(error)))) => {
            tracing::debug!(?error, "admin request refused");
            (Method::Get, Response::status(error.status()))
        }
        Ok(Ok(Some(Ok(request)))) => (request.method, admin.respond(&request).await),
    };
    let bytes = response.encode(method);
    let written = timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        let _ = timeout(LINGER_TIMEOUT, drain(&mut stream)).await;
    }
}

/// Reads until the request head is complete or refused. `None` when the client closed the
/// connection without sending a byte.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Result<Request, HeadError>>> {
    let mut buf = vec![0u8; HEAD_BYTES_MAX];
    let mut filled = 0;
    loop {
        match http::parse_head(&buf[..filled]) {
            Ok(Some(request)) => return Ok(Some(Ok(request))),
            Err(error) => return Ok(Some(Err(error))),
            Ok(None) => {}
        }
        // `parse_head` refuses a full buffer without a complete head, so there is room.
        let read = stream.read(&mut buf[filled..]).await?;
        if read == 0 {
            return Ok((filled > 0).then_some(Err(HeadError::Incomplete)));
        }
        filled += read;
    }
}

/// Reads and discards what the client still sends, up to a bound, until it closes.
async fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES_MAX {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(read) => drained += read,
        }
    }
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;
    use silt_log::LogConfig;
    use tokio::sync::oneshot;

    use super::*;

    fn admin(state: watch::Receiver<NodeState>) -> Admin {
        // A recorder of the test's own: nothing is installed globally here.
        Admin::new(
            state,
            PrometheusBuilder::new().build_recorder().handle(),
            None,
        )
    }

    fn get(path: &str) -> Request {
        Request {
            method: Method::Get,
            path: path.to_string(),
        }
    }

    #[tokio::test]
    async fn health_follows_the_node_from_start_to_stop() {
        let (state, receiver) = watch::channel(NodeState::Starting);
        let admin = admin(receiver);
        assert_eq!(
            admin.respond(&get("/health")).await,
            Response::text(Status::Unavailable, "starting\n")
        );
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path())).unwrap();
        state.send_replace(NodeState::Serving(log.clone()));
        assert_eq!(
            admin.respond(&get("/health")).await,
            Response::text(Status::Ok, "ok\n")
        );
        state.send_replace(NodeState::Stopping(log.clone()));
        assert_eq!(
            admin.respond(&get("/health")).await,
            Response::text(Status::Unavailable, "shutting down\n")
        );
        log.close().unwrap();

        let post = Request {
            method: Method::Other,
            path: "/metrics".into(),
        };
        assert_eq!(admin.respond(&post).await.status, Status::MethodNotAllowed);
        assert_eq!(admin.respond(&get("/")).await.status, Status::NotFound);
        let metrics = admin.respond(&get("/metrics")).await;
        assert_eq!(metrics.status, Status::Ok);
        assert_eq!(metrics.content_type, telemetry::CONTENT_TYPE);
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_and_shutdown_drops_idle_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_state, receiver) = watch::channel(NodeState::Starting);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, admin(receiver), async move {
            let _ = stopped.await;
        }));
        let mut idle = Vec::new();
        for _ in 0..CONNECTIONS_MAX {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Accepted after all the idle ones, so past the limit: closed without an answer.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        let read = timeout(Duration::from_secs(10), extra.read_to_end(&mut answer)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");

        stop.send(()).unwrap();
        timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops at once")
            .unwrap();
        for mut stream in idle {
            let mut buf = Vec::new();
            let read = timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        }
    }
}
