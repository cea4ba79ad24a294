//! The inter-node transport: one TCP connection per pair of nodes, carrying
//! every group's Raft RPCs, forwarded proposals, the broker's messages and
//! the failure detector's heartbeats.
//!
//! - **Who dials.** The node with the lower id dials the higher one; the
//!   acceptor learns who called from the handshake. One connection per pair
//!   means per-peer message order holds and there is never a duplicate link
//!   to reconcile. A dialer reconnects with exponential backoff
//!   ([`INITIAL_BACKOFF`] doubling to [`MAX_BACKOFF`]).
//! - **Handshake.** Both sides prove they know the cluster's shared secret
//!   without sending it: each sends a random challenge and answers the
//!   other's with HMAC-SHA256(secret, role, both challenges, both ids). The
//!   acceptor answers first; a dialer whose proof is wrong is refused and
//!   logged, and so is an acceptor whose proof is wrong. Proofs are checked in
//!   constant time. Handshake frames are capped at [`HANDSHAKE_MAX_BYTES`], so
//!   an unauthenticated caller cannot make the node allocate much.
//! - **Writing.** Frames go into a bounded per-connection queue
//!   ([`QUEUE_DEPTH`]). One writer task drains it and writes everything
//!   queued (up to [`WRITE_BATCH_BYTES`]) with one syscall, so many small
//!   Raft messages and deliveries share a write.
//! - **Requests.** A request carries an id; the reply quoting it completes
//!   the waiter. When the connection drops, every waiter on it fails at once
//!   rather than waiting for its timeout.
//! - **Bad input.** A frame that does not decode, or is too large, closes the
//!   connection (and the dialer reconnects); it never panics the node.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use crate::failure_detector::PeerEvent;
use crate::types::NodeId;
use crate::wire::{
    self, Frame, MAX_FRAME_BYTES, NONCE_BYTES, PROTOCOL_VERSION, Reply, Request, WireError,
};

