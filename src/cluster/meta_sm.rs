//! The metadata group's state machine: every node applies the cluster's
//! definitions (exchanges, queues, bindings, the queue registry with each
//! queue's placement) into its own routing table, and starts or stops the
//! queues the change concerns on this node.
//!
//! The reply to the proposer is the entry's index and the outcome of
//! [`Metadata::apply`], or the
//! AMQP error that refused the command, so a client declaring on any node
//! gets the same answers as on a single node.
//!
//! [`Metadata::apply`]: crate::broker::metadata::Metadata::apply

use super::wire::{decode, encode};
use crate::broker::error::BrokerError;
use crate::broker::metadata::{MetaCommand, MetaOutcome};
use crate::node::Node;
use bytes::Bytes;
use std::sync::Weak;

/// The group id of the metadata group; queue groups never use it.
pub const META_GROUP: u64 = 0;

pub struct MetaSm {
    pub node: Weak<Node>,
}

impl warren_raft::StateMachine for MetaSm {
    fn apply(&mut self, index: u64, cmd: Bytes, _leader: bool) -> Bytes {
        let result: Result<MetaOutcome, BrokerError> =
            match (decode::<MetaCommand>(&cmd), self.node.upgrade()) {
                (Some(cmd), Some(node)) => node.apply_meta_local(cmd),
                (None, _) => {
                    tracing::warn!("undecodable metadata log entry skipped");
                    Err(BrokerError::internal("undecodable metadata command"))
                }
                (_, None) => Err(BrokerError::internal("node is stopping")),
            };
        if let Some(node) = self.node.upgrade() {
            node.meta_applied.send_replace(index);
        }
        // The index goes back with the outcome: the proposer waits until its
        // own node has applied the command too, so that what the client
        // declared is there when its next command arrives.
        encode(&(index, result))
    }

    fn snapshot(&self) -> Bytes {
        match self.node.upgrade() {
            Some(node) => encode(&node.meta().to_commands()),
            None => encode(&Vec::<MetaCommand>::new()),
        }
    }

    fn restore(&mut self, snapshot: Bytes) {
        let (Some(cmds), Some(node)) = (decode::<Vec<MetaCommand>>(&snapshot), self.node.upgrade())
        else {
            tracing::error!("metadata snapshot does not decode");
            return;
        };
        node.restore_meta(cmds);
    }
}
