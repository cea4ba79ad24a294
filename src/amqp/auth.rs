//! SASL mechanisms offered in `connection.start`: PLAIN and AMQPLAIN.
//!
//! Both carry a username and password in the clear; they are decoded here
//! and checked against the node's users by the connection.

use amq_protocol::types::{AMQPValue, FieldTable};

/// Mechanisms Warren offers, in `connection.start`'s space-separated form.
pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

/// Username and password from a `connection.start-ok` response, or `None`
/// when the mechanism is not offered or the response is malformed.
pub fn decode_response(mechanism: &str, response: &[u8]) -> Option<(String, String)> {
    match mechanism {
        "PLAIN" => plain(response),
        "AMQPLAIN" => amqplain(response),
        _ => None,
    }
}

/// PLAIN (RFC 4616): `authzid NUL authcid NUL passwd`.
fn plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(pass.to_vec()).ok()?,
    ))
}

/// AMQPLAIN: a field table without its length prefix, holding LOGIN and
/// PASSWORD.
fn amqplain(response: &[u8]) -> Option<(String, String)> {
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&(response.len() as u32).to_be_bytes());
    framed.extend_from_slice(response);
    let (_, table): (_, FieldTable) =
        amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let get = |k: &str| match table.inner().get(k)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::auth::{Credentials, SASLMechanism};

    #[test]
    fn plain_and_amqplain_responses_decode_as_clients_encode_them() {
        let c = Credentials::new("user".into(), "p\u{e4}ss".into());
        for (m, name) in [
            (SASLMechanism::Plain, "PLAIN"),
            (SASLMechanism::AMQPlain, "AMQPLAIN"),
        ] {
            let r = c.sasl_auth_string(m);
            assert_eq!(
                decode_response(name, r.as_bytes()),
                Some(("user".to_owned(), "p\u{e4}ss".to_owned()))
            );
        }
    }

    #[test]
    fn malformed_responses_and_unknown_mechanisms_are_refused() {
        assert_eq!(decode_response("PLAIN", b"nonul"), None);
        assert_eq!(decode_response("AMQPLAIN", b"\xff\xff"), None);
        assert_eq!(decode_response("EXTERNAL", b"\0a\0b"), None);
    }
}
