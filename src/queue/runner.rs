//! The I/O shell around one queue's state machine on this node.
//!
//! A runner is a task that owns a [`QueueState`], applies the commands sent
//! to it in arrival order, and carries out the effects: deliveries and
//! confirms go to the owning channel's connection, replies (get, purge) go
//! back to the caller, dead letters are republished through the node, and an
//! expired or auto-deleted queue asks the node to delete it. The inbox is
//! bounded, so a publisher that outruns a queue waits on `send`, which stops
//! its connection reading from the socket: TCP backpressure, with no
//! per-publisher state kept in the queue.

use super::command::{Command, ConsumerSpec, Effect, OwnerId, QueueCounts};
use super::config::QueueConfig;
use super::exclusive::Exclusive;
use super::fifo::QueueState;
use crate::message::Message;
use crate::node::{ChannelEvent, Handover, Node};
use amq_protocol::types::{AMQPValue, ShortString};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Commands waiting for a queue. A full inbox makes publishers wait.
pub const INBOX_CAPACITY: usize = 1024;
/// Commands applied before the runner yields to carry out effects.
const BATCH: usize = 256;

/// Requests a runner serves.
pub enum Request {
    /// Apply a command. `reply` receives the reply effects (get-ok,
    /// get-empty, purged), and the confirm of an enqueue, which then goes
    /// to the caller instead of the channel it names.
    Apply(Command, Option<oneshot::Sender<Vec<Effect>>>),
    /// Register a consumer, refusing it if an exclusive consumer is there or
    /// it asks for exclusivity while others are.
    Consume {
        spec: ConsumerSpec,
        exclusive: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Current counts.
    Counts(oneshot::Sender<QueueCounts>),
    /// The queue was deleted: cancel every consumer and stop.
    Stop,
    /// Node `node` went down, or restarted (then `below` is the first owner
    /// id of its new run): the owners it had are gone, so their consumers
    /// are cancelled and their unsettled messages returned.
    NodeGone { node: u64, below: Option<u64> },
    /// The link to node `node` broke and came back: what its channels hold
    /// is sent to them again (marked redelivered), since deliveries in
    /// flight on the broken link may never have arrived.
    Resend { node: u64 },
}

/// Counts published by the runner after every batch, read by the admin API
/// and metrics without a round trip to the task.
#[derive(Default)]
pub struct QueueStats {
    pub ready: AtomicU64,
    pub unacked: AtomicU64,
    pub consumers: AtomicU64,
    pub ready_bytes: AtomicU64,
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    /// Messages being dead-lettered at least once (RabbitMQ's
    /// `messages_dlx`).
    pub dead_lettering: AtomicU64,
}

/// How the rest of the node reaches a queue.
#[derive(Clone)]
pub struct QueueHandle {
    pub vhost: Arc<str>,
    pub name: Arc<str>,
    pub config: Arc<QueueConfig>,
    pub stats: Arc<QueueStats>,
    tx: mpsc::Sender<Request>,
    /// The Raft group of a replicated queue; None for a node-local one.
    pub group: Option<u64>,
    /// For a node-local queue that lives on another node: that node, to
    /// which this handle forwards every request.
    pub home: Option<u64>,
}

impl QueueHandle {
    pub fn new(
        vhost: Arc<str>,
        name: Arc<str>,
        config: Arc<QueueConfig>,
        stats: Arc<QueueStats>,
        tx: mpsc::Sender<Request>,
        group: Option<u64>,
        home: Option<u64>,
    ) -> QueueHandle {
        QueueHandle {
            vhost,
            name,
            config,
            stats,
            tx,
            group,
            home,
        }
    }

    /// Sends a request, waiting for room in the inbox. Fails only when the
    /// queue has stopped (it was deleted meanwhile).
    pub async fn send(&self, r: Request) -> Result<(), ()> {
        self.tx.send(r).await.map_err(|_| ())
    }

    /// Sends without waiting; used where waiting could deadlock (a queue
    /// dead-lettering into another queue).
    pub fn try_send(&self, r: Request) -> Result<(), Box<Request>> {
        self.tx.try_send(r).map_err(|e| match e {
            mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => {
                Box::new(r)
            }
        })
    }

    /// Applies a command and waits for its reply effects.
    pub async fn call(&self, cmd: Command) -> Option<Vec<Effect>> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Apply(cmd, Some(tx))).await.ok()?;
        rx.await.ok()
    }

    pub async fn counts(&self) -> Option<QueueCounts> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Counts(tx)).await.ok()?;
        rx.await.ok()
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Starts a runner for a queue that was just declared.
pub fn spawn(
    node: Arc<Node>,
    vhost: Arc<str>,
    name: Arc<str>,
    config: QueueConfig,
    auto_delete: bool,
) -> QueueHandle {
    let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
    let config = Arc::new(config);
    let handle = QueueHandle {
        vhost,
        name,
        config: config.clone(),
        stats: Arc::new(QueueStats::default()),
        tx,
        group: None,
        home: None,
    };
    let runner = Runner {
        node,
        handle: handle.clone(),
        state: QueueState::new((*config).clone(), crate::node::now_ms()),
        auto_delete,
        had_consumer: false,
        exclusive: Exclusive::default(),
    };
    tokio::spawn(runner.run(rx));
    handle
}

