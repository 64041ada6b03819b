//! The broker: shared state, routing to subscribers, and the accept loops.
//!
//! Locks: the registry (sessions, subscriptions, retained messages) is taken before a
//! session's lock, never after; both are held only for memory operations, never across an
//! await or IO.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle as ThreadHandle;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::persist::Persist;
use super::session::{Message, PendingWill, Queued, Session, SessionCell};
use super::{BrokerConfig, IngestPort, LogPosition, lock, stopped};
use crate::mqtt::auth::{AclRules, Identity, PasswordFile};
use crate::mqtt::ingest::{HEADER_QOS2_ID, HEADER_WILL_ID, qos2_id_value};
use crate::mqtt::store::{Op, StoredQos2, StoredSubscription, StoredWill};
use crate::mqtt::subscriptions::{
    QoS, RetainHandling, SubscriptionId, SubscriptionLimits, SubscriptionOptions, SubscriptionStore,
};
use crate::mqtt::topic::{FilterSupport, SubscriptionFilter};

/// How long shutdown waits for connections to finish what is under way.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Connections over `max_connections` still read far enough to be refused with a CONNACK.
const CONNACK_GRACE: usize = 64;
/// Pause after a failed accept (out of file descriptors, say) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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

/// Sessions, subscriptions and retained messages.
#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) sessions: HashMap<Arc<str>, Arc<SessionCell>>,
    pub(crate) subscriptions: SubscriptionStore,
    pub(crate) retained: BTreeMap<String, Arc<Message>>,
}

pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) ingest: Arc<dyn IngestPort>,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) persist: Persist,
    store_thread: Mutex<Option<ThreadHandle<()>>>,
    pub(crate) passwords: Option<PasswordFile>,
    pub(crate) acl: Option<AclRules>,
    /// Open connections, CONNECT or not.
    pub(crate) connections: AtomicUsize,
    /// Connections closed: shutdown waits for `connections` to reach 0.
    pub(crate) connection_closed: Notify,
    pub(crate) generation: AtomicU64,
    pub(crate) shutdown: watch::Sender<bool>,
    rate: Mutex<TokenBucket>,
    /// Sessions loaded from the store, with the time left before they expire; their timers
    /// start when the broker first serves (they need the runtime).
    loaded_expiries: Mutex<Vec<(Arc<str>, Duration)>>,
    /// Sessions loaded with a will still to publish, with the time left before it is due.
    loaded_wills: Mutex<Vec<(Arc<str>, Duration)>>,
}

