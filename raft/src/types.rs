//! The openraft type configuration every Warren Raft group uses, and the
//! names the rest of the crate (and the broker) use for openraft's types.
//!
//! This is the one module that spells out openraft's generic types; everything
//! else says `Entry`, `LogId`, `Vote`. An openraft upgrade that renames or
//! reshapes them should only have to touch this file (and the trait impls in
//! `log_store.rs`, which openraft defines).
//!
//! Application data is an opaque byte blob. The broker serialises its own
//! commands (queue commands, metadata commands) and replies, so this crate
//! stays ignorant of AMQP and one type configuration serves every kind of
//! group: the metadata group and each quorum queue share the node's log store.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Identifies a Raft group on this node and across the cluster. The metadata
/// group and every quorum queue each have one.
pub type GroupId = u64;

/// Identifies a Warren node in the cluster.
pub type NodeId = u64;

/// A command proposed to a group: bytes the group's state machine decodes.
/// A newtype only because openraft wants its app data to be `Display`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Command(pub Bytes);

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.0.len())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<Bytes> for Command {
    fn from(bytes: Bytes) -> Self {
        Command(bytes)
    }
}

openraft::declare_raft_types!(
    /// Type configuration of every Warren Raft group: opaque command bytes in,
    /// opaque reply bytes out, `u64` node ids, tokio runtime.
    pub TypeConfig:
        D = Command,
        R = Bytes,
        NodeId = NodeId,
        Node = openraft::BasicNode,
);

/// A log entry of a Warren group.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// Position of an entry in a group's log: (leader of the term, index).
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// The vote a node has cast or holds in a group.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// What `get_log_state` reports: last purged and last present log id.
pub type LogState = openraft::storage::LogState<TypeConfig>;
/// Callback openraft hands to `append`, to be fired once the entries are
/// durable.
pub type IoFlushed = openraft::storage::IOFlushed<TypeConfig>;
/// openraft's storage error for this configuration.
pub type StorageError = openraft::StorageError<TypeConfig>;
/// The handle to one running Raft group.
pub type Raft<SM> = openraft::Raft<TypeConfig, SM>;
