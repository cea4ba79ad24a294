//! How a node reaches a replicated queue: a task per queue on every node
//! that turns the queue requests of its channels into Raft proposals.
//!
//! It drains its inbox into one batch, proposes the batch as one log entry
//! (to the local leader, or forwarded to the leader's node), waits for the
//! entry to be committed and applied, and hands each request its answer. One
//! batch is in flight at a time, which keeps every channel's commands in the
//! order they were sent and lets the batch grow while the previous one is
//! being replicated: under load a proposal carries hundreds of publishes for
//! the price of one round of fsyncs.
//!
//! A publisher confirm is sent when the enqueue is committed; if the
//! proposal fails (no majority within the timeout) the publisher gets a
//! `basic.nack`, since the outcome is unknown.

use super::wire::{OpReply, QueueOp, decode, encode};
use crate::node::{ChannelEvent, Node};
use crate::queue::command::{Command, ConfirmRef, Effect, QueueCounts};
use crate::queue::config::QueueConfig;
use crate::queue::runner::{INBOX_CAPACITY, QueueHandle, QueueStats, Request};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Requests proposed in one log entry, at most.
const BATCH: usize = 512;
/// How long a proposal may wait for a leader and a majority.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do with the answer to one proposed operation.
enum Waiter {
    Apply {
        confirm: Option<ConfirmRef>,
        reply: Option<oneshot::Sender<Vec<Effect>>>,
    },
    Consume(oneshot::Sender<Result<(), String>>),
    Counts(oneshot::Sender<QueueCounts>),
    None,
}

/// Starts the proxy of a replicated queue on this node.
pub fn spawn(
    node: Arc<Node>,
    vhost: Arc<str>,
    name: Arc<str>,
    config: QueueConfig,
    group: u64,
) -> QueueHandle {
    let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
    let handle = QueueHandle::new(
        vhost,
        name,
        Arc::new(config),
        Arc::new(QueueStats::default()),
        tx,
        Some(group),
    );
    tokio::spawn(run(node, handle.clone(), group, rx));
    handle
}

async fn run(node: Arc<Node>, handle: QueueHandle, group: u64, mut rx: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            break;
        }
        let mut ops = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        let mut stop = false;
        for req in batch.drain(..) {
            match req {
                Request::Apply(cmd, reply) => {
                    let confirm = match &cmd {
                        Command::Enqueue { confirm, .. } => *confirm,
                        _ => None,
                    };
                    ops.push(QueueOp::Cmd(cmd));
                    waiters.push(Waiter::Apply { confirm, reply });
                }
                Request::Consume {
                    spec,
                    exclusive,
                    reply,
                } => {
                    ops.push(QueueOp::Consume {
                        spec,
                        exclusive,
                        now_ms: crate::node::now_ms(),
                    });
                    waiters.push(Waiter::Consume(reply));
                }
                Request::Counts(reply) => {
                    ops.push(QueueOp::Counts);
                    waiters.push(Waiter::Counts(reply));
                }
                Request::NodeGone { node: n, below } => {
                    ops.push(QueueOp::NodeGone {
                        node: n,
                        below,
                        now_ms: crate::node::now_ms(),
                    });
                    waiters.push(Waiter::None);
                }
                Request::Stop => {
                    stop = true;
                    break;
                }
            }
        }
        if !ops.is_empty() {
            let result = node
                .raft()
                .propose(group, encode(&ops), PROPOSE_TIMEOUT)
                .await;
            let replies = match result {
                Ok(bytes) => decode::<Vec<OpReply>>(&bytes),
                Err(e) => {
                    tracing::warn!(queue = %handle.name, "proposal failed: {e}");
                    None
                }
            };
            match replies {
                Some(replies) if replies.len() == waiters.len() => {
                    for (w, r) in waiters.into_iter().zip(replies) {
                        answer(&node, w, r);
                    }
                }
                _ => {
                    for w in waiters {
                        fail(&node, w);
                    }
                    retry_later(&handle, ops);
                }
            }
        }
        if stop {
            break;
        }
    }
    crate::queue::runner::refuse_pending(&node, &handle, rx);
}

fn answer(node: &Node, w: Waiter, r: OpReply) {
    match (w, r) {
        (Waiter::Apply { reply, .. }, OpReply::Effects(effects)) => {
            let mut rest = Vec::new();
            for e in effects {
                match e {
                    Effect::Confirm { confirm, accepted } => {
                        node.send_to_owner(
                            confirm.owner,
                            ChannelEvent::Confirm {
                                seq: confirm.seq,
                                accepted,
                            },
                        );
                    }
                    e => rest.push(e),
                }
            }
            if let Some(reply) = reply {
                let _ = reply.send(rest);
            }
        }
        (Waiter::Consume(reply), OpReply::Consume(res)) => {
            let _ = reply.send(res);
        }
        (Waiter::Counts(reply), OpReply::Counts(c)) => {
            let _ = reply.send(c);
        }
        (w, _) => fail(node, w),
    }
}

/// The outcome is unknown: a publisher is nacked, a caller sees no answer.
fn fail(node: &Node, w: Waiter) {
    if let Waiter::Apply {
        confirm: Some(c), ..
    } = w
    {
        node.send_to_owner(
            c.owner,
            ChannelEvent::Confirm {
                seq: c.seq,
                accepted: false,
            },
        );
    }
}

/// After a failed proposal, the commands that must eventually happen are
/// proposed again, a second later, until they are committed or the queue is
/// deleted: settlements (ack, nack, reject), a consumer's cancel, and a
/// channel that closed (`OwnerDown`). Without them a consumer whose acks
/// were lost would stay at its prefetch limit and receive nothing more, and
/// a closed channel's messages would stay checked out to it forever. All of
/// them are idempotent (settling what the owner no longer holds does
/// nothing). Publishes are not retried (their publisher got a nack), nor is
/// a node reported gone (by then the node may well be back).
fn retry_later(handle: &QueueHandle, ops: Vec<QueueOp>) {
    let must: Vec<Request> = ops
        .into_iter()
        .filter_map(|op| match op {
            QueueOp::Cmd(
                cmd @ (Command::OwnerDown { .. }
                | Command::Settle { .. }
                | Command::Return { .. }
                | Command::Discard { .. }
                | Command::Cancel { .. }),
            ) => Some(Request::Apply(cmd, None)),
            _ => None,
        })
        .collect();
    if must.is_empty() {
        return;
    }
    let handle = handle.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for req in must {
            if handle.send(req).await.is_err() {
                return;
            }
        }
    });
}
