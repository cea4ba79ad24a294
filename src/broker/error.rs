//! Errors from definition commands and routing, each with the AMQP reply
//! code a client sees (the channel is closed with it).

use thiserror::Error;

/// A refused command: `code` is the AMQP reply code (404, 403, 405, 406, …)
/// and `text` the reply text, worded as RabbitMQ words it.
#[derive(Clone, Debug, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
#[error("{code} {text}")]
pub struct BrokerError {
    pub code: u16,
    pub text: String,
}

impl BrokerError {
    pub fn not_found(text: impl Into<String>) -> Self {
        BrokerError {
            code: 404,
            text: format!("NOT_FOUND - {}", text.into()),
        }
    }
    pub fn access_refused(text: impl Into<String>) -> Self {
        BrokerError {
            code: 403,
            text: format!("ACCESS_REFUSED - {}", text.into()),
        }
    }
    pub fn resource_locked(text: impl Into<String>) -> Self {
        BrokerError {
            code: 405,
            text: format!("RESOURCE_LOCKED - {}", text.into()),
        }
    }
    pub fn precondition_failed(text: impl Into<String>) -> Self {
        BrokerError {
            code: 406,
            text: format!("PRECONDITION_FAILED - {}", text.into()),
        }
    }
    pub fn command_invalid(text: impl Into<String>) -> Self {
        BrokerError {
            code: 503,
            text: format!("COMMAND_INVALID - {}", text.into()),
        }
    }
    /// The cluster could not carry out the command (no majority in time).
    pub fn internal(text: impl Into<String>) -> Self {
        BrokerError {
            code: 541,
            text: format!("INTERNAL_ERROR - {}", text.into()),
        }
    }
    pub fn not_implemented(text: impl Into<String>) -> Self {
        BrokerError {
            code: 540,
            text: format!("NOT_IMPLEMENTED - {}", text.into()),
        }
    }
}
