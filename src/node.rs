//! The running broker on this machine: definitions, queue runners, the
//! channels that own consumers, and the operations that touch several of
//! them (declare, delete, dead-lettering).
//!
//! Connections and queue runners talk through the node: a queue sends a
//! delivery to `send_to_owner(owner, …)`, which finds the owning channel's
//! connection. Nothing here blocks on a socket.

use crate::broker::error::BrokerError;
use crate::broker::metadata::{ConnId, MetaCommand, MetaOutcome, Metadata, QueueDef};
use crate::config::Config;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::queue::command::{Command, DeadLetterReason, MsgId, OwnerId};
use crate::queue::config::QueueConfig;
use crate::queue::runner::{self, QueueHandle, Request};
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, watch};

/// Milliseconds since the Unix epoch: the time carried inside commands.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a queue (or the node) tells a channel.
#[derive(Debug)]
pub enum ChannelEvent {
    Deliver {
        queue: Arc<str>,
        tag: Arc<str>,
        id: MsgId,
        msg: Message,
        redelivered: bool,
    },
    Confirm {
        seq: u64,
        accepted: bool,
    },
    /// The queue the consumer was on was deleted.
    ConsumerCancelled {
        tag: Arc<str>,
    },
    /// A direct reply-to response for this channel's pseudo-consumer.
    DirectReply {
        msg: Message,
    },
}

/// Events for a connection, tagged with the channel they are for.
pub type ConnEvents = mpsc::UnboundedSender<(u16, ChannelEvent)>;

/// One Warren node.
pub struct Node {
    pub config: Config,
    pub metrics: Metrics,
    meta: RwLock<Metadata>,
    /// vhost -> queue name -> runner.
    queues: RwLock<HashMap<String, HashMap<Arc<str>, QueueHandle>>>,
    /// Channels that own consumers or deliveries, by owner id.
    owners: RwLock<HashMap<OwnerId, (ConnEvents, u16)>>,
    next_id: AtomicU64,
    /// True while a resource alarm (memory) blocks publishers.
    pub alarm: watch::Sender<bool>,
    /// Resident memory above which the alarm fires, bytes; changed at run
    /// time through the admin API.
    pub memory_limit: AtomicU64,
}

impl Node {
    pub fn new(config: Config) -> Arc<Node> {
        let (alarm, _) = watch::channel(false);
        Arc::new(Node {
            metrics: Metrics::new(),
            meta: RwLock::new(Metadata::new()),
            queues: RwLock::new(HashMap::new()),
            owners: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            alarm,
            memory_limit: AtomicU64::new(crate::server::memory_limit(&config)),
            config,
        })
    }

    /// A new id for a connection or channel, unique in the cluster: the node
    /// id is in the top 16 bits.
    pub fn next_id(&self) -> u64 {
        ((self.config.node_id as u64) << 48) | self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn meta(&self) -> std::sync::RwLockReadGuard<'_, Metadata> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a definition command and starts or stops the queue runners it
    /// creates or deletes.
    pub fn apply_meta(self: &Arc<Self>, cmd: MetaCommand) -> Result<MetaOutcome, BrokerError> {
        let spawn = match &cmd {
            MetaCommand::DeclareQueue { vhost, def } => Some((vhost.clone(), def.clone())),
            _ => None,
        };
        let outcome = {
            let mut meta = self.meta.write().unwrap_or_else(|e| e.into_inner());
            meta.apply(cmd)?
        };
        if let (Some((vhost, def)), true) = (spawn, outcome.created) {
            self.start_queue(&vhost, &def);
        }
        Ok(outcome)
    }

    fn start_queue(self: &Arc<Self>, vhost: &str, def: &QueueDef) {
        let config = QueueConfig::from_arguments(
            def.durable,
            def.exclusive_owner.is_some(),
            def.auto_delete,
            &def.arguments,
        )
        .unwrap_or_else(|_| QueueConfig::classic());
        let handle = runner::spawn(
            self.clone(),
            Arc::from(vhost),
            Arc::from(def.name.as_str()),
            config,
            def.auto_delete,
        );
        self.queues
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(vhost.to_owned())
            .or_default()
            .insert(handle.name.clone(), handle);
    }

    /// The runner of a queue, if it exists.
    pub fn queue(&self, vhost: &str, name: &str) -> Option<QueueHandle> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(vhost)?
            .get(name)
            .cloned()
    }

