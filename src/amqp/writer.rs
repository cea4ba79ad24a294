//! Encoding outgoing frames into a buffer of segments that is written to the
//! socket with vectored writes.
//!
//! Small frames are encoded into one scratch buffer; a message body of
//! [`ZERO_COPY_MIN`] bytes or more is not copied: its `Bytes` (which points
//! at the buffer the publisher's frame was read into) becomes a segment of
//! its own. `basic.deliver`, `basic.ack` and content headers are encoded by
//! hand because they are on the hot path and need no allocation; everything
//! else goes through `amq-protocol`'s encoder.

use super::frame::{FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD};
use crate::message::Message;
use amq_protocol::protocol::AMQPClass;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Bodies at least this large are written from their own buffer; smaller
/// ones are cheaper to copy than to give their own `iovec`.
pub const ZERO_COPY_MIN: usize = 2048;

/// Encodes one method frame into a fresh buffer (used outside the hot path
/// and by tests).
pub fn encode_method(channel: u16, method: &AMQPClass) -> Vec<u8> {
    let mut out = OutBuf::default();
    out.method(channel, method);
    let mut v = Vec::new();
    for s in out
        .segments
        .iter()
        .chain(std::iter::once(&out.scratch.clone().freeze()))
    {
        v.extend_from_slice(s);
    }
    v
}

/// Outgoing frames waiting to be written.
#[derive(Default)]
pub struct OutBuf {
    segments: VecDeque<Bytes>,
    scratch: BytesMut,
}

impl OutBuf {
    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.scratch.len() + self.segments.iter().map(|s| s.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.scratch.is_empty() && self.segments.is_empty()
    }

    fn frame_start(&mut self, kind: u8, channel: u16) -> usize {
        self.scratch.put_u8(kind);
        self.scratch.put_u16(channel);
        let at = self.scratch.len();
        self.scratch.put_u32(0);
        at
    }

    fn frame_end(&mut self, size_at: usize) {
        let size = (self.scratch.len() - size_at - 4) as u32;
        self.scratch[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
        self.scratch.put_u8(FRAME_END);
    }

    pub fn method(&mut self, channel: u16, method: &AMQPClass) {
        let at = self.frame_start(FRAME_METHOD, channel);
        // The generic encoder needs a seekable writer; methods off the hot
        // path can afford the small Vec. Encoding into a Vec cannot fail.
        if let Ok((v, _)) = cookie_factory::r#gen(
            amq_protocol::protocol::gen_class(method),
            Vec::with_capacity(64),
        ) {
            self.scratch.put_slice(&v);
        }
        self.frame_end(at);
    }

    pub fn heartbeat(&mut self) {
        self.scratch
            .extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
    }

    /// `basic.deliver`, encoded without allocating.
    pub fn deliver(
        &mut self,
        channel: u16,
        consumer_tag: &str,
        delivery_tag: u64,
        redelivered: bool,
        msg: &Message,
    ) {
        let at = self.frame_start(FRAME_METHOD, channel);
        self.scratch.put_u16(60);
        self.scratch.put_u16(60);
        self.short_str(consumer_tag);
        self.scratch.put_u64(delivery_tag);
        self.scratch.put_u8(redelivered as u8);
        self.short_str(&msg.exchange);
        self.short_str(&msg.routing_key);
        self.frame_end(at);
    }

    /// `basic.get-ok`, encoded without allocating.
    pub fn get_ok(
        &mut self,
        channel: u16,
        delivery_tag: u64,
        redelivered: bool,
        msg: &Message,
        message_count: u32,
    ) {
        let at = self.frame_start(FRAME_METHOD, channel);
        self.scratch.put_u16(60);
        self.scratch.put_u16(71);
        self.scratch.put_u64(delivery_tag);
        self.scratch.put_u8(redelivered as u8);
        self.short_str(&msg.exchange);
        self.short_str(&msg.routing_key);
        self.scratch.put_u32(message_count);
        self.frame_end(at);
    }

    /// `basic.ack` or `basic.nack` for publisher confirms.
    pub fn confirm(&mut self, channel: u16, delivery_tag: u64, multiple: bool, ack: bool) {
        let at = self.frame_start(FRAME_METHOD, channel);
        self.scratch.put_u16(60);
        self.scratch.put_u16(if ack { 80 } else { 120 });
        self.scratch.put_u64(delivery_tag);
        // nack's bits are multiple (bit 0) and requeue (bit 1, unset).
        self.scratch.put_u8(multiple as u8);
        self.frame_end(at);
    }