/// New connections allowed per second, with an equal burst.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Shared {
    pub(crate) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether another CONNECT may be accepted now (the connect-rate limit).
    pub(crate) fn take_connect_token(&self) -> bool {
        lock(&self.rate).take()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Delivers a durable message to every matching subscription and updates the retained
    /// store. Returns the store changes; `needs_commit` says whether any of them must be
    /// durable before the publisher is acknowledged.
    pub(crate) fn route(&self, message: &Arc<Message>) -> Routed {
        self.route_all(std::slice::from_ref(message))
    }

    /// [`Shared::route`] for several messages, in order, under one lock of the registry.
    pub(crate) fn route_all(&self, messages: &[Arc<Message>]) -> Routed {
        let mut ops = Vec::new();
        let mut needs_commit = false;
        let limits = &self.config.limits;
        let mut targets: Vec<(Arc<SessionCell>, Queued)> = Vec::new();
        {
            let mut registry = lock(&self.registry);
            for message in messages {
                self.route_one(
                    &mut registry,
                    message,
                    &mut targets,
                    &mut ops,
                    &mut needs_commit,
                );
            }
        }
        for (cell, copy) in targets {
            let mut session = cell.lock();
            if let Some(acl) = &self.acl {
                let who = Identity {
                    client_id: &session.client_id,
                    username: session.username.as_deref(),
                };
                if !acl.allows_receive(&who, &copy.message.topic) {
                    continue;
                }
            }
            let before = ops.len();
            match session.enqueue(copy, limits, &mut ops) {
                Ok(()) => {
                    needs_commit |= ops.len() > before;
                    drop(session);
                    cell.notify.notify_one();
                }
                Err(refusal) => {
                    metrics::counter!("silt_mqtt_dropped_total", "reason" => refusal.label())
                        .increment(1);
                }
            }
        }
        Routed { ops, needs_commit }
    }

    /// Retained-message bookkeeping and the copies for one message, under the registry lock.
    fn route_one(
        &self,
        registry: &mut Registry,
        message: &Arc<Message>,
        targets: &mut Vec<(Arc<SessionCell>, Queued)>,
        ops: &mut Vec<Op>,
        needs_commit: &mut bool,
    ) {
        let limits = &self.config.limits;
        if message.retain {
            let topic = message.topic.as_str();
            if message.payload.is_empty() {
                if registry.retained.remove(topic).is_some() {
                    ops.push(Op::ClearRetained {
                        topic: topic.to_string(),
                    });
                    *needs_commit = true;
                }
            } else if registry.retained.len() < limits.max_retained_messages
                || registry.retained.contains_key(topic)
            {
                let mut kept = Message::clone_for_retain(message);
                kept.retain = true;
                registry.retained.insert(topic.to_string(), Arc::new(kept));
                ops.push(Op::Retain {
                    message: message.to_stored(),
                });
                *needs_commit = true;
            } else {
                metrics::counter!("silt_mqtt_dropped_total", "reason" => "retained_full")
                    .increment(1);
            }
            metrics::gauge!("silt_mqtt_retained_messages").set(registry.retained.len() as f64);
        }
        if registry.subscriptions.is_empty() {
            return;
        }
        let Registry {
            sessions,
            subscriptions,
            ..
        } = registry;
        let deliveries = subscriptions.matches_with(&message.topic, &message.publisher, |id| {
            sessions.get(id).is_some_and(|cell| cell.is_online())
        });
        targets.extend(deliveries.into_iter().filter_map(|delivery| {
            let cell = sessions.get(&delivery.client_id)?.clone();
            let copy = Queued {
                message: message.clone(),
                qos: delivery.qos.min(message.qos),
                retain: delivery.retain_as_published && message.retain,
                subscription_ids: delivery
                    .subscription_ids
                    .iter()
                    .map(|id| id.get())
                    .collect(),
                seq: None,
            };
            Some((cell, copy))
        }));
    }

    /// Publishes a will: into the log first, then to subscribers. A persistent session's will
    /// (one with a token) is exactly once across crashes: its log position is journaled
    /// before the append and the will cleared from the journal, first in the same commit as
    /// the copies routing queued, once it is routed (see `mqtt::store`).
    pub(crate) async fn fire_will(self: &Arc<Self>, client_id: Arc<str>, will: PendingWill) {
        let message = Arc::new(will.message(client_id.clone(), silt_log::now_ms()));
        let mut record = message.ingest_record(&self.config.routes);
        if let Some(token) = will.token {
            record.record.headers.push(silt_log::batch::Header {
                key: HEADER_WILL_ID.to_string(),
                value: Some(qos2_id_value(token)),
            });
            let position = self.ingest.position(record.log_topic, &record.key).await;
            let journaled = match position {
                Ok(position) => {
                    let op = Op::WillFiring {
                        client_id: client_id.to_string(),
                        token,
                        firing: crate::mqtt::store::StoredWillFiring {
                            log_topic: record.log_topic.to_string(),
                            partition: position.partition,
                            from_offset: position.offset,
                        },
                    };
                    matches!(self.persist.commit(vec![op]).await, Ok(Ok(())))
                }
                Err(_) => false,
            };
            if !journaled {
                // Still published: a crash before it is cleared would publish it again after
                // the restart (a duplicate), which is better than never.
                tracing::warn!(client_id = %client_id, "cannot journal a will before publishing it");
            }
        }
        let request = super::IngestRequest {
            log_topic: Arc::from(record.log_topic),
            key: record.key,
            record: record.record,
        };
        let durable = match self.ingest.submit(vec![request]).await {
            Ok(receipt) => matches!(receipt.await, Ok(Ok(()))),
            Err(_) => false,
        };
        if !durable {
            tracing::warn!(client_id = %client_id, topic = %message.topic, "a will message could not be stored; not published");
            return;
        }
        metrics::counter!("silt_mqtt_wills_published_total").increment(1);
        let routed = self.route(&message);
        let mut ops = Vec::with_capacity(routed.ops.len() + 1);
        // First, so that a crash that keeps any queued copy also keeps the clear: a will is
        // never queued twice.
        if let Some(token) = will.token {
            ops.push(Op::WillClear {
                client_id: client_id.to_string(),
                token: Some(token),
            });
        }
        ops.extend(routed.ops);
        if routed.needs_commit || will.token.is_some() {
            let _ = self.persist.commit(ops).await;
        } else {
            self.persist.write(ops);
        }
    }

    /// Publishes the will of `client_id`'s session after `after` unless a connection
    /// attaches first (which changes the session's epoch and cancels the will).
    pub(crate) fn arm_will(self: &Arc<Self>, client_id: Arc<str>, epoch: u64, after: Duration) {
        let shared = self.clone();
        tokio::spawn(async move {
            // At shutdown a persistent session's will stays in the store and fires after the
            // restart.
            if shared.sleep_unless_stopping(after).await {
                shared.fire_pending_will(&client_id, epoch).await;
            }
        });
    }

    /// Sleeps for `after`; false if the broker began to stop first.
    async fn sleep_unless_stopping(&self, after: Duration) -> bool {
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            () = tokio::time::sleep(after) => true,
            () = stopped(&mut shutdown) => false,
        }
    }

    /// Publishes the will `client_id`'s session still holds from connection `epoch`, if any;
    /// returns the session.
    async fn fire_pending_will(
        self: &Arc<Self>,
        client_id: &Arc<str>,
        epoch: u64,
    ) -> Option<Arc<SessionCell>> {
        let cell = lock(&self.registry).sessions.get(client_id).cloned()?;
        if let Some(will) = take_will(&cell, epoch) {
            self.fire_will(client_id.clone(), will).await;
        }
        Some(cell)
    }

    /// Ends a session: its subscriptions, its queue, and its record in the store.
    pub(crate) fn remove_session(&self, registry: &mut Registry, client_id: &str) -> Vec<Op> {
        let mut ops = Vec::new();
        if let Some(cell) = registry.sessions.remove(client_id) {
            registry.subscriptions.remove_client(client_id);
            let session = cell.lock();
            if session.stored {
                ops.push(Op::SessionRemove {
                    client_id: client_id.to_string(),
                });
            }
        }
        metrics::gauge!("silt_mqtt_sessions").set(registry.sessions.len() as f64);
        ops
    }

    /// Removes `client_id`'s session if it is still `cell` (a new one may have replaced it).
    pub(crate) fn remove_session_if(
        &self,
        registry: &mut Registry,
        client_id: &str,
        cell: &Arc<SessionCell>,
    ) -> Vec<Op> {
        match registry.sessions.get(client_id) {
            Some(current) if Arc::ptr_eq(current, cell) => self.remove_session(registry, client_id),
            _ => Vec::new(),
        }
    }

    /// Removes the session `client_id` after `after` unless a connection attaches to it first
    /// (which changes its epoch).
    pub(crate) fn arm_session_expiry(
        self: &Arc<Self>,
        client_id: Arc<str>,
        epoch: u64,
        after: Duration,
    ) {
        let shared = self.clone();
        tokio::spawn(async move {
            if !shared.sleep_unless_stopping(after).await {
                return;
            }
            // A will still waiting goes out when its session ends (MQTT 5.0 §3.1.3.2).
            let Some(cell) = shared.fire_pending_will(&client_id, epoch).await else {
                return;
            };
            let ops = {
                let mut registry = lock(&shared.registry);
                let expired = {
                    let session = cell.lock();
                    session.attached.is_none() && session.epoch == epoch
                };
                if !expired {
                    return;
                }
                shared.remove_session_if(&mut registry, &client_id, &cell)
            };
            shared.persist.write(ops);
        });
    }

    /// Retained messages matching `filter`, as copies for a new subscription.
    pub(crate) fn retained_for(
        &self,
        registry: &Registry,
        filter: &SubscriptionFilter,
        options: &SubscriptionOptions,
        now_ms: i64,
    ) -> Vec<Queued> {
        registry
            .retained
            .values()
            .filter(|message| filter.matches(&message.topic))
            .filter(|message| message.remaining_expiry(now_ms).is_some())
            .map(|message| Queued {
                message: message.clone(),
                qos: options.qos.min(message.qos),
                retain: true,
                subscription_ids: options
                    .subscription_id
                    .map(|id| id.get())
                    .into_iter()
                    .collect(),
                seq: None,
            })
            .collect()
    }
}

