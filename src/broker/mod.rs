//! Definitions and routing: vhosts, exchanges, bindings, the queue registry.
//!
//! - [`metadata`]: the metadata state machine. Declares, deletes, binds and
//!   unbinds are commands applied in one order on every node, so every node
//!   holds the same definitions and routes a publish with a local lookup.
//! - [`routing`]: where a publish goes: per-exchange indexes for direct,
//!   fanout, topic ([`topic`], a trie) and headers ([`headers`]) exchanges,
//!   with exchange-to-exchange bindings and alternate exchanges.
//! - [`error`]: the AMQP reply codes a definition command can fail with.

pub mod error;
pub mod headers;
pub mod metadata;
pub mod routing;
pub mod topic;
