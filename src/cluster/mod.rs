//! Warren as a cluster: how the broker sits on the Raft engine.
//!
//! - [`wire`]: what nodes say to each other above Raft (batched queue
//!   operations and their replies, deliveries to a consumer's node).
//! - [`meta_sm`]: the metadata group, applied by every node into its
//!   routing table.
//! - [`queue_sm`]: a replicated queue's state machine; the leader carries
//!   out deliveries.
//! - [`proxy`]: on every node, the task that turns a queue's requests into
//!   proposals (a replicated queue) or calls to its home node (a node-local
//!   queue on another node).
//! - [`dead_letter`]: a replicated queue's leader dead-lettering at least
//!   once.
//!
//! This module also answers what other nodes send ([`Handler`]: one-way
//! deliveries, cancels and direct replies; calls carrying a node-local
//! queue's operations or waiting for the metadata to be applied) and reacts
//! to the failure detector's peer events (returns for a node that went
//! down, resends after a link reconnected, held cancels).

pub mod dead_letter;
pub mod meta_sm;
pub mod proxy;
pub mod queue_sm;
pub mod wire;

use crate::node::{ChannelEvent, Handover, Node};
use crate::queue::runner::Request;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Weak;
use tokio::sync::oneshot;
use warren_raft::{AppHandler, NodeId, PeerEvent};
use wire::{AppCall, AppMsg, OpReply, QueueOp, decode, encode};

/// Receives other nodes' one-way messages and calls.
pub struct Handler {
    pub node: Weak<Node>,
}

impl AppHandler for Handler {
    fn on_message(&self, from: NodeId, msg: Bytes) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        let Some(msg) = decode::<AppMsg>(&msg) else {
            tracing::warn!(from, "undecodable message from a peer dropped");
            return;
        };
        match msg {
            AppMsg::Deliver {
                owner,
                vhost,
                queue,
                tag,
                id,
                msg,
                redelivered,
            } => {
                // The owner lives here (the sender routes by its node id),
                // so the handover is local: a gone channel's messages go back.
                let handed = node.deliver(owner, &vhost, &queue, tag, id, msg, redelivered);
                if handed != Handover::Sent {
                    queue_sm::owner_down_later(&node, &vhost, &queue, owner);
                }
            }
            AppMsg::Cancelled { owner, tag } => {
                node.send_to_owner(owner, ChannelEvent::ConsumerCancelled { tag });
            }
            AppMsg::DirectReply { owner, msg } => {
                node.send_to_owner(owner, ChannelEvent::DirectReply { msg });
            }
        }
    }

    fn on_call(&self, from: NodeId, msg: Bytes) -> Pin<Box<dyn Future<Output = Bytes> + Send>> {
        let node = self.node.upgrade();
        Box::pin(async move {
            let Some(node) = node else {
                return encode(&None::<Vec<OpReply>>);
            };
            match decode::<AppCall>(&msg) {
                Some(AppCall::QueueOps { vhost, queue, ops }) => {
                    encode(&serve_queue_ops(&node, &vhost, &queue, ops).await)
                }
                Some(AppCall::MetaApplied { index }) => {
                    encode(&node.meta_applied_up_to(index).await)
                }
                None => {
                    tracing::debug!(from, "undecodable call from a peer");
                    encode(&None::<Vec<OpReply>>)
                }
            }
        })
    }
}

/// Carries out another node's operations on a node-local queue that runs
/// here, in order, and collects one reply per operation. None when the
/// queue does not run here (deleted meanwhile): the caller then treats the
/// queue as gone.
async fn serve_queue_ops(
    node: &Node,
    vhost: &str,
    queue: &str,
    ops: Vec<QueueOp>,
) -> Option<Vec<OpReply>> {
    let h = node
        .queue(vhost, queue)
        .filter(|h| h.home.is_none() && h.group.is_none())?;
    let mut replies = Vec::with_capacity(ops.len());
    for op in ops {
        let reply = match op {
            QueueOp::Cmd(cmd) => {
                let (tx, rx) = oneshot::channel();
                h.send(Request::Apply(cmd, Some(tx))).await.ok()?;
                OpReply::Effects(rx.await.ok()?)
            }
            QueueOp::Consume {
                spec, exclusive, ..
            } => {
                let (tx, rx) = oneshot::channel();
                h.send(Request::Consume {
                    spec,
                    exclusive,
                    reply: tx,
                })
                .await
                .ok()?;
                OpReply::Consume(rx.await.ok()?)
            }
            QueueOp::Counts => OpReply::Counts(h.counts().await?),
            QueueOp::Resend { node: n } => {
                h.send(Request::Resend { node: n }).await.ok()?;
                OpReply::Effects(Vec::new())
            }
            QueueOp::NodeGone { node: n, below, .. } => {
                h.send(Request::NodeGone { node: n, below }).await.ok()?;
                OpReply::Effects(Vec::new())
            }
        };
        replies.push(reply);
    }
    Some(replies)
}

/// How often held consumer cancellations are offered to their nodes' links
/// again (a link that was reconnecting takes them once it is up).
const CANCEL_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// Follows the failure detector: when a node goes down, the queues this
/// node leads, and the node-local queues that run here, give back what that
/// node's channels held (their consumers are gone with it).
pub async fn watch_peers(node: Weak<Node>) {
    let Some(mut events) = node.upgrade().map(|n| n.raft().peer_events()) else {
        return;
    };
    let mut retry = tokio::time::interval(CANCEL_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = retry.tick() => {
                let Some(node) = node.upgrade() else { return };
                for peer in node.peers_with_held_cancels() {
                    node.flush_cancels(peer);
                }
                continue;
            }
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let Some(node) = node.upgrade() else { return };
        if let PeerEvent::Up(peer) | PeerEvent::Restarted(peer) = ev {
            node.flush_cancels(peer);
        }
        if let PeerEvent::Reconnected(peer) = ev {
            // Deliveries queued on the broken connection are lost with it;
            // the queues served here send that node's channels what they
            // hold once more (a channel acks either copy).
            node.flush_cancels(peer);
            for h in node.all_queues() {
                let serves = match h.group {
                    Some(group) => node.raft().is_leader(group),
                    None => h.home.is_none(),
                };
                if serves && h.stats.unacked.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                    let resend = Request::Resend { node: peer };
                    if let Err(req) = h.try_send(resend) {
                        tokio::spawn(async move { h.send(*req).await });
                    }
                }
            }
        }
        if let PeerEvent::Down(peer) = ev {
            // A node that cannot reach a majority is more likely cut off
            // itself than looking at a dead peer: it leaves the decision to
            // the majority side.
            let view = node.raft().reachable();
            let up = view.values().filter(|u| **u).count();
            if up * 2 <= view.len() {
                continue;
            }
            tracing::info!(peer, "peer down: returning its channels' messages");
            for h in node.all_queues() {
                let serves = match h.group {
                    Some(group) => node.raft().is_leader(group),
                    None => h.home.is_none(),
                };
                if serves {
                    let gone = Request::NodeGone {
                        node: peer,
                        below: None,
                    };
                    if let Err(req) = h.try_send(gone) {
                        tokio::spawn(async move { h.send(*req).await });
                    }
                }
            }
        }
    }
}