/// What routing a message changed in the store.
#[derive(Debug)]
pub(crate) struct Routed {
    pub(crate) ops: Vec<Op>,
    pub(crate) needs_commit: bool,
}

impl Message {
    fn clone_for_retain(message: &Message) -> Message {
        Message {
            topic: message.topic.clone(),
            payload: message.payload.clone(),
            qos: message.qos,
            retain: true,
            published_at_ms: message.published_at_ms,
            expiry_secs: message.expiry_secs,
            properties: message.properties.clone(),
            publisher: message.publisher.clone(),
        }
    }
}

/// The session's pending will, if the client is still away since `epoch`.
fn take_will(cell: &SessionCell, epoch: u64) -> Option<PendingWill> {
    let mut session = cell.lock();
    if session.attached.is_none() && session.epoch == epoch {
        session.will.take()
    } else {
        None
    }
}

/// Restores the will of a persistent session loaded from the store: `None` when there is
/// nothing left to publish, else the will and when it is due. A will that started firing
/// before the crash was published exactly when the log holds its token (then it is cleared);
/// one that did not is due its delay (capped by the session expiry) after the disconnect, or
/// after now for a connection that was alive when the broker stopped.
fn restore_will(
    ingest: &dyn IngestPort,
    client_id: &str,
    stored: StoredWill,
    disconnected_at_ms: Option<i64>,
    expiry_secs: u32,
    now_ms: i64,
    ops: &mut Vec<Op>,
) -> Option<(PendingWill, Duration)> {
    let token = stored.token;
    if let Some(firing) = &stored.firing {
        let from = LogPosition {
            partition: firing.partition,
            offset: firing.from_offset,
        };
        let published = ingest
            .find_header(
                &firing.log_topic,
                &from,
                HEADER_WILL_ID,
                &qos2_id_value(token),
            )
            .unwrap_or_else(|error| {
                tracing::warn!(client_id, %error, "cannot check the log for a will cut short; publishing it again");
                false
            });
        tracing::info!(client_id, published, "settled a will cut short by a crash");
        if published {
            ops.push(Op::WillClear {
                client_id: client_id.to_string(),
                token: Some(token),
            });
            return None;
        }
        return PendingWill::from_stored(stored).map(|will| (will, Duration::ZERO));
    }
    let delay_ms = i64::from(stored.delay_secs.min(expiry_secs)) * 1000;
    let due_ms = disconnected_at_ms
        .unwrap_or(now_ms)
        .saturating_add(delay_ms);
    let left = Duration::from_millis(due_ms.saturating_sub(now_ms).max(0) as u64);
    PendingWill::from_stored(stored).map(|will| (will, left))
}

