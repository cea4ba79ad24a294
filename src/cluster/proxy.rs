//! How a node reaches a queue that does not run on it: a task per queue
//! that turns the queue requests of this node's channels into batches sent
//! where the queue is. For a replicated queue (on every node) a batch is a
//! Raft proposal; for a node-local queue that lives on another node (its
//! *home*) a batch is a call to the home node, which hands the operations to
//! the queue's runner there and answers with their replies.
//!
//! It drains its inbox into one batch, proposes the batch as one log entry
//! (to the local leader, or forwarded to the leader's node) or sends it to
//! the home node, waits for the answer, and hands each request its own. One
//! batch is in flight at a time, which keeps every channel's commands in the
//! order they were sent and lets the batch grow while the previous one is
//! being replicated: under load a proposal carries hundreds of publishes for
//! the price of one round of fsyncs.
//!
//! A publisher confirm is sent when the enqueue is committed; if the
//! proposal fails (no majority within the timeout) the publisher gets a
//! `basic.nack`, since the outcome is unknown.

use super::wire::{AppCall, OpReply, QueueOp, decode, encode};
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

/// Where a proxy sends its batches.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// A replicated queue: proposals to its Raft group.
    Group(u64),
    /// A node-local queue on another node: calls to that node.
    Home(u64),
}

/// Starts the proxy of a queue that does not run on this node.
pub fn spawn(
    node: Arc<Node>,
    vhost: Arc<str>,
    name: Arc<str>,
    config: QueueConfig,
    target: Target,
) -> QueueHandle {
    let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
    let (group, home) = match target {
        Target::Group(g) => (Some(g), None),
        Target::Home(h) => (None, Some(h)),
    };
    let handle = QueueHandle::new(
        vhost,
        name,
        Arc::new(config),
        Arc::new(QueueStats::default()),
        tx,
        group,
        home,
    );
    tokio::spawn(run(node, handle.clone(), target, rx));
    handle
}

/// Sends one batch where the queue is and returns its replies, one per
/// operation, or None when the outcome is unknown.
async fn send_batch(
    node: &Node,
    handle: &QueueHandle,
    target: Target,
    ops: &[QueueOp],
) -> Option<Vec<OpReply>> {
    let result = match target {
        Target::Group(group) => {
            node.raft()
                .propose(group, encode(&ops), PROPOSE_TIMEOUT)
                .await
        }
        Target::Home(home) => {
            let call = AppCall::QueueOps {
                vhost: handle.vhost.clone(),
                queue: handle.name.clone(),
                ops: ops.to_vec(),
            };
            node.raft().call(home, encode(&call), PROPOSE_TIMEOUT).await
        }
    };
    match result {
        Ok(bytes) => match target {
            Target::Group(_) => decode::<Vec<OpReply>>(&bytes),
            Target::Home(_) => decode::<Option<Vec<OpReply>>>(&bytes).flatten(),
        },
        Err(e) => {
            tracing::debug!(queue = %handle.name, "batch failed: {e}");
            None
        }
    }
}

async fn run(
    node: Arc<Node>,
    handle: QueueHandle,
    target: Target,
    mut rx: mpsc::Receiver<Request>,
) {
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
                Request::Resend { node: n } => {
                    ops.push(QueueOp::Resend { node: n });
                    waiters.push(Waiter::None);
                }
                Request::Stop => {
                    stop = true;
                    break;
                }
            }
        }
        if !ops.is_empty() {
            match send_batch(&node, &handle, target, &ops).await {
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
            // A caller that waits for the reply gets the confirm in it, as
            // from a node-local queue's runner (a queue dead-lettering at
            // least once reads its target queues' confirms so); a channel's
            // publish is confirmed to the channel.
            let mut rest = Vec::new();
            for e in effects {
                match e {
                    Effect::Confirm { confirm, accepted } if reply.is_none() => {
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

/// The outcome is unknown: a publisher is nacked, a caller sees no answer
/// (its reply is dropped), which is all a caller that asked for the
/// confirm in the reply is told.
fn fail(node: &Node, w: Waiter) {
    if let Waiter::Apply {
        confirm: Some(c),
        reply: None,
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
/// deleted: settlements (ack, nack, reject), a consumer's cancel, a channel
/// that closed (`OwnerDown`), and the report that dead letters reached their
/// queues (`DeadLettered`). Without them a consumer whose acks were lost
/// would stay at its prefetch limit and receive nothing more, a closed
/// channel's messages would stay checked out to it forever, and messages
/// already dead-lettered would stay in their queue until a retry
/// dead-letters them once more. All of them are idempotent (settling what
/// the owner no longer holds does nothing). Publishes are not retried
/// (their publisher got a nack), nor is a node reported gone (by then the
/// node may well be back).
fn retry_later(handle: &QueueHandle, ops: Vec<QueueOp>) {
    let must: Vec<Request> = ops
        .into_iter()
        .filter_map(|op| match op {
            QueueOp::Cmd(
                cmd @ (Command::OwnerDown { .. }
                | Command::Settle { .. }
                | Command::Return { .. }
                | Command::Discard { .. }
                | Command::Cancel { .. }
                | Command::DeadLettered { .. }),
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
