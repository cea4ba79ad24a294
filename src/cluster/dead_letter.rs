//! Dead-lettering at least once (`x-dead-letter-strategy: at-least-once`),
//! the replicated queue's side of it.
//!
//! The queue state machine keeps such a message under its id
//! (`QueueState::pending_dead_letters`) until a committed
//! `Command::DeadLettered` removes it. The leader routes each one through
//! the dead-letter exchange, enqueues it into every target queue with a
//! confirm answered to the caller (`SHELL_OWNER`), and once every target
//! accepted it proposes `DeadLettered` for the batch. Nothing here waits
//! inside the state machine's apply: each batch is a task.
//!
//! Anything that goes wrong leaves the message pending: no route, a target
//! that refuses it (full, reject-publish), a proposal that fails or times
//! out, a leader that dies. The leader tries the pending messages again
//! every [`RETRY_MS`] (driven by the queue's ticker, so a queue with nothing
//! pending keeps no timer), and a new leader sends every pending message at
//! once, since the previous leader may have died with them under way.
//! Target queues may therefore get a message twice; none is lost.

use crate::message::Message;
use crate::node::{Node, now_ms};
use crate::queue::command::{Command, ConfirmRef, DeadLetterReason, Effect, MsgId, SHELL_OWNER};
use crate::queue::config::QueueConfig;
use crate::queue::fifo::QueueState;
use crate::queue::runner::{QueueHandle, Request};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// How often the leader tries again what is still pending and not under
/// way: a dead-letter exchange that routes nowhere costs one attempt per
/// message this often, not a busy loop.
pub const RETRY_MS: u64 = 5_000;
/// How long a task waits for the target queues' confirms; a proposal gives
/// up after `PROPOSE_TIMEOUT`, so this is a bound on a lost reply.
const CONFIRM_TIMEOUT: Duration =
    Duration::from_secs(crate::cluster::proxy::PROPOSE_TIMEOUT.as_secs() + 5);
/// Messages under way longer than this are sent again at the next retry: a
/// task or its `DeadLettered` proposal was lost somewhere.
const STALE_MS: u64 = 60_000;
/// Messages per task (and so per `DeadLettered` proposal).
const BATCH: usize = 256;
/// The warning that dead letters are stuck, at most this often per queue.
const WARN_EVERY_MS: u64 = 60_000;

/// One message to dead-letter.
struct Pending {
    id: MsgId,
    msg: Message,
    reason: DeadLetterReason,
}

impl Pending {
    /// The pending dead letter an effect names; None for one dead-lettered
    /// at most once.
    fn of(e: Effect) -> Option<Pending> {
        match e {
            Effect::DeadLetter {
                msg,
                reason,
                settle: Some(id),
            } => Some(Pending { id, msg, reason }),
            _ => None,
        }
    }
}

/// What this replica has under way, shared with its tasks.
#[derive(Default)]
struct UnderWay {
    /// Changes whenever this replica starts or stops leading, so that a
    /// task of an earlier stint changes nothing.
    stint: u64,
    /// Ids handed to a task, with when. A delivered one stays until its
    /// `DeadLettered` is applied, so that a retry does not send it again.
    ids: BTreeMap<MsgId, u64>,
}

/// The leader's half of dead-lettering at least once, one per replica.
pub struct DeadLetterer {
    vhost: Arc<str>,
    name: Arc<str>,
    config: Arc<QueueConfig>,
    under_way: Arc<Mutex<UnderWay>>,
    /// When pending messages not under way are tried again; set only while
    /// leading with something pending.
    retry_at: Option<u64>,
    warned_at: Option<u64>,
}

impl DeadLetterer {
    pub fn new(vhost: Arc<str>, name: Arc<str>, config: Arc<QueueConfig>) -> DeadLetterer {
        DeadLetterer {
            vhost,
            name,
            config,
            under_way: Arc::new(Mutex::new(UnderWay::default())),
            retry_at: None,
            warned_at: None,
        }
    }

    fn under_way(&self) -> std::sync::MutexGuard<'_, UnderWay> {
        self.under_way.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This replica leads from now on, every earlier entry applied: it
    /// dead-letters everything pending, whatever the previous leader had
    /// under way.
    pub fn take_over(&mut self, node: &Arc<Node>, state: &QueueState) {
        {
            let mut u = self.under_way();
            u.stint += 1;
            u.ids.clear();
        }
        self.retry_at = None;
        let all = state.pending_dead_letters();
        if !all.is_empty() {
            tracing::info!(
                queue = %self.name,
                count = all.len(),
                "new leader dead-letters the messages still pending"
            );
        }
        self.send(node, all);
    }

    /// This replica no longer leads: what its tasks still do is the next
    /// leader's to do again.
    pub fn step_down(&mut self) {
        {
            let mut u = self.under_way();
            u.stint += 1;
            u.ids.clear();
        }
        self.retry_at = None;
    }

    /// `Command::DeadLettered` was applied: those ids are done with.
    pub fn settled(&mut self, ids: &[MsgId]) {
        let mut u = self.under_way();
        if u.ids.is_empty() {
            return;
        }
        for id in ids {
            u.ids.remove(id);
        }
    }

    /// Dead-letters the pending messages `effects` name, in tasks of
    /// [`BATCH`]; the ones at most once are not this module's business.
    pub fn send(&mut self, node: &Arc<Node>, effects: Vec<Effect>) {
        let pending: Vec<Pending> = effects.into_iter().filter_map(Pending::of).collect();
        if pending.is_empty() {
            return;
        }
        let now = now_ms();
        let stint = {
            let mut u = self.under_way();
            for p in &pending {
                u.ids.insert(p.id, now);
            }
            u.stint
        };
        let mut pending = pending.into_iter().peekable();
        while pending.peek().is_some() {
            let batch: Vec<Pending> = pending.by_ref().take(BATCH).collect();
            tokio::spawn(deliver(
                node.clone(),
                self.vhost.clone(),
                self.name.clone(),
                self.config.clone(),
                batch,
                self.under_way.clone(),
                stint,
            ));
        }
    }

