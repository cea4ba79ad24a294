//! The quorum queue as a pure state machine.
//!
//! [`QueueState::apply`] takes a [`Command`] and returns the [`Effect`]s it
//! causes, touching no socket, disk or clock: time arrives inside commands.
//! Every map here is ordered (`BTreeMap`), so two replicas that apply the same
//! commands hold the same state and emit the same effects in the same order,
//! which is what lets a Raft log drive one copy per node. Node-local
//! (classic) queues run the same machine without the log.
//!
//! The model follows RabbitMQ's `rabbit_fifo`:
//! - each message gets a priority level when it is enqueued, FIFO by id
//!   within a level, and a returned message goes back to the place its id
//!   gives it. The levels depend on the queue type, as in RabbitMQ:
//!   - a quorum queue has two, "high" (priority above 4) and "normal" (0 to
//!     4, or none). When both have ready messages they are served two high,
//!     then one normal, so normal messages are never starved (RabbitMQ 4.x's
//!     `rabbit_fifo_q`); the position in that cycle is part of the state;
//!   - a classic queue has levels only if declared with `x-max-priority` M:
//!     the level is `min(priority, M)`, served strictly highest first.
//!     Without it every message is on level 0 and the queue is plain FIFO;
//! - consumers take messages while they have credit (prefetch), the highest
//!   priority first and round-robin among equals;
//! - message TTL is enforced at the head of each priority level only, so
//!   expiry never needs a scan of the whole queue.
//!
//! Dead-lettering at least once (`x-dead-letter-strategy`, see
//! [`QueueConfig::dead_letters_at_least_once`]): a message dead-lettered
//! out of the queue (rejected, expired, over the delivery limit) is moved
//! aside under its id, neither ready nor delivered, and stays there until
//! the shell reports with [`Command::DeadLettered`] that the queues the
//! dead-letter exchange routes it to all accepted it.
//! [`QueueState::pending_dead_letters`] hands them out again, for a new
//! leader and for retries. As in RabbitMQ they count toward `x-max-length`
//! and `x-max-length-bytes`: such a queue refuses publishes (it must be
//! `reject-publish`) rather than hold more messages than its limits while
//! its dead letters find no home.
//!
//! Bounds: the number of ready messages is limited only by `x-max-length`
//! and `x-max-length-bytes` (memory limits are the broker's business). Each
//! command does work proportional to the messages it moves plus the number
//! of consumers and priority levels (at most 256 for a classic queue, 2 for
//! a quorum queue), never a scan of the queue, except `OwnerDown` and
//! `Purge`, which touch that owner's unacknowledged messages and every ready
//! message respectively.

use super::command::{
    Command, ConfirmRef, ConsumerSpec, DeadLetterReason, Effect, MsgId, OwnerId, QueueCounts,
    SHELL_OWNER,
};
use super::config::{Overflow, QueueConfig};
use crate::message::Message;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

/// Position of a ready message: higher level first, then FIFO by id. A
/// returned message keeps its id and level and so returns to its original
/// place. (For a quorum queue the 2:1 cycle decides between the two levels;
/// see [`QueueState::next_ready_key`].)
type ReadyKey = (Reverse<u8>, MsgId);

/// Quorum queues: a message priority above this is "high".
const QUORUM_NORMAL_MAX_PRIORITY: u8 = 4;
/// Quorum queue level of "high" messages ("normal" ones are on level 0).
const QUORUM_HIGH: u8 = 1;
/// Quorum queues serve this many high messages for each normal one while
/// both levels have ready messages (RabbitMQ's `?WEIGHT`).
const QUORUM_HIGH_WEIGHT: u8 = 2;

/// Identifies one consumer registration. Never reused, so an unacknowledged
/// message of a cancelled consumer cannot be counted against a later consumer
/// that happens to reuse the same tag.
type ConsumerSerial = u64;

/// A message held by the queue, ready or unacknowledged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Stored {
    msg: Message,
    /// Times the message was returned to the queue (nack/reject with
    /// requeue, or its owner went down).
    delivery_count: u32,
    /// Delivered before: the next delivery carries `redelivered = true`.
    redelivered: bool,
    /// When the message expires (ms), from `x-message-ttl` and `expiration`.
    expires_at: Option<u64>,
    /// Effective priority level, fixed at enqueue from the message priority
    /// and the queue type (see the module comment).
    level: u8,
}

impl Stored {
    fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now_ms)
    }

    fn key(&self, id: MsgId) -> ReadyKey {
        (Reverse(self.level), id)
    }
}

/// A message being dead-lettered at least once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct DeadLettering {
    msg: Message,
    reason: DeadLetterReason,
}

/// A message delivered and not yet settled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Unacked {
    owner: OwnerId,
    /// The consumer it was delivered to; `None` for `basic.get`.
    consumer: Option<ConsumerSerial>,
    stored: Stored,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Consumer {
    spec: ConsumerSpec,
    /// Unacknowledged deliveries made to this consumer.
    in_flight: u32,
    /// Place in the round-robin among consumers of equal priority.
    turn: u64,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        // no_ack deliveries are settled at once, so prefetch never binds them
        // (RabbitMQ ignores basic.qos for no-ack consumers too).
        self.spec.no_ack || self.spec.prefetch == 0 || self.in_flight < self.spec.prefetch
    }

    fn service_key(&self) -> (Reverse<i32>, u64) {
        (Reverse(self.spec.priority), self.turn)
    }
}

/// One queue's complete state. Cloneable and serialisable so that it can be
/// snapshotted and compared between replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueState {
    config: QueueConfig,
    /// Id for the next enqueued message; ids start at 1.
    next_id: MsgId,
    ready: BTreeMap<ReadyKey, Stored>,
    /// Sum of the body sizes in `ready`.
    ready_bytes: u64,
    unacked: BTreeMap<MsgId, Unacked>,
    consumers: BTreeMap<ConsumerSerial, Consumer>,
    /// `(owner, tag)` to consumer, for Cancel, OwnerDown and `has_consumer`.
    consumer_index: BTreeMap<OwnerId, BTreeMap<Arc<str>, ConsumerSerial>>,
    /// Consumers in the order they are offered messages: priority
    /// descending, then least recently served.
    service_order: BTreeMap<(Reverse<i32>, u64), ConsumerSerial>,
    next_serial: ConsumerSerial,
    next_turn: u64,
    /// Quorum queues: where the next take is in the cycle of
    /// `QUORUM_HIGH_WEIGHT + 1` takes, the last of which goes to a normal
    /// message if one is waiting. Advances on every take from the head,
    /// whichever level it comes from, as RabbitMQ's `dequeue_counter` does.
    priority_turn: u8,
    /// With single active consumer: the one that receives.
    active: Option<ConsumerSerial>,
    /// The latest time seen in any command. Commands without a time (Settle,
    /// Purge) use it, and time never runs backwards even when proposers'
    /// clocks disagree.
    clock_ms: u64,
    /// Last use for `x-expires`.
    last_used_ms: u64,
    /// `Effect::Expired` was emitted; it is emitted only once.
    expired: bool,
    /// The highest publish sequence number accepted from each publishing
    /// channel (publisher confirms): an enqueue carrying one already
    /// accepted is a copy of a proposal that was retried after its
    /// connection dropped, and is confirmed without being added twice.
    /// Bounded; the oldest channels (smallest ids) are forgotten first.
    publishers: BTreeMap<OwnerId, u64>,
    /// Messages being dead-lettered at least once, by id: out of the
    /// queue's flow until [`Command::DeadLettered`] names them. Always
    /// empty unless the config asks for at-least-once.
    dead_lettering: BTreeMap<MsgId, DeadLettering>,
    /// Sum of the body sizes in `dead_lettering`.
    dead_lettering_bytes: u64,
}

/// Publishing channels whose last sequence number a queue remembers.
const MAX_REMEMBERED_PUBLISHERS: usize = 4096;

impl QueueState {
    /// An empty queue. `now_ms` starts the `x-expires` countdown.
    pub fn new(config: QueueConfig, now_ms: u64) -> Self {
        QueueState {
            config,
            next_id: 1,
            ready: BTreeMap::new(),
            ready_bytes: 0,
            unacked: BTreeMap::new(),
            consumers: BTreeMap::new(),
            consumer_index: BTreeMap::new(),
            service_order: BTreeMap::new(),
            next_serial: 1,
            next_turn: 0,
            priority_turn: 0,
            active: None,
            clock_ms: now_ms,
            last_used_ms: now_ms,
            expired: false,
            publishers: BTreeMap::new(),
            dead_lettering: BTreeMap::new(),
            dead_lettering_bytes: 0,
        }
    }

    /// The settings the queue was declared with (the shell needs the
    /// dead-letter exchange and routing key to carry out `DeadLetter`).
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Applies one command and returns every effect it causes, in order.
    /// After any command, ready messages are delivered as far as consumer
    /// credit allows.
    pub fn apply(&mut self, cmd: Command) -> Vec<Effect> {
        let mut fx = Vec::new();
        match cmd {
            Command::Enqueue {
                msg,
                confirm,
                now_ms,
            } => {
                self.advance(now_ms);
                self.enqueue(msg, confirm, &mut fx);
            }
            Command::Consume { spec, now_ms } => {
                self.advance(now_ms);
                self.touch();
                self.add_consumer(spec);
            }
            Command::Cancel { owner, tag, now_ms } => {
                self.advance(now_ms);
                self.touch();
                if let Some(serial) = self.find_consumer(owner, &tag) {
                    self.remove_consumer(serial);
                }
            }
            Command::SetPrefetch {
                owner,
                tag,
                prefetch,
            } => {
                if let Some(c) = self
                    .find_consumer(owner, &tag)
                    .and_then(|s| self.consumers.get_mut(&s))
                {
                    c.spec.prefetch = prefetch;
                }
            }
            Command::Settle { owner, ids } => {
                for id in ids {
                    self.take_unacked(owner, id);
                }
            }
            Command::Return { owner, ids, now_ms } => {
                self.advance(now_ms);
                for id in ids {
                    if let Some(u) = self.take_unacked(owner, id) {
                        self.requeue(id, u.stored, &mut fx);
                    }
                }
            }
            Command::Discard { owner, ids, now_ms } => {
                self.advance(now_ms);
                for id in ids {
                    if let Some(u) = self.take_unacked(owner, id) {
                        self.dead_letter(
                            Some(id),
                            u.stored.msg,
                            DeadLetterReason::Rejected,
                            &mut fx,
                        );
                    }
                }
            }
            Command::Get {
                owner,
                no_ack,
                now_ms,
            } => {
                self.advance(now_ms);
                self.touch();
                self.get(owner, no_ack, &mut fx);
            }
            Command::Purge => {
                // Messages being dead-lettered go too, as in RabbitMQ; the
                // count is of ready messages only, as there.
                let count = self.ready.len() as u64;
                self.ready.clear();
                self.ready_bytes = 0;
                self.dead_lettering.clear();
                self.dead_lettering_bytes = 0;
                fx.push(Effect::Purged { count });
            }
            Command::OwnerDown { owner, now_ms } => {
                self.advance(now_ms);
                self.owner_down(owner, &mut fx);
            }
            Command::Touch { now_ms } => {
                self.advance(now_ms);
                self.touch();
            }
            Command::Tick { now_ms } => {
                self.advance(now_ms);
                self.expire_heads(&mut fx);
                self.check_queue_expiry(&mut fx);
            }
            Command::DeadLettered { ids } => {
                for id in ids {
                    if let Some(d) = self.dead_lettering.remove(&id) {
                        debug_assert!(self.dead_lettering_bytes >= d.msg.body_len());
                        self.dead_lettering_bytes =
                            self.dead_lettering_bytes.saturating_sub(d.msg.body_len());
                    }
                }
            }
        }
        self.deliver(None, &mut fx);
        self.assert_invariants();
        fx
    }

    /// Counts for `queue.declare-ok`, the admin API and metrics. Expired
    /// messages not yet removed from a head are still counted.
    pub fn counts(&self) -> QueueCounts {
        QueueCounts {
            ready: self.ready.len() as u64,
            unacked: self.unacked.len() as u64,
            ready_bytes: self.ready_bytes,
            consumers: self.consumers.len() as u64,
            dead_lettering: self.dead_lettering.len() as u64,
        }
    }

