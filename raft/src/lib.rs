//! Warren's multi-Raft engine, built on openraft. It knows nothing of AMQP:
//! a group's commands and replies are opaque bytes that the broker encodes.
//!
//! Every durable queue (and the cluster's metadata) is one Raft group; a node
//! runs thousands of them. What makes that affordable is that they share one
//! log store and one fsync per batch rather than paying one each.
//!
//! Where to start reading:
//! - [`types`]: the openraft type configuration and the short names the rest
//!   of the code uses (`Entry`, `LogId`, `Vote`). The only module that spells
//!   out openraft's generics.
//! - [`log_store`]: [`SharedLog`], the node's one redb database holding every
//!   group's log, vote, committed and purged log ids, and [`GroupLogStore`],
//!   the per-group handle openraft drives as its log storage.
//! - [`group_commit`]: the single writer thread that batches every group's
//!   writes into one transaction and one fsync; the on-disk key layout and the
//!   measurements behind it.
//!
//! - [`registry`]: [`RaftNode`], the node's registry of groups and the
//!   broker's entry point: create and remove groups, propose, app messages.
//! - [`state_machine`]: the [`StateMachine`] the broker implements, and the
//!   adapter openraft drives (snapshots, their persistence).
//! - `transport`: one authenticated TCP connection per pair of nodes,
//!   carrying everything; `wire` is what travels on it.
//! - `network`: openraft's network trait over the transport.
//! - `failure_detector`: one heartbeat per peer, peers declared down or
//!   restarted, so groups need no heartbeats of their own.
//!
//! openraft appears in `types`, `log_store`, `state_machine`, `network` and
//! the group plumbing of `registry`; an upgrade should touch only those.

mod failure_detector;
pub mod group_commit;
pub mod log_store;
mod network;
pub mod registry;
pub mod state_machine;
mod transport;
pub mod types;
mod wire;

#[cfg(test)]
mod tests;

pub use failure_detector::PeerEvent;
pub use log_store::{GroupLogStore, LogStoreError, SharedLog};
pub use registry::{
    AppHandler, ClusterConfig, DEFAULT_FAILURE_TIMEOUT, GroupStatus, NodeOptions, ProposeError,
    RaftNode,
};
pub use state_machine::StateMachine;
pub use types::{Command, GroupId, NodeId, TypeConfig};