struct Runner {
    node: Arc<Node>,
    handle: QueueHandle,
    state: QueueState,
    auto_delete: bool,
    /// Auto-delete applies only once a consumer has come and gone.
    had_consumer: bool,
    exclusive: Exclusive,
}

impl Runner {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let deadline = self.state.next_deadline();
            let received = match deadline {
                Some(at) => {
                    let wait = at.saturating_sub(crate::node::now_ms());
                    tokio::select! {
                        n = rx.recv_many(&mut batch, BATCH) => n,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {
                            let effects = self.state.apply(Command::Tick { now_ms: crate::node::now_ms() });
                            if self.carry_out(effects, None) { break; }
                            self.publish_stats();
                            continue;
                        }
                    }
                }
                None => rx.recv_many(&mut batch, BATCH).await,
            };
            if received == 0 {
                break;
            }
            let mut stop = false;
            for req in batch.drain(..) {
                if self.serve(req) {
                    stop = true;
                    break;
                }
            }
            self.publish_stats();
            if stop {
                break;
            }
            if self.auto_delete && self.had_consumer && self.state.counts().consumers == 0 {
                self.node
                    .delete_queue_later(&self.handle.vhost, &self.handle.name);
                self.auto_delete = false;
            }
        }
        self.cancel_all_consumers();
        self.refuse_pending(rx);
    }

    /// Returns true when the runner must stop.
    fn serve(&mut self, req: Request) -> bool {
        match req {
            Request::Apply(cmd, reply) => {
                self.exclusive.observe(&cmd);
                if matches!(cmd, Command::Enqueue { .. }) {
                    self.handle.stats.published.fetch_add(1, Ordering::Relaxed);
                }
                let effects = self.state.apply(cmd);
                self.carry_out(effects, reply)
            }
            Request::Consume {
                spec,
                exclusive,
                reply,
            } => {
                let consumers = self.state.counts().consumers;
                if let Err(text) = self.exclusive.admit(
                    &spec,
                    exclusive,
                    consumers,
                    &self.handle.vhost,
                    &self.handle.name,
                ) {
                    let _ = reply.send(Err(text));
                    return false;
                }
                self.had_consumer = true;
                // The reply goes first so that consume-ok precedes deliveries.
                let _ = reply.send(Ok(()));
                let effects = self.state.apply(Command::Consume {
                    spec,
                    now_ms: crate::node::now_ms(),
                });
                self.carry_out(effects, None)
            }
            Request::Counts(reply) => {
                let _ = reply.send(self.state.counts());
                false
            }
            Request::Stop => true,
            Request::Resend { node } => {
                let effects = self
                    .state
                    .checked_out_to(|o| crate::node::owner_node(o) == node);
                self.carry_out(effects, None)
            }
            Request::NodeGone { node, below } => {
                let now = crate::node::now_ms();
                let gone = owners_of(&self.state.owners(), node, below);
                if below.is_none() {
                    // The node may only be cut off, its channels alive: they
                    // are told once it is reachable (as a replicated queue
                    // does).
                    hold_cancels(&self.node, &self.state, &gone);
                }
                for owner in gone {
                    let cmd = Command::OwnerDown { owner, now_ms: now };
                    self.exclusive.observe(&cmd);
                    let effects = self.state.apply(cmd);
                    if self.carry_out(effects, None) {
                        return true;
                    }
                }
                false
            }
        }
    }

    /// Carries out effects; returns true when the queue must stop.
    fn carry_out(
        &mut self,
        effects: Vec<Effect>,
        reply: Option<oneshot::Sender<Vec<Effect>>>,
    ) -> bool {
        let mut replies = Vec::new();
        let mut gone_owners = Vec::new();
        let mut unreachable = Vec::new();
        for e in effects {
            match e {
                Effect::Deliver {
                    owner,
                    tag,
                    id,
                    msg,
                    redelivered,
                    delivery_count,
                } => {
                    self.handle.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    let msg = self.with_delivery_count(msg, delivery_count);
                    let sent = self.node.deliver(
                        owner,
                        &self.handle.vhost,
                        &self.handle.name,
                        tag,
                        id,
                        msg,
                        redelivered,
                    );
                    match sent {
                        Handover::Sent => {}
                        Handover::OwnerGone => gone_owners.push(owner),
                        Handover::NotSent => unreachable.push(owner),
                    }
                }
                // A publish forwarded from another node is confirmed there,
                // by the forwarding node, from the reply.
                e @ Effect::Confirm { .. } if reply.is_some() => replies.push(e),
                Effect::Confirm { confirm, accepted } => {
                    self.node.send_to_owner(
                        confirm.owner,
                        ChannelEvent::Confirm {
                            seq: confirm.seq,
                            accepted,
                        },
                    );
                }
                Effect::DeadLetter {
                    msg,
                    reason,
                    settle,
                } => {
                    // At least once takes a quorum queue, and a node-local
                    // queue never is one: it dead-letters at most once.
                    debug_assert!(settle.is_none());
                    self.node.dead_letter(
                        &self.handle.vhost,
                        &self.handle.name,
                        &self.handle.config,
                        msg,
                        reason,
                    );
                }
                Effect::Expired => {
                    self.node
                        .delete_queue_later(&self.handle.vhost, &self.handle.name);
                }
                Effect::GetOk {
                    owner,
                    id,
                    msg,
                    redelivered,
                    delivery_count,
                    remaining,
                } => {
                    let msg = self.with_delivery_count(msg, delivery_count);
                    replies.push(Effect::GetOk {
                        owner,
                        id,
                        msg,
                        redelivered,
                        delivery_count,
                        remaining,
                    });
                }
                e @ (Effect::GetEmpty { .. } | Effect::Purged { .. }) => {
                    replies.push(e);
                }
            }
        }
        if let Some(r) = reply {
            let _ = r.send(replies);
        }
        // A channel that a delivery could not reach loses its consumers of
        // this queue (told when its node can be reached again), and what it
        // held goes back like a gone channel's.
        unreachable.sort_unstable();
        unreachable.dedup();
        hold_cancels(&self.node, &self.state, &unreachable);
        gone_owners.extend(unreachable);
        // A delivery to a channel that has gone away goes back to the queue
        // at once rather than waiting for the channel's cleanup.
        gone_owners.sort_unstable();
        gone_owners.dedup();
        for owner in gone_owners {
            let effects = self.state.apply(Command::OwnerDown {
                owner,
                now_ms: crate::node::now_ms(),
            });
            if self.carry_out(effects, None) {
                return true;
            }
        }
        false
    }

    fn with_delivery_count(&self, msg: Message, count: u32) -> Message {
        with_delivery_count(&self.handle.config, msg, count)
    }

    fn publish_stats(&self) {
        let c = self.state.counts();
        let s = &self.handle.stats;
        s.ready.store(c.ready, Ordering::Relaxed);
        s.unacked.store(c.unacked, Ordering::Relaxed);
        s.consumers.store(c.consumers, Ordering::Relaxed);
        s.ready_bytes.store(c.ready_bytes, Ordering::Relaxed);
        s.dead_lettering.store(c.dead_lettering, Ordering::Relaxed);
    }

    fn refuse_pending(&self, rx: mpsc::Receiver<Request>) {
        refuse_pending(&self.node, &self.handle, rx);
    }

    /// Tells every consumer's channel that the queue is gone
    /// (consumer cancel notification).
    fn cancel_all_consumers(&mut self) {
        for (owner, tag) in self.state.consumers() {
            self.node.cancel_consumer(owner, tag);
        }
        self.handle.stats.consumers.store(0, Ordering::Relaxed);
    }
}

