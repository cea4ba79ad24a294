//! Queues.
//!
//! - [`command`]: the commands a queue accepts and the effects it asks for.
//!   They are plain data so that a Raft log can carry them.
//! - [`config`]: a queue's settings, read from its declare arguments.
//! - [`exclusive`]: the exclusive-consumer rule, kept beside the state
//!   machine by both shells.
//! - [`fifo`]: the queue as a pure, deterministic state machine:
//!   `apply(command) -> effects`, with time arriving inside the command.
//!   Replicas that apply the same commands reach the same state.
//! - [`runner`]: the I/O shell that owns one queue's state machine on this
//!   node, feeds it commands and carries out its effects.

pub mod command;
pub mod config;
pub mod exclusive;
pub mod fifo;
pub mod runner;