/// Frames waiting to be written to one peer; senders of requests wait for
/// room, one-way messages beyond it wait in the link's overflow.
pub const QUEUE_DEPTH: usize = 16 * 1024;
/// Bytes of one-way messages that may wait for room on one link.
pub const OVERFLOW_BYTES: usize = 128 * 1024 * 1024;
/// Most bytes one write syscall carries.
pub const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Largest frame accepted before the peer proved the secret.
pub const HANDSHAKE_MAX_BYTES: usize = 4 * 1024;
/// How long a handshake (connect included) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// First reconnect delay after a failed dial.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What the transport hands to the node: requests to answer and one-way
/// messages to deliver.
pub(crate) trait Inbound: Send + Sync + 'static {
    fn request(
        self: Arc<Self>,
        from: NodeId,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Reply, String>> + Send>>;
    fn message(&self, from: NodeId, msg: Bytes);
}

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("node {0} is unreachable: {1}")]
    Unreachable(NodeId, &'static str),
    #[error("request to node {0} timed out")]
    Timeout(NodeId),
    #[error("node {0} answered with an error: {1}")]
    Remote(NodeId, String),
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, String>>>>>;

/// One established connection, as seen by the code that sends on it.
#[derive(Clone)]
struct Conn {
    id: u64,
    tx: mpsc::Sender<Frame>,
    waiters: Waiters,
    close: Arc<Notify>,
}

/// Everything the node knows about its link to one peer.
pub(crate) struct Link {
    pub(crate) peer: NodeId,
    addr: String,
    conn: Mutex<Option<Conn>>,
    /// Milliseconds since the transport's epoch when a frame last arrived
    /// from the peer; 0 means never.
    last_heard: AtomicU64,
    /// The peer's incarnation as last announced; 0 means unknown.
    incarnation: AtomicU64,
    /// Whether a connection to the peer was ever established: the next one
    /// is then a reconnection.
    had_conn: AtomicBool,
    /// One-way messages are waiting in the overflow: mirrors
    /// `overflow.draining`, so that a send can skip the lock while it is
    /// false.
    full: AtomicBool,
    /// One-way messages waiting for room in a full send queue.
    overflow: Mutex<Overflow>,
}

/// One-way messages that found the send queue full. They wait here, in
/// order, and a drainer task moves them into the queue as it empties, so a
/// burst (a consumer without a prefetch limit taking a deep backlog) slows
/// down instead of losing messages. Bounded by [`OVERFLOW_BYTES`]; past it a
/// message is refused like one to an unconnected peer.
#[derive(Default)]
struct Overflow {
    messages: std::collections::VecDeque<Bytes>,
    bytes: usize,
    /// The connection the waiting messages are for; a new connection
    /// drops them (they are lost with the old one, as its queue is).
    conn: u64,
    /// A drainer is running (or about to).
    draining: bool,
}

impl Link {
    fn conn(&self) -> Option<Conn> {
        self.conn.lock().ok().and_then(|c| c.clone())
    }

    /// When the peer was last heard from (ms since the epoch), and its
    /// incarnation; read by the failure detector.
    pub(crate) fn heard(&self) -> (u64, u64) {
        (
            self.last_heard.load(Ordering::Relaxed),
            self.incarnation.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.conn().is_some()
    }
}

/// The node's side of every link.
pub(crate) struct Transport {
    me: NodeId,
    incarnation: u64,
    secret: Vec<u8>,
    links: BTreeMap<NodeId, Arc<Link>>,
    inbound: Weak<dyn Inbound>,
    next_request: AtomicU64,
    next_conn: AtomicU64,
    epoch: Instant,
    closed: watch::Sender<bool>,
    /// Handshakes refused because the other side did not prove the secret
    /// (or spoke another protocol); for tests and diagnostics.
    pub(crate) refused: AtomicU64,
    /// Where a reconnection is announced ([`PeerEvent::Reconnected`]).
    events: broadcast::Sender<PeerEvent>,
}

impl Transport {
    pub(crate) fn new(
        me: NodeId,
        incarnation: u64,
        secret: &str,
        peers: &BTreeMap<NodeId, String>,
        inbound: Weak<dyn Inbound>,
        events: broadcast::Sender<PeerEvent>,
    ) -> Transport {
        let links = peers
            .iter()
            .filter(|(id, _)| **id != me)
            .map(|(id, addr)| {
                (
                    *id,
                    Arc::new(Link {
                        peer: *id,
                        addr: addr.clone(),
                        conn: Mutex::new(None),
                        last_heard: AtomicU64::new(0),
                        incarnation: AtomicU64::new(0),
                        had_conn: AtomicBool::new(false),
                        full: AtomicBool::new(false),
                        overflow: Mutex::new(Overflow::default()),
                    }),
                )
            })
            .collect();
        Transport {
            me,
            incarnation,
            secret: secret.as_bytes().to_vec(),
            links,
            inbound,
            next_request: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            epoch: Instant::now(),
            closed: watch::channel(false).0,
            refused: AtomicU64::new(0),
            events,
        }
    }

    /// Starts accepting on `listener` and dialing every higher-numbered peer.
    pub(crate) fn start(self: &Arc<Self>, listener: TcpListener) {
        tokio::spawn(self.clone().accept_loop(listener));
        for link in self.links.values() {
            if link.peer > self.me {
                tokio::spawn(self.clone().dial_loop(link.clone()));
            }
        }
    }

    /// Closes every connection and stops accepting and dialing.
    pub(crate) fn close(&self) {
        self.closed.send_replace(true);
    }

    pub(crate) fn links(&self) -> impl Iterator<Item = &Arc<Link>> {
        self.links.values()
    }

    /// Milliseconds since the transport started (the clock of `Link::heard`).
    pub(crate) fn now_ms(&self) -> u64 {
        // Starts at 1 so that 0 can mean "never".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Queues a frame of the node's own (a heartbeat); false (and not sent)
    /// if the peer is not connected or its queue is full, which a heartbeat
    /// can afford: any frame is a sign of life.
    pub(crate) fn send_frame(&self, to: NodeId, frame: Frame) -> bool {
        let Some(conn) = self.links.get(&to).and_then(|l| l.conn()) else {
            return false;
        };
        conn.tx.try_send(frame).is_ok()
    }

    /// Queues a one-way application message. False when the peer is not
    /// connected, or its send queue and overflow are both full: the caller
    /// decides what a message that never left means. A full send queue
    /// alone is not a refusal: the message waits in the link's overflow.
    pub(crate) fn send_message(&self, to: NodeId, msg: Bytes) -> bool {
        let Some(link) = self.links.get(&to) else {
            return false;
        };
        let Some(conn) = link.conn() else {
            return false;
        };
        // The usual case takes no lock: nothing waits in the overflow, so
        // the message may go straight into the send queue.
        let msg = if link.full.load(Ordering::Acquire) {
            msg
        } else {
            match conn.tx.try_send(Frame::Message(msg)) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(Frame::Message(msg))) => msg,
                Err(_) => return false,
            }
        };
        let mut o = lock(&link.overflow);
        if o.draining {
            if o.conn != conn.id {
                // What waited for the old connection is lost with it; a
                // drainer for the new one takes over from here.
                o.messages.clear();
                o.bytes = 0;
                o.conn = conn.id;
                tokio::spawn(drain_overflow(link.clone(), conn.clone()));
            }
            if o.bytes + msg.len() > OVERFLOW_BYTES {
                return false;
            }
            o.bytes += msg.len();
            o.messages.push_back(msg);
            return true;
        }
        // The drainer finished meanwhile: room may be back.
        match conn.tx.try_send(Frame::Message(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(Frame::Message(msg))) => {
                tracing::debug!(peer = to, "send queue full: one-way messages wait for room");
                o.bytes = msg.len();
                o.messages.push_back(msg);
                o.conn = conn.id;
                o.draining = true;
                link.full.store(true, Ordering::Release);
                tokio::spawn(drain_overflow(link.clone(), conn));
                true
            }
            Err(_) => false,
        }
    }

    /// Sends a request and waits for its reply, at most `timeout`.
    pub(crate) async fn call(
        &self,
        to: NodeId,
        body: Request,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let conn = self
            .links
            .get(&to)
            .ok_or(CallError::Unreachable(to, "not a member of the cluster"))?
            .conn()
            .ok_or(CallError::Unreachable(to, "not connected"))?;
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&conn.waiters).insert(id, tx);
        // Removes the waiter however this call ends (timeout, cancellation).
        let _guard = WaiterGuard {
            waiters: conn.waiters.clone(),
            id,
        };
        let exchange = async {
            conn.tx
                .send(Frame::Request { id, body })
                .await
                .map_err(|_| CallError::Unreachable(to, "connection closed"))?;
            rx.await
                .map_err(|_| CallError::Unreachable(to, "connection closed"))?
                .map_err(|reason| CallError::Remote(to, reason))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout(to)),
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut closed = self.closed.subscribe();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = closed.wait_for(|c| *c) => return,
            };
            match accepted {
                Ok((stream, addr)) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, this.accept(stream)).await {
                            Ok(Ok((link, stream))) => this.run_conn(link, stream).await,
                            Ok(Err(e)) => {
                                tracing::warn!(%addr, error = %e, "refused inter-node connection")
                            }
                            Err(_) => tracing::warn!(%addr, "inter-node handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    // Typically out of file descriptors; do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(INITIAL_BACKOFF).await;
                }
            }
        }
    }

    /// The acceptor's half of the handshake.
    async fn accept(&self, mut stream: TcpStream) -> io::Result<(Arc<Link>, TcpStream)> {
        let (from, dialer_nonce, incarnation) = match read_frame(&mut stream, HANDSHAKE_MAX_BYTES)
            .await?
        {
            Frame::Hello {
                version,
                from,
                to,
                incarnation,
                nonce,
            } => {
                if version != PROTOCOL_VERSION || to != self.me {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(invalid(format!(
                        "node {from} speaks version {version} to node {to}; this is node {} of version {PROTOCOL_VERSION}",
                        self.me
                    )));
                }
                (from, nonce, incarnation)
            }
            _ => return Err(invalid("expected a hello".into())),
        };
        let link = match self.links.get(&from) {
            Some(link) if from < self.me => link.clone(),
            _ => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(invalid(format!(
                    "node {from} is not a lower-numbered member of the cluster"
                )));
            }
        };
        let nonce = new_nonce();
        let proof = self.proof(b"acceptor", &dialer_nonce, &nonce, from, self.me);
        write_frame(
            &mut stream,
            &Frame::Challenge {
                incarnation: self.incarnation,
                nonce,
                proof,
            },
        )
        .await?;
        // A dialer that hangs up here could not verify our proof: it does
        // not know the secret either way, so this too is a refusal.
        let ok = match read_frame(&mut stream, HANDSHAKE_MAX_BYTES).await {
            Ok(Frame::Proof { proof }) => {
                self.verify(b"dialer", &nonce, &dialer_nonce, from, self.me, &proof)
            }
            _ => false,
        };
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(invalid(format!(
                "node {from} did not prove it knows the cluster secret"
            )));
        }
        link.incarnation.store(incarnation, Ordering::Relaxed);
        Ok((link, stream))
    }

    /// Keeps the connection to a higher-numbered peer up for the node's life.
    async fn dial_loop(self: Arc<Self>, link: Arc<Link>) {
        let mut closed = self.closed.subscribe();
        let mut backoff = INITIAL_BACKOFF;
        loop {
            if *closed.borrow() {
                return;
            }
            let attempt = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.dial(&link));
            let outcome = tokio::select! {
                outcome = attempt => outcome,
                _ = closed.wait_for(|c| *c) => return,
            };
            match outcome {
                Ok(Ok(stream)) => {
                    backoff = INITIAL_BACKOFF;
                    self.clone().run_conn(link.clone(), stream).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = link.peer, error = %e, "dial failed");
                }
                Err(_) => tracing::debug!(peer = link.peer, "dial timed out"),
            }
            let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 4);
            tokio::select! {
                _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
                _ = closed.wait_for(|c| *c) => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The dialer's half of the handshake.
    async fn dial(&self, link: &Link) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect(&link.addr).await?;
        let nonce = new_nonce();
        write_frame(
            &mut stream,
            &Frame::Hello {
                version: PROTOCOL_VERSION,
                from: self.me,
                to: link.peer,
                incarnation: self.incarnation,
                nonce,
            },
        )
        .await?;
        let (incarnation, acceptor_nonce) = match read_frame(&mut stream, HANDSHAKE_MAX_BYTES)
            .await?
        {
            Frame::Challenge {
                incarnation,
                nonce: acceptor_nonce,
                proof,
            } => {
                if !self.verify(
                    b"acceptor",
                    &nonce,
                    &acceptor_nonce,
                    self.me,
                    link.peer,
                    &proof,
                ) {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        peer = link.peer,
                        addr = %link.addr,
                        "refused inter-node connection: peer did not prove it knows the cluster secret"
                    );
                    return Err(invalid("peer failed to prove the secret".into()));
                }
                (incarnation, acceptor_nonce)
            }
            _ => return Err(invalid("expected a challenge".into())),
        };
        let proof = self.proof(b"dialer", &acceptor_nonce, &nonce, self.me, link.peer);
        write_frame(&mut stream, &Frame::Proof { proof }).await?;
        link.incarnation.store(incarnation, Ordering::Relaxed);
        Ok(stream)
    }

    fn mac(
        &self,
        role: &[u8],
        challenge: &[u8; NONCE_BYTES],
        other: &[u8; NONCE_BYTES],
        dialer: NodeId,
        acceptor: NodeId,
    ) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"warren-raft-handshake-v1\0");
        mac.update(role);
        mac.update(challenge);
        mac.update(other);
        mac.update(&dialer.to_be_bytes());
        mac.update(&acceptor.to_be_bytes());
        mac
    }

    fn proof(
        &self,
        role: &[u8],
        challenge: &[u8; NONCE_BYTES],
        other: &[u8; NONCE_BYTES],
        dialer: NodeId,
        acceptor: NodeId,
    ) -> Vec<u8> {
        self.mac(role, challenge, other, dialer, acceptor)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Constant-time check of a proof.
    fn verify(
        &self,
        role: &[u8],
        challenge: &[u8; NONCE_BYTES],
        other: &[u8; NONCE_BYTES],
        dialer: NodeId,
        acceptor: NodeId,
        proof: &[u8],
    ) -> bool {
        self.mac(role, challenge, other, dialer, acceptor)
            .verify_slice(proof)
            .is_ok()
    }

    /// Runs an authenticated connection until it fails, is replaced by a newer
    /// one to the same peer, or the node shuts down.
    async fn run_conn(self: Arc<Self>, link: Arc<Link>, stream: TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let (read_half, write_half) = stream.into_split();
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let conn = Conn {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            tx,
            waiters: Arc::new(Mutex::new(HashMap::new())),
            close: Arc::new(Notify::new()),
        };
        if let Ok(mut current) = link.conn.lock()
            && let Some(old) = current.replace(conn.clone())
        {
            // The peer reconnected (it restarted, or saw the old link die
            // first): the old connection is dead weight.
            old.close.notify_one();
        }
        link.last_heard.store(self.now_ms(), Ordering::Relaxed);
        tracing::info!(peer = link.peer, "inter-node connection established");
        if link.had_conn.swap(true, Ordering::Relaxed) {
            // Nobody may be listening (a node without a broker on top).
            let _ = self.events.send(PeerEvent::Reconnected(link.peer));
        }

        let mut closed = self.closed.subscribe();
        let reader = self
            .clone()
            .read_loop(link.clone(), read_half, conn.clone());
        let writer = write_loop(write_half, rx, conn.waiters.clone());
        let reason = tokio::select! {
            r = reader => r.err().map(|e| e.to_string()).unwrap_or_else(|| "peer closed".into()),
            w = writer => w.err().map(|e| e.to_string()).unwrap_or_else(|| "writer stopped".into()),
            _ = conn.close.notified() => "replaced by a newer connection".into(),
            _ = closed.wait_for(|c| *c) => "node shutting down".into(),
        };
        if let Ok(mut current) = link.conn.lock()
            && current.as_ref().map(|c| c.id) == Some(conn.id)
        {
            *current = None;
        }
        // Dropping the senders fails every waiter on this connection now.
        lock(&conn.waiters).clear();
        tracing::info!(peer = link.peer, %reason, "inter-node connection closed");
    }

    async fn read_loop(
        self: Arc<Self>,
        link: Arc<Link>,
        read_half: OwnedReadHalf,
        conn: Conn,
    ) -> io::Result<()> {
        let mut reader = BufReader::with_capacity(64 * 1024, read_half);
        loop {
            let frame = read_frame(&mut reader, MAX_FRAME_BYTES).await?;
            link.last_heard.store(self.now_ms(), Ordering::Relaxed);
            match frame {
                Frame::Heartbeat { incarnation } => {
                    link.incarnation.store(incarnation, Ordering::Relaxed);
                }
                Frame::Message(msg) => {
                    // Delivered on the reader task, so per-peer order holds.
                    if let Some(inbound) = self.inbound.upgrade() {
                        inbound.message(link.peer, msg);
                    }
                }
                Frame::Request { id, body } => {
                    let Some(inbound) = self.inbound.upgrade() else {
                        continue;
                    };
                    let tx = conn.tx.clone();
                    let from = link.peer;
                    tokio::spawn(async move {
                        let body = inbound.request(from, body).await;
                        // The connection may be gone; the caller then fails fast.
                        let _ = tx.send(Frame::Reply { id, body }).await;
                    });
                }
                Frame::Reply { id, body } => {
                    if let Some(waiter) = lock(&conn.waiters).remove(&id) {
                        // The caller may have timed out meanwhile.
                        let _ = waiter.send(body);
                    }
                }
                Frame::Hello { .. } | Frame::Challenge { .. } | Frame::Proof { .. } => {
                    return Err(invalid("handshake frame on an established link".into()));
                }
            }
        }
    }
}

