//! The thread that owns the session store: it writes the broker's state changes to the
//! journal and makes them durable, many callers to one fsync.
//!
//! Changes come in two kinds. Those an acknowledgement depends on (a session opened, a
//! subscription, a retained message, a copy queued for a persistent session before the
//! publisher's PUBACK) are *committed*: the caller waits until they are fsync'd. The rest (a
//! copy delivered, a session closed) are *written* and become durable with the next commit,
//! or within [`LAZY_SYNC`] at the latest; losing them in a crash only means a redelivery.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::mqtt::store::{Op, Store, StoreLimits, StoreState};

/// The longest a written (not committed) change waits for its fsync.
const LAZY_SYNC: Duration = Duration::from_secs(1);
/// How often the thread looks at whether the journal needs compacting.
const COMPACT_CHECK: Duration = Duration::from_secs(30);

enum Command {
    Write(Vec<Op>),
    Commit(Vec<Op>, oneshot::Sender<Result<(), String>>),
    Close(oneshot::Sender<()>),
}

/// A handle on the store thread; cloning shares it.
#[derive(Debug, Clone)]
pub(crate) struct Persist {
    sender: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Write(ops) => write!(f, "Write({} ops)", ops.len()),
            Command::Commit(ops, _) => write!(f, "Commit({} ops)", ops.len()),
            Command::Close(_) => f.write_str("Close"),
        }
    }
}

impl Persist {
    /// Opens the store in `dir` and starts its thread; returns the state found on disk.
    pub(crate) fn open(dir: &Path) -> Result<(Persist, StoreState, JoinHandle<()>), String> {
        let store = Store::open(dir, StoreLimits::default()).map_err(|e| e.to_string())?;
        let state = store.state().clone();
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("silt-mqtt-store".into())
            .spawn(move || run(store, receiver))
            .map_err(|e| format!("cannot start the store thread: {e}"))?;
        Ok((Persist { sender }, state, thread))
    }

    /// Writes `ops` without waiting for them to be durable.
    pub(crate) fn write(&self, ops: Vec<Op>) {
        if !ops.is_empty() {
            let _ = self.sender.send(Command::Write(ops));
        }
    }

    /// Writes `ops` and resolves once they are durable.
    pub(crate) fn commit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), String>> {
        let (done, receipt) = oneshot::channel();
        if let Err(mpsc::SendError(Command::Commit(_, done))) =
            self.sender.send(Command::Commit(ops, done))
        {
            let _ = done.send(Err("the session store is closed".into()));
        }
        receipt
    }

    /// Syncs and compacts the store, then stops its thread.
    pub(crate) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.sender.send(Command::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

fn run(mut store: Store, receiver: mpsc::Receiver<Command>) {
    let mut dirty_since: Option<Instant> = None;
    let mut last_compact_check = Instant::now();
    loop {
        let timeout = match dirty_since {
            Some(since) => LAZY_SYNC.saturating_sub(since.elapsed()),
            None => COMPACT_CHECK,
        };
        let first = match receiver.recv_timeout(timeout) {
            Ok(command) => Some(command),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                finish(&mut store);
                return;
            }
        };
        let mut waiters = Vec::new();
        let mut close = None;
        let mut failed: Option<String> = None;
        for command in first
            .into_iter()
            .chain(std::iter::from_fn(|| receiver.try_recv().ok()))
        {
            match command {
                Command::Write(ops) => {
                    if let Err(error) = store.apply(&ops) {
                        tracing::error!(%error, "cannot write to the MQTT session store");
                    }
                    dirty_since.get_or_insert_with(Instant::now);
                }
                Command::Commit(ops, done) => {
                    if let Err(error) = store.apply(&ops) {
                        failed = Some(error.to_string());
                    }
                    waiters.push(done);
                }
                Command::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
        }
        let due = dirty_since.is_some_and(|since| since.elapsed() >= LAZY_SYNC);
        if !waiters.is_empty() || due || close.is_some() {
            let result = match store.sync() {
                Ok(()) => failed.map_or(Ok(()), Err),
                Err(error) => {
                    tracing::error!(%error, "cannot sync the MQTT session store");
                    Err(error.to_string())
                }
            };
            dirty_since = None;
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
        }
        if let Some(done) = close {
            finish(&mut store);
            let _ = done.send(());
            return;
        }
        if last_compact_check.elapsed() >= COMPACT_CHECK {
            last_compact_check = Instant::now();
            if let Err(error) = store.maybe_compact() {
                tracing::warn!(%error, "cannot compact the MQTT session store");
            }
        }
    }
}

fn finish(store: &mut Store) {
    if let Err(error) = store.sync() {
        tracing::error!(%error, "cannot sync the MQTT session store");
    }
    if let Err(error) = store.maybe_compact() {
        tracing::warn!(%error, "cannot compact the MQTT session store");
    }
}
