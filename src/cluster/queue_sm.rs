//! A replicated queue's state machine: the single-node [`QueueState`]
//! driven by committed Raft entries instead of a local inbox.
//!
//! Every replica applies every entry, so every replica holds the same
//! queue. Only the leader carries out the effects that reach outside the
//! queue (deliveries, dead-lettering, deleting an expired queue); the
//! effects meant for the proposer (confirms, get replies, purge counts) go
//! back in the entry's reply, which Raft hands to the node that proposed it.
//!
//! "The leader" here means: this node leads the group *and* the entry was
//! proposed in its own term. Entries of an earlier term were the previous
//! leader's to carry out; when a node starts applying entries of its own
//! term it sends every unsettled delivery once more, marked redelivered,
//! because the previous leader may have died before they left it, and
//! dead-letters again every message still being dead-lettered at least
//! once ([`super::dead_letter`]).

use super::dead_letter::DeadLetterer;
use super::wire::{OpReply, QueueOp, decode, encode};
use crate::node::{Handover, Node};
use crate::queue::command::{Command, Effect, OwnerId};
use crate::queue::config::QueueConfig;
use crate::queue::exclusive::Exclusive;
use crate::queue::fifo::QueueState;
use crate::queue::runner::{QueueStats, Request, hold_cancels, owners_of, with_delivery_count};
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::watch;

/// How much older than the queue's clock a node-down report may be and
/// still be acted on.
const STALE_NODE_GONE_MS: u64 = 2_000;

pub struct QueueSm {
    node: Weak<Node>,
    vhost: Arc<str>,
    name: Arc<str>,
    config: Arc<QueueConfig>,
    state: QueueState,
    exclusive: Exclusive,
    stats: Arc<QueueStats>,
    /// The next time a Tick is due, set only while leading.
    deadline: watch::Sender<Option<u64>>,
    /// Whether the last applied entry was applied as the leader.
    leading: bool,
    /// Dead-lettering at least once: the leader's tasks and retries.
    dead_letterer: DeadLetterer,
    /// Dead letters (at least once) that the entry being applied produced,
    /// handed to `dead_letterer` once the whole entry is applied.
    fresh_dead_letters: Vec<Effect>,
}

impl QueueSm {
    pub fn new(
        node: &Arc<Node>,
        vhost: Arc<str>,
        name: Arc<str>,
        config: Arc<QueueConfig>,
        stats: Arc<QueueStats>,
    ) -> QueueSm {
        let (deadline, rx) = watch::channel(None);
        tokio::spawn(ticker(
            Arc::downgrade(node),
            vhost.clone(),
            name.clone(),
            rx,
        ));
        QueueSm {
            node: Arc::downgrade(node),
            state: QueueState::new((*config).clone(), 0),
            dead_letterer: DeadLetterer::new(vhost.clone(), name.clone(), config.clone()),
            fresh_dead_letters: Vec::new(),
            vhost,
            name,
            config,
            exclusive: Exclusive::default(),
            stats,
            deadline,
            leading: false,
        }
    }

    fn apply_op(&mut self, op: QueueOp, node: Option<&Arc<Node>>) -> OpReply {
        match op {
            QueueOp::Cmd(cmd) => {
                self.exclusive.observe(&cmd);
                match &cmd {
                    Command::Enqueue { .. } => {
                        self.stats.published.fetch_add(1, Ordering::Relaxed);
                    }
                    Command::DeadLettered { ids } => self.dead_letterer.settled(ids),
                    _ => {}
                }
                let fx = self.state.apply(cmd);
                OpReply::Effects(self.carry_out(fx, node))
            }
            QueueOp::Consume {
                spec,
                exclusive,
                now_ms,
            } => {
                let consumers = self.state.counts().consumers;
                if let Err(text) =
                    self.exclusive
                        .admit(&spec, exclusive, consumers, &self.vhost, &self.name)
                {
                    return OpReply::Consume(Err(text));
                }
                let fx = self.state.apply(Command::Consume { spec, now_ms });
                self.carry_out(fx, node);
                OpReply::Consume(Ok(()))
            }
            QueueOp::Counts => OpReply::Counts(self.state.counts()),
            QueueOp::Resend { node: n } => {
                let fx = self
                    .state
                    .checked_out_to(|o| crate::node::owner_node(o) == n);
                self.carry_out(fx, node);
                OpReply::Effects(Vec::new())
            }
            QueueOp::NodeGone {
                node: n,
                below,
                now_ms,
            } => {
                // A node cut off while it led the queue may have proposed
                // "the others are gone" and, once back, forwarded that to the
                // new leader. By then the queue has applied later commands
                // from the live side: a report older than that is stale, and
                // acting on it would drop every live consumer.
                if below.is_none() && now_ms + STALE_NODE_GONE_MS < self.state.clock_ms() {
                    tracing::info!(queue = %self.name, node = n, "stale node-down report ignored");
                    return OpReply::Effects(Vec::new());
                }
                let gone = owners_of(&self.state.owners(), n, below);
                if let (Some(node), None) = (node, below) {
                    // The node may only be cut off or paused, its channels
                    // alive: they are told their consumers were cancelled
                    // (once the node is reachable again), so that clients
                    // consume again instead of waiting for nothing.
                    hold_cancels(node, &self.state, &gone);
                }
                for owner in gone {
                    let cmd = Command::OwnerDown { owner, now_ms };
                    self.exclusive.observe(&cmd);
                    let fx = self.state.apply(cmd);
                    self.carry_out(fx, node);
                }
                OpReply::Effects(Vec::new())
            }
        }
    }

