//! A queue's settings, read from the `x-…` arguments of `queue.declare`.
//!
//! Validation follows RabbitMQ: a value of the wrong type or out of range is
//! refused with 406 PRECONDITION_FAILED and a message naming the argument.
//! The queue's name is not known here, so messages say "invalid arg 'x-…'"
//! without it; the caller may add it.

use crate::message::{value_int, value_str};
use amq_protocol::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};

/// What happens to a publish that would take the queue over its
/// `x-max-length` or `x-max-length-bytes` (`x-overflow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overflow {
    /// Accept the new message and drop (or dead-letter) the oldest ready ones.
    DropHead,
    /// Refuse the new message; the publisher gets a nack if it asked for
    /// confirms.
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// `x-dead-letter-strategy`: what a quorum queue promises about the messages
/// it dead-letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadLetterStrategy {
    /// Republish to the dead-letter exchange and forget (the default): a
    /// message whose republish fails, or routes nowhere, is gone.
    AtMostOnce,
    /// Keep the message in the queue, out of the consumers' reach, until
    /// every queue the dead-letter exchange routes it to has accepted it.
    AtLeastOnce,
}

/// Everything about a queue that its declare arguments decide. Part of the
/// replicated state of a quorum queue, hence serialisable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// True for a quorum (Raft-replicated) queue.
    pub quorum: bool,
    /// `x-message-ttl`.
    pub message_ttl_ms: Option<u64>,
    /// `x-expires` (always > 0).
    pub expires_ms: Option<u64>,
    /// `x-max-length`: ready messages allowed.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: ready body bytes allowed.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-dead-letter-exchange` (`""` is valid: the default exchange).
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-delivery-limit`: returns allowed before a message is dead-lettered.
    pub delivery_limit: Option<u32>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
    /// `x-max-priority` of a classic queue: message priorities above it
    /// count as it. `None` for a classic queue without the argument (every
    /// message has the same priority) and always for a quorum queue, whose
    /// two fixed priorities need no declaration.
    pub max_priority: Option<u8>,
    /// `x-dead-letter-strategy` as declared; see
    /// [`QueueConfig::dead_letters_at_least_once`] for when it applies.
    pub dead_letter_strategy: DeadLetterStrategy,
}

/// Largest TTL or expiry RabbitMQ accepts (its timers are 32-bit).
pub const MAX_EXPIRY_MS: u64 = u32::MAX as u64;

/// RabbitMQ 4.x gives quorum queues a delivery limit of 20 unless told
/// otherwise, so a poison message cannot loop forever.
pub const QUORUM_DEFAULT_DELIVERY_LIMIT: u32 = 20;

impl QueueConfig {
    /// Reads the declare arguments. `durable`, `exclusive` and `auto_delete`
    /// are the declare flags; they decide the queue type when `x-queue-type`
    /// is absent. Returns `Err(text)` for a bad argument; the caller sends
    /// 406 PRECONDITION_FAILED with that text.
    pub fn from_arguments(
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        args: &FieldTable,
    ) -> Result<QueueConfig, String> {
        let queue_type = string_arg(args, "x-queue-type")?;
        let quorum = match queue_type.as_deref() {
            None => durable && !exclusive && !auto_delete,
            Some("classic") => false,
            Some("quorum") => {
                // A Raft group outlives its declaring connection by design, so
                // RabbitMQ refuses quorum queues that would not.
                if exclusive {
                    return Err("invalid property 'exclusive-owner' for a quorum queue".into());
                }
                if auto_delete {
                    return Err("invalid property 'auto-delete' for a quorum queue".into());
                }
                if !durable {
                    return Err("invalid property 'non-durable' for a quorum queue".into());
                }
                true
            }
            Some(other) => {
                return Err(format!(
                    "invalid arg 'x-queue-type': unsupported queue type '{other}' \
                     (expected 'classic' or 'quorum')"
                ));
            }
        };

        let message_ttl_ms = int_arg(args, "x-message-ttl", 0, MAX_EXPIRY_MS)?;
        let expires_ms = int_arg(args, "x-expires", 1, MAX_EXPIRY_MS)?;
        let max_length = int_arg(args, "x-max-length", 0, u64::MAX)?;
        let max_length_bytes = int_arg(args, "x-max-length-bytes", 0, u64::MAX)?;
        let overflow = match string_arg(args, "x-overflow")?.as_deref() {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(other) => {
                return Err(format!(
                    "invalid arg 'x-overflow': expected drop-head, reject-publish \
                     or reject-publish-dlx, got '{other}'"
                ));
            }
        };
        let dead_letter_exchange = string_arg(args, "x-dead-letter-exchange")?;
        let dead_letter_routing_key = string_arg(args, "x-dead-letter-routing-key")?;
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(
                "invalid arg 'x-dead-letter-routing-key': requires x-dead-letter-exchange".into(),
            );
        }

        let delivery_limit = match args.inner().get("x-delivery-limit") {
            None if quorum => Some(QUORUM_DEFAULT_DELIVERY_LIMIT),
            None => None,
            Some(v) => match value_int(v) {
                // A negative limit is RabbitMQ's way of saying "unlimited".
                Some(n) if n < 0 => None,
                Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
                None => return Err("invalid arg 'x-delivery-limit': expected an integer".into()),
            },
        };
        let single_active_consumer = match args.inner().get("x-single-active-consumer") {
            None => false,
            Some(AMQPValue::Boolean(b)) => *b,
            Some(_) => {
                return Err("invalid arg 'x-single-active-consumer': expected a boolean".into());
            }
        };

        let max_priority =
            int_arg(args, "x-max-priority", 0, 255)?.map(|m| u8::try_from(m).unwrap_or(u8::MAX));
        // RabbitMQ refuses x-max-priority on a queue declared quorum outright.
        // A durable queue that is quorum only by Warren's default keeps it
        // accepted: clients written for RabbitMQ's classic default declare
        // such queues, and they get the quorum queue's two priorities.
        if max_priority.is_some() && quorum && queue_type.is_some() {
            return Err("invalid arg 'x-max-priority': not supported by quorum queues".into());
        }
        let max_priority = if quorum { None } else { max_priority };
        // Validated for compatibility, not acted on: group size is the
        // cluster layer's business.
        int_arg(args, "x-quorum-initial-group-size", 1, u64::MAX)?;
        // Checked on every queue type, so that a typo is caught wherever it
        // is made, though only quorum queues act on it (a classic queue
        // accepts it and ignores it, as RabbitMQ's do).
        let dead_letter_strategy = match string_arg(args, "x-dead-letter-strategy")?.as_deref() {
            None | Some("at-most-once") => DeadLetterStrategy::AtMostOnce,
            Some("at-least-once") => DeadLetterStrategy::AtLeastOnce,
            Some(other) => {
                return Err(format!(
                    "invalid arg 'x-dead-letter-strategy': expected at-most-once \
                         or at-least-once, got '{other}'"
                ));
            }
        };

        Ok(QueueConfig {
            quorum,
            message_ttl_ms,
            expires_ms,
            max_length,
            max_length_bytes,
            overflow,
            dead_letter_exchange,
            dead_letter_routing_key,
            delivery_limit,
            single_active_consumer,
            max_priority,
            dead_letter_strategy,
        })
    }

    /// Whether the queue dead-letters at least once. As in RabbitMQ, that
    /// takes a quorum queue declared `at-least-once` with a dead-letter
    /// exchange and `x-overflow: reject-publish`: the messages being
    /// dead-lettered stay in the queue and count toward its length limit,
    /// so refusing publishes is what bounds them. Any other queue
    /// dead-letters at most once.
    pub fn dead_letters_at_least_once(&self) -> bool {
        self.quorum
            && self.dead_letter_strategy == DeadLetterStrategy::AtLeastOnce
            && self.dead_letter_exchange.is_some()
            && self.overflow == Overflow::RejectPublish
    }

    /// Why a quorum queue declared `at-least-once` dead-letters at most
    /// once after all, for the warning at declare (RabbitMQ accepts such a
    /// queue and logs one too); None when nothing was asked for or it
    /// applies.
    pub fn at_least_once_fallback(&self) -> Option<&'static str> {
        if !self.quorum || self.dead_letter_strategy != DeadLetterStrategy::AtLeastOnce {
            return None;
        }
        if self.dead_letter_exchange.is_none() {
            Some("it has no x-dead-letter-exchange")
        } else if self.overflow != Overflow::RejectPublish {
            Some("its x-overflow is not reject-publish")
        } else {
            None
        }
    }

    /// RabbitMQ's default for tests and node-local queues: nothing set,
    /// drop-head.
    pub fn classic() -> QueueConfig {
        QueueConfig {
            quorum: false,
            message_ttl_ms: None,
            expires_ms: None,
            max_length: None,
            max_length_bytes: None,
            overflow: Overflow::DropHead,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            delivery_limit: None,
            single_active_consumer: false,
            max_priority: None,
            dead_letter_strategy: DeadLetterStrategy::AtMostOnce,
        }
    }
}

/// An integer argument within `min..=max`, accepting any AMQP integer type.
fn int_arg(args: &FieldTable, key: &str, min: u64, max: u64) -> Result<Option<u64>, String> {
    let Some(v) = args.inner().get(key) else {
        return Ok(None);
    };
    let expected = || match (min, max) {
        (0, u64::MAX) => format!("invalid arg '{key}': expected a non-negative integer"),
        (1, u64::MAX) => format!("invalid arg '{key}': expected a positive integer"),
        _ => format!("invalid arg '{key}': expected an integer from {min} to {max}"),
    };
    let n = value_int(v).ok_or_else(expected)?;
    let n = u64::try_from(n).map_err(|_| expected())?;
    if n < min || n > max {
        return Err(expected());
    }
    Ok(Some(n))
}

/// A string argument, long or short.
fn string_arg(args: &FieldTable, key: &str) -> Result<Option<String>, String> {
    match args.inner().get(key) {
        None => Ok(None),
        Some(v) => value_str(v)
            .map(Some)
            .ok_or_else(|| format!("invalid arg '{key}': expected a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{LongString, ShortString};

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    fn durable(entries: &[(&str, AMQPValue)]) -> Result<QueueConfig, String> {
        QueueConfig::from_arguments(true, false, false, &table(entries))
    }

    #[test]
    fn durable_shared_queue_is_quorum_by_default_with_delivery_limit_20() {
        let c = durable(&[]).unwrap();
        assert!(c.quorum);
        assert_eq!(c.delivery_limit, Some(20));
        assert_eq!(c.overflow, Overflow::DropHead);
    }

    #[test]
    fn transient_exclusive_or_auto_delete_queue_is_classic() {
        let empty = FieldTable::default();
        for (d, e, a) in [
            (false, false, false),
            (true, true, false),
            (true, false, true),
        ] {
            let c = QueueConfig::from_arguments(d, e, a, &empty).unwrap();
            assert!(!c.quorum);
            assert_eq!(c.delivery_limit, None);
        }
    }

    #[test]
    fn explicit_classic_type_overrides_durable_default() {
        let c = durable(&[("x-queue-type", long("classic"))]).unwrap();
        assert!(!c.quorum);
        assert_eq!(c.delivery_limit, None);
    }

    #[test]
    fn unknown_queue_type_is_refused() {
        for t in ["stream", "banana"] {
            let e = durable(&[("x-queue-type", long(t))]).unwrap_err();
            assert!(e.contains("x-queue-type"), "{e}");
            assert!(e.contains(&format!("unsupported queue type '{t}'")), "{e}");
        }
        assert!(durable(&[("x-queue-type", AMQPValue::LongInt(1))]).is_err());
    }

    #[test]
    fn quorum_type_refuses_exclusive_auto_delete_and_transient() {
        let t = table(&[("x-queue-type", long("quorum"))]);
        for ((d, e, a), what) in [
            ((true, true, false), "exclusive-owner"),
            ((true, false, true), "auto-delete"),
            ((false, false, false), "non-durable"),
        ] {
            let err = QueueConfig::from_arguments(d, e, a, &t).unwrap_err();
            assert_eq!(err, format!("invalid property '{what}' for a quorum queue"));
        }
        assert!(
            QueueConfig::from_arguments(true, false, false, &t)
                .unwrap()
                .quorum
        );
    }

    #[test]
    fn integer_arguments_accept_any_integer_type() {
        let c = durable(&[
            ("x-message-ttl", AMQPValue::ShortShortUInt(5)),
            ("x-expires", AMQPValue::LongLongInt(1000)),
            ("x-max-length", AMQPValue::ShortInt(3)),
            ("x-max-length-bytes", AMQPValue::LongUInt(100)),
        ])
        .unwrap();
        assert_eq!(c.message_ttl_ms, Some(5));
        assert_eq!(c.expires_ms, Some(1000));
        assert_eq!(c.max_length, Some(3));
        assert_eq!(c.max_length_bytes, Some(100));
    }

    #[test]
    fn wrongly_typed_or_negative_arguments_are_refused_naming_the_argument() {
        let cases = [
            ("x-message-ttl", AMQPValue::LongInt(-1)),
            ("x-message-ttl", long("100")),
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(MAX_EXPIRY_MS as i64 + 1),
            ),
            ("x-expires", AMQPValue::LongInt(0)),
            ("x-max-length", long("10")),
            ("x-max-length-bytes", AMQPValue::LongInt(-5)),
            ("x-overflow", long("drop-tail")),
            ("x-overflow", AMQPValue::LongInt(1)),
            ("x-delivery-limit", long("3")),
            ("x-single-active-consumer", long("true")),
            ("x-max-priority", AMQPValue::LongInt(256)),
            ("x-max-priority", AMQPValue::LongInt(-1)),
            ("x-max-priority", long("high")),
            ("x-quorum-initial-group-size", AMQPValue::LongInt(0)),
            ("x-dead-letter-exchange", AMQPValue::LongInt(0)),
            ("x-dead-letter-strategy", long("exactly-once")),
            ("x-dead-letter-strategy", AMQPValue::LongInt(1)),
        ];
        for (key, value) in cases {
            let e = durable(&[(key, value.clone())]).unwrap_err();
            assert!(e.contains(key), "{key}={value:?}: {e}");
        }
    }

    #[test]
    fn overflow_modes_are_parsed() {
        for (s, o) in [
            ("drop-head", Overflow::DropHead),
            ("reject-publish", Overflow::RejectPublish),
            ("reject-publish-dlx", Overflow::RejectPublishDlx),
        ] {
            let short = AMQPValue::ShortString(ShortString::from(s));
            assert_eq!(durable(&[("x-overflow", short)]).unwrap().overflow, o);
        }
    }

    #[test]
    fn delivery_limit_can_be_set_or_made_unlimited() {
        let c = durable(&[("x-delivery-limit", AMQPValue::LongInt(3))]).unwrap();
        assert_eq!(c.delivery_limit, Some(3));
        let c = durable(&[("x-delivery-limit", AMQPValue::LongInt(-1))]).unwrap();
        assert_eq!(c.delivery_limit, None);
        let t = table(&[("x-delivery-limit", AMQPValue::LongInt(2))]);
        let c = QueueConfig::from_arguments(false, false, false, &t).unwrap();
        assert_eq!(c.delivery_limit, Some(2));
    }

    #[test]
    fn dead_letter_exchange_may_be_the_default_exchange() {
        let c = durable(&[
            ("x-dead-letter-exchange", long("")),
            ("x-dead-letter-routing-key", long("dlq")),
        ])
        .unwrap();
        assert_eq!(c.dead_letter_exchange.as_deref(), Some(""));
        assert_eq!(c.dead_letter_routing_key.as_deref(), Some("dlq"));
    }

    #[test]
    fn dead_letter_routing_key_requires_an_exchange() {
        let e = durable(&[("x-dead-letter-routing-key", long("dlq"))]).unwrap_err();
        assert!(e.contains("x-dead-letter-routing-key"), "{e}");
    }

    #[test]
    fn single_active_consumer_and_validated_only_arguments_are_accepted() {
        let c = durable(&[
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ("x-quorum-initial-group-size", AMQPValue::LongInt(3)),
            ("x-unknown-extension", long("ignored")),
        ])
        .unwrap();
        assert!(c.single_active_consumer);
    }

    #[test]
    fn classic_queue_keeps_its_max_priority() {
        let t = table(&[("x-max-priority", AMQPValue::ShortShortUInt(10))]);
        let c = QueueConfig::from_arguments(false, false, false, &t).unwrap();
        assert_eq!(c.max_priority, Some(10));
        let c = durable(&[
            ("x-queue-type", long("classic")),
            ("x-max-priority", AMQPValue::LongInt(255)),
        ])
        .unwrap();
        assert_eq!(c.max_priority, Some(255));
        assert_eq!(
            durable(&[("x-queue-type", long("classic"))])
                .unwrap()
                .max_priority,
            None
        );
    }

    #[test]
    fn explicit_quorum_type_refuses_max_priority() {
        let e = durable(&[
            ("x-queue-type", long("quorum")),
            ("x-max-priority", AMQPValue::LongInt(5)),
        ])
        .unwrap_err();
        assert!(e.contains("invalid arg 'x-max-priority'"), "{e}");
    }

    #[test]
    fn default_quorum_queue_accepts_max_priority_and_uses_its_own_priorities() {
        let c = durable(&[("x-max-priority", AMQPValue::ShortShortUInt(10))]).unwrap();
        assert!(c.quorum);
        assert_eq!(c.max_priority, None);
    }

    /// A quorum queue with a dead-letter exchange and the given strategy
    /// and overflow.
    fn dead_lettering(strategy: &str, overflow: &str) -> QueueConfig {
        durable(&[
            ("x-dead-letter-exchange", long("dlx")),
            ("x-dead-letter-strategy", long(strategy)),
            ("x-overflow", long(overflow)),
        ])
        .unwrap()
    }

    #[test]
    fn at_least_once_applies_to_quorum_queues_with_reject_publish_and_a_dlx() {
        let c = dead_lettering("at-least-once", "reject-publish");
        assert_eq!(c.dead_letter_strategy, DeadLetterStrategy::AtLeastOnce);
        assert!(c.dead_letters_at_least_once());
        assert_eq!(c.at_least_once_fallback(), None);
        let c = dead_lettering("at-most-once", "reject-publish");
        assert_eq!(c.dead_letter_strategy, DeadLetterStrategy::AtMostOnce);
        assert!(!c.dead_letters_at_least_once());
        assert_eq!(c.at_least_once_fallback(), None);
    }

    #[test]
    fn at_least_once_falls_back_to_at_most_once_without_its_requirements() {
        // Accepted, as RabbitMQ does, with a reason for the warning.
        for overflow in ["drop-head", "reject-publish-dlx"] {
            let c = dead_lettering("at-least-once", overflow);
            assert!(!c.dead_letters_at_least_once(), "{overflow}");
            assert!(c.at_least_once_fallback().unwrap().contains("x-overflow"));
        }
        let c = durable(&[
            ("x-dead-letter-strategy", long("at-least-once")),
            ("x-overflow", long("reject-publish")),
        ])
        .unwrap();
        assert!(!c.dead_letters_at_least_once());
        assert!(
            c.at_least_once_fallback()
                .unwrap()
                .contains("x-dead-letter-exchange")
        );
    }

    #[test]
    fn a_classic_queue_accepts_and_ignores_at_least_once() {
        let t = table(&[
            ("x-dead-letter-exchange", long("dlx")),
            ("x-dead-letter-strategy", long("at-least-once")),
            ("x-overflow", long("reject-publish")),
        ]);
        let c = QueueConfig::from_arguments(false, false, false, &t).unwrap();
        assert!(!c.quorum);
        assert!(!c.dead_letters_at_least_once());
        assert_eq!(c.at_least_once_fallback(), None);
    }

    #[test]
    fn an_unknown_dead_letter_strategy_is_refused_naming_the_value() {
        let e = durable(&[("x-dead-letter-strategy", long("exactly-once"))]).unwrap_err();
        assert_eq!(
            e,
            "invalid arg 'x-dead-letter-strategy': expected at-most-once or at-least-once, \
             got 'exactly-once'"
        );
    }

    #[test]
    fn classic_default_sets_nothing() {
        let c = QueueConfig::classic();
        assert!(!c.quorum);
        assert_eq!(
            c,
            QueueConfig::from_arguments(false, false, false, &FieldTable::default()).unwrap()
        );
    }
}