/// Restores one inbound QoS 2 packet id of a persistent session; returns whether the message
/// is stored (the id awaits PUBREL). An intent journaled before an append that the crash may
/// have cut short is settled by the log: the record carries the intent's token, so it is
/// stored exactly when the log holds that token at or above the journaled offset. If the log
/// cannot tell, the id is freed: a re-sent PUBLISH is then stored again (a duplicate), which
/// is better than answering PUBREC for a message that was never stored (a loss).
fn restore_qos2(
    ingest: &dyn IngestPort,
    client_id: &str,
    packet_id: u16,
    qos2: StoredQos2,
    ops: &mut Vec<Op>,
) -> bool {
    let (log_topic, from, token) = match qos2 {
        StoredQos2::Received => return true,
        StoredQos2::Intent {
            log_topic,
            partition,
            from_offset,
            token,
        } => (
            log_topic,
            LogPosition {
                partition,
                offset: from_offset,
            },
            token,
        ),
    };
    let stored = match ingest.find_header(&log_topic, &from, HEADER_QOS2_ID, &qos2_id_value(token))
    {
        Ok(found) => found,
        Err(error) => {
            tracing::warn!(client_id, packet_id, %error, "cannot check the log for a QoS 2 message cut short; a re-send will be stored again");
            false
        }
    };
    tracing::info!(
        client_id,
        packet_id,
        stored,
        "settled a QoS 2 message cut short by a crash"
    );
    let client_id = client_id.to_string();
    ops.push(if stored {
        Op::Qos2Set {
            client_id,
            packet_id,
            state: StoredQos2::Received,
        }
    } else {
        Op::Qos2Release {
            client_id,
            packet_id,
        }
    });
    stored
}

