//! What a queue is told to do ([`Command`]) and what it asks its shell to do
//! in return ([`Effect`]).
//!
//! Everything here is plain data: a command carries the current time when
//! time matters (`now_ms`, milliseconds since the Unix epoch, read by the
//! proposer), so that replaying the same commands on another replica gives
//! the same state and the same effects.

use crate::message::Message;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Identifies the channel that owns consumers and unacknowledged deliveries.
/// Unique in the cluster (the node id is in the high bits).
pub type OwnerId = u64;

/// Identifies a message within one queue; assigned by the queue on enqueue,
/// strictly increasing. The channel maps its delivery tags to these.
pub type MsgId = u64;

/// The owner named in the confirms a queue's shell asks for on its own
/// behalf rather than a channel's: a quorum queue dead-lettering at least
/// once enqueues into the target queues with it and reads the confirms from
/// the replies. No channel has this id (a channel's id carries its node's
/// id, at least 1, in the top bits). An enqueue confirmed to it is not
/// remembered as a publisher's last sequence number: its sender numbers
/// enqueues its own way and accepts duplicates.
pub const SHELL_OWNER: OwnerId = 0;

/// Names a publisher-confirm to send once the queue has accepted (or refused)
/// an enqueue: the channel and the publish sequence number on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConfirmRef {
    pub owner: OwnerId,
    pub seq: u64,
}

/// A consumer's settings at `basic.consume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsumerSpec {
    pub owner: OwnerId,
    pub tag: Arc<str>,
    /// Unacknowledged deliveries allowed at once; 0 means no limit.
    pub prefetch: u32,
    /// `x-priority`: consumers with a higher priority are served first while
    /// they have credit.
    pub priority: i32,
    /// With `no_ack` a delivery is settled as soon as it is made.
    pub no_ack: bool,
}

/// A command to a queue. Every effect a command causes is in the
/// `Vec<Effect>` that `apply` returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Add a message. `confirm` is answered with [`Effect::Confirm`].
    Enqueue {
        msg: Message,
        confirm: Option<ConfirmRef>,
        now_ms: u64,
    },
    /// Register a consumer (`basic.consume`).
    Consume { spec: ConsumerSpec, now_ms: u64 },
    /// Remove a consumer (`basic.cancel`). Its unacknowledged messages stay
    /// with it until they are settled or returned, as in RabbitMQ.
    Cancel {
        owner: OwnerId,
        tag: Arc<str>,
        now_ms: u64,
    },
    /// The consumer's prefetch changed (`basic.qos` with `global` on its
    /// channel). Deliveries it already holds above a lowered limit stay
    /// with it; it gets no more until it is below the limit again.
    SetPrefetch {
        owner: OwnerId,
        tag: Arc<str>,
        prefetch: u32,
    },
    /// `basic.ack`: the messages are done with.
    Settle { owner: OwnerId, ids: Vec<MsgId> },
    /// `basic.nack`/`basic.reject` with requeue: the messages go back to the
    /// queue in their original position and are redelivered.
    Return {
        owner: OwnerId,
        ids: Vec<MsgId>,
        now_ms: u64,
    },
    /// `basic.nack`/`basic.reject` without requeue: the messages are dropped,
    /// or dead-lettered with reason `rejected`.
    Discard {
        owner: OwnerId,
        ids: Vec<MsgId>,
        now_ms: u64,
    },
    /// `basic.get`: take one message, answered with [`Effect::GetOk`] or
    /// [`Effect::GetEmpty`].
    Get {
        owner: OwnerId,
        no_ack: bool,
        now_ms: u64,
    },
    /// `queue.purge`: drop every ready message, answered with
    /// [`Effect::Purged`]. Unacknowledged messages are kept.
    Purge,
    /// The owner (a channel) is gone: cancel its consumers and return every
    /// message it had not settled.
    OwnerDown { owner: OwnerId, now_ms: u64 },
    /// The queue was used (redeclared, or any client operation): restarts the
    /// `x-expires` countdown.
    Touch { now_ms: u64 },
    /// Time passed: expire messages whose TTL ran out and the queue itself
    /// if `x-expires` ran out.
    Tick { now_ms: u64 },
    /// Messages being dead-lettered at least once have reached every queue
    /// the dead-letter exchange routed them to: they leave the queue. Ids
    /// no longer being dead-lettered are ignored.
    ///
    /// (Variants are only ever appended, so that logs written before a
    /// variant existed still decode.)
    DeadLettered { ids: Vec<MsgId> },
}

/// Why a message is dead-lettered; written into `x-death` as RabbitMQ names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadLetterReason {
    Rejected,
    Expired,
    MaxLen,
    DeliveryLimit,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::Expired => "expired",
            DeadLetterReason::MaxLen => "maxlen",
            DeadLetterReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Something the queue's shell must do. Effects are produced in a
/// deterministic order. Serialisable because a replicated queue's leader
/// sends reply effects back to the node that proposed the command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Effect {
    /// Send `msg` to the consumer `(owner, tag)`.
    Deliver {
        owner: OwnerId,
        tag: Arc<str>,
        id: MsgId,
        msg: Message,
        redelivered: bool,
        /// Times the message was returned to the queue before this delivery.
        delivery_count: u32,
    },
    /// Answer to [`Command::Get`] with a message. `remaining` is the number
    /// of ready messages left after this one.
    GetOk {
        owner: OwnerId,
        id: MsgId,
        msg: Message,
        redelivered: bool,
        delivery_count: u32,
        remaining: u64,
    },
    /// Answer to [`Command::Get`] on an empty queue.
    GetEmpty { owner: OwnerId },
    /// Answer to a publisher confirm: `accepted` is false when the queue
    /// refused the message (`x-overflow: reject-publish`).
    Confirm { confirm: ConfirmRef, accepted: bool },
    /// Publish `msg` to the queue's dead-letter exchange (the shell adds
    /// `x-death` and knows the exchange and routing key from the config).
    /// Only produced when the queue has a dead-letter exchange.
    DeadLetter {
        msg: Message,
        reason: DeadLetterReason,
        /// Dead-lettering at least once: the message stays in the queue
        /// under this id until the shell reports, with
        /// [`Command::DeadLettered`], that every target queue accepted it.
        /// None: publish and forget.
        settle: Option<MsgId>,
    },
    /// Answer to [`Command::Purge`].
    Purged { count: u64 },
    /// `x-expires` ran out: the shell deletes the queue.
    Expired,
}

/// Counts reported by `queue.declare-ok`, the admin API and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages delivered and not yet settled.
    pub unacked: u64,
    /// Body bytes of ready messages.
    pub ready_bytes: u64,
    /// Registered consumers.
    pub consumers: u64,
    /// Messages being dead-lettered at least once, not yet accepted by
    /// every target queue (RabbitMQ's `messages_dlx`).
    pub dead_lettering: u64,
}
