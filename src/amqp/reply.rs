//! Reply codes (AMQP 0-9-1 section 1.2 constants, as RabbitMQ uses them).
//!
//! Soft errors close the channel; hard errors close the connection.

pub const REPLY_SUCCESS: u16 = 200;
pub const CONTENT_TOO_LARGE: u16 = 311;
pub const NO_ROUTE: u16 = 312;
pub const NO_CONSUMERS: u16 = 313;
pub const CONNECTION_FORCED: u16 = 320;
pub const INVALID_PATH: u16 = 402;
pub const ACCESS_REFUSED: u16 = 403;
pub const NOT_FOUND: u16 = 404;
pub const RESOURCE_LOCKED: u16 = 405;
pub const PRECONDITION_FAILED: u16 = 406;
pub const FRAME_ERROR: u16 = 501;
pub const SYNTAX_ERROR: u16 = 502;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const RESOURCE_ERROR: u16 = 506;
pub const NOT_ALLOWED: u16 = 530;
pub const NOT_IMPLEMENTED: u16 = 540;
pub const INTERNAL_ERROR: u16 = 541;

/// The constant's name as RabbitMQ prefixes reply texts with it.
pub fn name(code: u16) -> &'static str {
    match code {
        REPLY_SUCCESS => "OK",
        CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        NO_ROUTE => "NO_ROUTE",
        NO_CONSUMERS => "NO_CONSUMERS",
        CONNECTION_FORCED => "CONNECTION_FORCED",
        INVALID_PATH => "INVALID_PATH",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        FRAME_ERROR => "FRAME_ERROR",
        SYNTAX_ERROR => "SYNTAX_ERROR",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        RESOURCE_ERROR => "RESOURCE_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

/// An error that closes the connection (hard error) or only the channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmqpError {
    pub code: u16,
    pub text: String,
    /// Class and method of the method that caused it (0 when none).
    pub class_id: u16,
    pub method_id: u16,
}

impl AmqpError {
    /// `text` without the constant's name; it is prefixed here.
    pub fn new(code: u16, text: impl AsRef<str>) -> AmqpError {
        AmqpError {
            code,
            text: format!("{} - {}", name(code), text.as_ref()),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Errors whose text already carries the constant's name.
    pub fn with_text(code: u16, text: String) -> AmqpError {
        AmqpError {
            code,
            text,
            class_id: 0,
            method_id: 0,
        }
    }

    pub fn on(mut self, class_id: u16, method_id: u16) -> AmqpError {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }

    /// Hard errors close the whole connection (spec 1.2: the 3xx/5xx
    /// connection constants), soft ones only the channel.
    pub fn is_hard(&self) -> bool {
        matches!(
            self.code,
            CONNECTION_FORCED
                | INVALID_PATH
                | FRAME_ERROR
                | SYNTAX_ERROR
                | COMMAND_INVALID
                | CHANNEL_ERROR
                | UNEXPECTED_FRAME
                | RESOURCE_ERROR
                | NOT_ALLOWED
                | NOT_IMPLEMENTED
                | INTERNAL_ERROR
        )
    }
}

impl From<crate::broker::error::BrokerError> for AmqpError {
    fn from(e: crate::broker::error::BrokerError) -> Self {
        AmqpError::with_text(e.code, e.text)
    }
}
