//! One client connection: protocol header, authentication, tuning,
//! heartbeats, the frame loop, memory-alarm blocking and teardown.
//!
//! The connection task reads frames and runs every channel's methods; a
//! separate writer task owns the socket's write half, so a client that is
//! slow to read its deliveries never stops Warren reading its frames (acks
//! keep flowing). A publish waits for room in the target queue's inbox,
//! which stops this task reading the socket: TCP backpressure, per
//! connection, with no state in the queue.

use super::channel::Channel;
use super::frame::{self, FRAME_MIN_SIZE, Frame, PROTOCOL_HEADER};
use super::reply::{self, AmqpError};
use super::writer::OutBuf;
use crate::node::{ChannelEvent, Node};
use amq_protocol::protocol::{AMQPClass, connection as conn};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;

/// Bytes read from the socket per read call at most.
const READ_CHUNK: usize = 64 * 1024;
/// Channel events handled before going back to the socket, so that a busy
/// queue cannot starve a client's acks.
const EVENT_BATCH: usize = 512;
/// How long to wait for `connection.close-ok` after a connection error.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);

/// Client capabilities from `connection.start-ok` that change what Warren sends.
#[derive(Default, Clone, Copy)]
pub struct ClientCaps {
    pub consumer_cancel_notify: bool,
    pub connection_blocked: bool,
}

/// A connection after the handshake. Channel methods are in `channel.rs`.
pub struct Conn {
    pub(super) node: Arc<Node>,
    pub(super) id: u64,
    pub(super) peer: SocketAddr,
    pub(super) user: String,
    pub(super) vhost: String,
    pub(super) frame_max: u32,
    pub(super) channel_max: u16,
    pub(super) caps: ClientCaps,
    pub(super) out: OutBuf,
    pub(super) events: crate::node::ConnEvents,
    pub(super) channels: HashMap<u16, Channel>,
    /// Set once the connection has published: only publishing connections
    /// are blocked by a resource alarm, so consumers keep running.
    pub(super) has_published: bool,
}

