//! Frames on the wire: splitting the byte stream, checking each frame, and
//! decoding method arguments.
//!
//! A frame is `type:u8 channel:u16 size:u32 payload[size] 0xCE`. Method
//! arguments are decoded by `amq-protocol`; content bodies are never copied:
//! a body frame's payload is split off the read buffer as a `Bytes`.
//! Every check that fails yields the connection error the spec names for it,
//! never a panic: the decoder is fuzzed (see the tests below and
//! `tests/codec_fuzz.rs`).

use super::reply::{self, AmqpError};
use amq_protocol::protocol::AMQPClass;
use bytes::{Buf, Bytes, BytesMut};

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// Type, channel and size before the payload, and the end octet after it.
pub const FRAME_OVERHEAD: usize = 8;
/// The smallest frame_max a peer may negotiate (spec 4.2.3).
pub const FRAME_MIN_SIZE: u32 = 4096;
/// The protocol header a 0-9-1 client sends, and the one Warren answers a
/// wrong header with.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// One decoded frame.
#[derive(Debug)]
pub enum Frame {
    Method {
        channel: u16,
        class_id: u16,
        method_id: u16,
        method: Box<AMQPClass>,
        /// The frame's payload as sent (class and method ids first), for
        /// the arguments `amq-protocol` does not keep: see
        /// [`qos_prefetch_size`].
        args: Bytes,
    },
    Header {
        channel: u16,
        class_id: u16,
        body_size: u64,
        /// The property flags and list, exactly as sent.
        raw_properties: Bytes,
        /// The same, decoded (once, here).
        properties: Box<amq_protocol::protocol::BasicProperties>,
    },
    Body {
        channel: u16,
        payload: Bytes,
    },
    Heartbeat,
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. } => *channel,
            Frame::Heartbeat => 0,
        }
    }
}

/// Takes one frame off the front of `buf` if a whole one is there.
///
/// `frame_max` is the negotiated maximum frame size including the overhead;
/// a larger frame is a 501 FRAME_ERROR before its payload is even read, so a
/// peer cannot make Warren buffer more than `frame_max` bytes per frame.
pub fn decode(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, AmqpError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(AmqpError::new(
            reply::FRAME_ERROR,
            format!("unknown frame type {kind}"),
        ));
    }
    if size + FRAME_OVERHEAD > frame_max as usize {
        return Err(AmqpError::new(
            reply::FRAME_ERROR,
            format!(
                "frame size {} exceeds negotiated frame_max {frame_max}",
                size + FRAME_OVERHEAD
            ),
        ));
    }
    if buf.len() < size + FRAME_OVERHEAD {
        buf.reserve(size + FRAME_OVERHEAD - buf.len());
        return Ok(None);
    }
    if buf[7 + size] != FRAME_END {
        return Err(AmqpError::new(
            reply::FRAME_ERROR,
            format!("frame end octet is {:#04x}, expected 0xce", buf[7 + size]),
        ));
    }
    buf.advance(7);
    let payload = buf.split_to(size).freeze();
    buf.advance(1);
    decode_payload(kind, channel, payload).map(Some)
}

fn decode_payload(kind: u8, channel: u16, payload: Bytes) -> Result<Frame, AmqpError> {
    match kind {
        FRAME_METHOD => decode_method(channel, payload),
        FRAME_HEADER => decode_header(channel, payload),
        FRAME_BODY => Ok(Frame::Body { channel, payload }),
        _ => {
            if channel != 0 {
                return Err(AmqpError::new(
                    reply::FRAME_ERROR,
                    "heartbeat frame on a channel other than 0",
                ));
            }
            Ok(Frame::Heartbeat)
        }
    }
}