    /// Earliest time (ms) at which a Tick would do something: a message at
    /// the head of its priority level expiring, or the queue's `x-expires`.
    /// `None` if nothing is pending. The shell schedules its timer from this.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut deadline: Option<u64> = None;
        let mut from = Bound::Unbounded;
        while let Some((&key, stored)) = self.ready.range((from, Bound::Unbounded)).next() {
            if let Some(t) = stored.expires_at {
                deadline = Some(deadline.map_or(t, |d| d.min(t)));
            }
            from = Bound::Excluded(level_end(key));
        }
        if let Some(t) = self.queue_expiry_time() {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        }
        deadline
    }

    /// Whether `(owner, tag)` is a registered consumer (the channel checks
    /// this before refusing a reused consumer tag).
    /// Every registered consumer as `(owner, tag)`, in registration order
    /// (the shell cancels them all when the queue is deleted).
    pub fn consumers(&self) -> Vec<(OwnerId, Arc<str>)> {
        self.consumers
            .values()
            .map(|c| (c.spec.owner, c.spec.tag.clone()))
            .collect()
    }

    /// Messages delivered to a consumer and not yet settled, as deliveries
    /// that would be made again: a new leader of a replicated queue sends
    /// these once more (with `redelivered`), because the old leader may have
    /// died before its deliveries reached the consumers. `basic.get`
    /// messages are not included (there is no consumer to send them to).
    pub fn checked_out(&self) -> Vec<Effect> {
        self.checked_out_to(|_| true)
    }

    /// [`QueueState::checked_out`] for the owners `which` selects: what a
    /// queue sends again to the channels of a node whose link broke, since
    /// deliveries in flight on it may be lost.
    pub fn checked_out_to(&self, which: impl Fn(OwnerId) -> bool) -> Vec<Effect> {
        self.unacked
            .iter()
            .filter(|(_, u)| which(u.owner))
            .filter_map(|(&id, u)| {
                let c = self.consumers.get(&u.consumer?)?;
                Some(Effect::Deliver {
                    owner: u.owner,
                    tag: c.spec.tag.clone(),
                    id,
                    msg: u.stored.msg.clone(),
                    redelivered: true,
                    delivery_count: u.stored.delivery_count,
                })
            })
            .collect()
    }

    /// Every message being dead-lettered at least once, as the effects that
    /// dead-letter it, in id order: a new leader of a replicated queue
    /// carries them out again, because the previous leader may have died
    /// before the target queues had them.
    pub fn pending_dead_letters(&self) -> Vec<Effect> {
        self.pending_dead_letters_where(|_| true)
    }

    /// [`QueueState::pending_dead_letters`] for the ids `which` selects:
    /// what the shell tries again, leaving out those it has under way.
    pub fn pending_dead_letters_where(&self, which: impl Fn(MsgId) -> bool) -> Vec<Effect> {
        self.dead_lettering
            .iter()
            .filter(|(id, _)| which(**id))
            .map(|(&id, d)| Effect::DeadLetter {
                msg: d.msg.clone(),
                reason: d.reason,
                settle: Some(id),
            })
            .collect()
    }

    /// Whether message `id` is being dead-lettered at least once.
    pub fn is_dead_lettering(&self, id: MsgId) -> bool {
        self.dead_lettering.contains_key(&id)
    }

    /// Every owner that has a consumer or an unsettled message here.
    pub fn owners(&self) -> Vec<OwnerId> {
        let mut v: Vec<OwnerId> = self
            .consumer_index
            .keys()
            .copied()
            .chain(self.unacked.values().map(|u| u.owner))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The queue's clock: the latest time any applied command carried.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    pub fn has_consumer(&self, owner: OwnerId, tag: &str) -> bool {
        self.find_consumer(owner, tag).is_some()
    }

    fn advance(&mut self, now_ms: u64) {
        if self.clock_ms == 0 {
            // A queue made without a clock (a replicated queue's state
            // exists before any command reaches it) starts its `x-expires`
            // countdown at the first time it is given, not at the epoch.
            self.last_used_ms = self.last_used_ms.max(now_ms);
        }
        self.clock_ms = self.clock_ms.max(now_ms);
    }

    fn touch(&mut self) {
        self.last_used_ms = self.clock_ms;
    }

    fn enqueue(&mut self, msg: Message, confirm: Option<ConfirmRef>, fx: &mut Vec<Effect>) {
        // The shell's own enqueues (see SHELL_OWNER) are never taken for
        // copies: their sequence numbers are not a publisher's.
        let publisher = confirm.filter(|c| c.owner != SHELL_OWNER);
        if let Some(c) = publisher {
            if self
                .publishers
                .get(&c.owner)
                .is_some_and(|&last| c.seq <= last)
            {
                confirm_effect(confirm, true, fx);
                return;
            }
        }
        // Expired heads must not count against the length limits.
        self.expire_heads(fx);
        if self.would_overflow(&msg) {
            match self.config.overflow {
                // Accepted; the head is trimmed after delivery below.
                Overflow::DropHead => {}
                Overflow::RejectPublish => {
                    confirm_effect(confirm, false, fx);
                    return;
                }
                Overflow::RejectPublishDlx => {
                    confirm_effect(confirm, false, fx);
                    // Never enqueued, so it has no id to be kept under
                    // (at-least-once needs reject-publish anyway).
                    self.dead_letter(None, msg, DeadLetterReason::MaxLen, fx);
                    return;
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let ttl = match (self.config.message_ttl_ms, msg.expiration_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let stored = Stored {
            expires_at: ttl.map(|t| self.clock_ms.saturating_add(t)),
            level: self.level_of(&msg),
            msg,
            delivery_count: 0,
            redelivered: false,
        };
        self.insert_ready(id, stored);
        if let Some(c) = publisher {
            self.publishers.insert(c.owner, c.seq);
            if self.publishers.len() > MAX_REMEMBERED_PUBLISHERS {
                self.publishers.pop_first();
            }
        }
        confirm_effect(confirm, true, fx);
        // A message with TTL 0 may still go straight to a waiting consumer
        // (RabbitMQ semantics); if it stays, it expires right after.
        self.deliver(Some(id), fx);
        self.expire_heads(fx);
        if self.config.overflow == Overflow::DropHead {
            self.trim_to_limits(fx);
        }
    }

    /// The priority level a message gets in this queue (see the module
    /// comment).
    fn level_of(&self, msg: &Message) -> u8 {
        if self.config.quorum {
            u8::from(msg.priority > QUORUM_NORMAL_MAX_PRIORITY)
        } else {
            self.config
                .max_priority
                .map_or(0, |max| msg.priority.min(max))
        }
    }

    /// Whether one more ready message would exceed a length limit. Messages
    /// being dead-lettered count, as in RabbitMQ (see the module comment).
    fn would_overflow(&self, msg: &Message) -> bool {
        let len = (self.ready.len() + self.dead_lettering.len()) as u64;
        let bytes = self.ready_bytes + self.dead_lettering_bytes;
        let over_count = self.config.max_length.is_some_and(|m| len + 1 > m);
        let over_bytes = self
            .config
            .max_length_bytes
            .is_some_and(|m| bytes.saturating_add(msg.body_len()) > m);
        over_count || over_bytes
    }

    /// Drop-head: removes messages from the head until the ready messages are
    /// within both limits.
    fn trim_to_limits(&mut self, fx: &mut Vec<Effect>) {
        loop {
            let over_count = self
                .config
                .max_length
                .is_some_and(|m| self.ready.len() as u64 > m);
            let over_bytes = self
                .config
                .max_length_bytes
                .is_some_and(|m| self.ready_bytes > m);
            if !(over_count || over_bytes) {
                break;
            }
            // The head is the message that would be delivered next.
            let Some((key, stored)) = self.take_next_ready() else {
                break;
            };
            self.dead_letter(Some(key.1), stored.msg, DeadLetterReason::MaxLen, fx);
        }
        debug_assert!(
            self.config
                .max_length
                .is_none_or(|m| self.ready.len() as u64 <= m)
        );
        debug_assert!(
            self.config
                .max_length_bytes
                .is_none_or(|m| self.ready_bytes <= m)
        );
    }

    fn get(&mut self, owner: OwnerId, no_ack: bool, fx: &mut Vec<Effect>) {
        let Some((id, stored)) = self.pop_live_head(None, fx) else {
            fx.push(Effect::GetEmpty { owner });
            return;
        };
        fx.push(Effect::GetOk {
            owner,
            id,
            msg: stored.msg.clone(),
            redelivered: stored.redelivered,
            delivery_count: stored.delivery_count,
            remaining: self.ready.len() as u64,
        });
        if !no_ack {
            self.insert_unacked(
                id,
                Unacked {
                    owner,
                    consumer: None,
                    stored,
                },
            );
        }
    }

    fn owner_down(&mut self, owner: OwnerId, fx: &mut Vec<Effect>) {
        let serials: Vec<ConsumerSerial> = self
            .consumer_index
            .get(&owner)
            .map(|tags| tags.values().copied().collect())
            .unwrap_or_default();
        for serial in serials {
            self.remove_consumer(serial);
        }
        let ids: Vec<MsgId> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.owner == owner)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            if let Some(u) = self.take_unacked(owner, id) {
                self.requeue(id, u.stored, fx);
            }
        }
        debug_assert!(self.unacked.values().all(|u| u.owner != owner));
        debug_assert!(!self.consumer_index.contains_key(&owner));
    }

    /// Puts a returned message back at its original position, counting the
    /// delivery, unless that takes it over the delivery limit.
    fn requeue(&mut self, id: MsgId, mut stored: Stored, fx: &mut Vec<Effect>) {
        stored.delivery_count = stored.delivery_count.saturating_add(1);
        if self
            .config
            .delivery_limit
            .is_some_and(|limit| stored.delivery_count > limit)
        {
            self.dead_letter(Some(id), stored.msg, DeadLetterReason::DeliveryLimit, fx);
            return;
        }
        stored.redelivered = true;
        self.insert_ready(id, stored);
    }

    /// Hands ready messages to consumers while any has credit. `fresh` is the
    /// message just enqueued, which may be delivered even if its TTL is 0.
    fn deliver(&mut self, fresh: Option<MsgId>, fx: &mut Vec<Effect>) {
        while let Some(serial) = self.next_consumer() {
            let Some((id, stored)) = self.pop_live_head(fresh, fx) else {
                break;
            };
            let Some(consumer) = self.consumers.get_mut(&serial) else {
                // next_consumer only returns registered consumers; put the
                // message back rather than lose it.
                self.insert_ready(id, stored);
                break;
            };
            debug_assert!(consumer.has_credit());
            fx.push(Effect::Deliver {
                owner: consumer.spec.owner,
                tag: consumer.spec.tag.clone(),
                id,
                msg: stored.msg.clone(),
                redelivered: stored.redelivered,
                delivery_count: stored.delivery_count,
            });
            let owner = consumer.spec.owner;
            if !consumer.spec.no_ack {
                consumer.in_flight += 1;
                debug_assert!(
                    consumer.spec.prefetch == 0 || consumer.in_flight <= consumer.spec.prefetch
                );
                self.insert_unacked(
                    id,
                    Unacked {
                        owner,
                        consumer: Some(serial),
                        stored,
                    },
                );
            }
            self.send_to_back(serial);
        }
    }

    /// The consumer to receive the next message, if any has credit.
    fn next_consumer(&self) -> Option<ConsumerSerial> {
        if self.config.single_active_consumer {
            let serial = self.active?;
            return self
                .consumers
                .get(&serial)
                .is_some_and(Consumer::has_credit)
                .then_some(serial);
        }
        self.service_order
            .values()
            .copied()
            .find(|s| self.consumers.get(s).is_some_and(Consumer::has_credit))
    }

    /// Round-robin: the consumer that just received waits behind its equals.
    fn send_to_back(&mut self, serial: ConsumerSerial) {
        let Some(consumer) = self.consumers.get_mut(&serial) else {
            return;
        };
        self.service_order.remove(&consumer.service_key());
        consumer.turn = self.next_turn;
        self.next_turn += 1;
        self.service_order.insert(consumer.service_key(), serial);
    }

    /// Removes and returns the first ready message, dropping expired ones
    /// that reach the head on the way (except `fresh`, see `deliver`).
    fn pop_live_head(
        &mut self,
        fresh: Option<MsgId>,
        fx: &mut Vec<Effect>,
    ) -> Option<(MsgId, Stored)> {
        loop {
            let (key, stored) = self.take_next_ready()?;
            if stored.is_expired(self.clock_ms) && fresh != Some(key.1) {
                self.dead_letter(Some(key.1), stored.msg, DeadLetterReason::Expired, fx);
                continue;
            }
            return Some((key.1, stored));
        }
    }

    /// The ready message to take next. A classic queue serves its highest
    /// level first. A quorum queue serves high messages first except on
    /// the last take of each cycle, which goes to the normal head, unless
    /// the high head is older (then taking it first starves no one).
    fn next_ready_key(&self) -> Option<ReadyKey> {
        let first = *self.ready.keys().next()?;
        if !self.config.quorum || first.0 != Reverse(QUORUM_HIGH) {
            return Some(first);
        }
        debug_assert!(self.priority_turn <= QUORUM_HIGH_WEIGHT);
        if self.priority_turn < QUORUM_HIGH_WEIGHT {
            return Some(first);
        }
        let normal = self.ready.range((Reverse(0), 0)..).next().map(|(k, _)| *k);
        match normal {
            Some(normal) if normal.1 < first.1 => Some(normal),
            _ => Some(first),
        }
    }

    /// Removes the ready message `next_ready_key` names, advancing a quorum
    /// queue's 2:1 cycle.
    fn take_next_ready(&mut self) -> Option<(ReadyKey, Stored)> {
        let key = self.next_ready_key()?;
        let stored = self.remove_ready(key)?;
        if self.config.quorum {
            self.priority_turn = if self.priority_turn >= QUORUM_HIGH_WEIGHT {
                0
            } else {
                self.priority_turn + 1
            };
        }
        Some((key, stored))
    }

    /// Removes expired messages at the head of every priority level, as
    /// quorum queues do: a message behind a live one waits its turn.
    fn expire_heads(&mut self, fx: &mut Vec<Effect>) {
        let now = self.clock_ms;
        let mut from = Bound::Unbounded;
        while let Some((&key, stored)) = self.ready.range((from, Bound::Unbounded)).next() {
            if stored.is_expired(now) {
                if let Some(stored) = self.remove_ready(key) {
                    self.dead_letter(Some(key.1), stored.msg, DeadLetterReason::Expired, fx);
                }
                // The next message of the same level is now its head.
                from = Bound::Excluded(key);
            } else {
                from = Bound::Excluded(level_end(key));
            }
        }
    }

    /// When `x-expires` runs out, if it can: never while consumers exist.
    fn queue_expiry_time(&self) -> Option<u64> {
        let expires = self.config.expires_ms?;
        if self.expired || !self.consumers.is_empty() {
            return None;
        }
        Some(self.last_used_ms.saturating_add(expires))
    }

    fn check_queue_expiry(&mut self, fx: &mut Vec<Effect>) {
        if self.queue_expiry_time().is_some_and(|t| self.clock_ms >= t) {
            self.expired = true;
            fx.push(Effect::Expired);
        }
    }

    /// Hands a message that leaves the queue to its dead-letter exchange.
    /// `id` is its id if it was in the queue: dead-lettering at least once,
    /// it is kept under that id until [`Command::DeadLettered`].
    fn dead_letter(
        &mut self,
        id: Option<MsgId>,
        msg: Message,
        reason: DeadLetterReason,
        fx: &mut Vec<Effect>,
    ) {
        match id {
            Some(id) if self.config.dead_letters_at_least_once() => {
                debug_assert!(id < self.next_id);
                self.dead_lettering_bytes += msg.body_len();
                let previous = self.dead_lettering.insert(
                    id,
                    DeadLettering {
                        msg: msg.clone(),
                        reason,
                    },
                );
                debug_assert!(previous.is_none());
                fx.push(Effect::DeadLetter {
                    msg,
                    reason,
                    settle: Some(id),
                });
            }
            // Without a dead-letter exchange the message is simply dropped.
            _ if self.config.dead_letter_exchange.is_some() => {
                fx.push(Effect::DeadLetter {
                    msg,
                    reason,
                    settle: None,
                });
            }
            _ => {}
        }
    }

    fn add_consumer(&mut self, spec: ConsumerSpec) {
        if self.find_consumer(spec.owner, &spec.tag).is_some() {
            // The channel refuses reused tags itself; a duplicate that gets
            // here changes nothing.
            return;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let consumer = Consumer {
            spec,
            in_flight: 0,
            turn: self.next_turn,
        };
        self.next_turn += 1;
        self.consumer_index
            .entry(consumer.spec.owner)
            .or_default()
            .insert(consumer.spec.tag.clone(), serial);
        self.service_order.insert(consumer.service_key(), serial);
        self.consumers.insert(serial, consumer);
        if self.config.single_active_consumer && self.active.is_none() {
            self.active = Some(serial);
        }
        debug_assert_eq!(self.service_order.len(), self.consumers.len());
    }

    fn remove_consumer(&mut self, serial: ConsumerSerial) {
        let Some(consumer) = self.consumers.remove(&serial) else {
            return;
        };
        self.service_order.remove(&consumer.service_key());
        let owner = consumer.spec.owner;
        if let Some(tags) = self.consumer_index.get_mut(&owner) {
            tags.remove(&consumer.spec.tag);
            if tags.is_empty() {
                self.consumer_index.remove(&owner);
            }
        }
        if self.active == Some(serial) {
            // Next in line: highest priority, then earliest registered.
            self.active = self
                .consumers
                .iter()
                .max_by_key(|(s, c)| (c.spec.priority, Reverse(**s)))
                .map(|(s, _)| *s);
        }
        // The x-expires countdown starts when the last consumer leaves.
        self.touch();
        debug_assert_eq!(self.service_order.len(), self.consumers.len());
    }

    fn find_consumer(&self, owner: OwnerId, tag: &str) -> Option<ConsumerSerial> {
        self.consumer_index.get(&owner)?.get(tag).copied()
    }

    /// Removes `id` from `owner`'s unacknowledged messages, giving its
    /// consumer the credit back. Ids that `owner` does not hold are ignored.
    fn take_unacked(&mut self, owner: OwnerId, id: MsgId) -> Option<Unacked> {
        if self.unacked.get(&id)?.owner != owner {
            return None;
        }
        let u = self.unacked.remove(&id)?;
        if let Some(c) = u.consumer.and_then(|s| self.consumers.get_mut(&s)) {
            debug_assert!(c.in_flight > 0);
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        Some(u)
    }

    fn insert_unacked(&mut self, id: MsgId, u: Unacked) {
        debug_assert!(!self.ready.contains_key(&u.stored.key(id)));
        let previous = self.unacked.insert(id, u);
        debug_assert!(previous.is_none());
    }

    fn insert_ready(&mut self, id: MsgId, stored: Stored) {
        debug_assert!(!self.unacked.contains_key(&id));
        debug_assert!(id < self.next_id);
        self.ready_bytes += stored.msg.body_len();
        let previous = self.ready.insert(stored.key(id), stored);
        debug_assert!(previous.is_none());
    }

    fn remove_ready(&mut self, key: ReadyKey) -> Option<Stored> {
        let stored = self.ready.remove(&key)?;
        debug_assert!(self.ready_bytes >= stored.msg.body_len());
        self.ready_bytes = self.ready_bytes.saturating_sub(stored.msg.body_len());
        Some(stored)
    }

    /// Invariants every command must leave true. The cheap ones are checked
    /// in every debug build; the full scan only under test, as it is linear
    /// in the queue's size.
    fn assert_invariants(&self) {
        debug_assert!(!self.ready.is_empty() || self.ready_bytes == 0);
        debug_assert_eq!(self.service_order.len(), self.consumers.len());
        debug_assert!(self.active.is_none_or(|s| self.consumers.contains_key(&s)));
        debug_assert_eq!(
            self.active.is_some(),
            self.config.single_active_consumer && !self.consumers.is_empty()
        );
        debug_assert!(
            self.unacked
                .last_key_value()
                .is_none_or(|(&id, _)| id < self.next_id)
        );
        debug_assert!(self.priority_turn <= QUORUM_HIGH_WEIGHT);
        debug_assert!(self.config.quorum || self.priority_turn == 0);
        debug_assert!(!self.dead_lettering.is_empty() || self.dead_lettering_bytes == 0);
        debug_assert!(self.config.dead_letters_at_least_once() || self.dead_lettering.is_empty());
        #[cfg(test)]
        self.assert_all_invariants();
    }

    #[cfg(test)]
    fn assert_all_invariants(&self) {
        let bytes: u64 = self.ready.values().map(|s| s.msg.body_len()).sum();
        assert_eq!(bytes, self.ready_bytes, "ready_bytes out of step");
        let top_level = if self.config.quorum {
            QUORUM_HIGH
        } else {
            self.config.max_priority.unwrap_or(0)
        };
        for (&(Reverse(level), id), stored) in &self.ready {
            assert_eq!(level, stored.level);
            assert_eq!(level, self.level_of(&stored.msg));
            assert!(level <= top_level, "level {level} above {top_level}");
            assert!(id >= 1 && id < self.next_id);
            assert!(!self.unacked.contains_key(&id), "{id} ready and unacked");
        }
        for (serial, c) in &self.consumers {
            let held = self
                .unacked
                .values()
                .filter(|u| u.consumer == Some(*serial))
                .count();
            assert_eq!(held as u64, u64::from(c.in_flight), "in_flight of {serial}");
            // No bound on in_flight here: a limit lowered by SetPrefetch
            // leaves a consumer above it until it settles. `deliver` checks
            // that no delivery takes a consumer above its limit.

            assert_eq!(self.service_order.get(&c.service_key()), Some(serial));
            assert_eq!(self.find_consumer(c.spec.owner, &c.spec.tag), Some(*serial));
        }
        let indexed: usize = self.consumer_index.values().map(BTreeMap::len).sum();
        assert_eq!(indexed, self.consumers.len());
        let bytes: u64 = self.dead_lettering.values().map(|d| d.msg.body_len()).sum();
        assert_eq!(bytes, self.dead_lettering_bytes, "dead_lettering_bytes");
        for &id in self.dead_lettering.keys() {
            assert!(id >= 1 && id < self.next_id);
            assert!(
                !self.unacked.contains_key(&id),
                "{id} unacked and dead-lettering"
            );
            assert!(
                !self.ready.keys().any(|k| k.1 == id),
                "{id} ready and dead-lettering"
            );
        }
    }
}

/// The largest key of `key`'s priority level: ranging past it skips to the
/// next level.
fn level_end(key: ReadyKey) -> ReadyKey {
    (key.0, MsgId::MAX)
}

fn confirm_effect(confirm: Option<ConfirmRef>, accepted: bool, fx: &mut Vec<Effect>) {
    if let Some(confirm) = confirm {
        fx.push(Effect::Confirm { confirm, accepted });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::config::{DeadLetterStrategy, Overflow};
    use bytes::Bytes;

    const T0: u64 = 1_000;

    fn msg(body: &str) -> Message {
        Message {
            exchange: Arc::from(""),
            routing_key: Arc::from("q"),
            raw_properties: Bytes::from_static(&[0, 0]),
            body: Bytes::copy_from_slice(body.as_bytes()),
            priority: 0,
            expiration_ms: None,
        }
    }

    fn msg_priority(body: &str, priority: u8) -> Message {
        Message {
            priority,
            ..msg(body)
        }
    }

    fn msg_expiring(body: &str, expiration_ms: u64) -> Message {
        Message {
            expiration_ms: Some(expiration_ms),
            ..msg(body)
        }
    }

    fn with_dlx(config: QueueConfig) -> QueueConfig {
        QueueConfig {
            dead_letter_exchange: Some("dlx".into()),
            ..config
        }
    }

    fn classic() -> QueueState {
        QueueState::new(QueueConfig::classic(), T0)
    }

    /// A classic queue declared with `x-max-priority`.
    fn prioritised(max_priority: u8) -> QueueConfig {
        QueueConfig {
            max_priority: Some(max_priority),
            ..QueueConfig::classic()
        }
    }

    /// A quorum queue's configuration, without the delivery limit that
    /// would get in the way of tests about ordering.
    fn quorum_config() -> QueueConfig {
        QueueConfig {
            quorum: true,
            ..QueueConfig::classic()
        }
    }

    fn quorum() -> QueueState {
        QueueState::new(quorum_config(), T0)
    }

    fn enqueue(q: &mut QueueState, m: Message) -> Vec<Effect> {
        enqueue_at(q, m, T0)
    }

    fn enqueue_at(q: &mut QueueState, m: Message, now_ms: u64) -> Vec<Effect> {
        q.apply(Command::Enqueue {
            msg: m,
            confirm: None,
            now_ms,
        })
    }

    fn spec(owner: OwnerId, tag: &str, prefetch: u32) -> ConsumerSpec {
        ConsumerSpec {
            owner,
            tag: Arc::from(tag),
            prefetch,
            priority: 0,
            no_ack: false,
        }
    }

    fn consume(q: &mut QueueState, spec: ConsumerSpec) -> Vec<Effect> {
        q.apply(Command::Consume { spec, now_ms: T0 })
    }

    fn cancel(q: &mut QueueState, owner: OwnerId, tag: &str) -> Vec<Effect> {
        q.apply(Command::Cancel {
            owner,
            tag: Arc::from(tag),
            now_ms: T0,
        })
    }

    fn get(q: &mut QueueState, owner: OwnerId, no_ack: bool) -> Vec<Effect> {
        q.apply(Command::Get {
            owner,
            no_ack,
            now_ms: T0,
        })
    }

    fn ret(q: &mut QueueState, owner: OwnerId, ids: &[MsgId]) -> Vec<Effect> {
        q.apply(Command::Return {
            owner,
            ids: ids.to_vec(),
            now_ms: T0,
        })
    }

    fn tick(q: &mut QueueState, now_ms: u64) -> Vec<Effect> {
        q.apply(Command::Tick { now_ms })
    }

    fn body(m: &Message) -> String {
        String::from_utf8_lossy(&m.body).into_owned()
    }

    /// A delivery or get, reduced to what tests compare.
    #[derive(Debug, PartialEq)]
    struct Got {
        owner: OwnerId,
        tag: String,
        id: MsgId,
        body: String,
        redelivered: bool,
        delivery_count: u32,
    }

    fn got(fx: &[Effect]) -> Vec<Got> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Deliver {
                    owner,
                    tag,
                    id,
                    msg,
                    redelivered,
                    delivery_count,
                } => Some(Got {
                    owner: *owner,
                    tag: tag.to_string(),
                    id: *id,
                    body: body(msg),
                    redelivered: *redelivered,
                    delivery_count: *delivery_count,
                }),
                Effect::GetOk {
                    owner,
                    id,
                    msg,
                    redelivered,
                    delivery_count,
                    ..
                } => Some(Got {
                    owner: *owner,
                    tag: String::new(),
                    id: *id,
                    body: body(msg),
                    redelivered: *redelivered,
                    delivery_count: *delivery_count,
                }),
                _ => None,
            })
            .collect()
    }

    fn bodies(fx: &[Effect]) -> Vec<String> {
        got(fx).into_iter().map(|g| g.body).collect()
    }

    fn dead_letters(fx: &[Effect]) -> Vec<(String, DeadLetterReason)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::DeadLetter { msg, reason, .. } => Some((body(msg), *reason)),
                _ => None,
            })
            .collect()
    }

    fn counts(ready: u64, unacked: u64, consumers: u64) -> (u64, u64, u64) {
        (ready, unacked, consumers)
    }

    fn counts_of(q: &QueueState) -> (u64, u64, u64) {
        let c = q.counts();
        (c.ready, c.unacked, c.consumers)
    }

    // --- ordering and ids -------------------------------------------------

    #[test]
    fn message_ids_start_at_one_and_increase() {
        let mut q = classic();
        for b in ["a", "b", "c"] {
            enqueue(&mut q, msg(b));
        }
        let fx = consume(&mut q, spec(1, "c", 0));
        let ids: Vec<MsgId> = got(&fx).iter().map(|g| g.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    // --- message priority ---------------------------------------------------

    /// Enqueues `(body, priority)` pairs, then drains the queue with
    /// `basic.get`, returning the bodies in the order they came out.
    fn drain_by_get(q: &mut QueueState, msgs: &[(&str, u8)]) -> Vec<String> {
        for &(b, p) in msgs {
            enqueue(q, msg_priority(b, p));
        }
        let mut out = Vec::new();
        loop {
            let fx = get(q, 1, true);
            if fx == [Effect::GetEmpty { owner: 1 }] {
                return out;
            }
            out.extend(bodies(&fx));
        }
    }

    #[test]
    fn classic_queue_with_max_priority_serves_highest_first_and_fifo_within_a_level() {
        let mut q = QueueState::new(prioritised(10), T0);
        for (b, p) in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 9)] {
            enqueue(&mut q, msg_priority(b, p));
        }
        let fx = consume(&mut q, spec(1, "c", 0));
        assert_eq!(bodies(&fx), ["e", "b", "d", "a", "c"]);
    }

    #[test]
    fn classic_queue_caps_priorities_at_its_max_priority() {
        // As test_classic_queue_message_priority: 200 counts as 10.
        let mut q = QueueState::new(prioritised(10), T0);
        let out = drain_by_get(
            &mut q,
            &[
                ("p1", 1),
                ("p5", 5),
                ("p3", 3),
                ("pNone", 0),
                ("p10", 10),
                ("p9", 9),
                ("p200", 200),
                ("p0", 0),
            ],
        );
        assert_eq!(out, ["p10", "p200", "p9", "p5", "p3", "p1", "pNone", "p0"]);
    }

    #[test]
    fn classic_queue_without_max_priority_ignores_message_priority() {
        let mut q = classic();
        let out = drain_by_get(&mut q, &[("a", 0), ("b", 9), ("c", 255), ("d", 1)]);
        assert_eq!(out, ["a", "b", "c", "d"]);
    }

    #[test]
    fn classic_queue_with_max_priority_zero_is_fifo() {
        let mut q = QueueState::new(prioritised(0), T0);
        let out = drain_by_get(&mut q, &[("a", 0), ("b", 9), ("c", 3)]);
        assert_eq!(out, ["a", "b", "c"]);
    }

    #[test]
    fn quorum_queue_serves_high_before_normal_fifo_within_each() {
        // As test_quorum_queue_message_priority: 0-4 is normal, 5+ is high.
        let mut q = quorum();
        let out = drain_by_get(&mut q, &[("n1", 0), ("n2", 4), ("h1", 5), ("h2", 9)]);
        assert_eq!(out, ["h1", "h2", "n1", "n2"]);
    }

    #[test]
    fn quorum_queue_interleaves_two_high_then_one_normal() {
        let mut q = quorum();
        let mut msgs = vec![("n", 0u8); 3];
        msgs.extend(vec![("h", 9u8); 6]);
        let out = drain_by_get(&mut q, &msgs);
        assert_eq!(out, ["h", "h", "n", "h", "h", "n", "h", "h", "n"]);
    }

    #[test]
    fn quorum_queue_interleave_applies_to_consumer_deliveries_too() {
        let mut q = quorum();
        for (b, p) in [
            ("n1", 1),
            ("n2", 2),
            ("h1", 7),
            ("h2", 8),
            ("h3", 5),
            ("h4", 6),
        ] {
            enqueue(&mut q, msg_priority(b, p));
        }
        let fx = consume(&mut q, spec(1, "c", 0));
        assert_eq!(bodies(&fx), ["h1", "h2", "n1", "h3", "h4", "n2"]);
    }

    #[test]
    fn quorum_queue_takes_an_older_high_message_on_the_normal_turn() {
        // On the normal turn the high head still goes first when it is
        // older than the normal head, as in RabbitMQ: that starves no one.
        let mut q = quorum();
        let out = drain_by_get(
            &mut q,
            &[("h1", 9), ("h2", 9), ("h3", 9), ("n1", 0), ("h4", 9)],
        );
        assert_eq!(out, ["h1", "h2", "h3", "h4", "n1"]);
    }

    #[test]
    fn quorum_queue_cycle_advances_on_every_take() {
        // Two normal takes use up the cycle's first two turns, so the next
        // take is the normal one.
        let mut q = quorum();
        assert_eq!(drain_by_get(&mut q, &[("n1", 0), ("n2", 0)]), ["n1", "n2"]);
        let out = drain_by_get(&mut q, &[("n3", 0), ("h1", 9), ("h2", 9)]);
        assert_eq!(out, ["n3", "h1", "h2"]);
    }

    #[test]
    fn returned_message_keeps_its_level_in_a_quorum_queue() {
        let mut q = quorum();
        enqueue(&mut q, msg_priority("n", 0));
        enqueue(&mut q, msg_priority("h", 9));
        let fx = get(&mut q, 7, false);
        assert_eq!(bodies(&fx), ["h"]);
        ret(&mut q, 7, &[2]);
        let fx = consume(&mut q, spec(1, "c", 0));
        assert_eq!(bodies(&fx), ["h", "n"]);
    }

    #[test]
    fn priority_cycle_is_part_of_the_replicated_state() {
        let mut a = quorum();
        drain_by_get(&mut a, &[("h", 9)]);
        let b = quorum();
        assert_ne!(a, b, "a take must show in the state");
        let json = serde_json::to_string(&a).unwrap();
        let back: QueueState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn returned_message_goes_back_to_its_original_position_marked_redelivered() {
        let mut q = classic();
        for b in ["a", "b", "c"] {
            enqueue(&mut q, msg(b));
        }
        get(&mut q, 7, false);
        get(&mut q, 7, false);
        assert!(ret(&mut q, 7, &[2]).is_empty());
        assert!(ret(&mut q, 7, &[1]).is_empty());
        let fx = consume(&mut q, spec(1, "c", 0));
        let g = got(&fx);
        assert_eq!(bodies(&fx), ["a", "b", "c"]);
        assert_eq!(
            g.iter()
                .map(|g| (g.redelivered, g.delivery_count))
                .collect::<Vec<_>>(),
            [(true, 1), (true, 1), (false, 0)]
        );
    }

    // --- consumers --------------------------------------------------------

    #[test]
    fn consumers_of_equal_priority_are_served_round_robin() {
        let mut q = classic();
        consume(&mut q, spec(1, "a", 0));
        consume(&mut q, spec(2, "b", 0));
        let mut owners = Vec::new();
        for b in ["1", "2", "3", "4"] {
            owners.extend(got(&enqueue(&mut q, msg(b))).iter().map(|g| g.owner));
        }
        assert_eq!(owners, [1, 2, 1, 2]);
    }

    #[test]
    fn higher_priority_consumer_is_served_while_it_has_credit() {
        let mut q = classic();
        consume(&mut q, spec(1, "low", 0));
        consume(
            &mut q,
            ConsumerSpec {
                priority: 5,
                ..spec(2, "high", 2)
            },
        );
        let mut owners = Vec::new();
        for b in ["1", "2", "3", "4"] {
            owners.extend(got(&enqueue(&mut q, msg(b))).iter().map(|g| g.owner));
        }
        assert_eq!(owners, [2, 2, 1, 1]);
        q.apply(Command::Settle {
            owner: 2,
            ids: vec![1],
        });
        let fx = enqueue(&mut q, msg("5"));
        assert_eq!(got(&fx)[0].owner, 2);
    }

    #[test]
    fn prefetch_caps_unacked_deliveries_and_settle_releases_credit() {
        let mut q = classic();
        consume(&mut q, spec(1, "c", 2));
        let mut fx = Vec::new();
        for b in ["a", "b", "c"] {
            fx.extend(enqueue(&mut q, msg(b)));
        }
        assert_eq!(bodies(&fx), ["a", "b"]);
        assert_eq!(counts_of(&q), counts(1, 2, 1));
        let fx = q.apply(Command::Settle {
            owner: 1,
            ids: vec![1],
        });
        assert_eq!(bodies(&fx), ["c"]);
        assert_eq!(counts_of(&q), counts(0, 2, 1));
    }

    #[test]
    fn set_prefetch_raises_or_lowers_a_consumers_limit_from_now_on() {
        let mut q = classic();
        consume(&mut q, spec(1, "c", 1));
        let mut fx = Vec::new();
        for b in ["a", "b", "c", "d", "e"] {
            fx.extend(enqueue(&mut q, msg(b)));
        }
        assert_eq!(bodies(&fx), ["a"]);
        let set = |q: &mut QueueState, prefetch| {
            q.apply(Command::SetPrefetch {
                owner: 1,
                tag: Arc::from("c"),
                prefetch,
            })
        };
        assert_eq!(bodies(&set(&mut q, 3)), ["b", "c"]);
        // Lowered to 1 with 3 held: nothing more until two are settled.
        assert!(set(&mut q, 1).is_empty());
        let settle = |q: &mut QueueState, id| {
            q.apply(Command::Settle {
                owner: 1,
                ids: vec![id],
            })
        };
        assert!(settle(&mut q, 1).is_empty());
        assert!(settle(&mut q, 2).is_empty());
        assert_eq!(bodies(&settle(&mut q, 3)), ["d"]);
        // Another owner's consumer of the same tag is not changed.
        assert!(
            q.apply(Command::SetPrefetch {
                owner: 2,
                tag: Arc::from("c"),
                prefetch: 0,
            })
            .is_empty()
        );
    }

    #[test]
    fn no_ack_consumer_settles_each_delivery_at_once() {
        let mut q = classic();
        for b in ["a", "b", "c"] {
            enqueue(&mut q, msg(b));
        }
        let fx = consume(
            &mut q,
            ConsumerSpec {
                no_ack: true,
                ..spec(1, "c", 1)
            },
        );
        assert_eq!(bodies(&fx), ["a", "b", "c"]);
        assert_eq!(counts_of(&q), counts(0, 0, 1));
    }

    #[test]
    fn single_active_consumer_delivers_only_to_the_first_registered() {
        let config = QueueConfig {
            single_active_consumer: true,
            ..QueueConfig::classic()
        };
        let mut q = QueueState::new(config, T0);
        consume(&mut q, spec(1, "first", 0));
        consume(
            &mut q,
            ConsumerSpec {
                priority: 9,
                ..spec(2, "second", 0)
            },
        );
        let mut owners = Vec::new();
        for b in ["1", "2", "3"] {
            owners.extend(got(&enqueue(&mut q, msg(b))).iter().map(|g| g.owner));
        }
        assert_eq!(owners, [1, 1, 1]);
        assert_eq!(q.counts().consumers, 2);
    }

    #[test]
    fn single_active_consumer_fails_over_by_priority_then_registration_order() {
        let config = QueueConfig {
            single_active_consumer: true,
            ..QueueConfig::classic()
        };
        let mut q = QueueState::new(config, T0);
        for (owner, priority) in [(1, 0), (2, 0), (3, 5), (4, 5)] {
            consume(
                &mut q,
                ConsumerSpec {
                    priority,
                    ..spec(owner, "c", 0)
                },
            );
        }
        let receiver = |q: &mut QueueState| got(&enqueue(q, msg("m")))[0].owner;
        assert_eq!(receiver(&mut q), 1);
        cancel(&mut q, 1, "c");
        assert_eq!(receiver(&mut q), 3);
        q.apply(Command::OwnerDown {
            owner: 3,
            now_ms: T0,
        });
        // Owner 3's unacked message went back and is redelivered to owner 4.
        assert_eq!(receiver(&mut q), 4);
        cancel(&mut q, 4, "c");
        assert_eq!(receiver(&mut q), 2);
    }

    #[test]
    fn cancel_keeps_unacked_messages_until_settled_or_owner_down() {
        let mut q = classic();
        consume(&mut q, spec(1, "c", 0));
        enqueue(&mut q, msg("a"));
        enqueue(&mut q, msg("b"));
        cancel(&mut q, 1, "c");
        assert_eq!(counts_of(&q), counts(0, 2, 0));
        assert!(!q.has_consumer(1, "c"));
        q.apply(Command::Settle {
            owner: 1,
            ids: vec![1],
        });
        assert_eq!(counts_of(&q), counts(0, 1, 0));
        q.apply(Command::OwnerDown {
            owner: 1,
            now_ms: T0,
        });
        assert_eq!(counts_of(&q), counts(1, 0, 0));
        let fx = consume(&mut q, spec(2, "d", 0));
        let g = got(&fx);
        assert_eq!((g[0].body.as_str(), g[0].redelivered), ("b", true));
        assert_eq!(g[0].delivery_count, 1);
    }

    #[test]
    fn a_new_consumer_reusing_a_tag_does_not_inherit_old_unacked_credit() {
        let mut q = classic();
        consume(&mut q, spec(1, "c", 1));
        enqueue(&mut q, msg("a"));
        cancel(&mut q, 1, "c");
        consume(&mut q, spec(1, "c", 1));
        let fx = enqueue(&mut q, msg("b"));
        assert_eq!(bodies(&fx), ["b"]);
        // Settling the old consumer's message must not free the new one's credit.
        q.apply(Command::Settle {
            owner: 1,
            ids: vec![1],
        });
        let fx = enqueue(&mut q, msg("c"));
        assert!(bodies(&fx).is_empty());
    }

    #[test]
    fn unknown_and_foreign_ids_are_ignored() {
        let mut q = with_delivery(classic());
        let before = q.clone();
        // Owner 1 holds message 1; owner 2 holds nothing.
        for (owner, ids) in [(1, vec![0]), (1, vec![99, MsgId::MAX]), (2, vec![1])] {
            let settle = Command::Settle {
                owner,
                ids: ids.clone(),
            };
            assert!(q.apply(settle).is_empty());
            assert!(ret(&mut q, owner, &ids).is_empty());
            let discard = Command::Discard {
                owner,
                ids,
                now_ms: T0,
            };
            assert!(q.apply(discard).is_empty());
        }
        assert_eq!(q, before);
    }

    /// A queue with message 1 unacked by owner 1.
    fn with_delivery(mut q: QueueState) -> QueueState {
        enqueue(&mut q, msg("a"));
        get(&mut q, 1, false);
        assert_eq!(counts_of(&q), counts(0, 1, 0));
        q
    }

    #[test]
    fn duplicate_consume_and_cancel_of_unknown_consumer_change_nothing() {
        let mut q = classic();
        consume(&mut q, spec(1, "c", 1));
        let before = q.clone();
        consume(&mut q, spec(1, "c", 5));
        cancel(&mut q, 1, "nope");
        cancel(&mut q, 2, "c");
        assert_eq!(q, before);
        assert!(q.has_consumer(1, "c"));
    }

    // --- delivery limit, discard, owner down -----------------------------

    #[test]
    fn delivery_limit_dead_letters_once_the_count_exceeds_it() {
        let config = QueueConfig {
            delivery_limit: Some(1),
            ..with_dlx(QueueConfig::classic())
        };
        let mut q = QueueState::new(config, T0);
        enqueue(&mut q, msg("a"));
        get(&mut q, 1, false);
        assert!(ret(&mut q, 1, &[1]).is_empty());
        assert_eq!(counts_of(&q), counts(1, 0, 0));
        get(&mut q, 1, false);
        let fx = ret(&mut q, 1, &[1]);
        assert_eq!(
            dead_letters(&fx),
            [("a".to_string(), DeadLetterReason::DeliveryLimit)]
        );
        assert_eq!(counts_of(&q), counts(0, 0, 0));
    }

    #[test]
    fn delivery_limit_without_dead_letter_exchange_drops_the_message() {
        let config = QueueConfig {
            delivery_limit: Some(0),
            ..QueueConfig::classic()
        };
        let mut q = with_delivery(QueueState::new(config, T0));
        assert!(ret(&mut q, 1, &[1]).is_empty());
        assert_eq!(counts_of(&q), counts(0, 0, 0));
    }

    #[test]
    fn owner_down_counts_a_delivery_against_the_limit() {
        let config = QueueConfig {
            delivery_limit: Some(0),
            ..with_dlx(QueueConfig::classic())
        };
        let mut q = with_delivery(QueueState::new(config, T0));
        let fx = q.apply(Command::OwnerDown {
            owner: 1,
            now_ms: T0,
        });
        assert_eq!(
            dead_letters(&fx),
            [("a".to_string(), DeadLetterReason::DeliveryLimit)]
        );
    }

    #[test]
    fn owner_down_returns_unacked_and_redelivers_to_remaining_consumers() {
        let mut q = classic();
        consume(&mut q, spec(1, "a", 1));
        consume(&mut q, spec(2, "b", 1));
        enqueue(&mut q, msg("x"));
        enqueue(&mut q, msg("y"));
        let fx = q.apply(Command::OwnerDown {
            owner: 1,
            now_ms: T0,
        });
        assert!(fx.is_empty(), "owner 2 has no credit left: {fx:?}");
        assert_eq!(counts_of(&q), counts(1, 1, 1));
        let fx = q.apply(Command::Settle {
            owner: 2,
            ids: vec![2],
        });
        let g = got(&fx);
        assert_eq!((g[0].owner, g[0].id, g[0].redelivered), (2, 1, true));
    }

    #[test]
    fn discard_dead_letters_as_rejected() {
        let mut q = with_delivery(QueueState::new(with_dlx(QueueConfig::classic()), T0));
        let fx = q.apply(Command::Discard {
            owner: 1,
            ids: vec![1],
            now_ms: T0,
        });
        assert_eq!(
            dead_letters(&fx),
            [("a".to_string(), DeadLetterReason::Rejected)]
        );
        assert_eq!(counts_of(&q), counts(0, 0, 0));
    }

    #[test]
    fn discard_without_dead_letter_exchange_drops() {
        let mut q = with_delivery(classic());
        let fx = q.apply(Command::Discard {
            owner: 1,
            ids: vec![1],
            now_ms: T0,
        });
        assert!(fx.is_empty());
        assert_eq!(counts_of(&q), counts(0, 0, 0));
    }

    // --- basic.get --------------------------------------------------------

    #[test]
    fn get_takes_the_next_message_and_reports_how_many_remain() {
        let mut q = QueueState::new(prioritised(9), T0);
        enqueue(&mut q, msg("a"));
        enqueue(&mut q, msg_priority("b", 1));
        let fx = get(&mut q, 1, true);
        assert!(matches!(
            &fx[..],
            [Effect::GetOk {
                remaining: 1,
                id: 2,
                ..
            }]
        ));
        let fx = get(&mut q, 1, true);
        assert!(matches!(
            &fx[..],
            [Effect::GetOk {
                remaining: 0,
                id: 1,
                ..
            }]
        ));
        assert_eq!(get(&mut q, 1, true), [Effect::GetEmpty { owner: 1 }]);
        assert_eq!(counts_of(&q), counts(0, 0, 0));
    }

    #[test]
    fn get_with_ack_holds_the_message_until_settled() {
        let mut q = with_delivery(classic());
        assert_eq!(get(&mut q, 1, false), [Effect::GetEmpty { owner: 1 }]);
        q.apply(Command::Settle {
            owner: 1,
            ids: vec![1],
        });
        assert_eq!(counts_of(&q), counts(0, 0, 0));
    }

    // --- TTL ----------------------------------------------------------------

    fn ttl_queue(ttl: u64) -> QueueState {
        let config = QueueConfig {
            message_ttl_ms: Some(ttl),
            ..with_dlx(QueueConfig::classic())
        };
        QueueState::new(config, T0)
    }

    #[test]
    fn message_ttl_expires_the_head_on_tick_with_a_dead_letter() {
        let mut q = ttl_queue(100);
        enqueue(&mut q, msg("a"));
        assert_eq!(q.next_deadline(), Some(T0 + 100));
        assert!(tick(&mut q, T0 + 99).is_empty());
        let fx = tick(&mut q, T0 + 100);
        assert_eq!(
            dead_letters(&fx),
            [("a".to_string(), DeadLetterReason::Expired)]
        );
        assert_eq!(counts_of(&q), counts(0, 0, 0));
        assert_eq!(q.next_deadline(), None);
    }

    #[test]
    fn expired_messages_without_dead_letter_exchange_are_dropped() {
        let mut q = classic();
        enqueue(&mut q, msg_expiring("a", 10));
        assert!(tick(&mut q, T0 + 10).is_empty());
        assert_eq!(counts_of(&q), counts(0, 0, 0));
    }

    #[test]
    fn the_lower_of_queue_ttl_and_message_expiration_applies() {
        let mut q = ttl_queue(100);
        enqueue(&mut q, msg_expiring("short", 50));
        assert_eq!(q.next_deadline(), Some(T0 + 50));
        let mut q = ttl_queue(100);
        enqueue(&mut q, msg_expiring("long", 500));
        assert_eq!(q.next_deadline(), Some(T0 + 100));
    }

    #[test]
    fn ttl_zero_message_goes_to_a_ready_consumer_or_expires_at_once() {
        let mut q = ttl_queue(0);
        let fx = enqueue(&mut q, msg("nobody"));
        assert_eq!(
            dead_letters(&fx),
            [("nobody".to_string(), DeadLetterReason::Expired)]
        );
        consume(&mut q, spec(1, "c", 1));
        let fx = enqueue(&mut q, msg("taken"));
        assert_eq!(bodies(&fx), ["taken"]);
        // The consumer is now out of credit, so the next one expires.
        let fx = enqueue(&mut q, msg("late"));
        assert!(bodies(&fx).is_empty());
        assert_eq!(
            dead_letters(&fx),
            [("late".to_string(), DeadLetterReason::Expired)]
        );
        assert_eq!(counts_of(&q), counts(0, 1, 1));
    }

    #[test]
    fn expired_message_behind_a_live_head_waits_its_turn() {
        let mut q = QueueState::new(with_dlx(QueueConfig::classic()), T0);
        enqueue(&mut q, msg_expiring("live", 1_000));
        enqueue(&mut q, msg_expiring("dead", 10));
        assert!(tick(&mut q, T0 + 20).is_empty());
        assert_eq!(q.counts().ready, 2);
        assert_eq!(q.next_deadline(), Some(T0 + 1_000));
        let fx = q.apply(Command::Get {
            owner: 1,
            no_ack: true,
            now_ms: T0 + 20,
        });
        assert_eq!(bodies(&fx), ["live"]);
        let fx = q.apply(Command::Get {
            owner: 1,
            no_ack: true,
            now_ms: T0 + 20,
        });
        assert_eq!(
            fx,
            [
                Effect::DeadLetter {
                    msg: msg_expiring("dead", 10),
                    reason: DeadLetterReason::Expired,
                    settle: None,
                },
                Effect::GetEmpty { owner: 1 }
            ]
        );
    }

    #[test]
    fn each_priority_level_expires_its_own_head() {
        let mut q = QueueState::new(with_dlx(prioritised(9)), T0);
        enqueue(&mut q, msg_priority("high", 5));
        enqueue(&mut q, msg_expiring("low", 10));
        assert_eq!(q.next_deadline(), Some(T0 + 10));
        let fx = tick(&mut q, T0 + 10);
        assert_eq!(
            dead_letters(&fx),
            [("low".to_string(), DeadLetterReason::Expired)]
        );
        assert_eq!(q.counts().ready, 1);
    }

    #[test]
    fn each_quorum_level_expires_its_own_head() {
        let mut q = QueueState::new(with_dlx(quorum_config()), T0);
        enqueue(&mut q, msg_priority("normal", 0));
        enqueue(&mut q, msg_expiring("normal-expiring", 10));
        let mut high = msg_expiring("high", 10);
        high.priority = 9;
        enqueue(&mut q, high);
        assert_eq!(q.next_deadline(), Some(T0 + 10));
        let fx = tick(&mut q, T0 + 10);
        assert_eq!(
            dead_letters(&fx),
            [("high".to_string(), DeadLetterReason::Expired)]
        );
        // The normal message expiring behind a live head waits its turn.
        assert_eq!(q.counts().ready, 2);
    }

    #[test]
    fn expired_head_is_not_delivered_to_a_new_consumer() {
        let mut q = ttl_queue(10);
        enqueue(&mut q, msg("old"));
        enqueue_at(&mut q, msg("new"), T0 + 5);
        let fx = q.apply(Command::Consume {
            spec: spec(1, "c", 0),
            now_ms: T0 + 12,
        });
        assert_eq!(bodies(&fx), ["new"]);
        assert_eq!(
            dead_letters(&fx),
            [("old".to_string(), DeadLetterReason::Expired)]
        );
    }

    #[test]
    fn time_never_runs_backwards_across_commands() {
        let mut q = ttl_queue(10);
        enqueue(&mut q, msg("a"));
        tick(&mut q, T0 + 10);
        // A later command stamped with an older clock does not resurrect time.
        enqueue_at(&mut q, msg("b"), T0);
        assert_eq!(q.next_deadline(), Some(T0 + 20));
    }

    // --- x-expires --------------------------------------------------------

    fn expiring_queue(expires: u64) -> QueueState {
        let config = QueueConfig {
            expires_ms: Some(expires),
            ..QueueConfig::classic()
        };
        QueueState::new(config, T0)
    }

    #[test]
    fn idle_queue_expires_once_after_x_expires() {
        let mut q = expiring_queue(1_000);
        assert_eq!(q.next_deadline(), Some(T0 + 1_000));
        assert!(tick(&mut q, T0 + 999).is_empty());
        assert_eq!(tick(&mut q, T0 + 1_000), [Effect::Expired]);
        assert!(tick(&mut q, T0 + 5_000).is_empty());
        assert_eq!(q.next_deadline(), None);
    }

    #[test]
    fn a_queue_without_a_clock_counts_down_from_its_first_command() {
        let config = QueueConfig {
            quorum: true,
            expires_ms: Some(1_000),
            ..QueueConfig::classic()
        };
        let mut q = QueueState::new(config, 0);
        assert!(tick(&mut q, T0).is_empty(), "not expired at its first tick");
        assert_eq!(q.next_deadline(), Some(T0 + 1_000));
        assert!(tick(&mut q, T0 + 999).is_empty());
        assert_eq!(tick(&mut q, T0 + 1_000), [Effect::Expired]);
    }

    #[test]
    fn queue_with_a_consumer_never_expires_and_restarts_when_it_leaves() {
        let mut q = expiring_queue(1_000);
        consume(&mut q, spec(1, "c", 0));
        assert_eq!(q.next_deadline(), None);
        assert!(tick(&mut q, T0 + 10_000).is_empty());
        q.apply(Command::OwnerDown {
            owner: 1,
            now_ms: T0 + 10_000,
        });
        assert_eq!(q.next_deadline(), Some(T0 + 11_000));
        assert_eq!(tick(&mut q, T0 + 11_000), [Effect::Expired]);
    }

    #[test]
    fn get_and_touch_restart_the_expiry_countdown() {
        let mut q = expiring_queue(1_000);
        q.apply(Command::Get {
            owner: 1,
            no_ack: true,
            now_ms: T0 + 500,
        });
        assert!(tick(&mut q, T0 + 1_000).is_empty());
        q.apply(Command::Touch { now_ms: T0 + 1_400 });
        assert!(tick(&mut q, T0 + 2_000).is_empty());
        assert_eq!(tick(&mut q, T0 + 2_400), [Effect::Expired]);
    }

    #[test]
    fn publishing_does_not_keep_a_queue_alive() {
        let mut q = expiring_queue(1_000);
        enqueue_at(&mut q, msg("a"), T0 + 900);
        assert_eq!(tick(&mut q, T0 + 1_000), [Effect::Expired]);
    }

    // --- length limits ----------------------------------------------------

    fn limited(max_length: Option<u64>, max_bytes: Option<u64>, overflow: Overflow) -> QueueState {
        let config = QueueConfig {
            max_length,
            max_length_bytes: max_bytes,
            overflow,
            ..with_dlx(QueueConfig::classic())
        };
        QueueState::new(config, T0)
    }

    fn confirmed(q: &mut QueueState, body: &str, seq: u64) -> Vec<Effect> {
        q.apply(Command::Enqueue {
            msg: msg(body),
            confirm: Some(ConfirmRef { owner: 9, seq }),
            now_ms: T0,
        })
    }

    fn confirm(seq: u64, accepted: bool) -> Effect {
        Effect::Confirm {
            confirm: ConfirmRef { owner: 9, seq },
            accepted,
        }
    }

    #[test]
    fn a_retried_publish_is_confirmed_but_not_enqueued_twice() {
        let mut q = QueueState::new(QueueConfig::classic(), T0);
        assert_eq!(confirmed(&mut q, "a", 1), [confirm(1, true)]);
        assert_eq!(confirmed(&mut q, "b", 2), [confirm(2, true)]);
        // The proposal carrying seq 2 is applied a second time.
        assert_eq!(confirmed(&mut q, "b", 2), [confirm(2, true)]);
        assert_eq!(q.counts().ready, 2);
        assert_eq!(confirmed(&mut q, "c", 3), [confirm(3, true)]);
        assert_eq!(q.counts().ready, 3);
    }

    #[test]
    fn the_shells_own_enqueues_are_never_taken_for_copies() {
        let mut q = classic();
        let shell = |q: &mut QueueState, body: &str| {
            q.apply(Command::Enqueue {
                msg: msg(body),
                confirm: Some(ConfirmRef {
                    owner: SHELL_OWNER,
                    seq: 1,
                }),
                now_ms: T0,
            })
        };
        let accepted = Effect::Confirm {
            confirm: ConfirmRef {
                owner: SHELL_OWNER,
                seq: 1,
            },
            accepted: true,
        };
        assert_eq!(shell(&mut q, "a"), vec![accepted.clone()]);
        assert_eq!(shell(&mut q, "b"), vec![accepted]);
        assert_eq!(q.counts().ready, 2);
        assert!(q.publishers.is_empty());
    }

    #[test]
    fn drop_head_makes_room_by_dead_lettering_the_oldest() {
        let mut q = limited(Some(2), None, Overflow::DropHead);
        confirmed(&mut q, "a", 1);
        confirmed(&mut q, "b", 2);
        let fx = confirmed(&mut q, "c", 3);
        assert_eq!(
            fx,
            [
                confirm(3, true),
                Effect::DeadLetter {
                    msg: msg("a"),
                    reason: DeadLetterReason::MaxLen,
                    settle: None,
                }
            ]
        );
        assert_eq!(bodies(&consume(&mut q, spec(1, "c", 0))), ["b", "c"]);
    }

    #[test]
    fn drop_head_applies_to_max_length_bytes() {
        let mut q = limited(None, Some(5), Overflow::DropHead);
        enqueue(&mut q, msg("aa"));
        enqueue(&mut q, msg("bb"));
        let fx = enqueue(&mut q, msg("cc"));
        assert_eq!(
            dead_letters(&fx),
            [("aa".to_string(), DeadLetterReason::MaxLen)]
        );
        assert_eq!(q.counts().ready_bytes, 4);
    }

    #[test]
    fn length_limits_count_only_ready_messages() {
        let mut q = limited(Some(1), None, Overflow::RejectPublish);
        consume(&mut q, spec(1, "c", 1));
        assert_eq!(confirmed(&mut q, "a", 1)[0], confirm(1, true));
        assert_eq!(confirmed(&mut q, "b", 2), [confirm(2, true)]);
        assert_eq!(confirmed(&mut q, "c", 3), [confirm(3, false)]);
        assert_eq!(counts_of(&q), counts(1, 1, 1));
    }

    #[test]
    fn reject_publish_nacks_without_enqueueing() {
        let mut q = limited(Some(1), None, Overflow::RejectPublish);
        assert_eq!(confirmed(&mut q, "a", 1), [confirm(1, true)]);
        assert_eq!(confirmed(&mut q, "b", 2), [confirm(2, false)]);
        // Without a confirm the refusal is silent.
        assert!(enqueue(&mut q, msg("c")).is_empty());
        assert_eq!(bodies(&consume(&mut q, spec(1, "c", 0))), ["a"]);
        // Refused publishes take no message id.
        assert_eq!(q.next_id, 2);
    }

    #[test]
    fn reject_publish_dlx_dead_letters_the_refused_message() {
        let mut q = limited(None, Some(1), Overflow::RejectPublishDlx);
        let fx = confirmed(&mut q, "big", 1);
        assert_eq!(
            fx,
            [
                confirm(1, false),
                Effect::DeadLetter {
                    msg: msg("big"),
                    reason: DeadLetterReason::MaxLen,
                    settle: None,
                }
            ]
        );
        assert_eq!(counts_of(&q), counts(0, 0, 0));
    }

    #[test]
    fn accepted_confirm_comes_before_the_delivery_it_causes() {
        let mut q = classic();
        consume(&mut q, spec(1, "c", 0));
        let fx = confirmed(&mut q, "a", 1);
        assert_eq!(fx.len(), 2);
        assert_eq!(fx[0], confirm(1, true));
        assert!(matches!(fx[1], Effect::Deliver { id: 1, .. }));
    }

    // --- purge --------------------------------------------------------------

    #[test]
    fn purge_drops_ready_messages_only_and_does_not_dead_letter() {
        let mut q = with_delivery(QueueState::new(with_dlx(QueueConfig::classic()), T0));
        enqueue(&mut q, msg("b"));
        enqueue(&mut q, msg("c"));
        assert_eq!(q.apply(Command::Purge), [Effect::Purged { count: 2 }]);
        assert_eq!(counts_of(&q), counts(0, 1, 0));
        assert_eq!(q.counts().ready_bytes, 0);
    }

    // --- dead-lettering at least once ---------------------------------------

    /// A quorum queue that dead-letters at least once: a dead-letter
    /// exchange, reject-publish, and the given length limit.
    fn at_least_once(max_length: Option<u64>) -> QueueState {
        let config = QueueConfig {
            quorum: true,
            max_length,
            overflow: Overflow::RejectPublish,
            dead_letter_strategy: DeadLetterStrategy::AtLeastOnce,
            ..with_dlx(QueueConfig::classic())
        };
        assert!(config.dead_letters_at_least_once());
        QueueState::new(config, T0)
    }

    fn discard(q: &mut QueueState, owner: OwnerId, ids: &[MsgId]) -> Vec<Effect> {
        q.apply(Command::Discard {
            owner,
            ids: ids.to_vec(),
            now_ms: T0,
        })
    }

    fn dead_lettered(q: &mut QueueState, ids: &[MsgId]) -> Vec<Effect> {
        q.apply(Command::DeadLettered { ids: ids.to_vec() })
    }

    fn pending(q: &QueueState) -> Vec<(MsgId, String, DeadLetterReason)> {
        q.pending_dead_letters()
            .iter()
            .filter_map(|e| match e {
                Effect::DeadLetter {
                    msg,
                    reason,
                    settle: Some(id),
                } => Some((*id, body(msg), *reason)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn at_least_once_keeps_a_rejected_message_until_it_is_dead_lettered() {
        let mut q = at_least_once(None);
        enqueue(&mut q, msg("a"));
        enqueue(&mut q, msg("b"));
        get(&mut q, 7, false);
        let fx = discard(&mut q, 7, &[1]);
        assert_eq!(
            fx,
            [Effect::DeadLetter {
                msg: msg("a"),
                reason: DeadLetterReason::Rejected,
                settle: Some(1),
            }]
        );
        // Neither ready nor unacked, and never delivered again.
        assert_eq!(counts_of(&q), counts(1, 0, 0));
        assert_eq!(q.counts().dead_lettering, 1);
        assert_eq!(bodies(&consume(&mut q, spec(1, "c", 0))), ["b"]);
        // Until the shell reports it done, it is handed out again.
        assert_eq!(
            pending(&q),
            [(1, "a".to_string(), DeadLetterReason::Rejected)]
        );
        assert_eq!(q.pending_dead_letters(), fx);
        assert!(q.pending_dead_letters_where(|id| id != 1).is_empty());
        assert!(dead_lettered(&mut q, &[1]).is_empty());
        assert_eq!(q.counts().dead_lettering, 0);
        assert!(pending(&q).is_empty());
        // A report repeated, or for an id never being dead-lettered, changes
        // nothing.
        assert!(dead_lettered(&mut q, &[1, 2, 99]).is_empty());
        assert_eq!(counts_of(&q), counts(0, 1, 1));
    }

    #[test]
    fn at_least_once_keeps_expired_and_over_the_limit_messages_too() {
        let mut q = at_least_once(None);
        q.config.message_ttl_ms = Some(10);
        q.config.delivery_limit = Some(0);
        enqueue(&mut q, msg("old"));
        enqueue_at(&mut q, msg("young"), T0 + 5);
        let fx = get(&mut q, 7, false);
        assert_eq!(bodies(&fx), ["old"]);
        // Returned once with a limit of 0: dead-lettered.
        let fx = ret(&mut q, 7, &[1]);
        assert_eq!(
            fx,
            [Effect::DeadLetter {
                msg: msg("old"),
                reason: DeadLetterReason::DeliveryLimit,
                settle: Some(1),
            }]
        );
        tick(&mut q, T0 + 20);
        assert_eq!(
            pending(&q),
            [
                (1, "old".to_string(), DeadLetterReason::DeliveryLimit),
                (2, "young".to_string(), DeadLetterReason::Expired),
            ]
        );
        assert_eq!(counts_of(&q), counts(0, 0, 0));
        dead_lettered(&mut q, &[2, 1]);
        assert!(pending(&q).is_empty());
    }

    #[test]
    fn messages_being_dead_lettered_count_toward_the_length_limits() {
        let mut q = at_least_once(Some(2));
        assert_eq!(confirmed(&mut q, "a", 1), [confirm(1, true)]);
        assert_eq!(confirmed(&mut q, "b", 2), [confirm(2, true)]);
        get(&mut q, 7, false);
        discard(&mut q, 7, &[1]);
        // One ready, one being dead-lettered: full.
        assert_eq!(confirmed(&mut q, "c", 3), [confirm(3, false)]);
        dead_lettered(&mut q, &[1]);
        assert_eq!(confirmed(&mut q, "d", 4), [confirm(4, true)]);
        let mut bytes = at_least_once(None);
        bytes.config.max_length_bytes = Some(2);
        enqueue(&mut bytes, msg("aa"));
        get(&mut bytes, 7, false);
        discard(&mut bytes, 7, &[1]);
        assert!(enqueue(&mut bytes, msg("b")).is_empty(), "refused");
        assert_eq!(bytes.counts().ready, 0);
    }

    #[test]
    fn at_least_once_without_reject_publish_dead_letters_at_most_once() {
        let mut q = at_least_once(None);
        q.config.overflow = Overflow::DropHead;
        enqueue(&mut q, msg("a"));
        get(&mut q, 7, false);
        assert_eq!(
            discard(&mut q, 7, &[1]),
            [Effect::DeadLetter {
                msg: msg("a"),
                reason: DeadLetterReason::Rejected,
                settle: None,
            }]
        );
        assert_eq!(q.counts().dead_lettering, 0);
        assert!(q.pending_dead_letters().is_empty());
    }

    #[test]
    fn purge_drops_messages_being_dead_lettered_too() {
        let mut q = at_least_once(None);
        enqueue(&mut q, msg("a"));
        enqueue(&mut q, msg("b"));
        get(&mut q, 7, false);
        discard(&mut q, 7, &[1]);
        assert_eq!(q.apply(Command::Purge), [Effect::Purged { count: 1 }]);
        assert_eq!(q.counts().dead_lettering, 0);
        assert!(q.pending_dead_letters().is_empty());
    }

    #[test]
    fn messages_being_dead_lettered_are_part_of_the_snapshot() {
        let mut q = at_least_once(None);
        enqueue(&mut q, msg("a"));
        get(&mut q, 7, false);
        discard(&mut q, 7, &[1]);
        let back: QueueState = crate::cluster::wire::decode(&crate::cluster::wire::encode(&q))
            .expect("snapshot decodes");
        assert_eq!(back, q);
        assert_eq!(pending(&back).len(), 1);
    }
}

/// Property tests: random command histories, as a Raft log might carry them.
#[cfg(test)]
mod properties {
    use super::*;
    use crate::queue::config::{DeadLetterStrategy, Overflow};
    use bytes::Bytes;
    use proptest::collection::vec;
    use proptest::option;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const T0: u64 = 1_000;
    const OWNERS: u64 = 3;
    /// The channel that publishes with confirms (consumers are 1..=OWNERS).
    const PUBLISHER: OwnerId = 9;

    /// One step of a history, before it is turned into a [`Command`] (ids
    /// are picked from what the queue holds at that point, so that settles
    /// and returns mostly hit real deliveries).
    #[derive(Clone, Debug)]
    enum Op {
        Enqueue {
            priority: u8,
            expiration: Option<u64>,
            padding: usize,
            confirm: bool,
        },
        Consume {
            owner: OwnerId,
            tag: u8,
            prefetch: u32,
            priority: i32,
            no_ack: bool,
        },
        Cancel {
            owner: OwnerId,
            tag: u8,
        },
        SetPrefetch {
            owner: OwnerId,
            tag: u8,
            prefetch: u32,
        },
        Settle {
            owner: OwnerId,
            picks: Vec<usize>,
        },
        Return {
            owner: OwnerId,
            picks: Vec<usize>,
        },
        Discard {
            owner: OwnerId,
            picks: Vec<usize>,
        },
        Get {
            owner: OwnerId,
            no_ack: bool,
        },
        Purge,
        OwnerDown {
            owner: OwnerId,
        },
        /// The shell reports dead letters delivered: mostly messages being
        /// dead-lettered, some that are not.
        DeadLettered {
            picks: Vec<usize>,
        },
        Touch,
        Tick {
            advance: u64,
        },
        /// The next proposer's clock is behind: later commands carry an
        /// older time.
        Skew {
            back: u64,
        },
    }

    fn owner() -> impl Strategy<Value = OwnerId> {
        1..=OWNERS
    }

    fn picks() -> impl Strategy<Value = Vec<usize>> {
        vec(any::<usize>(), 0..4)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Both sides of the quorum queue's 4/5 boundary, and above a
            // classic queue's x-max-priority.
            6 => (0u8..8, option::weighted(0.3, 0u64..60), 0usize..8, any::<bool>()).prop_map(
                |(priority, expiration, padding, confirm)| Op::Enqueue {
                    priority,
                    expiration,
                    padding,
                    confirm,
                }
            ),
            2 => (owner(), 0u8..2, 0u32..4, 0i32..2, proptest::bool::weighted(0.2)).prop_map(
                |(owner, tag, prefetch, priority, no_ack)| Op::Consume {
                    owner,
                    tag,
                    prefetch,
                    priority,
                    no_ack,
                }
            ),
            1 => (owner(), 0u8..2).prop_map(|(owner, tag)| Op::Cancel { owner, tag }),
            1 => (owner(), 0u8..2, 0u32..4).prop_map(|(owner, tag, prefetch)| Op::SetPrefetch {
                owner,
                tag,
                prefetch
            }),
            3 => (owner(), picks()).prop_map(|(owner, picks)| Op::Settle { owner, picks }),
            2 => (owner(), picks()).prop_map(|(owner, picks)| Op::Return { owner, picks }),
            1 => (owner(), picks()).prop_map(|(owner, picks)| Op::Discard { owner, picks }),
            1 => (owner(), any::<bool>()).prop_map(|(owner, no_ack)| Op::Get { owner, no_ack }),
            1 => Just(Op::Purge),
            1 => owner().prop_map(|owner| Op::OwnerDown { owner }),
            2 => picks().prop_map(|picks| Op::DeadLettered { picks }),
            1 => Just(Op::Touch),
            2 => (0u64..40).prop_map(|advance| Op::Tick { advance }),
            1 => (0u64..20).prop_map(|back| Op::Skew { back }),
        ]
    }

    fn overflow() -> impl Strategy<Value = Overflow> {
        prop_oneof![
            Just(Overflow::DropHead),
            Just(Overflow::RejectPublish),
            Just(Overflow::RejectPublishDlx),
        ]
    }

    /// Any queue configuration; `dlx` forces a dead-letter exchange so that
    /// every removal is visible as an effect.
    fn config(dlx: bool) -> impl Strategy<Value = QueueConfig> {
        (
            any::<bool>(),
            option::weighted(0.3, 0u64..60),
            option::weighted(0.2, 1u64..100),
            option::weighted(0.3, 0u64..6),
            option::weighted(0.2, 8u64..60),
            overflow(),
            any::<bool>(),
            option::weighted(0.4, 0u32..3),
            proptest::bool::weighted(0.2),
            option::weighted(0.5, 0u8..6),
            (any::<bool>(), proptest::bool::weighted(0.3)),
        )
            .prop_map(
                move |(
                    quorum,
                    ttl,
                    expires,
                    max_len,
                    max_bytes,
                    overflow,
                    dl,
                    limit,
                    sac,
                    max_prio,
                    (strategy, forced),
                )| {
                    // Asked for at random, at-least-once mostly falls back to
                    // at-most-once; `forced` makes it apply (quorum, a
                    // dead-letter exchange, reject-publish).
                    let at_least_once = strategy || forced;
                    let quorum = quorum || forced;
                    QueueConfig {
                        quorum,
                        message_ttl_ms: ttl,
                        expires_ms: expires,
                        max_length: max_len,
                        max_length_bytes: max_bytes,
                        overflow: if forced {
                            Overflow::RejectPublish
                        } else {
                            overflow
                        },
                        dead_letter_exchange: (dlx || dl || forced).then(|| "dlx".to_string()),
                        dead_letter_routing_key: None,
                        delivery_limit: limit,
                        single_active_consumer: sac,
                        // Only classic queues have x-max-priority.
                        max_priority: max_prio.filter(|_| !quorum),
                        dead_letter_strategy: if at_least_once {
                            DeadLetterStrategy::AtLeastOnce
                        } else {
                            DeadLetterStrategy::AtMostOnce
                        },
                    }
                },
            )
    }

    /// Turns ops into commands against a queue, tracking the clock and the
    /// publish sequence. Each message body starts with its sequence number,
    /// which identifies it in effects that carry no id (dead-letters).
    struct Driver {
        now: u64,
        seq: u64,
    }

    impl Driver {
        fn new() -> Self {
            Driver { now: T0, seq: 0 }
        }

        fn command(&mut self, op: &Op, q: &QueueState) -> Command {
            let now_ms = self.now;
            match op.clone() {
                Op::Enqueue {
                    priority,
                    expiration,
                    padding,
                    confirm,
                } => {
                    self.seq += 1;
                    let mut body = self.seq.to_be_bytes().to_vec();
                    body.resize(8 + padding, 0);
                    let msg = Message {
                        exchange: Arc::from(""),
                        routing_key: Arc::from("q"),
                        raw_properties: Bytes::from_static(&[0, 0]),
                        body: Bytes::from(body),
                        priority,
                        expiration_ms: expiration,
                    };
                    // Some enqueues are the shell's own (dead letters from
                    // another queue), which are never taken for copies.
                    let owner = if self.seq % 5 == 0 {
                        SHELL_OWNER
                    } else {
                        PUBLISHER
                    };
                    let confirm = confirm.then_some(ConfirmRef {
                        owner,
                        seq: self.seq,
                    });
                    Command::Enqueue {
                        msg,
                        confirm,
                        now_ms,
                    }
                }
                Op::Consume {
                    owner,
                    tag,
                    prefetch,
                    priority,
                    no_ack,
                } => Command::Consume {
                    spec: ConsumerSpec {
                        owner,
                        tag: tag_name(tag),
                        prefetch,
                        priority,
                        no_ack,
                    },
                    now_ms,
                },
                Op::Cancel { owner, tag } => Command::Cancel {
                    owner,
                    tag: tag_name(tag),
                    now_ms,
                },
                Op::SetPrefetch {
                    owner,
                    tag,
                    prefetch,
                } => Command::SetPrefetch {
                    owner,
                    tag: tag_name(tag),
                    prefetch,
                },
                Op::Settle { owner, picks } => Command::Settle {
                    owner,
                    ids: pick_ids(q, owner, &picks),
                },
                Op::Return { owner, picks } => Command::Return {
                    owner,
                    ids: pick_ids(q, owner, &picks),
                    now_ms,
                },
                Op::Discard { owner, picks } => Command::Discard {
                    owner,
                    ids: pick_ids(q, owner, &picks),
                    now_ms,
                },
                Op::Get { owner, no_ack } => Command::Get {
                    owner,
                    no_ack,
                    now_ms,
                },
                Op::Purge => Command::Purge,
                Op::OwnerDown { owner } => Command::OwnerDown { owner, now_ms },
                Op::DeadLettered { picks } => {
                    let mut candidates: Vec<MsgId> = q.dead_lettering.keys().copied().collect();
                    candidates.extend([0, q.next_id]);
                    candidates.extend(q.unacked.keys().copied());
                    Command::DeadLettered {
                        ids: picks
                            .iter()
                            .map(|p| candidates[p % candidates.len()])
                            .collect(),
                    }
                }
                Op::Touch => Command::Touch { now_ms },
                Op::Tick { advance } => {
                    self.now += advance;
                    Command::Tick { now_ms: self.now }
                }
                Op::Skew { back } => {
                    self.now = self.now.saturating_sub(back).max(T0);
                    Command::Touch { now_ms: self.now }
                }
            }
        }
    }

    fn tag_name(tag: u8) -> Arc<str> {
        Arc::from(format!("t{tag}"))
    }

    /// Ids to settle: mostly the owner's own deliveries, some held by other
    /// owners, and some that never existed.
    fn pick_ids(q: &QueueState, owner: OwnerId, picks: &[usize]) -> Vec<MsgId> {
        let mut candidates: Vec<MsgId> = q
            .unacked
            .iter()
            .filter(|(_, u)| u.owner == owner)
            .map(|(&id, _)| id)
            .collect();
        candidates.extend(q.unacked.keys().copied());
        candidates.extend([0, q.next_id, q.next_id + 7]);
        picks
            .iter()
            .map(|p| candidates[p % candidates.len()])
            .collect()
    }

    fn seq_of(msg: &Message) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&msg.body[..8]);
        u64::from_be_bytes(b)
    }

    /// Where a published message is, as the effects tell it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Fate {
        Ready,
        Unacked(OwnerId),
        Settled,
        DeadLettered,
        Purged,
        /// Refused by `x-overflow` (not enqueued).
        Refused,
        /// Refused and dead-lettered (`reject-publish-dlx`).
        RefusedDeadLettered,
        /// Discarded by its owner; its dead-letter effect is due.
        Discarding,
        /// Being dead-lettered at least once: in the queue until reported
        /// dead-lettered.
        DeadLettering,
    }

    /// An independent account of every message, driven only by the commands
    /// sent and the effects returned.
    #[derive(Default)]
    struct Ledger {
        fate: BTreeMap<u64, Fate>,
        delivered: BTreeSet<u64>,
        seq_by_id: BTreeMap<MsgId, u64>,
        no_ack: BTreeMap<(OwnerId, Arc<str>), bool>,
    }

    impl Ledger {
        fn count(&self, f: Fate) -> u64 {
            self.fate.values().filter(|&&x| x == f).count() as u64
        }

        fn unacked_count(&self) -> u64 {
            self.fate
                .values()
                .filter(|f| matches!(f, Fate::Unacked(_)))
                .count() as u64
        }

        fn release(&mut self, owner: OwnerId, ids: &[MsgId], to: Fate) {
            for id in ids {
                let Some(&seq) = self.seq_by_id.get(id) else {
                    continue;
                };
                if self.fate.get(&seq) == Some(&Fate::Unacked(owner)) {
                    self.fate.insert(seq, to);
                }
            }
        }

        fn before(&mut self, cmd: &Command) {
            match cmd {
                Command::Settle { owner, ids } => self.release(*owner, ids, Fate::Settled),
                Command::Return { owner, ids, .. } => self.release(*owner, ids, Fate::Ready),
                Command::Discard { owner, ids, .. } => self.release(*owner, ids, Fate::Discarding),
                Command::DeadLettered { ids } => {
                    for id in ids {
                        let Some(&seq) = self.seq_by_id.get(id) else {
                            continue;
                        };
                        if self.fate.get(&seq) == Some(&Fate::DeadLettering) {
                            self.fate.insert(seq, Fate::DeadLettered);
                        }
                    }
                }
                Command::OwnerDown { owner, .. } => {
                    for f in self.fate.values_mut() {
                        if *f == Fate::Unacked(*owner) {
                            *f = Fate::Ready;
                        }
                    }
                    self.no_ack.retain(|(o, _), _| o != owner);
                }
                Command::Consume { spec, .. } => {
                    self.no_ack
                        .entry((spec.owner, spec.tag.clone()))
                        .or_insert(spec.no_ack);
                }
                Command::Cancel { owner, tag, .. } => {
                    self.no_ack.remove(&(*owner, tag.clone()));
                }
                _ => {}
            }
        }

        fn take(
            &mut self,
            id: MsgId,
            msg: &Message,
            redelivered: bool,
            to: Fate,
        ) -> Result<(), TestCaseError> {
            let seq = seq_of(msg);
            prop_assert_eq!(self.fate.get(&seq), Some(&Fate::Ready), "taking {}", seq);
            prop_assert_eq!(
                redelivered,
                self.delivered.contains(&seq),
                "redelivered flag"
            );
            prop_assert_eq!(*self.seq_by_id.entry(id).or_insert(seq), seq, "id reused");
            self.delivered.insert(seq);
            self.fate.insert(seq, to);
            Ok(())
        }

        fn after(
            &mut self,
            cmd: &Command,
            fx: &[Effect],
            q: &QueueState,
        ) -> Result<(), TestCaseError> {
            let mut published = None;
            for e in fx {
                match e {
                    Effect::Confirm { confirm, accepted } => {
                        prop_assert!(!self.fate.contains_key(&confirm.seq));
                        let f = if *accepted {
                            Fate::Ready
                        } else {
                            Fate::Refused
                        };
                        self.fate.insert(confirm.seq, f);
                        published = Some(confirm.seq);
                    }
                    Effect::Deliver {
                        owner,
                        tag,
                        id,
                        msg,
                        redelivered,
                        ..
                    } => {
                        self.note_unconfirmed(cmd, msg, &mut published);
                        let no_ack = self.no_ack.get(&(*owner, tag.clone()));
                        prop_assert!(no_ack.is_some(), "delivery to an unknown consumer");
                        let to = if no_ack == Some(&true) {
                            Fate::Settled
                        } else {
                            Fate::Unacked(*owner)
                        };
                        self.take(*id, msg, *redelivered, to)?;
                    }
                    Effect::GetOk {
                        owner,
                        id,
                        msg,
                        redelivered,
                        remaining,
                        ..
                    } => {
                        let no_ack = matches!(cmd, Command::Get { no_ack: true, .. });
                        let to = if no_ack {
                            Fate::Settled
                        } else {
                            Fate::Unacked(*owner)
                        };
                        self.take(*id, msg, *redelivered, to)?;
                        prop_assert_eq!(*remaining, self.count(Fate::Ready));
                    }
                    Effect::GetEmpty { .. } => prop_assert_eq!(self.count(Fate::Ready), 0),
                    Effect::DeadLetter {
                        msg,
                        reason,
                        settle,
                    } => {
                        self.note_unconfirmed(cmd, msg, &mut published);
                        let seq = seq_of(msg);
                        let at_least_once = q.config.dead_letters_at_least_once();
                        let to = match (self.fate.get(&seq), reason) {
                            (Some(Fate::Ready), DeadLetterReason::Expired)
                            | (Some(Fate::Ready), DeadLetterReason::MaxLen)
                            | (Some(Fate::Ready), DeadLetterReason::DeliveryLimit)
                            | (Some(Fate::Discarding), DeadLetterReason::Rejected) => {
                                // At least once, a message that was in the
                                // queue stays there under its id.
                                prop_assert_eq!(settle.is_some(), at_least_once, "settle");
                                if let Some(id) = settle {
                                    let known = *self.seq_by_id.entry(*id).or_insert(seq);
                                    prop_assert_eq!(known, seq, "id of a dead letter");
                                    Fate::DeadLettering
                                } else {
                                    Fate::DeadLettered
                                }
                            }
                            (Some(Fate::Refused), DeadLetterReason::MaxLen) => {
                                prop_assert!(settle.is_none(), "a refused message has no id");
                                Fate::RefusedDeadLettered
                            }
                            (f, r) => {
                                return Err(TestCaseError::fail(format!(
                                    "dead-letter {r:?} of {seq} in state {f:?}"
                                )));
                            }
                        };
                        self.fate.insert(seq, to);
                    }
                    Effect::Purged { count } => {
                        prop_assert_eq!(*count, self.count(Fate::Ready));
                        for f in self.fate.values_mut() {
                            if *f == Fate::Ready || *f == Fate::DeadLettering {
                                *f = Fate::Purged;
                            }
                        }
                    }
                    Effect::Expired => {}
                }
            }
            // Without a confirm, an accepted enqueue shows only in the state.
            if let Command::Enqueue { msg, .. } = cmd {
                let seq = seq_of(msg);
                self.fate.entry(seq).or_insert_with(|| {
                    if q.ready.values().any(|s| seq_of(&s.msg) == seq) {
                        Fate::Ready
                    } else {
                        Fate::Refused
                    }
                });
            }
            prop_assert_eq!(self.count(Fate::Discarding), 0, "discard not dead-lettered");
            let c = q.counts();
            prop_assert_eq!(c.ready, self.count(Fate::Ready));
            prop_assert_eq!(c.unacked, self.unacked_count());
            prop_assert_eq!(c.dead_lettering, self.count(Fate::DeadLettering));
            Ok(())
        }

        /// An enqueue without a confirm: the message enters the ledger when
        /// its first effect (delivery or dead-letter) names it.
        fn note_unconfirmed(&mut self, cmd: &Command, msg: &Message, published: &mut Option<u64>) {
            if let Command::Enqueue {
                msg: m, confirm, ..
            } = cmd
            {
                let seq = seq_of(m);
                if confirm.is_none() && seq_of(msg) == seq && published.is_none() {
                    self.fate.insert(seq, Fate::Ready);
                    *published = Some(seq);
                }
            }
        }

        /// At the end, the ledger and the queue agree on every message.
        fn matches(&self, q: &QueueState) -> Result<(), TestCaseError> {
            let ready: BTreeSet<u64> = q.ready.values().map(|s| seq_of(&s.msg)).collect();
            let ledger_ready: BTreeSet<u64> = self
                .fate
                .iter()
                .filter(|(_, f)| **f == Fate::Ready)
                .map(|(&s, _)| s)
                .collect();
            prop_assert_eq!(ready, ledger_ready);
            let unacked: BTreeMap<u64, Fate> = q
                .unacked
                .values()
                .map(|u| (seq_of(&u.stored.msg), Fate::Unacked(u.owner)))
                .collect();
            let ledger_unacked: BTreeMap<u64, Fate> = self
                .fate
                .iter()
                .filter(|(_, f)| matches!(f, Fate::Unacked(_)))
                .map(|(&s, &f)| (s, f))
                .collect();
            prop_assert_eq!(unacked, ledger_unacked);
            // What is being dead-lettered is exactly what the queue would
            // hand a new leader to dead-letter again.
            let pending: BTreeMap<u64, MsgId> = q
                .pending_dead_letters()
                .iter()
                .filter_map(|e| match e {
                    Effect::DeadLetter {
                        msg,
                        settle: Some(id),
                        ..
                    } => Some((seq_of(msg), *id)),
                    _ => None,
                })
                .collect();
            let ledger_pending: BTreeMap<u64, MsgId> = self
                .seq_by_id
                .iter()
                .filter(|(_, s)| self.fate.get(s) == Some(&Fate::DeadLettering))
                .map(|(&id, &s)| (s, id))
                .collect();
            prop_assert_eq!(pending.len() as u64, q.counts().dead_lettering);
            prop_assert_eq!(pending, ledger_pending);
            Ok(())
        }
    }

    /// Outstanding deliveries per consumer registration, for the prefetch
    /// property. A registration keeps its deliveries after Cancel; a new
    /// consumer with the same tag starts afresh.
    #[derive(Default)]
    struct CreditTracker {
        registrations: BTreeMap<(OwnerId, Arc<str>), usize>,
        specs: Vec<ConsumerSpec>,
        outstanding: Vec<BTreeSet<MsgId>>,
    }

    impl CreditTracker {
        fn before(&mut self, cmd: &Command) {
            match cmd {
                Command::Consume { spec, .. } => {
                    let key = (spec.owner, spec.tag.clone());
                    if !self.registrations.contains_key(&key) {
                        self.registrations.insert(key, self.specs.len());
                        self.specs.push(spec.clone());
                        self.outstanding.push(BTreeSet::new());
                    }
                }
                Command::Cancel { owner, tag, .. } => {
                    self.registrations.remove(&(*owner, tag.clone()));
                }
                Command::SetPrefetch {
                    owner,
                    tag,
                    prefetch,
                } => {
                    if let Some(&i) = self.registrations.get(&(*owner, tag.clone())) {
                        self.specs[i].prefetch = *prefetch;
                    }
                }
                Command::Settle { owner, ids }
                | Command::Return { owner, ids, .. }
                | Command::Discard { owner, ids, .. } => {
                    for (spec, held) in self.specs.iter().zip(&mut self.outstanding) {
                        if spec.owner == *owner {
                            for id in ids {
                                held.remove(id);
                            }
                        }
                    }
                }
                Command::OwnerDown { owner, .. } => {
                    self.registrations.retain(|(o, _), _| o != owner);
                    for (spec, held) in self.specs.iter().zip(&mut self.outstanding) {
                        if spec.owner == *owner {
                            held.clear();
                        }
                    }
                }
                _ => {}
            }
        }

        fn after(&mut self, fx: &[Effect]) -> Result<(), TestCaseError> {
            for e in fx {
                if let Effect::Deliver { owner, tag, id, .. } = e {
                    let i = self.registrations.get(&(*owner, tag.clone())).copied();
                    prop_assert!(i.is_some(), "delivery to an unregistered consumer");
                    let i = i.unwrap_or_default();
                    let spec = &self.specs[i];
                    if spec.no_ack {
                        continue;
                    }
                    self.outstanding[i].insert(*id);
                    if spec.prefetch > 0 {
                        prop_assert!(
                            self.outstanding[i].len() <= spec.prefetch as usize,
                            "prefetch {} exceeded by {:?}",
                            spec.prefetch,
                            self.outstanding[i]
                        );
                    }
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Two replicas applying the same log emit the same effects and end
        /// in the same state.
        #[test]
        fn replicas_applying_the_same_commands_agree(
            config in config(false),
            ops in vec(op(), 0..80),
        ) {
            let mut a = QueueState::new(config.clone(), T0);
            let mut b = QueueState::new(config, T0);
            let mut driver = Driver::new();
            for op in &ops {
                let cmd = driver.command(op, &a);
                let fa = a.apply(cmd.clone());
                let fb = b.apply(cmd);
                prop_assert_eq!(fa, fb);
                prop_assert_eq!(a.counts(), b.counts());
                prop_assert_eq!(a.next_deadline(), b.next_deadline());
            }
            prop_assert_eq!(a, b);
        }

        /// Three replicas as a Raft group runs them: one applies the
        /// commands as they are, one applies them after the log's encoding,
        /// and one starts from a snapshot (encoded as it is persisted) taken
        /// part-way and replays the rest. All three end in the same state.
        #[test]
        fn a_replica_from_the_log_or_a_snapshot_agrees(
            config in config(false),
            ops in vec(op(), 0..80),
            cut in 0usize..80,
        ) {
            use crate::cluster::wire::{decode, encode};
            let mut a = QueueState::new(config.clone(), T0);
            let mut b = QueueState::new(config, T0);
            let mut c: Option<QueueState> = None;
            let mut driver = Driver::new();
            let mut tail = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                if i == cut.min(ops.len()) {
                    c = Some(decode(&encode(&a)).expect("snapshot decodes"));
                }
                let cmd = driver.command(op, &a);
                let logged: Command = decode(&encode(&cmd)).expect("entry decodes");
                let fa = a.apply(cmd);
                let fb = b.apply(logged.clone());
                prop_assert_eq!(fa, fb);
                if c.is_some() {
                    tail.push(logged);
                }
            }
            let mut c = c.unwrap_or_else(|| decode(&encode(&a)).expect("snapshot decodes"));
            for cmd in tail {
                c.apply(cmd);
            }
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&a, &c);
        }

        /// Every published message ends up in exactly one place, and one
        /// delivered before is only delivered again marked redelivered.
        #[test]
        fn every_message_is_accounted_for_exactly_once(
            config in config(true),
            ops in vec(op(), 0..80),
        ) {
            let mut q = QueueState::new(config, T0);
            let mut driver = Driver::new();
            let mut ledger = Ledger::default();
            for op in &ops {
                let cmd = driver.command(op, &q);
                ledger.before(&cmd);
                let fx = q.apply(cmd.clone());
                ledger.after(&cmd, &fx, &q)?;
            }
            ledger.matches(&q)?;
            prop_assert_eq!(ledger.fate.len() as u64, driver.seq);
        }

        /// Dead-lettering at least once: every dead letter stays in the
        /// queue, handed out again by `pending_dead_letters`, until a
        /// `DeadLettered` names it (the ledger checks that nothing else
        /// removes it), and a replica fed the same log agrees throughout.
        #[test]
        fn at_least_once_dead_letters_leave_only_when_reported(
            config in config(true),
            ops in vec(op(), 0..120),
        ) {
            let config = QueueConfig {
                quorum: true,
                overflow: Overflow::RejectPublish,
                dead_letter_strategy: DeadLetterStrategy::AtLeastOnce,
                max_priority: None,
                // A low delivery limit and a TTL, so that returns and time
                // dead-letter too, not only rejects.
                delivery_limit: Some(config.delivery_limit.unwrap_or(0)),
                message_ttl_ms: Some(config.message_ttl_ms.unwrap_or(50)),
                ..config
            };
            prop_assert!(config.dead_letters_at_least_once());
            let mut q = QueueState::new(config.clone(), T0);
            let mut replica = QueueState::new(config, T0);
            let mut driver = Driver::new();
            let mut ledger = Ledger::default();
            for op in &ops {
                let cmd = driver.command(op, &q);
                ledger.before(&cmd);
                let fx = q.apply(cmd.clone());
                prop_assert_eq!(&fx, &replica.apply(cmd.clone()));
                ledger.after(&cmd, &fx, &q)?;
            }
            ledger.matches(&q)?;
            prop_assert_eq!(ledger.fate.len() as u64, driver.seq);
            prop_assert_eq!(q.pending_dead_letters(), replica.pending_dead_letters());
            prop_assert_eq!(q, replica);
        }

        /// No consumer ever holds more unacknowledged deliveries than its
        /// prefetch allows.
        #[test]
        fn prefetch_is_never_exceeded(
            config in config(false),
            ops in vec(op(), 0..80),
        ) {
            let mut q = QueueState::new(config, T0);
            let mut driver = Driver::new();
            let mut credit = CreditTracker::default();
            for op in &ops {
                let cmd = driver.command(op, &q);
                credit.before(&cmd);
                let fx = q.apply(cmd);
                credit.after(&fx)?;
            }
        }
    }
}
