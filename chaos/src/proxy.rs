//! A fault-injecting TCP proxy, and the set of them that stands between
//! every pair of nodes and between clients and every node.
//!
//! Warren nodes do not know the proxies exist: node i's `--peers` entry for a
//! higher-numbered node j points at the proxy for the link (i, j), and
//! clients connect to a node's AMQP proxy instead of its port. Changing a
//! proxy's [`Mode`] is how the harness partitions the network:
//! - `Open`: bytes flow both ways;
//! - `Blocked`: existing connections are dropped, new ones are accepted and
//!   then hear nothing until the mode changes (the caller's own timeout
//!   fires, as with an unreachable host);
//! - `OneWayForward` / `OneWayBackward`: bytes in one direction stop
//!   arriving. They are held, not discarded: TCP would retransmit them into
//!   the void, and the receiver sees silence, never a corrupt stream. When the
//!   link opens again they flow, like a late network.
//!
//! "Forward" is from the connecting side (the lower node id, or the client)
//! to the listening side.

use crate::network::{NodeId, Topology};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Open,
    Blocked,
    OneWayForward,
    OneWayBackward,
}

/// Connections one proxy carries at most; beyond it new ones are refused,
/// so a reconnect storm cannot exhaust file descriptors.
const MAX_CONNECTIONS: usize = 512;

/// Time allowed to reach the proxied address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes moved per read.
const BUFFER: usize = 32 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward,
    Backward,
}

fn held(mode: Mode, dir: Direction) -> bool {
    matches!(
        (mode, dir),
        (Mode::OneWayForward, Direction::Forward) | (Mode::OneWayBackward, Direction::Backward)
    )
}

/// One listening proxy. Dropping it stops accepting and closes every
/// connection it carries.
pub struct Proxy {
    mode: watch::Sender<Mode>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Binds `listen` and forwards every connection to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind(listen).await.with_context(|| {
            format!("proxy cannot listen on {listen} (a previous run still there?)")
        })?;
        let (mode, rx) = watch::channel(Mode::Open);
        let accept = tokio::spawn(accept_loop(listener, target, rx));
        Ok(Proxy { mode, accept })
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_if_modified(|m| {
            let changed = *m != mode;
            *m = mode;
            changed
        });
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Connection tasks end on their own when the mode sender goes away.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, mode: watch::Receiver<Mode>) {
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let client = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors or similar: wait instead of spinning.
                tracing::warn!(%target, error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            continue;
        }
        live.fetch_add(1, Ordering::Relaxed);
        let live = live.clone();
        let mode = mode.clone();
        tokio::spawn(async move {
            serve(client, target, mode).await;
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Carries one connection until either side closes it or the link is
/// blocked.
async fn serve(mut client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>) {
    if *mode.borrow_and_update() == Mode::Blocked {
        hang(&mut client, &mut mode).await;
        return;
    }
    let server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        // The node is down: the client sees its connection closed, as it
        // would see a refused one.
        _ => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let forward = pump(client_read, server_write, mode.clone(), Direction::Forward);
    let backward = pump(server_read, client_write, mode.clone(), Direction::Backward);
    tokio::select! {
        _ = async { tokio::join!(forward, backward) } => {}
        _ = until_blocked(mode) => {}
    }
}

/// A connection accepted while blocked: read and discard whatever the
/// client sends, answer nothing, and close when the link changes or the
/// client gives up.
async fn hang(client: &mut TcpStream, mode: &mut watch::Receiver<Mode>) {
    let mut sink = vec![0u8; 4096];
    loop {
        tokio::select! {
            _ = mode.changed() => return,
            r = client.read(&mut sink) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

async fn until_blocked(mut mode: watch::Receiver<Mode>) {
    loop {
        if *mode.borrow_and_update() == Mode::Blocked {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}

/// Copies one direction, pausing while that direction is cut.
async fn pump(
    mut src: OwnedReadHalf,
    mut dst: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    dir: Direction,
) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        // Nothing is read while held, so the sender's buffers fill up as
        // they would when its packets vanish.
        while held(*mode.borrow_and_update(), dir) {
            if mode.changed().await.is_err() {
                return;
            }
        }
        tokio::select! {
            r = src.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = dst.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if dst.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Where the proxies of a cluster listen and where they lead.
pub struct ProxySet {
    /// Link proxies, keyed `(dialer, acceptor)` with dialer < acceptor.
    links: BTreeMap<(NodeId, NodeId), Proxy>,
    /// Each node's AMQP proxy.
    clients: BTreeMap<NodeId, Proxy>,
}

impl ProxySet {
    /// Starts every proxy open. `links` maps `(low, high)` to (listen,
    /// target); `clients` maps a node to (listen, target).
    pub async fn start(
        links: BTreeMap<(NodeId, NodeId), (SocketAddr, SocketAddr)>,
        clients: BTreeMap<NodeId, (SocketAddr, SocketAddr)>,
    ) -> Result<ProxySet> {
        let mut set = ProxySet {
            links: BTreeMap::new(),
            clients: BTreeMap::new(),
        };
        for (pair, (listen, target)) in links {
            assert!(pair.0 < pair.1, "the lower id dials");
            set.links.insert(pair, Proxy::start(listen, target).await?);
        }
        for (node, (listen, target)) in clients {
            set.clients
                .insert(node, Proxy::start(listen, target).await?);
        }
        Ok(set)
    }

    /// Puts every proxy in the mode `topology` asks for.
    pub fn apply(&self, topology: &Topology) {
        for (&(a, b), p) in &self.links {
            p.set(topology.link_mode(a, b));
        }
        for (&n, p) in &self.clients {
            p.set(topology.client_mode(n));
        }
    }

    /// Whether every proxy is open.
    pub fn all_open(&self) -> bool {
        self.links
            .values()
            .chain(self.clients.values())
            .all(|p| p.mode() == Mode::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn free_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(buf)
    }

    #[tokio::test]
    async fn open_forwards_blocked_cuts_and_one_way_holds_then_releases() {
        let target = echo_server().await;
        let listen = free_addr().await;
        let proxy = Proxy::start(listen, target).await.unwrap();
        let mut s = TcpStream::connect(listen).await.unwrap();
        assert_eq!(
            round_trip(&mut s, b"hello").await.as_deref(),
            Some(&b"hello"[..])
        );

        // One way: the echo cannot come back while the backward path is cut,
        // and arrives once it opens.
        proxy.set(Mode::OneWayBackward);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(round_trip(&mut s, b"held").await, None);
        proxy.set(Mode::Open);
        let mut late = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut late))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&late, b"held");

        // Blocked: the live connection is closed; a new one hears nothing.
        proxy.set(Mode::Blocked);
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "closed: {r:?}");
        let mut s2 = TcpStream::connect(listen).await.unwrap();
        assert_eq!(round_trip(&mut s2, b"x").await, None);

        proxy.set(Mode::Open);
        let mut s3 = TcpStream::connect(listen).await.unwrap();
        assert_eq!(
            round_trip(&mut s3, b"back").await.as_deref(),
            Some(&b"back"[..])
        );
    }
}
