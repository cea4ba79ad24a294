//! What Warren's nodes say to each other above Raft: the batched commands a
//! replicated queue's log holds, the replies its leader sends back to the
//! proposer, the one-way messages that carry deliveries to the node where
//! the consumer's channel lives, and the calls by which any node reaches a
//! node-local queue on another node.
//!
//! Everything is serde data encoded with bincode; a payload that does not
//! decode is dropped (and logged by the caller), never a panic.

use crate::message::Message;
use crate::queue::command::{Command, ConsumerSpec, Effect, MsgId, OwnerId, QueueCounts};
use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::sync::Arc;

/// One operation in a replicated queue's log entry. An entry holds a batch
/// of them, in the order the proposing node received them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum QueueOp {
    /// A queue command, applied to the state machine as it is.
    Cmd(Command),
    /// `basic.consume`, refused when an exclusive consumer is there or it
    /// asks for exclusivity while others are.
    Consume {
        spec: ConsumerSpec,
        exclusive: bool,
        now_ms: u64,
    },
    /// A read of the counts, ordered with the commands (declare-ok).
    Counts,
    /// Node `node` went down or restarted: its owners (those below `below`
    /// when given) are gone.
    NodeGone {
        node: u64,
        below: Option<u64>,
        now_ms: u64,
    },
    /// The leader's link to node `node` broke and came back: the leader
    /// sends what that node's channels hold once more.
    Resend { node: u64 },
}

/// The answer to one [`QueueOp`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum OpReply {
    /// The effects meant for the proposer: confirms, get-ok/empty, purged.
    Effects(Vec<Effect>),
    Consume(Result<(), String>),
    Counts(QueueCounts),
}

/// One-way messages between nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AppMsg {
    /// A queue leader hands a message to a consumer on the receiving node.
    Deliver {
        owner: OwnerId,
        vhost: Arc<str>,
        queue: Arc<str>,
        tag: Arc<str>,
        id: MsgId,
        msg: Message,
        redelivered: bool,
    },
    /// The consumer was cancelled by the queue (it was deleted).
    Cancelled { owner: OwnerId, tag: Arc<str> },
    /// A direct reply-to response for a channel on the receiving node.
    DirectReply { owner: OwnerId, msg: Message },
}

/// Requests between nodes that wait for an answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AppCall {
    /// Operations on a node-local queue that lives on the receiver, sent by
    /// another node's handle of it; answered with `Option<Vec<OpReply>>`,
    /// one reply per operation (None when the queue is not there).
    QueueOps {
        vhost: Arc<str>,
        queue: Arc<str>,
        ops: Vec<QueueOp>,
    },
    /// Answered (with `true`) once the receiver has applied the metadata
    /// log up to `index`, or (with `false`) when that takes too long.
    MetaApplied { index: u64 },
}

pub fn encode<T: Serialize>(v: &T) -> Bytes {
    // Encoding plain data into a Vec cannot fail; an empty payload would be
    // refused by the decoder rather than misread.
    Bytes::from(bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap_or_default())
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice(b, bincode::config::standard())
        .ok()
        .map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::metadata::{MetaCommand, QueueDef};
    use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};

    #[test]
    fn queue_ops_and_definitions_round_trip() {
        let msg = Message {
            exchange: Arc::from("x"),
            routing_key: Arc::from("k"),
            raw_properties: Bytes::from_static(&[0x80, 0x00, 1, b'a']),
            body: Bytes::from_static(b"hello"),
            priority: 3,
            expiration_ms: Some(10),
        };
        let ops = vec![
            QueueOp::Cmd(Command::Enqueue {
                msg: msg.clone(),
                confirm: None,
                now_ms: 5,
            }),
            QueueOp::Counts,
        ];
        let back: Vec<QueueOp> = decode(&encode(&ops)).unwrap();
        match &back[0] {
            QueueOp::Cmd(Command::Enqueue { msg: m, .. }) => assert_eq!(m, &msg),
            other => panic!("unexpected {other:?}"),
        }
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(5));
        let cmd = MetaCommand::DeclareQueue {
            vhost: "/".into(),
            def: QueueDef {
                arguments: args,
                ..QueueDef::new("q")
            },
        };
        let back: MetaCommand = decode(&encode(&cmd)).unwrap();
        assert_eq!(back, cmd);
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(decode::<Vec<QueueOp>>(&[0xff, 0xff, 0xff, 0x01]).is_none());
    }
}