    /// Every queue runner (admin API, metrics).
    pub fn all_queues(&self) -> Vec<QueueHandle> {
        let q = self.queues.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<QueueHandle> = q.values().flat_map(|m| m.values().cloned()).collect();
        v.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        v
    }

    /// Deletes a queue's definition and stops its runner, which cancels its
    /// consumers. Returns the number of ready messages it held.
    pub async fn delete_queue(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
    ) -> Result<u64, BrokerError> {
        let count = match self.queue(vhost, name) {
            Some(h) => h.counts().await.map(|c| c.ready).unwrap_or(0),
            None => 0,
        };
        self.apply_meta(MetaCommand::DeleteQueue {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        })?;
        self.stop_queue(vhost, name).await;
        Ok(count)
    }

    async fn stop_queue(&self, vhost: &str, name: &str) {
        let handle = self
            .queues
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(vhost)
            .and_then(|m| m.remove(name));
        if let Some(h) = handle {
            let _ = h.send(Request::Stop).await;
        }
    }

    /// Deletes a queue from inside a runner (x-expires, auto-delete), where
    /// awaiting the runner itself would deadlock.
    pub fn delete_queue_later(self: &Arc<Self>, vhost: &str, name: &str) {
        let node = self.clone();
        let (vhost, name) = (vhost.to_owned(), name.to_owned());
        tokio::spawn(async move {
            let removed = {
                let mut meta = node.meta.write().unwrap_or_else(|e| e.into_inner());
                meta.apply(MetaCommand::DeleteQueue {
                    vhost: vhost.clone(),
                    name: name.clone(),
                })
            };
            if removed.is_ok() {
                node.stop_queue(&vhost, &name).await;
            }
        });
    }

    /// A connection closed: its exclusive queues go with it.
    /// `vhost` is the one the connection used: its exclusive queues can be
    /// nowhere else.
    pub async fn connection_closed(self: &Arc<Self>, conn: ConnId, vhost: &str) {
        let outcome = {
            let mut meta = self.meta.write().unwrap_or_else(|e| e.into_inner());
            meta.apply(MetaCommand::ConnectionClosed { conn })
        };
        if let Ok(outcome) = outcome {
            for name in &outcome.deleted_queues {
                self.stop_queue(vhost, name).await;
            }
        }
    }

    pub fn register_owner(&self, owner: OwnerId, events: ConnEvents, channel: u16) {
        self.owners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(owner, (events, channel));
    }

    pub fn unregister_owner(&self, owner: OwnerId) {
        self.owners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&owner);
    }

    /// Sends an event to a channel; false when the channel is gone.
    pub fn send_to_owner(&self, owner: OwnerId, ev: ChannelEvent) -> bool {
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        match owners.get(&owner) {
            Some((tx, ch)) => tx.send((*ch, ev)).is_ok(),
            None => false,
        }
    }

    /// Publishes a dead-lettered message to the queue's dead-letter exchange
    /// with an `x-death` entry, as RabbitMQ does. Never waits: a full target
    /// queue gets the message from a spawned task.
    pub fn dead_letter(
        self: &Arc<Self>,
        vhost: &str,
        queue: &str,
        config: &QueueConfig,
        msg: Message,
        reason: DeadLetterReason,
    ) {
        let Some(dlx) = config.dead_letter_exchange.as_deref() else {
            return;
        };
        let routing_key = config
            .dead_letter_routing_key
            .clone()
            .unwrap_or_else(|| msg.routing_key.to_string());
        let dead = add_x_death(&msg, queue, reason, now_ms());
        let dead = Message {
            exchange: Arc::from(dlx),
            routing_key: Arc::from(routing_key.as_str()),
            ..dead
        };
        let mut targets = Vec::new();
        if self
            .meta()
            .route(vhost, dlx, &routing_key, &dead.raw_properties, &mut targets)
            .is_err()
        {
            return;
        }
        self.metrics.dead_lettered.inc();
        for name in targets {
            // A message is never dead-lettered back into the queue it left
            // for the same reason in a cycle without a reject (RabbitMQ's
            // cycle rule); keeping it simple: skip the source queue unless
            // the reason is a rejection.
            if &*name == queue && reason != DeadLetterReason::Rejected {
                continue;
            }
            if let Some(h) = self.queue(vhost, &name) {
                let cmd = Command::Enqueue {
                    msg: dead.clone(),
                    confirm: None,
                    now_ms: now_ms(),
                };
                if let Err(req) = h.try_send(Request::Apply(cmd, None)) {
                    tokio::spawn(async move {
                        let _ = h.send(*req).await;
                    });
                }
            }
        }
    }

    /// Checks a username and password against the configured users.
    pub fn authenticate(&self, user: &str, password: &str) -> bool {
        self.config
            .users
            .iter()
            .any(|u| u.name == user && u.password == password)
    }
}