fn decode_method(channel: u16, payload: Bytes) -> Result<Frame, AmqpError> {
    if payload.len() < 4 {
        return Err(AmqpError::new(
            reply::FRAME_ERROR,
            "method frame too short for class and method ids",
        ));
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let method_id = u16::from_be_bytes([payload[2], payload[3]]);
    if !is_known_method(class_id, method_id) {
        return Err(AmqpError::new(
            reply::COMMAND_INVALID,
            format!("unknown method {class_id}/{method_id}"),
        )
        .on(class_id, method_id));
    }
    match amq_protocol::protocol::parse_class(&payload[..]) {
        Ok((_, method)) => Ok(Frame::Method {
            channel,
            class_id,
            method_id,
            method: Box::new(method),
            args: payload,
        }),
        Err(_) => Err(AmqpError::new(
            reply::SYNTAX_ERROR,
            format!("malformed arguments for method {class_id}/{method_id}"),
        )
        .on(class_id, method_id)),
    }
}

/// The `prefetch-size` of a `basic.qos` method frame's payload (`args`).
/// `amq-protocol` parses and drops it, since RabbitMQ accepts only 0; Warren
/// must see it to refuse any other value as RabbitMQ does.
pub fn qos_prefetch_size(args: &[u8]) -> u32 {
    args.get(4..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

fn decode_header(channel: u16, payload: Bytes) -> Result<Frame, AmqpError> {
    if payload.len() < 14 {
        return Err(AmqpError::new(
            reply::FRAME_ERROR,
            "content header frame too short",
        ));
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let body_size = u64::from_be_bytes(payload[4..12].try_into().unwrap_or([0; 8]));
    let raw_properties = payload.slice(12..);
    // Decoded now so that a malformed table is refused at the door rather
    // than discovered by a consumer.
    let Some(properties) = crate::message::decode_properties(&raw_properties) else {
        return Err(AmqpError::new(
            reply::SYNTAX_ERROR,
            "malformed content header properties",
        ));
    };
    Ok(Frame::Header {
        channel,
        class_id,
        body_size,
        raw_properties,
        properties: Box::new(properties),
    })
}

/// The methods of AMQP 0-9-1 (spec section 1) that a peer may send or
/// receive, by class and method id.
pub fn is_known_method(class_id: u16, method_id: u16) -> bool {
    let methods: &[u16] = match class_id {
        10 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
        20 => &[10, 11, 20, 21, 40, 41],
        30 => &[10, 11],
        40 => &[10, 11, 20, 21, 30, 31, 40, 51],
        50 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        60 => &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
        85 => &[10, 11],
        90 => &[10, 11, 20, 21, 30, 31],
        _ => return false,
    };
    methods.contains(&method_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::writer::encode_method;
    use amq_protocol::protocol::{AMQPClass, basic, channel as chan};
    use proptest::prelude::*;

    fn frame_bytes(kind: u8, channel: u16, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[kind]);
        b.extend_from_slice(&channel.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        b.extend_from_slice(&[FRAME_END]);
        b
    }

    #[test]
    fn a_method_frame_round_trips() {
        let m = AMQPClass::Channel(chan::AMQPMethod::Open(chan::Open {}));
        let mut buf = BytesMut::from(&encode_method(3, &m)[..]);
        match decode(&mut buf, 131072).unwrap().unwrap() {
            Frame::Method {
                channel, method, ..
            } => {
                assert_eq!(channel, 3);
                assert_eq!(*method, m);
            }
            f => panic!("unexpected {f:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_frame_waits_for_more_bytes() {
        let full = frame_bytes(FRAME_BODY, 1, b"hello");
        let mut buf = BytesMut::from(&full[..full.len() - 1]);
        assert!(decode(&mut buf, 131072).unwrap().is_none());
        buf.extend_from_slice(&full[full.len() - 1..]);
        assert!(matches!(
            decode(&mut buf, 131072).unwrap(),
            Some(Frame::Body { channel: 1, .. })
        ));
    }

    #[test]
    fn an_oversized_frame_is_a_frame_error_before_its_payload_arrives() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[FRAME_BODY, 0, 1]);
        buf.extend_from_slice(&(1_000_000u32).to_be_bytes());
        let e = decode(&mut buf, 131072).unwrap_err();
        assert_eq!(e.code, reply::FRAME_ERROR);
    }

    #[test]
    fn a_bad_frame_end_is_a_frame_error() {
        let mut buf = frame_bytes(FRAME_BODY, 1, b"x");
        let n = buf.len();
        buf[n - 1] = 0;
        assert_eq!(
            decode(&mut buf, 131072).unwrap_err().code,
            reply::FRAME_ERROR
        );
    }

    #[test]
    fn an_unknown_frame_type_is_a_frame_error() {
        let mut buf = frame_bytes(9, 0, b"");
        assert_eq!(
            decode(&mut buf, 131072).unwrap_err().code,
            reply::FRAME_ERROR
        );
    }

    #[test]
    fn an_unknown_method_is_command_invalid() {
        let mut buf = frame_bytes(FRAME_METHOD, 1, &[0, 60, 0, 99]);
        assert_eq!(
            decode(&mut buf, 131072).unwrap_err().code,
            reply::COMMAND_INVALID
        );
    }

    #[test]
    fn truncated_method_arguments_are_a_syntax_error() {
        // basic.publish with its arguments cut short.
        let mut buf = frame_bytes(FRAME_METHOD, 1, &[0, 60, 0, 40, 0, 0, 5, b'a']);
        assert_eq!(
            decode(&mut buf, 131072).unwrap_err().code,
            reply::SYNTAX_ERROR
        );
    }

    #[test]
    fn a_malformed_header_table_is_a_syntax_error() {
        // class 60, weight 0, size 1, flags = headers present, table length 100 but no data
        let payload = [0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x20, 0, 0, 0, 0, 100];
        let mut buf = frame_bytes(FRAME_HEADER, 1, &payload);
        assert_eq!(
            decode(&mut buf, 131072).unwrap_err().code,
            reply::SYNTAX_ERROR
        );
    }

    #[test]
    fn a_heartbeat_on_a_channel_is_a_frame_error() {
        let mut buf = frame_bytes(FRAME_HEARTBEAT, 2, b"");
        assert_eq!(
            decode(&mut buf, 131072).unwrap_err().code,
            reply::FRAME_ERROR
        );
    }

    #[test]
    fn a_body_frame_payload_shares_the_read_buffer() {
        let mut buf = frame_bytes(FRAME_BODY, 1, &[7u8; 1000]);
        let base = buf.as_ptr() as usize;
        match decode(&mut buf, 131072).unwrap().unwrap() {
            Frame::Body { payload, .. } => {
                assert_eq!(payload.as_ptr() as usize, base + 7, "payload was copied");
            }
            f => panic!("unexpected {f:?}"),
        }
    }

    #[test]
    fn every_publish_argument_round_trips() {
        let m = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "ex".into(),
            routing_key: "a.b".into(),
            mandatory: true,
            immediate: false,
        }));
        let mut buf = BytesMut::from(&encode_method(1, &m)[..]);
        let Frame::Method { method, .. } = decode(&mut buf, 131072).unwrap().unwrap() else {
            panic!("not a method")
        };
        assert_eq!(*method, m);
    }

    #[test]
    fn a_qos_prefetch_size_is_read_from_the_raw_arguments() {
        // basic.qos: prefetch-size 1000, prefetch-count 5, global.
        let payload = [0, 60, 0, 10, 0, 0, 0x03, 0xe8, 0, 5, 1];
        let mut buf = frame_bytes(FRAME_METHOD, 1, &payload);
        let Frame::Method { method, args, .. } = decode(&mut buf, 131072).unwrap().unwrap() else {
            panic!("not a method")
        };
        assert_eq!(qos_prefetch_size(&args), 1000);
        assert_eq!(
            *method,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 5,
                global: true
            }))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Fuzzing: no input makes the decoder panic, and whatever it
        /// refuses is refused with a connection-level reply code.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&data[..]);
            for _ in 0..64 {
                match decode(&mut buf, 4096) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        prop_assert!(e.is_hard(), "soft error {e:?}");
                        break;
                    }
                }
            }
        }

        /// Structured fuzzing: well-framed frames of every type with random
        /// payloads, which reach the method and header decoders.
        #[test]
        fn decoding_framed_random_payloads_never_panics(
            kind in prop_oneof![Just(FRAME_METHOD), Just(FRAME_HEADER), Just(FRAME_BODY), Just(FRAME_HEARTBEAT)],
            class in prop_oneof![Just(10u16), Just(20), Just(40), Just(50), Just(60), Just(85), Just(90), any::<u16>()],
            method in 0u16..130,
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut payload = Vec::new();
            payload.extend_from_slice(&class.to_be_bytes());
            payload.extend_from_slice(&method.to_be_bytes());
            payload.extend_from_slice(&rest);
            let mut buf = frame_bytes(kind, 1, &payload);
            if let Err(e) = decode(&mut buf, 131072) {
                prop_assert!(e.is_hard());
            }
        }
    }
}
