//! What travels on the one connection between two nodes: the frames, their
//! length-delimited encoding, and the handshake messages.
//!
//! A frame on the socket is a big-endian `u32` length followed by that many
//! bytes of a bincode-encoded [`Frame`]. Every group's Raft RPCs, forwarded
//! proposals, the broker's messages and the failure detector's heartbeats
//! share the connection, so a frame says what it carries and, for requests,
//! which id the reply must quote.
//!
//! Nothing here touches a socket: encoding and decoding are pure so that a
//! malformed frame is a typed error the connection turns into "close this
//! connection", never a panic.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::network::{RaftReply, RaftRpc};
use crate::types::{GroupId, NodeId};

/// Largest frame a node accepts or sends. A Raft append is bounded by
/// openraft's `max_payload_entries`; the largest frames are full snapshots,
/// which must stay below this (a bigger one fails to send and is retried,
/// which is logged).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Bytes of the length prefix in front of every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Version of the frame format, checked in the handshake so that two nodes of
/// incompatible versions refuse each other instead of misreading frames.
pub const PROTOCOL_VERSION: u32 = 1;

/// Length of the random challenges exchanged in the handshake.
pub const NONCE_BYTES: usize = 32;

/// One unit on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    /// Dialer's opening: who it is, whom it wants, and its challenge.
    Hello {
        version: u32,
        from: NodeId,
        to: NodeId,
        incarnation: u64,
        nonce: [u8; NONCE_BYTES],
    },
    /// Acceptor's answer: its own challenge and its proof of the secret
    /// over the dialer's challenge.
    Challenge {
        incarnation: u64,
        nonce: [u8; NONCE_BYTES],
        proof: Vec<u8>,
    },
    /// Dialer's proof of the secret over the acceptor's challenge.
    Proof { proof: Vec<u8> },
    /// Failure detector beat: "this node, of this incarnation, is alive".
    Heartbeat { incarnation: u64 },
    /// A one-way application message.
    Message(Bytes),
    /// A request; the peer answers with a `Reply` quoting `id`.
    Request { id: u64, body: Request },
    /// The answer to request `id`; `Err` carries the peer's reason.
    Reply {
        id: u64,
        body: Result<Reply, String>,
    },
}

/// What one node asks another.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// A Raft RPC for one group.
    Raft { group: GroupId, rpc: RaftRpc },
    /// Propose `cmd` to `group`; only a leader accepts (no second forward).
    Propose {
        group: GroupId,
        cmd: Bytes,
        timeout_ms: u64,
    },
    /// Which node leads `group`, as far as the asked node knows.
    WhoLeads { group: GroupId },
    /// An application request, answered by the application.
    App(Bytes),
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Raft(RaftReply),
    Proposed(ProposeOutcome),
    Leader(LeaderInfo),
    App(Bytes),
}

/// How a forwarded proposal ended on the node that received it.
#[derive(Debug, Serialize, Deserialize)]
pub enum ProposeOutcome {
    /// Committed and applied: the state machine's reply.
    Applied(Bytes),
    /// This node does not lead the group; it thinks `leader` does.
    NotLeader { leader: Option<NodeId> },
    /// The group does not exist on this node.
    NoGroup,
    /// The node led the group but the entry was not committed in time.
    Timeout,
    /// Anything else (shutting down, storage failure).
    Failed(String),
}

/// Answer to [`Request::WhoLeads`].
#[derive(Debug, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// Whether the asked node has the group at all.
    pub has_group: bool,
    pub leader: Option<NodeId>,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Appends `frame`, length prefix first, to `out`.
pub fn encode_frame(frame: &Frame, out: &mut BytesMut) -> Result<(), WireError> {
    let start = out.len();
    out.put_u32(0);
    let mut writer = out.writer();
    bincode::serde::encode_into_std_write(frame, &mut writer, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let out = writer.into_inner();
    let len = out.len() - start - LENGTH_PREFIX_BYTES;
    if len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(WireError::TooLarge(len));
    }
    out[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Decodes one frame body (the bytes after the length prefix). Trailing
/// bytes make the frame malformed: a sender and a receiver that disagree on
/// the format must not go on.
pub fn decode_frame(body: &[u8]) -> Result<Frame, WireError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(body.len()));
    }
    let (frame, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes",
            body.len() - used
        )));
    }
    Ok(frame)
}

/// Splits a whole frame off the front of `buf`, if it holds one.
#[cfg(test)]
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    if buf.len() < LENGTH_PREFIX_BYTES {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(len));
    }
    if buf.len() < LENGTH_PREFIX_BYTES + len {
        return Ok(None);
    }
    bytes::Buf::advance(buf, LENGTH_PREFIX_BYTES);
    let body = buf.split_to(len);
    decode_frame(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut buf = BytesMut::new();
        encode_frame(&Frame::Heartbeat { incarnation: 7 }, &mut buf).unwrap();
        encode_frame(&Frame::Message(Bytes::from_static(b"hi")), &mut buf).unwrap();
        assert!(matches!(
            split_frame(&mut buf).unwrap(),
            Some(Frame::Heartbeat { incarnation: 7 })
        ));
        match split_frame(&mut buf).unwrap() {
            Some(Frame::Message(m)) => assert_eq!(&m[..], b"hi"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(split_frame(&mut buf).unwrap().is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        assert!(split_frame(&mut buf).is_err());
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        assert!(matches!(
            split_frame(&mut huge),
            Err(WireError::TooLarge(_))
        ));
        assert!(decode_frame(&[]).is_err());
    }
}
