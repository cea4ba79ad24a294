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
//! Still to come (see the architecture document): the inter-node transport
//! (`transport.rs`), the registry of groups (`registry.rs`) and the node-level
//! failure detector (`failure_detector.rs`).

pub mod group_commit;
pub mod log_store;
pub mod types;

#[cfg(test)]
mod tests;

pub use log_store::{GroupLogStore, LogStoreError, SharedLog};
pub use types::{Command, GroupId, NodeId, TypeConfig};
