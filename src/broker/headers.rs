//! Headers-exchange matching: does a message's `headers` table satisfy a
//! binding's arguments, as RabbitMQ decides it.
//!
//! The binding argument `x-match` picks the rule: `all` (the default) needs
//! every binding argument to match, `any` needs one. Arguments whose key
//! starts with `x-` are ignored, unless `x-match` is `all-with-x` or
//! `any-with-x`. An argument with a void value asks only that the header be
//! present; otherwise the header must hold an equal value. Values compare as
//! RabbitMQ (Erlang) compares them: numbers by value whatever their AMQP width,
//! strings by their bytes whether short or long.

use crate::broker::error::BrokerError;
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

/// The binding argument naming the matching rule. It is never matched itself.
pub const X_MATCH: &str = "x-match";

/// How a headers binding combines its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

impl XMatch {
    fn parse_str(s: &[u8]) -> Option<XMatch> {
        Some(match s {
            b"all" => XMatch::All,
            b"any" => XMatch::Any,
            b"all-with-x" => XMatch::AllWithX,
            b"any-with-x" => XMatch::AnyWithX,
            _ => return None,
        })
    }

    /// Reads `x-match` from binding arguments, refusing what RabbitMQ refuses
    /// at bind time (406): an unknown word or a value that is not a string.
    pub fn from_arguments(args: &FieldTable) -> Result<XMatch, BrokerError> {
        let Some(value) = args.inner().get(X_MATCH) else {
            return Ok(XMatch::All);
        };
        match string_bytes(value) {
            Some(bytes) => XMatch::parse_str(bytes).ok_or_else(|| {
                BrokerError::precondition_failed(format!(
                    "Invalid x-match field value \"{}\"; expected all, any, all-with-x, or any-with-x",
                    String::from_utf8_lossy(bytes)
                ))
            }),
            None => Err(BrokerError::precondition_failed(format!(
                "Invalid x-match field type {} (value {}); expected longstr",
                type_name(value),
                display_value(value)
            ))),
        }
    }

    /// Reads `x-match` for routing; arguments were validated at bind time, so
    /// anything unreadable falls back to `all` as RabbitMQ's router does.
    pub fn from_arguments_lenient(args: &FieldTable) -> XMatch {
        XMatch::from_arguments(args).unwrap_or(XMatch::All)
    }

    fn is_any(self) -> bool {
        matches!(self, XMatch::Any | XMatch::AnyWithX)
    }

    fn counts_x_keys(self) -> bool {
        matches!(self, XMatch::AllWithX | XMatch::AnyWithX)
    }
}

/// Whether a message with `headers` (None when the property is absent)
/// matches a binding with `args` under rule `x_match`.
pub fn matches(x_match: XMatch, args: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mut counted = args.inner().iter().filter(|(k, _)| {
        let k = k.as_str();
        k != X_MATCH && (x_match.counts_x_keys() || !k.starts_with("x-"))
    });
    let one = |(key, want): (&ShortString, &AMQPValue)| match headers
        .and_then(|h| h.inner().get(key.as_str()))
    {
        None => false,
        Some(_) if matches!(want, AMQPValue::Void) => true,
        Some(have) => values_equal(want, have),
    };
    if x_match.is_any() {
        // With nothing to match, `any` matches nothing.
        counted.any(one)
    } else {
        // With nothing to match, `all` matches everything.
        counted.all(one)
    }
}

/// Loose equality of AMQP values: numbers by numeric value across integer
/// and float types, strings and byte arrays by their bytes, arrays and tables
/// element by element.
pub fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (number(a), number(b)) {
        return match (x, y) {
            (Number::Int(x), Number::Int(y)) => x == y,
            (Number::Float(x), Number::Float(y)) => x == y,
            (Number::Int(i), Number::Float(f)) | (Number::Float(f), Number::Int(i)) => {
                (i as f64) == f
            }
        };
    }
    if let (Some(x), Some(y)) = (string_bytes(a), string_bytes(b)) {
        return x == y;
    }
    match (a, b) {
        (AMQPValue::FieldArray(x), AMQPValue::FieldArray(y)) => {
            let (x, y) = (x.as_slice(), y.as_slice());
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| values_equal(p, q))
        }
        (AMQPValue::FieldTable(x), AMQPValue::FieldTable(y)) => {
            let (x, y) = (x.inner(), y.inner());
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && values_equal(vx, vy))
        }
        (AMQPValue::Boolean(x), AMQPValue::Boolean(y)) => x == y,
        (AMQPValue::DecimalValue(x), AMQPValue::DecimalValue(y)) => x == y,
        (AMQPValue::Void, AMQPValue::Void) => true,
        _ => false,
    }
}

#[derive(Clone, Copy)]
enum Number {
    Int(i128),
    Float(f64),
}

fn number(v: &AMQPValue) -> Option<Number> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => Number::Int(i128::from(*x)),
        AMQPValue::ShortShortUInt(x) => Number::Int(i128::from(*x)),
        AMQPValue::ShortInt(x) => Number::Int(i128::from(*x)),
        AMQPValue::ShortUInt(x) => Number::Int(i128::from(*x)),
        AMQPValue::LongInt(x) => Number::Int(i128::from(*x)),
        AMQPValue::LongUInt(x) => Number::Int(i128::from(*x)),
        AMQPValue::LongLongInt(x) => Number::Int(i128::from(*x)),
        AMQPValue::Timestamp(x) => Number::Int(i128::from(*x)),
        AMQPValue::Float(x) => Number::Float(f64::from(*x)),
        AMQPValue::Double(x) => Number::Float(*x),
        _ => return None,
    })
}