/// Quorum queues tell a consumer how often a message was returned before, in
/// `x-delivery-count` (RabbitMQ 4.x), on redeliveries only so that a first
/// delivery's properties go out untouched.
pub fn with_delivery_count(config: &QueueConfig, msg: Message, count: u32) -> Message {
    if !config.quorum || count == 0 {
        return msg;
    }
    let props = msg.properties();
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from("x-delivery-count"),
        AMQPValue::LongLongInt(count as i64),
    );
    msg.with_properties(&props.with_headers(headers))
}

/// Holds a consumer cancellation for every consumer of `owners` in
/// `state` (their channels may be alive on a node that cannot be reached
/// now); [`Node::cancel_when_reachable`] sends them once it can be.
pub fn hold_cancels(node: &Node, state: &QueueState, owners: &[OwnerId]) {
    if owners.is_empty() {
        return;
    }
    for (owner, tag) in state.consumers() {
        if owners.contains(&owner) {
            node.cancel_when_reachable(owner, tag);
        }
    }
}

/// The owners among `owners` that belong to `node` (its id is in the top 16
/// bits), and, when `below` is given, to an earlier run of it.
pub fn owners_of(owners: &[OwnerId], node: u64, below: Option<u64>) -> Vec<OwnerId> {
    owners
        .iter()
        .copied()
        .filter(|&o| crate::node::owner_node(o) == node && below.is_none_or(|f| o < f))
        .collect()
}

/// Answers what was sent to a queue after it stopped: a publish waiting for
/// a confirm is confirmed (it reached the queue, which is gone, as in
/// RabbitMQ), so that no publisher waits forever; a consumer is refused.
/// Replies that are dropped make their callers see a deleted queue.
pub fn refuse_pending(node: &Node, handle: &QueueHandle, mut rx: mpsc::Receiver<Request>) {
    rx.close();
    while let Ok(req) = rx.try_recv() {
        match req {
            Request::Apply(
                Command::Enqueue {
                    confirm: Some(confirm),
                    ..
                },
                _,
            ) => {
                node.send_to_owner(
                    confirm.owner,
                    ChannelEvent::Confirm {
                        seq: confirm.seq,
                        accepted: true,
                    },
                );
            }
            Request::Consume { reply, .. } => {
                let _ = reply.send(Err(format!(
                    "queue '{}' in vhost '{}' was deleted",
                    handle.name, handle.vhost
                )));
            }
            _ => {}
        }
    }
}