    /// Carries out the leader's effects (when `node` is given) and returns
    /// the ones that answer the proposer.
    fn carry_out(&mut self, fx: Vec<Effect>, node: Option<&Arc<Node>>) -> Vec<Effect> {
        let mut replies = Vec::new();
        // Channels a delivery did not reach: gone, or on a node that cannot
        // be reached now.
        let mut gone = Vec::new();
        let mut unreachable = Vec::new();
        for e in fx {
            match e {
                Effect::Deliver {
                    owner,
                    tag,
                    id,
                    msg,
                    redelivered,
                    delivery_count,
                } => {
                    let Some(node) = node else { continue };
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    let msg = with_delivery_count(&self.config, msg, delivery_count);
                    match node.deliver(owner, &self.vhost, &self.name, tag, id, msg, redelivered) {
                        Handover::Sent => {}
                        Handover::OwnerGone => gone.push(owner),
                        Handover::NotSent => unreachable.push(owner),
                    }
                }
                // At least once: carried out (in tasks) once the whole entry
                // is applied.
                e @ Effect::DeadLetter {
                    settle: Some(_), ..
                } => {
                    if node.is_some() {
                        self.fresh_dead_letters.push(e);
                    }
                }
                Effect::DeadLetter {
                    msg,
                    reason,
                    settle: None,
                } => {
                    if let Some(node) = node {
                        node.dead_letter(&self.vhost, &self.name, &self.config, msg, reason);
                    }
                }
                Effect::Expired => {
                    if let Some(node) = node {
                        node.delete_queue_later(&self.vhost, &self.name);
                    }
                }
                Effect::GetOk {
                    owner,
                    id,
                    msg,
                    redelivered,
                    delivery_count,
                    remaining,
                } => replies.push(Effect::GetOk {
                    owner,
                    id,
                    msg: with_delivery_count(&self.config, msg, delivery_count),
                    redelivered,
                    delivery_count,
                    remaining,
                }),
                e @ (Effect::Confirm { .. } | Effect::GetEmpty { .. } | Effect::Purged { .. }) => {
                    replies.push(e)
                }
            }
        }
        if let Some(node) = node {
            // A gone channel's messages go back at once. A channel whose
            // node cannot be reached also loses its consumers here (told
            // once the node is reachable): the message never left, and no
            // credit may stay held by deliveries nobody will receive.
            unreachable.sort_unstable();
            unreachable.dedup();
            hold_cancels(node, &self.state, &unreachable);
            gone.extend(unreachable);
            gone.sort_unstable();
            gone.dedup();
            for owner in gone {
                owner_down_later(node, &self.vhost, &self.name, owner);
            }
        }
        replies
    }

    /// A new leader gives back what the channels of unreachable nodes
    /// hold: their node went down before this one led the queue, so nobody
    /// returned it then (the old leader may have been cut off with them).
    fn release_unreachable_owners(&self, node: &Arc<Node>) {
        let view = node.raft().reachable();
        let mut gone: Vec<u64> = self
            .state
            .owners()
            .iter()
            .map(|o| crate::node::owner_node(*o))
            .filter(|n| *n != node.node_id() && view.get(n) == Some(&false))
            .collect();
        gone.sort_unstable();
        gone.dedup();
        let Some(h) = node.queue(&self.vhost, &self.name) else {
            return;
        };
        for n in gone {
            let h = h.clone();
            tokio::spawn(async move {
                let _ = h
                    .send(Request::NodeGone {
                        node: n,
                        below: None,
                    })
                    .await;
            });
        }
    }