    /// After every entry this replica applies as the leader: tries again
    /// what is pending and not under way when a retry is due. Returns when
    /// the next retry is due, for the queue's ticker (None when nothing is
    /// pending).
    pub fn retry_when_due(&mut self, node: &Arc<Node>, state: &QueueState) -> Option<u64> {
        let pending = state.counts().dead_lettering;
        if pending == 0 {
            self.retry_at = None;
            return None;
        }
        let now = now_ms();
        match self.retry_at {
            Some(at) if now >= at => {}
            Some(at) => return Some(at),
            None => {
                self.retry_at = Some(now + RETRY_MS);
                return self.retry_at;
            }
        }
        let again = {
            let mut u = self.under_way();
            // Purged messages leave without a DeadLettered.
            u.ids.retain(|id, _| state.is_dead_lettering(*id));
            let stale = now.saturating_sub(STALE_MS);
            state.pending_dead_letters_where(|id| u.ids.get(&id).is_none_or(|&t| t < stale))
        };
        if !again.is_empty() && self.warned_at.is_none_or(|t| now >= t + WARN_EVERY_MS) {
            self.warned_at = Some(now);
            tracing::warn!(
                queue = %self.name,
                vhost = %self.vhost,
                pending,
                "messages wait to be dead-lettered (at least once): the dead-letter exchange \
                 routes them nowhere, or a target queue refused them or cannot be reached; \
                 trying again every {} s",
                RETRY_MS / 1000
            );
        }
        self.send(node, again);
        self.retry_at = Some(now + RETRY_MS);
        self.retry_at
    }
}

/// Dead-letters one batch and reports the delivered ones with
/// `DeadLettered`; the others are no longer under way, so the next retry
/// takes them.
async fn deliver(
    node: Arc<Node>,
    vhost: Arc<str>,
    name: Arc<str>,
    config: Arc<QueueConfig>,
    batch: Vec<Pending>,
    under_way: Arc<Mutex<UnderWay>>,
    stint: u64,
) {
    // Every enqueue goes out before any confirm is awaited, so that the
    // target queues' proxies batch them.
    let mut waits: Vec<(MsgId, Option<Vec<Reply>>)> = Vec::with_capacity(batch.len());
    for p in batch {
        let enqueues = enqueue_everywhere(&node, &vhost, &name, &config, p.id, &p.msg, p.reason);
        let receivers = match enqueues {
            Some(enqueues) => {
                let mut receivers = Vec::with_capacity(enqueues.len());
                for Enqueue {
                    handle,
                    request,
                    reply,
                } in enqueues
                {
                    // A queue deleted meanwhile drops the request, and with
                    // it the reply: not delivered.
                    let _ = handle.send(request).await;
                    receivers.push(reply);
                }
                Some(receivers)
            }
            None => None,
        };
        waits.push((p.id, receivers));
    }
    let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (id, receivers) in waits {
        let mut ok = receivers.is_some();
        for rx in receivers.unwrap_or_default() {
            let accepted = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(effects)) => effects
                    .iter()
                    .any(|e| matches!(e, Effect::Confirm { accepted: true, .. })),
                _ => false,
            };
            ok &= accepted;
        }
        if ok {
            done.push(id);
        } else {
            failed.push(id);
        }
    }
    if !failed.is_empty() {
        tracing::debug!(queue = %name, count = failed.len(), "dead letters not delivered yet");
        let mut u = under_way.lock().unwrap_or_else(|e| e.into_inner());
        if u.stint == stint {
            for id in &failed {
                u.ids.remove(id);
            }
        }
    }
    if done.is_empty() {
        return;
    }
    for _ in &done {
        node.metrics.dead_lettered.inc();
    }
    if let Some(h) = node.queue(&vhost, &name) {
        let _ = h
            .send(Request::Apply(Command::DeadLettered { ids: done }, None))
            .await;
    }
}

/// Where the reply to an enqueue, with its confirm, comes.
type Reply = oneshot::Receiver<Vec<Effect>>;

/// One enqueue of a dead letter into a target queue.
struct Enqueue {
    handle: QueueHandle,
    request: Request,
    reply: Reply,
}

/// The enqueues of one dead letter into each queue its dead-letter exchange
/// routes it to. Some(empty) when it needs to go nowhere (it could only
/// cycle back into its own queue, which RabbitMQ drops); None when it cannot
/// go anywhere yet (no exchange, no route, a target not known here).
fn enqueue_everywhere(
    node: &Arc<Node>,
    vhost: &str,
    queue: &str,
    config: &QueueConfig,
    id: MsgId,
    msg: &Message,
    reason: DeadLetterReason,
) -> Option<Vec<Enqueue>> {
    let route = node.route_dead_letter(vhost, queue, config, msg, reason)?;
    if route.targets.is_empty() && !route.cycled {
        return None;
    }
    let mut out = Vec::with_capacity(route.targets.len());
    for target in &route.targets {
        let h = node.queue(vhost, target)?;
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Enqueue {
            msg: route.msg.clone(),
            // Answered in the reply; the id only helps reading logs.
            confirm: Some(ConfirmRef {
                owner: SHELL_OWNER,
                seq: id,
            }),
            now_ms: now_ms(),
        };
        out.push(Enqueue {
            handle: h,
            request: Request::Apply(cmd, Some(tx)),
            reply: rx,
        });
    }
    Some(out)
}