    fn short_str(&mut self, s: &str) {
        // Names are checked to be at most 255 bytes where they enter Warren;
        // truncating here keeps a bad one from corrupting the stream.
        let b = &s.as_bytes()[..s.len().min(255)];
        self.scratch.put_u8(b.len() as u8);
        self.scratch.put_slice(b);
    }

    /// The content header and body frames of `msg`, split to fit `frame_max`.
    pub fn content(&mut self, channel: u16, msg: &Message, frame_max: u32) {
        let at = self.frame_start(FRAME_HEADER, channel);
        self.scratch.put_u16(60);
        self.scratch.put_u16(0);
        self.scratch.put_u64(msg.body.len() as u64);
        self.scratch.put_slice(&msg.raw_properties);
        self.frame_end(at);
        let chunk = (frame_max as usize)
            .saturating_sub(super::frame::FRAME_OVERHEAD)
            .max(1);
        let mut offset = 0;
        while offset < msg.body.len() {
            let end = (offset + chunk).min(msg.body.len());
            self.scratch.put_u8(FRAME_BODY);
            self.scratch.put_u16(channel);
            self.scratch.put_u32((end - offset) as u32);
            if end - offset >= ZERO_COPY_MIN {
                let head = self.scratch.split().freeze();
                self.segments.push_back(head);
                self.segments.push_back(msg.body.slice(offset..end));
            } else {
                self.scratch.put_slice(&msg.body[offset..end]);
            }
            self.scratch.put_u8(FRAME_END);
            offset = end;
        }
    }

    /// Writes everything out. Cancel-safe only between calls: a cancelled
    /// flush may have written part of a segment, so callers await it to the end.
    pub async fn flush<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        if !self.scratch.is_empty() {
            let tail = self.scratch.split().freeze();
            self.segments.push_back(tail);
        }
        while !self.segments.is_empty() {
            let n = {
                let slices: Vec<IoSlice<'_>> = self
                    .segments
                    .iter()
                    .take(64)
                    .map(|s| IoSlice::new(s))
                    .collect();
                w.write_vectored(&slices).await?
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let mut left = n;
            while left > 0 {
                let Some(front) = self.segments.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.segments.pop_front();
                } else {
                    let _ = front.split_to(left);
                    left = 0;
                }
            }
        }
        w.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::frame::{Frame, decode};
    use amq_protocol::protocol::{BasicProperties, basic};

    async fn written(out: &mut OutBuf) -> BytesMut {
        let mut v: Vec<u8> = Vec::new();
        out.flush(&mut v).await.unwrap();
        BytesMut::from(&v[..])
    }

    #[tokio::test]
    async fn deliver_encodes_like_the_generic_encoder() {
        let msg = Message::from_properties("ex", "rk", &BasicProperties::default(), Bytes::new());
        let mut out = OutBuf::default();
        out.deliver(5, "ctag", 42, true, &msg);
        let mut buf = written(&mut out).await;
        let Frame::Method { method, .. } = decode(&mut buf, 131072).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(
            *method,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "ctag".into(),
                delivery_tag: 42,
                redelivered: true,
                exchange: "ex".into(),
                routing_key: "rk".into(),
            }))
        );
    }

    #[tokio::test]
    async fn a_large_body_is_split_into_frames_and_reassembles() {
        let body: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let props = BasicProperties::default().with_priority(3);
        let msg = Message::from_properties("", "q", &props, Bytes::from(body.clone()));
        let mut out = OutBuf::default();
        out.content(1, &msg, 4096);
        let mut buf = written(&mut out).await;
        let Frame::Header {
            body_size,
            raw_properties,
            ..
        } = decode(&mut buf, 4096).unwrap().unwrap()
        else {
            panic!()
        };
        assert_eq!(body_size, body.len() as u64);
        assert_eq!(raw_properties, msg.raw_properties);
        let mut got = Vec::new();
        while let Some(Frame::Body { payload, .. }) = decode(&mut buf, 4096).unwrap() {
            assert!(payload.len() <= 4096 - 8);
            got.extend_from_slice(&payload);
        }
        assert_eq!(got, body);
    }
}
