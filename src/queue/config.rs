//! A queue's settings, read from the `x-…` arguments of `queue.declare`.
//!
//! Validation follows RabbitMQ: a value of the wrong type or out of range is
//! refused with 406 PRECONDITION_FAILED and a message naming the argument.