/// The message with RabbitMQ's `x-death` header updated: the entry for this
/// queue and reason has its count raised, or a new one goes first; and the
/// `x-first-death-*` / `x-last-death-*` headers are set.
pub fn add_x_death(msg: &Message, queue: &str, reason: DeadLetterReason, now_ms: u64) -> Message {
    let mut props = msg.properties();
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let ls = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let mut found = None;
    for (i, d) in deaths.iter().enumerate() {
        if let AMQPValue::FieldTable(t) = d {
            let q = t.inner().get("queue").and_then(crate::message::value_str);
            let r = t.inner().get("reason").and_then(crate::message::value_str);
            if q.as_deref() == Some(queue) && r.as_deref() == Some(reason.as_str()) {
                found = Some(i);
            }
        }
    }
    let entry = match found {
        Some(i) => {
            let mut t = match deaths.remove(i) {
                AMQPValue::FieldTable(t) => t,
                _ => FieldTable::default(),
            };
            let count = crate::message::table_int(&t, "count").unwrap_or(0) + 1;
            t.insert(ShortString::from("count"), AMQPValue::LongLongInt(count));
            t.insert(
                ShortString::from("time"),
                AMQPValue::Timestamp(now_ms / 1000),
            );
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
            t.insert(ShortString::from("reason"), ls(reason.as_str()));
            t.insert(ShortString::from("queue"), ls(queue));
            t.insert(
                ShortString::from("time"),
                AMQPValue::Timestamp(now_ms / 1000),
            );
            t.insert(ShortString::from("exchange"), ls(&msg.exchange));
            t.insert(
                ShortString::from("routing-keys"),
                AMQPValue::FieldArray(FieldArray::from(vec![ls(&msg.routing_key)])),
            );
            if let Some(exp) = props.expiration() {
                t.insert(ShortString::from("original-expiration"), ls(exp.as_str()));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    if !headers.contains_key("x-first-death-reason") {
        headers.insert(
            ShortString::from("x-first-death-reason"),
            ls(reason.as_str()),
        );
        headers.insert(ShortString::from("x-first-death-queue"), ls(queue));
        headers.insert(
            ShortString::from("x-first-death-exchange"),
            ls(&msg.exchange),
        );
    }
    headers.insert(
        ShortString::from("x-last-death-reason"),
        ls(reason.as_str()),
    );
    headers.insert(ShortString::from("x-last-death-queue"), ls(queue));
    headers.insert(
        ShortString::from("x-last-death-exchange"),
        ls(&msg.exchange),
    );
    headers.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    // A dead-lettered message's per-message TTL is removed so that it does
    // not expire again in the dead-letter queue (RabbitMQ does the same).
    props = props.with_headers(headers);
    let mut cleared = amq_protocol::protocol::BasicProperties::default();
    if let Some(v) = props.content_type() {
        cleared = cleared.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        cleared = cleared.with_content_encoding(v.clone());
    }
    if let Some(v) = props.headers() {
        cleared = cleared.with_headers(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        cleared = cleared.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        cleared = cleared.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        cleared = cleared.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        cleared = cleared.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        cleared = cleared.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        cleared = cleared.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        cleared = cleared.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        cleared = cleared.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        cleared = cleared.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        cleared = cleared.with_cluster_id(v.clone());
    }
    let mut out = msg.with_properties(&cleared);
    out.expiration_ms = None;
    out
}
