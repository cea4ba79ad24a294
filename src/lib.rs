//! Warren: an AMQP 0-9-1 message broker (RabbitMQ's dialect) whose durable
//! queues are meant to be Raft groups, like RabbitMQ's quorum queues.
//!
//! Where to start reading:
//! - [`server`] starts a node: the AMQP listener, the admin API, the memory
//!   monitor.
//! - [`amqp`] is the wire protocol: [`amqp::frame`] (decoding),
//!   [`amqp::writer`] (encoding), [`amqp::connection`] (handshake,
//!   heartbeats, the frame loop) and [`amqp::channel`] (what every method
//!   does).
//! - [`broker`] holds definitions and routing: the metadata state machine
//!   and the exchange types.
//! - [`queue`] is the queue: [`queue::fifo`] the pure state machine,
//!   [`queue::runner`] the task that runs it and carries out its effects.
//! - [`node`] ties them together: which queue runs where, which channel owns
//!   which consumer, dead-lettering.
//! - [`admin`] is the HTTP API and `/metrics`; [`cli`] the command line,
//!   including `warren perf`.
//!
//! Pure logic (codec, routing, state machines) is kept apart from I/O so
//! that it is tested without sockets or disks.

pub mod admin;
pub mod amqp;
pub mod broker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod message;
pub mod metrics;
pub mod node;
pub mod queue;
pub mod server;