/// Drains the queue and writes what it holds in as few syscalls as possible.
async fn write_loop(
    mut write_half: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Frame>,
    waiters: Waiters,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(frame) = rx.recv().await {
        buf.clear();
        push(&mut buf, frame, &waiters);
        while buf.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(frame) => push(&mut buf, frame, &waiters),
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            write_half.write_all(&buf).await?;
        }
        if buf.capacity() > 4 * WRITE_BATCH_BYTES {
            // One huge frame (a snapshot) should not pin its buffer forever.
            buf = BytesMut::with_capacity(64 * 1024);
        }
    }
    Ok(())
}

/// Encodes a frame into the write buffer. A frame that cannot be encoded
/// (too large) is not sent; its request fails at once, or its reply becomes
/// an error reply, so nobody waits for a timeout.
fn push(buf: &mut BytesMut, frame: Frame, waiters: &Waiters) {
    let Err(e) = wire::encode_frame(&frame, buf) else {
        return;
    };
    tracing::warn!(error = %e, "frame not sent");
    match frame {
        Frame::Request { id, .. } => {
            if let Some(waiter) = lock(waiters).remove(&id) {
                let _ = waiter.send(Err(format!("request not sent: {e}")));
            }
        }
        Frame::Reply { id, .. } => {
            let error = Frame::Reply {
                id,
                body: Err(format!("reply not sent: {e}")),
            };
            if let Err(e) = wire::encode_frame(&error, buf) {
                tracing::warn!(error = %e, "error reply not sent either");
            }
        }
        _ => {}
    }
}