/// Serves one accepted TCP connection to the end.
pub async fn serve(node: Arc<Node>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let timeout = Duration::from_millis(node.config.handshake_timeout_ms);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let handshake =
        tokio::time::timeout(timeout, handshake(&node, &mut stream, &mut buf, peer)).await;
    let hs = match handshake {
        Err(_) => {
            tracing::warn!(%peer, "closing connection: handshake timeout ({} ms)", timeout.as_millis());
            return;
        }
        Ok(Err(HandshakeEnd::Probe)) => {
            tracing::debug!(%peer, "connection closed before the protocol header (probe)");
            return;
        }
        Ok(Err(HandshakeEnd::Closed(why))) => {
            tracing::info!(%peer, "connection closed during handshake: {why}");
            return;
        }
        Ok(Ok(hs)) => hs,
    };
    node.metrics.connections_opened.inc();
    node.metrics.connections.inc();
    tracing::debug!(%peer, user = %hs.user, vhost = %hs.vhost, "connection open");
    let (rd, wr) = stream.into_split();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<OutBuf>();
    let writer = tokio::spawn(write_loop(wr, out_rx));
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let mut c = Conn {
        id: node.next_id(),
        node: node.clone(),
        peer,
        user: hs.user,
        vhost: hs.vhost,
        frame_max: hs.frame_max,
        channel_max: hs.channel_max,
        caps: hs.caps,
        out: OutBuf::default(),
        events: ev_tx,
        channels: HashMap::new(),
        has_published: false,
    };
    let end = c.run(rd, buf, ev_rx, &out_tx, hs.heartbeat).await;
    if let Err(e) = &end {
        // A connection error: tell the client why, then give it a moment to
        // answer close-ok (which nobody waits for beyond the writer flush).
        tracing::info!(peer = %c.peer, code = e.code, "closing connection: {}", e.text);
        c.out.method(
            0,
            &AMQPClass::Connection(conn::AMQPMethod::Close(conn::Close {
                reply_code: e.code,
                reply_text: short(&e.text),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
    }
    // Whatever the last frames produced (close-ok, or the close above).
    if !c.out.is_empty() {
        let _ = out_tx.send(std::mem::take(&mut c.out));
    }
    c.teardown().await;
    drop(out_tx);
    let _ = tokio::time::timeout(CLOSE_OK_TIMEOUT, writer).await;
    node.metrics.connections_closed.inc();
    node.metrics.connections.dec();
}

async fn write_loop(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<OutBuf>,
) {
    while let Some(mut out) = rx.recv().await {
        if out.flush(&mut wr).await.is_err() {
            break;
        }
        // Everything queued meanwhile goes out before the next wait.
        while let Ok(mut more) = rx.try_recv() {
            if more.flush(&mut wr).await.is_err() {
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}

/// Truncates a reply text to a short string's 255 bytes.
pub(super) fn short(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

struct Handshake {
    user: String,
    vhost: String,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    caps: ClientCaps,
}

enum HandshakeEnd {
    /// Closed before sending anything: a load balancer's health probe.
    Probe,
    Closed(String),
}

impl From<std::io::Error> for HandshakeEnd {
    fn from(e: std::io::Error) -> Self {
        HandshakeEnd::Closed(e.to_string())
    }
}

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(ShortString::from(c), AMQPValue::Boolean(true));
    }
    let ls = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let mut p = FieldTable::default();
    p.insert(
        ShortString::from("capabilities"),
        AMQPValue::FieldTable(caps),
    );
    p.insert(ShortString::from("product"), ls("Warren"));
    p.insert(ShortString::from("version"), ls(env!("CARGO_PKG_VERSION")));
    p.insert(ShortString::from("platform"), ls("Rust"));
    p.insert(ShortString::from("cluster_name"), ls("warren"));
    p.insert(
        ShortString::from("information"),
        ls("An AMQP 0-9-1 broker whose durable queues are Raft groups"),
    );
    p.insert(ShortString::from("copyright"), ls("The Warren authors"));
    p
}

fn client_caps(props: &FieldTable) -> ClientCaps {
    let Some(AMQPValue::FieldTable(caps)) = props.inner().get("capabilities") else {
        return ClientCaps::default();
    };
    let on = |k: &str| matches!(caps.inner().get(k), Some(AMQPValue::Boolean(true)));
    ClientCaps {
        consumer_cancel_notify: on("consumer_cancel_notify"),
        connection_blocked: on("connection.blocked"),
    }
}

async fn send_method(stream: &mut TcpStream, method: AMQPClass) -> std::io::Result<()> {
    let mut out = OutBuf::default();
    out.method(0, &method);
    out.flush(stream).await
}

/// Reads the next method on channel 0 during the handshake.
async fn next_method(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<AMQPClass, HandshakeEnd> {
    loop {
        match frame::decode(buf, FRAME_MIN_SIZE * 32) {
            Ok(Some(Frame::Method {
                method, channel: 0, ..
            })) => return Ok(*method),
            Ok(Some(Frame::Heartbeat)) => continue,
            Ok(Some(_)) => {
                let e = AmqpError::new(reply::COMMAND_INVALID, "unexpected frame during handshake");
                close_handshake(stream, &e).await;
                return Err(HandshakeEnd::Closed(e.text));
            }
            Ok(None) => {
                if stream.read_buf(buf).await? == 0 {
                    return Err(HandshakeEnd::Closed("peer closed the connection".into()));
                }
            }
            Err(e) => {
                close_handshake(stream, &e).await;
                return Err(HandshakeEnd::Closed(e.text));
            }
        }
    }
}

async fn close_handshake(stream: &mut TcpStream, e: &AmqpError) {
    let _ = send_method(
        stream,
        AMQPClass::Connection(conn::AMQPMethod::Close(conn::Close {
            reply_code: e.code,
            reply_text: short(&e.text),
            class_id: e.class_id,
            method_id: e.method_id,
        })),
    )
    .await;
}

async fn handshake(
    node: &Node,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    peer: SocketAddr,
) -> Result<Handshake, HandshakeEnd> {
    while buf.len() < 8 {
        if stream.read_buf(buf).await? == 0 {
            return Err(if buf.is_empty() {
                HandshakeEnd::Probe
            } else {
                HandshakeEnd::Closed("incomplete protocol header".into())
            });
        }
    }
    if &buf[..8] != PROTOCOL_HEADER {
        // The spec: answer a header we do not speak with the one we do, then close.
        let _ = stream.write_all(PROTOCOL_HEADER).await;
        return Err(HandshakeEnd::Closed(format!(
            "unsupported protocol header {:?}",
            &buf[..8]
        )));
    }
    let _ = buf.split_to(8);
    send_method(
        stream,
        AMQPClass::Connection(conn::AMQPMethod::Start(conn::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: LongString::from(super::auth::MECHANISMS.as_bytes().to_vec()),
            locales: LongString::from(b"en_US".to_vec()),
        })),
    )
    .await?;
    let start_ok = match next_method(stream, buf).await? {
        AMQPClass::Connection(conn::AMQPMethod::StartOk(s)) => s,
        _ => {
            let e = AmqpError::new(reply::COMMAND_INVALID, "expected connection.start-ok");
            close_handshake(stream, &e).await;
            return Err(HandshakeEnd::Closed(e.text));
        }
    };
    let caps = client_caps(&start_ok.client_properties);
    let creds =
        super::auth::decode_response(start_ok.mechanism.as_str(), start_ok.response.as_bytes());
    let refused = |why: String| AmqpError::new(reply::ACCESS_REFUSED, why);
    let user = match creds {
        None => {
            let e = refused(format!(
                "Login was refused using authentication mechanism {}",
                start_ok.mechanism
            ));
            close_handshake(stream, &e).await;
            tracing::warn!(%peer, "login refused: malformed or unsupported SASL response");
            return Err(HandshakeEnd::Closed(e.text));
        }
        Some((user, pass)) => {
            if !node.authenticate(&user, &pass) {
                let e = refused(format!(
                    "Login was refused using authentication mechanism {}. For details see the broker logfile.",
                    start_ok.mechanism
                ));
                close_handshake(stream, &e).await;
                tracing::warn!(%peer, %user, "login refused: invalid credentials");
                return Err(HandshakeEnd::Closed(e.text));
            }
            if user == "guest" && !node.config.guest_remote && !peer.ip().is_loopback() {
                let e = refused("User 'guest' can only connect via localhost".into());
                close_handshake(stream, &e).await;
                tracing::warn!(%peer, "login refused: guest from a remote address");
                return Err(HandshakeEnd::Closed(e.text));
            }
            user
        }
    };
    let cfg = &node.config;
    send_method(
        stream,
        AMQPClass::Connection(conn::AMQPMethod::Tune(conn::Tune {
            channel_max: cfg.channel_max,
            frame_max: cfg.frame_max,
            heartbeat: cfg.heartbeat,
        })),
    )
    .await?;
    let tune_ok = match next_method(stream, buf).await? {
        AMQPClass::Connection(conn::AMQPMethod::TuneOk(t)) => t,
        _ => {
            let e = AmqpError::new(reply::COMMAND_INVALID, "expected connection.tune-ok");
            close_handshake(stream, &e).await;
            return Err(HandshakeEnd::Closed(e.text));
        }
    };
    let frame_max = if tune_ok.frame_max == 0 {
        cfg.frame_max
    } else {
        tune_ok.frame_max
    };
    if frame_max < FRAME_MIN_SIZE || frame_max > cfg.frame_max {
        let e = AmqpError::new(
            reply::NOT_ALLOWED,
            format!(
                "negotiated frame_max = {frame_max} is outside {FRAME_MIN_SIZE}..={}",
                cfg.frame_max
            ),
        );
        close_handshake(stream, &e).await;
        return Err(HandshakeEnd::Closed(e.text));
    }
    let channel_max = match tune_ok.channel_max {
        0 => cfg.channel_max,
        n => n.min(cfg.channel_max),
    };
    let open = match next_method(stream, buf).await? {
        AMQPClass::Connection(conn::AMQPMethod::Open(o)) => o,
        _ => {
            let e = AmqpError::new(reply::COMMAND_INVALID, "expected connection.open");
            close_handshake(stream, &e).await;
            return Err(HandshakeEnd::Closed(e.text));
        }
    };
    let vhost = open.virtual_host.as_str().to_owned();
    if !node.meta().has_vhost(&vhost) {
        let e = AmqpError::new(reply::NOT_ALLOWED, format!("vhost {vhost} not found"));
        close_handshake(stream, &e).await;
        return Err(HandshakeEnd::Closed(e.text));
    }
    send_method(
        stream,
        AMQPClass::Connection(conn::AMQPMethod::OpenOk(conn::OpenOk {})),
    )
    .await?;
    Ok(Handshake {
        user,
        vhost,
        frame_max,
        channel_max,
        heartbeat: tune_ok.heartbeat,
        caps,
    })
}

impl Conn {
    /// The frame loop. Returns Ok on a clean close, Err on a connection error
    /// that must be reported to the client.
    async fn run(
        &mut self,
        mut rd: OwnedReadHalf,
        mut buf: BytesMut,
        mut events: mpsc::UnboundedReceiver<(u16, ChannelEvent)>,
        out_tx: &mpsc::UnboundedSender<OutBuf>,
        heartbeat: u16,
    ) -> Result<(), AmqpError> {
        let hb = (heartbeat > 0).then(|| Duration::from_secs(heartbeat as u64));
        // Heartbeats go out at half the interval; silence for two intervals
        // closes the connection (spec 4.2.7, RabbitMQ's rule).
        let mut ticker =
            tokio::time::interval(hb.map(|d| d / 2).unwrap_or(Duration::from_secs(3600)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        let mut last_write = Instant::now();
        let mut alarm = self.node.alarm.subscribe();
        let mut blocked_sent = false;
        loop {
            let alarm_on = *alarm.borrow();
            if alarm_on && !blocked_sent && self.caps.connection_blocked && self.has_published {
                self.out.method(
                    0,
                    &AMQPClass::Connection(conn::AMQPMethod::Blocked(conn::Blocked {
                        reason: ShortString::from("low on memory"),
                    })),
                );
                blocked_sent = true;
            } else if !alarm_on && blocked_sent {
                self.out.method(
                    0,
                    &AMQPClass::Connection(conn::AMQPMethod::Unblocked(conn::Unblocked {})),
                );
                blocked_sent = false;
            }
            if !self.out.is_empty() {
                if out_tx.send(std::mem::take(&mut self.out)).is_err() {
                    return Ok(());
                }
                last_write = Instant::now();
            }
            // While an alarm is on, a publishing connection is not read:
            // its publishes wait in the kernel, as with RabbitMQ.
            let may_read = !(alarm_on && self.has_published);
            if !may_read {
                // Frames the client sends meanwhile (its heartbeats too) wait
                // unread, so silence is not held against it (as RabbitMQ).
                last_read = Instant::now();
            }
            tokio::select! {
                biased;
                n = events.recv() => {
                    let Some((ch, ev)) = n else { return Ok(()) };
                    self.on_event(ch, ev);
                    for _ in 0..EVENT_BATCH {
                        match events.try_recv() {
                            Ok((ch, ev)) => self.on_event(ch, ev),
                            Err(_) => break,
                        }
                    }
                    self.flush_confirms();
                }
                r = rd.read_buf(&mut buf), if may_read => {
                    match r {
                        Ok(0) | Err(_) => return Ok(()),
                        Ok(_) => {}
                    }
                    last_read = Instant::now();
                    while let Some(f) = frame::decode(&mut buf, self.frame_max)? {
                        if self.on_frame(f).await? {
                            return Ok(());
                        }
                    }
                    if buf.capacity() - buf.len() < 4096 {
                        buf.reserve(READ_CHUNK);
                    }
                    self.flush_confirms();
                }
                _ = alarm.changed() => {}
                _ = ticker.tick() => {
                    if let Some(hb) = hb {
                        if last_read.elapsed() > hb * 2 {
                            tracing::warn!(peer = %self.peer, "missed heartbeats from client, timeout: {}s", hb.as_secs());
                            return Ok(());
                        }
                        if last_write.elapsed() >= hb / 2 {
                            self.out.heartbeat();
                        }
                    }
                }
            }
        }
    }

    /// Handles one frame; returns true when the connection is to end.
    async fn on_frame(&mut self, f: Frame) -> Result<bool, AmqpError> {
        let channel = f.channel();
        if channel == 0 {
            return match f {
                Frame::Heartbeat => Ok(false),
                Frame::Method {
                    method,
                    class_id,
                    method_id,
                    ..
                } => self.on_connection_method(*method, class_id, method_id),
                _ => Err(AmqpError::new(
                    reply::COMMAND_INVALID,
                    "content frame on channel 0",
                )),
            };
        }
        if channel > self.channel_max {
            // RabbitMQ answers this with 530, not the spec's 504.
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!(
                    "channel number {channel} exceeds channel_max {}",
                    self.channel_max
                ),
            ));
        }
        self.on_channel_frame(channel, f).await?;
        Ok(false)
    }

    fn on_connection_method(
        &mut self,
        m: AMQPClass,
        class_id: u16,
        method_id: u16,
    ) -> Result<bool, AmqpError> {
        match m {
            AMQPClass::Connection(conn::AMQPMethod::Close(c)) => {
                tracing::debug!(peer = %self.peer, code = c.reply_code, "client closed the connection: {}", c.reply_text);
                self.out.method(
                    0,
                    &AMQPClass::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})),
                );
                Ok(true)
            }
            AMQPClass::Connection(conn::AMQPMethod::CloseOk(_)) => Ok(true),
            AMQPClass::Connection(
                conn::AMQPMethod::Blocked(_) | conn::AMQPMethod::Unblocked(_),
            ) => Ok(false),
            AMQPClass::Connection(conn::AMQPMethod::UpdateSecret(_)) => {
                self.out.method(
                    0,
                    &AMQPClass::Connection(conn::AMQPMethod::UpdateSecretOk(
                        conn::UpdateSecretOk {},
                    )),
                );
                Ok(false)
            }
            _ => Err(AmqpError::new(
                reply::COMMAND_INVALID,
                format!("method {class_id}/{method_id} is not allowed on channel 0"),
            )
            .on(class_id, method_id)),
        }
    }

    /// Cleans up after the connection: every channel's consumers are
    /// cancelled and its unacknowledged messages returned, and exclusive
    /// queues are deleted.
    async fn teardown(&mut self) {
        let channels: Vec<u16> = self.channels.keys().copied().collect();
        for ch in channels {
            self.close_channel_state(ch).await;
        }
        self.node.connection_closed(self.id, &self.vhost).await;
    }
}