    fn publish_stats(&self) {
        let c = self.state.counts();
        let s = &self.stats;
        s.ready.store(c.ready, Ordering::Relaxed);
        s.unacked.store(c.unacked, Ordering::Relaxed);
        s.consumers.store(c.consumers, Ordering::Relaxed);
        s.ready_bytes.store(c.ready_bytes, Ordering::Relaxed);
        s.dead_lettering.store(c.dead_lettering, Ordering::Relaxed);
    }
}

impl warren_raft::StateMachine for QueueSm {
    fn apply(&mut self, _index: u64, cmd: Bytes, leader: bool) -> Bytes {
        let Some(ops) = decode::<Vec<QueueOp>>(&cmd) else {
            tracing::warn!(queue = %self.name, "undecodable queue log entry skipped");
            return encode(&Vec::<OpReply>::new());
        };
        let node = if leader { self.node.upgrade() } else { None };
        if leader && !self.leading {
            // First entry of this node's own term: everything before it has
            // been applied, so the unsettled deliveries and the pending dead
            // letters are all known.
            if let Some(node) = &node {
                let fx = self.state.checked_out();
                self.carry_out(fx, Some(node));
                self.release_unreachable_owners(node);
                self.dead_letterer.take_over(node, &self.state);
            }
        } else if !leader && self.leading {
            self.dead_letterer.step_down();
        }
        self.leading = leader;
        let replies: Vec<OpReply> = ops
            .into_iter()
            .map(|op| self.apply_op(op, node.as_ref()))
            .collect();
        self.publish_stats();
        let next = match &node {
            Some(node) => {
                let fresh = std::mem::take(&mut self.fresh_dead_letters);
                self.dead_letterer.send(node, fresh);
                // A retry of pending dead letters is due like a TTL: the
                // ticker proposes a Tick then, whose apply lands here.
                let retry = self.dead_letterer.retry_when_due(node, &self.state);
                match (self.state.next_deadline(), retry) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            None => None,
        };
        self.deadline.send_if_modified(|d| {
            let changed = *d != next;
            *d = next;
            changed
        });
        encode(&replies)
    }

    fn snapshot(&self) -> Bytes {
        encode(&(&self.state, &self.exclusive))
    }

    fn restore(&mut self, snapshot: Bytes) {
        match decode::<(QueueState, Exclusive)>(&snapshot) {
            Some((state, exclusive)) => {
                self.state = state;
                self.exclusive = exclusive;
                self.publish_stats();
            }
            None => tracing::error!(queue = %self.name, "queue snapshot does not decode"),
        }
    }

    fn leader_changed(&mut self, is_leader: bool) {
        if !is_leader {
            self.leading = false;
            self.dead_letterer.step_down();
            self.deadline.send_replace(None);
            return;
        }
        // Commit something in the new term at once, so that the resend of
        // unsettled deliveries (see `apply`) does not wait for the next
        // client command.
        if let Some(node) = self.node.upgrade() {
            if let Some(h) = node.queue(&self.vhost, &self.name) {
                tokio::spawn(async move {
                    let _ = h.counts().await;
                });
            }
        }
    }
}

/// Proposes the return of a gone channel's messages, without waiting.
pub fn owner_down_later(node: &Arc<Node>, vhost: &str, name: &str, owner: OwnerId) {
    if let Some(h) = node.queue(vhost, name) {
        let cmd = Command::OwnerDown {
            owner,
            now_ms: crate::node::now_ms(),
        };
        if let Err(req) = h.try_send(Request::Apply(cmd, None)) {
            tokio::spawn(async move {
                let _ = h.send(*req).await;
            });
        }
    }
}

/// Proposes a Tick when the leader's next deadline (message TTL, queue
/// expiry) comes. One per replica; it sleeps on a watch while the replica
/// does not lead, so idle queues cost no timer.
async fn ticker(
    node: Weak<Node>,
    vhost: Arc<str>,
    name: Arc<str>,
    mut rx: watch::Receiver<Option<u64>>,
) {
    loop {
        let next = *rx.borrow_and_update();
        let Some(at) = next else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        let wait = at.saturating_sub(crate::node::now_ms());
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() { return; }
                continue;
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {}
        }
        let Some(n) = node.upgrade() else { return };
        let Some(h) = n.queue(&vhost, &name) else {
            return;
        };
        drop(n);
        let _ = h
            .send(Request::Apply(
                Command::Tick {
                    now_ms: crate::node::now_ms(),
                },
                None,
            ))
            .await;
        // The tick's apply moves the deadline; if it does not (clocks
        // disagree), try again a little later rather than spin.
        tokio::select! {
            r = rx.changed() => if r.is_err() { return; },
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
    }
}
