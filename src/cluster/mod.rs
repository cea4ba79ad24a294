//! Warren as a cluster: how the broker sits on the Raft engine.
//!
//! - [`wire`]: what nodes say to each other above Raft (batched queue
//!   operations and their replies, deliveries to a consumer's node).
//! - [`meta_sm`]: the metadata group, applied by every node into its
//!   routing table.
//! - [`queue_sm`]: a replicated queue's state machine; the leader carries
//!   out deliveries.
//! - [`proxy`]: on every node, the task that turns a replicated queue's
//!   requests into proposals.
//!
//! This module also answers the one-way messages other nodes send
//! ([`Handler`]) and reacts to the failure detector's peer events.

pub mod meta_sm;
pub mod proxy;
pub mod queue_sm;
pub mod wire;

use crate::node::{ChannelEvent, Node};
use crate::queue::command::Command;
use crate::queue::runner::Request;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Weak;
use warren_raft::{AppHandler, NodeId, PeerEvent};
use wire::{AppMsg, decode};

/// Receives other nodes' one-way messages.
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
                let ev = ChannelEvent::Deliver {
                    queue: queue.clone(),
                    tag,
                    id,
                    msg,
                    redelivered,
                };
                if !node.send_to_owner(owner, ev) {
                    queue_sm::owner_down_later(&node, &vhost, &queue, owner);
                }
            }
            AppMsg::Cancelled { owner, tag } => {
                node.send_to_owner(owner, ChannelEvent::ConsumerCancelled { tag });
            }
            AppMsg::LocalEnqueue { vhost, queue, msg } => {
                if let Some(h) = node.queue(&vhost, &queue) {
                    let cmd = Command::Enqueue {
                        msg,
                        confirm: None,
                        now_ms: crate::node::now_ms(),
                    };
                    tokio::spawn(async move {
                        let _ = h.send(Request::Apply(cmd, None)).await;
                    });
                }
            }
        }
    }

    fn on_call(&self, _from: NodeId, _msg: Bytes) -> Pin<Box<dyn Future<Output = Bytes> + Send>> {
        Box::pin(async { Bytes::new() })
    }
}

/// Follows the failure detector: when a node goes down, the queues this
/// node leads give back what that node's channels held (their consumers are
/// gone with it).
pub async fn watch_peers(node: Weak<Node>) {
    let Some(mut events) = node.upgrade().map(|n| n.raft().peer_events()) else {
        return;
    };
    loop {
        let ev = match events.recv().await {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let Some(node) = node.upgrade() else { return };
        if let PeerEvent::Up(peer) | PeerEvent::Restarted(peer) = ev {
            node.peer_reachable(peer);
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
                let Some(group) = h.group else { continue };
                if node.raft().is_leader(group) {
                    let _ = h.try_send(Request::NodeGone {
                        node: peer,
                        below: None,
                    });
                }
            }
        }
    }
}
