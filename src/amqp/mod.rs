//! The AMQP 0-9-1 front-end. It knows nothing of Raft.
//!
//! - [`frame`]: the wire: splitting a byte stream into frames and checking
//!   them, with method arguments decoded by the `amq-protocol` crate and
//!   bodies kept as `Bytes` slices of the read buffer (no copy).
//! - [`writer`]: encoding outgoing frames; bodies are written from the
//!   message's own `Bytes` with vectored writes.
//! - [`reply`]: the reply codes of the spec and RabbitMQ.
//! - [`auth`]: PLAIN and AMQPLAIN.
//! - [`connection`]: one client connection: handshake, tuning, heartbeats,
//!   flow control, dispatch of frames to channels.
//! - [`channel`]: what a channel does with each method.
//! - [`confirms`]: publisher-confirm bookkeeping (pure).
//! - [`prefetch`]: a channel's shared (`global`) prefetch limit (pure).

pub mod auth;
pub mod channel;
pub mod confirms;
pub mod connection;
pub mod frame;
pub mod prefetch;
pub mod reply;
pub mod writer;
