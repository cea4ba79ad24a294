//! A published message as the broker holds it.
//!
//! The content header's property list is kept exactly as the publisher encoded
//! it (`raw_properties`), so delivering a message writes those bytes back out
//! without parsing and re-encoding them, and the body is a `Bytes` that points
//! into the buffer the frame was read into. Only the few properties the broker
//! acts on (priority, expiration, headers for the headers exchange) are decoded,
//! once, when the message is published.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A message, cheap to clone: every field is shared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Exchange the message was published to (`""` for the default exchange).
    pub exchange: Arc<str>,
    /// Routing key given at publish time.
    pub routing_key: Arc<str>,
    /// The content header's property flags and property list, as encoded on
    /// the wire (everything after class-id, weight and body-size).
    pub raw_properties: Bytes,
    /// The message body.
    pub body: Bytes,
    /// Decoded `priority` property (0 when absent).
    pub priority: u8,
    /// Decoded `expiration` property in milliseconds, when present and valid.
    pub expiration_ms: Option<u64>,
}

impl Message {
    /// Size counted against `x-max-length-bytes` and memory limits: the body,
    /// as RabbitMQ counts it.
    pub fn body_len(&self) -> u64 {
        self.body.len() as u64
    }

    /// Decodes the full property list. Used off the hot path only (headers
    /// exchange, dead-lettering, basic.get of a modified message).
    pub fn properties(&self) -> BasicProperties {
        decode_properties(&self.raw_properties).unwrap_or_default()
    }

    /// Builds a message from decoded properties, encoding them once.
    pub fn from_properties(
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
        body: Bytes,
    ) -> Message {
        let raw = encode_properties(properties);
        Message {
            exchange: Arc::from(exchange),
            routing_key: Arc::from(routing_key),
            priority: properties.priority().unwrap_or(0),
            expiration_ms: properties
                .expiration()
                .as_ref()
                .and_then(|e| parse_expiration(e.as_str()).ok()),
            raw_properties: raw,
            body,
        }
    }

    /// Returns a copy of this message with its properties replaced (for
    /// dead-lettering, which adds `x-death`, and `x-delivery-count`).
    pub fn with_properties(&self, properties: &BasicProperties) -> Message {
        let mut m = self.clone();
        m.raw_properties = encode_properties(properties);
        m.priority = properties.priority().unwrap_or(0);
        m
    }

    /// The `headers` property, decoded.
    pub fn headers(&self) -> Option<FieldTable> {
        self.properties().headers().clone()
    }
}

/// Parses an `expiration` property: a non-negative integer of milliseconds
/// written in decimal, as RabbitMQ requires. Anything else is an error that
/// the channel reports as 406 PRECONDITION_FAILED.
pub fn parse_expiration(s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .map_err(|_| format!("invalid expiration '{s}'"))
}

/// Decodes an encoded property list (flags + properties).
pub fn decode_properties(raw: &[u8]) -> Option<BasicProperties> {
    amq_protocol::protocol::basic::parse_properties(raw)
        .ok()
        .map(|(_, p)| p)
}

/// Encodes a property list (flags + properties) as it appears in a content
/// header frame.
pub fn encode_properties(properties: &BasicProperties) -> Bytes {
    // Encoding into a Vec cannot fail: the writer grows as needed. Should it
    // ever fail, an empty property list (flags 0) is still a valid header.
    match cookie_factory::r#gen(
        amq_protocol::protocol::basic::gen_properties(properties),
        Vec::with_capacity(64),
    ) {
        Ok((out, _)) => Bytes::from(out),
        Err(_) => Bytes::from_static(&[0, 0]),
    }
}

/// Reads an integer-valued table entry the way RabbitMQ does: any integer type.
pub fn table_int(table: &FieldTable, key: &str) -> Option<i64> {
    value_int(table.inner().get(key)?)
}

/// An AMQP value as an integer, if it is one of the integer types.
pub fn value_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => *x as i64,
        AMQPValue::ShortShortUInt(x) => *x as i64,
        AMQPValue::ShortInt(x) => *x as i64,
        AMQPValue::ShortUInt(x) => *x as i64,
        AMQPValue::LongInt(x) => *x as i64,
        AMQPValue::LongUInt(x) => *x as i64,
        AMQPValue::LongLongInt(x) => *x,
        AMQPValue::Timestamp(x) => *x as i64,
        _ => return None,
    })
}

/// Reads a string-valued table entry (long or short string).
pub fn table_str(table: &FieldTable, key: &str) -> Option<String> {
    value_str(table.inner().get(key)?)
}

/// An AMQP value as a string, if it is a string type.
pub fn value_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Reads a boolean table entry; RabbitMQ also accepts integers 0/1 here.
pub fn table_bool(table: &FieldTable, key: &str) -> Option<bool> {
    match table.inner().get(key)? {
        AMQPValue::Boolean(b) => Some(*b),
        v => value_int(v).map(|i| i != 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::ShortString;

    #[test]
    fn properties_round_trip_through_raw_bytes() {
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from("k"), AMQPValue::LongInt(7));
        let props = BasicProperties::default()
            .with_priority(5)
            .with_expiration(ShortString::from("1500"))
            .with_headers(headers.clone());
        let m = Message::from_properties("ex", "rk", &props, Bytes::from_static(b"hi"));
        assert_eq!(m.priority, 5);
        assert_eq!(m.expiration_ms, Some(1500));
        assert_eq!(m.properties(), props);
        assert_eq!(m.headers(), Some(headers));
    }

    #[test]
    fn expiration_must_be_a_non_negative_integer() {
        assert_eq!(parse_expiration("0"), Ok(0));
        assert!(parse_expiration("-1").is_err());
        assert!(parse_expiration("1.5").is_err());
        assert!(parse_expiration("").is_err());
    }
}