/// Options stored for a subscription, back into the store's form.
pub(crate) fn stored_subscription(
    filter: &SubscriptionFilter,
    options: &SubscriptionOptions,
) -> StoredSubscription {
    StoredSubscription {
        filter: filter.to_string(),
        qos: options.qos.as_u8(),
        no_local: options.no_local,
        retain_as_published: options.retain_as_published,
        retain_handling: options.retain_handling as u8,
        subscription_id: options.subscription_id.map(|id| id.get()),
    }
}

impl Broker {
    /// Loads the broker's state (sessions, retained messages) from `config.state_dir` and
    /// the password and ACL files. Blocking IO: call it before serving, off the async threads.
    pub fn open(config: BrokerConfig, ingest: Arc<dyn IngestPort>) -> Result<Broker, BrokerError> {
        let passwords = match &config.password_file {
            None => None,
            Some(path) => Some(PasswordFile::load(path).map_err(|e| BrokerError::Auth {
                path: path.display().to_string(),
                message: e.to_string(),
            })?),
        };
        let acl = match &config.acl_file {
            None => None,
            Some(path) => Some(AclRules::load(path).map_err(|e| BrokerError::Auth {
                path: path.display().to_string(),
                message: e.to_string(),
            })?),
        };
        let (persist, state, store_thread) =
            Persist::open(&config.state_dir).map_err(|message| BrokerError::State {
                path: config.state_dir.display().to_string(),
                message,
            })?;

        let limits = config.limits.clone();
        let mut registry = Registry {
            sessions: HashMap::new(),
            subscriptions: SubscriptionStore::new(SubscriptionLimits {
                per_client_max: limits.max_subscriptions_per_client,
                ..SubscriptionLimits::default()
            }),
            retained: BTreeMap::new(),
        };
        let broker_id: Arc<str> = Arc::from("");
        for (topic, stored) in state.retained {
            if let Some(message) = Message::from_stored(stored, broker_id.clone()) {
                registry.retained.insert(topic, Arc::new(message));
            }
        }
        let now_ms = silt_log::now_ms();
        let mut expiries = Vec::new();
        let mut wills = Vec::new();
        let mut recovered = Vec::new();
        for (client_id, stored) in state.sessions {
            let client_id: Arc<str> = Arc::from(client_id.as_str());
            let mut session = Session::new(client_id.clone(), &limits);
            session.expiry_secs = stored.expiry_secs;
            session.stored = true;
            for sub in &stored.subscriptions {
                let Ok(filter) = SubscriptionFilter::parse(&sub.filter, FilterSupport::ALL) else {
                    continue;
                };
                let Some(qos) = QoS::from_u8(sub.qos) else {
                    continue;
                };
                let options = SubscriptionOptions {
                    qos,
                    no_local: sub.no_local,
                    retain_as_published: sub.retain_as_published,
                    retain_handling: RetainHandling::from_u8(sub.retain_handling)
                        .unwrap_or_default(),
                    subscription_id: sub.subscription_id.and_then(SubscriptionId::new),
                };
                let _ = registry
                    .subscriptions
                    .subscribe(&client_id, &filter, options);
            }
            for (seq, mut stored_message) in stored.queue {
                let subscription_ids = std::mem::take(&mut stored_message.subscription_ids);
                let Some(message) = Message::from_stored(stored_message, broker_id.clone()) else {
                    continue;
                };
                session.next_seq = session.next_seq.max(seq + 1);
                session.queued_bytes += message.payload.len();
                let qos = message.qos;
                let retain = message.retain;
                session.queue.push_back(Queued {
                    message: Arc::new(message),
                    qos,
                    retain,
                    subscription_ids,
                    seq: Some(seq),
                });
            }
            for (packet_id, qos2) in stored.qos2 {
                if restore_qos2(ingest.as_ref(), &client_id, packet_id, qos2, &mut recovered) {
                    session.inbound.mark_received(packet_id);
                }
            }
            let restored = stored.will.and_then(|will| {
                restore_will(
                    ingest.as_ref(),
                    &client_id,
                    will,
                    stored.disconnected_at_ms,
                    stored.expiry_secs,
                    now_ms,
                    &mut recovered,
                )
            });
            if let Some((will, due)) = restored {
                session.will = Some(will);
                wills.push((client_id.clone(), due));
            }
            let gone_ms = now_ms - stored.disconnected_at_ms.unwrap_or(now_ms);
            let left_ms = (i64::from(session.expiry_secs) * 1000 - gone_ms).max(0);
            expiries.push((client_id.clone(), Duration::from_millis(left_ms as u64)));
            registry
                .sessions
                .insert(client_id, SessionCell::new(session));
        }
        metrics::gauge!("silt_mqtt_sessions").set(registry.sessions.len() as f64);
        metrics::gauge!("silt_mqtt_retained_messages").set(registry.retained.len() as f64);
        // What the log said is a fact that the next recovery would find again: no need to
        // wait for it.
        persist.write(recovered);

        let rate = f64::from(limits.connect_rate_per_sec.max(1));
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            ingest,
            registry: Mutex::new(registry),
            persist,
            store_thread: Mutex::new(Some(store_thread)),
            passwords,
            acl,
            connections: AtomicUsize::new(0),
            connection_closed: Notify::new(),
            generation: AtomicU64::new(0),
            shutdown,
            rate: Mutex::new(TokenBucket {
                rate,
                tokens: rate,
                last: Instant::now(),
            }),
            loaded_expiries: Mutex::new(expiries),
            loaded_wills: Mutex::new(wills),
        });
        Ok(Broker { shared })
    }

    /// Accepts MQTT connections on `listener` (TLS when `tls` is given) until
    /// [`Broker::shutdown`]. The task ends when the broker shuts down.
    pub fn serve(
        &self,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> JoinHandle<()> {
        let shared = self.shared.clone();
        let loaded = std::mem::take(&mut *lock(&shared.loaded_expiries));
        for (client_id, after) in loaded {
            shared.arm_session_expiry(client_id, 0, after);
        }
        let wills = std::mem::take(&mut *lock(&shared.loaded_wills));
        for (client_id, after) in wills {
            shared.arm_will(client_id, 0, after);
        }
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            let mut shutdown = shared.shutdown.subscribe();
            loop {
                let accepted = tokio::select! {
                    () = stopped(&mut shutdown) => break,
                    accepted = listener.accept() => accepted,
                };
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept an MQTT connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                // Beyond the limit (plus room to tell a few clients so in a CONNACK), a socket
                // is closed at once: a flood of silent connections cannot pin tasks and buffers
                // until their connect timeout.
                let open = shared.connections.load(Ordering::Acquire);
                if open
                    >= shared
                        .config
                        .limits
                        .max_connections
                        .saturating_add(CONNACK_GRACE)
                {
                    metrics::counter!("silt_mqtt_connects_refused_total", "reason" => "max_connections")
                        .increment(1);
                    drop(socket);
                    continue;
                }
                let _ = socket.set_nodelay(true);
                shared.connections.fetch_add(1, Ordering::AcqRel);
                metrics::gauge!("silt_mqtt_connections").increment(1.0);
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let guard = ConnectionGuard(shared.clone());
                    serve_socket(shared, socket, peer, acceptor).await;
                    drop(guard);
                });
            }
        })
    }

    /// Stops accepting, disconnects every client (5.0: 0x8B server shutting down), waits for
    /// acknowledgements under way, and saves the session state. Idempotent.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        shared.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while shared.connections.load(Ordering::Acquire) > 0 {
            let closed = shared.connection_closed.notified();
            if shared.connections.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                tracing::warn!(
                    open = shared.connections.load(Ordering::Acquire),
                    "connections still open after the shutdown grace period"
                );
                break;
            }
        }
        shared.persist.close().await;
        let thread = lock(&shared.store_thread).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Counts a connection until it ends.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("silt_mqtt_connections").decrement(1.0);
        self.0.connection_closed.notify_waiters();
    }
}

async fn serve_socket(
    shared: Arc<Shared>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    match acceptor {
        None => super::connection::run(shared, socket, peer, None).await,
        Some(acceptor) => {
            let timeout = shared.config.limits.connect_timeout;
            let stream = match tokio::time::timeout(timeout, acceptor.accept(socket)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    metrics::counter!("silt_mqtt_connects_refused_total", "reason" => "tls")
                        .increment(1);
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let identity = super::tls::peer_common_name(stream.get_ref().1);
            super::connection::run(shared, stream, peer, identity).await;
        }
    }
}