/// The bytes of a string-like value (long string, short string, byte array).
pub(crate) fn string_bytes(v: &AMQPValue) -> Option<&[u8]> {
    match v {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Some(b.as_slice()),
        _ => None,
    }
}

/// RabbitMQ's name for a value's AMQP type, as it appears in reply texts.
pub(crate) fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

/// A value as it is shown in reply texts: strings bare, numbers in decimal.
pub(crate) fn display_value(v: &AMQPValue) -> String {
    if let Some(bytes) = string_bytes(v) {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    match number(v) {
        Some(Number::Int(i)) => i.to_string(),
        Some(Number::Float(f)) => f.to_string(),
        None => match v {
            AMQPValue::Boolean(b) => b.to_string(),
            AMQPValue::Void => "undefined".to_owned(),
            other => format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{FieldArray, LongString};

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    fn check(args: &FieldTable, headers: Option<&FieldTable>) -> bool {
        matches(
            XMatch::from_arguments(args).expect("valid x-match"),
            args,
            headers,
        )
    }

    #[test]
    fn all_is_the_default_and_needs_every_argument() {
        let args = table(&[("a", s("1")), ("b", s("2"))]);
        assert!(check(
            &args,
            Some(&table(&[("a", s("1")), ("b", s("2")), ("c", s("3"))]))
        ));
        assert!(!check(&args, Some(&table(&[("a", s("1"))]))));
        assert!(!check(&args, Some(&table(&[("a", s("1")), ("b", s("3"))]))));
        assert!(!check(&args, None));
    }

    #[test]
    fn any_needs_one_argument() {
        let args = table(&[("x-match", s("any")), ("a", s("1")), ("b", s("2"))]);
        assert!(check(&args, Some(&table(&[("b", s("2"))]))));
        assert!(!check(&args, Some(&table(&[("a", s("2")), ("c", s("1"))]))));
        assert!(!check(&args, None));
    }

    #[test]
    fn x_arguments_are_ignored_by_all_and_any() {
        let all = table(&[("x-match", s("all")), ("x-foo", s("1"))]);
        assert!(
            check(&all, None),
            "all with no counted arguments matches everything"
        );
        let any = table(&[("x-match", s("any")), ("x-foo", s("1"))]);
        assert!(
            !check(&any, Some(&table(&[("x-foo", s("1"))]))),
            "any with no counted arguments matches nothing"
        );
    }

    #[test]
    fn with_x_variants_count_x_arguments() {
        let all = table(&[
            ("x-match", s("all-with-x")),
            ("x-foo", s("1")),
            ("a", s("2")),
        ]);
        assert!(check(
            &all,
            Some(&table(&[("x-foo", s("1")), ("a", s("2"))]))
        ));
        assert!(!check(&all, Some(&table(&[("a", s("2"))]))));
        let any = table(&[("x-match", s("any-with-x")), ("x-foo", s("1"))]);
        assert!(check(&any, Some(&table(&[("x-foo", s("1"))]))));
        assert!(!check(&any, Some(&table(&[("x-foo", s("2"))]))));
    }

    #[test]
    fn void_argument_matches_on_presence() {
        let args = table(&[("a", AMQPValue::Void)]);
        assert!(check(&args, Some(&table(&[("a", s("anything"))]))));
        assert!(check(
            &args,
            Some(&table(&[("a", AMQPValue::Boolean(false))]))
        ));
        assert!(!check(&args, Some(&table(&[("b", s("1"))]))));
    }

    #[test]
    fn integers_compare_across_widths_and_strings_across_kinds() {
        let args = table(&[("n", AMQPValue::LongInt(5)), ("s", s("x"))]);
        let headers = table(&[
            ("n", AMQPValue::ShortShortUInt(5)),
            ("s", AMQPValue::ShortString(ShortString::from("x"))),
        ]);
        assert!(check(&args, Some(&headers)));
        assert!(values_equal(
            &AMQPValue::LongLongInt(7),
            &AMQPValue::Double(7.0)
        ));
        assert!(!values_equal(
            &AMQPValue::LongInt(1),
            &AMQPValue::Boolean(true)
        ));
        assert!(!values_equal(&AMQPValue::LongInt(5), &s("5")));
        let arr = |v: Vec<AMQPValue>| AMQPValue::FieldArray(FieldArray::from(v));
        assert!(values_equal(
            &arr(vec![AMQPValue::ShortInt(1), s("a")]),
            &arr(vec![AMQPValue::LongLongInt(1), s("a")])
        ));
    }

    #[test]
    fn invalid_x_match_is_refused_at_bind_time() {
        let err = XMatch::from_arguments(&table(&[("x-match", s("some"))])).unwrap_err();
        assert_eq!(err.code, 406);
        assert!(
            err.text.contains("Invalid x-match field value"),
            "{}",
            err.text
        );
        let err =
            XMatch::from_arguments(&table(&[("x-match", AMQPValue::LongInt(1))])).unwrap_err();
        assert_eq!(err.code, 406);
        assert_eq!(
            XMatch::from_arguments(&FieldTable::default()),
            Ok(XMatch::All)
        );
    }
}
