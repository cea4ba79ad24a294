//! Warren: an AMQP 0-9-1 broker.
pub mod broker;
pub mod message;
pub mod queue;