async fn read_frame(reader: &mut (impl AsyncRead + Unpin), max: usize) -> io::Result<Frame> {
    let len = reader.read_u32().await? as usize;
    if len > max {
        return Err(invalid(WireError::TooLarge(len).to_string()));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    wire::decode_frame(&body).map_err(|e| invalid(e.to_string()))
}

async fn write_frame(writer: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> io::Result<()> {
    let mut buf = BytesMut::new();
    wire::encode_frame(frame, &mut buf).map_err(|e| invalid(e.to_string()))?;
    writer.write_all(&buf).await
}

fn new_nonce() -> [u8; NONCE_BYTES] {
    rand::random()
}

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// Locks a waiter map. A poisoned lock only means a panic elsewhere while
/// inserting or removing a waiter; the map itself is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct WaiterGuard {
    waiters: Waiters,
    id: u64,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        lock(&self.waiters).remove(&self.id);
    }
}

/// Moves a link's overflow into its send queue as room appears, in order,
/// until it is empty or the connection it was for is gone.
async fn drain_overflow(link: Arc<Link>, conn: Conn) {
    loop {
        let next = {
            let mut o = lock(&link.overflow);
            if o.conn != conn.id {
                // Another drainer serves the newer connection.
                return;
            }
            match o.messages.pop_front() {
                Some(m) => {
                    o.bytes -= m.len();
                    m
                }
                None => {
                    o.draining = false;
                    link.full.store(false, Ordering::Release);
                    return;
                }
            }
        };
        if conn.tx.send(Frame::Message(next)).await.is_err() {
            // The connection closed: what waited is lost with it, like its
            // queue; the peer-level reactions (resend on reconnection,
            // returns when the node is declared down) cover both.
            let mut o = lock(&link.overflow);
            if o.conn == conn.id {
                o.messages.clear();
                o.bytes = 0;
                o.draining = false;
                link.full.store(false, Ordering::Release);
            }
            return;
        }
    }
}
