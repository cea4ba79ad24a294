//! Process control for a cluster of real `warren server` processes: where
//! each node lives, starting, SIGKILL, SIGTERM, SIGSTOP/SIGCONT, readiness,
//! and reading the admin API.
//!
//! Node `n` lives on its own loopback address, 127.0.0.(10+n), with fixed
//! ports from `--base-port`:
//! - base + 0: the AMQP proxy clients use;
//! - base + 1: the node's own AMQP port (only its proxy connects there);
//! - base + 2: the admin HTTP API (the harness's out-of-band view, never cut);
//! - base + 3: the inter-node port;
//! - base + 10 + m, on node n's address: the proxy node n dials to reach a
//!   higher-numbered node m.
//!
//! Each node's stdout and stderr go to `nodes/node-N.log` in the report
//! directory, appended across restarts.

use crate::network::NodeId;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The secret the harness's nodes share.
const SECRET: &str = "warren-chaos-cluster-secret";

/// How long a graceful stop may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Largest cluster the address plan supports comfortably.
pub const MAX_NODES: usize = 9;

/// One node's fixed identity.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub id: NodeId,
    pub ip: Ipv4Addr,
    /// Where clients connect: the node's AMQP proxy.
    pub amqp_public: SocketAddr,
    /// Where the node itself listens for AMQP.
    pub amqp: SocketAddr,
    pub admin: SocketAddr,
    pub cluster: SocketAddr,
    pub data: PathBuf,
    pub log: PathBuf,
}

impl NodeSpec {
    /// The URI a client of this node uses. A short heartbeat lets lapin
    /// notice a paused or cut-off node within seconds.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f?heartbeat=5", self.amqp_public)
    }
}

/// The address plan for `n` nodes under `dir`.
#[derive(Clone, Debug)]
pub struct Layout {
    pub specs: Vec<NodeSpec>,
    base_port: u16,
}

impl Layout {
    pub fn new(n: usize, base_port: u16, dir: &Path) -> Layout {
        assert!((1..=MAX_NODES).contains(&n), "1 to {MAX_NODES} nodes");
        assert!(base_port as usize + 10 + MAX_NODES < u16::MAX as usize);
        let specs = (1..=n as NodeId)
            .map(|id| {
                let ip = Ipv4Addr::new(127, 0, 0, 10 + id as u8);
                let at = |off: u16| SocketAddr::new(IpAddr::V4(ip), base_port + off);
                NodeSpec {
                    id,
                    ip,
                    amqp_public: at(0),
                    amqp: at(1),
                    admin: at(2),
                    cluster: at(3),
                    data: dir.join(format!("node-{id}")),
                    log: dir.join(format!("node-{id}.log")),
                }
            })
            .collect();
        Layout { specs, base_port }
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.specs.iter().map(|s| s.id).collect()
    }

    pub fn spec(&self, id: NodeId) -> &NodeSpec {
        &self.specs[id as usize - 1]
    }

    /// Where `dialer` reaches `acceptor` (dialer < acceptor): the link
    /// proxy on the dialer's own address.
    pub fn link_proxy(&self, dialer: NodeId, acceptor: NodeId) -> SocketAddr {
        assert!(dialer < acceptor, "the lower id dials");
        SocketAddr::new(
            IpAddr::V4(self.spec(dialer).ip),
            self.base_port + 10 + acceptor,
        )
    }

    /// Every link proxy: `(low, high) -> (listen, the acceptor's port)`.
    pub fn link_proxies(&self) -> BTreeMap<(NodeId, NodeId), (SocketAddr, SocketAddr)> {
        let mut m = BTreeMap::new();
        for a in self.ids() {
            for b in self.ids().into_iter().filter(|&b| b > a) {
                m.insert((a, b), (self.link_proxy(a, b), self.spec(b).cluster));
            }
        }
        m
    }

    /// Every AMQP proxy: `node -> (listen, the node's AMQP port)`.
    pub fn client_proxies(&self) -> BTreeMap<NodeId, (SocketAddr, SocketAddr)> {
        self.specs
            .iter()
            .map(|s| (s.id, (s.amqp_public, s.amqp)))
            .collect()
    }

    /// Node `me`'s `--peers`: itself at its own port, higher nodes through
    /// the link proxies it dials, lower nodes (which dial it) at their port.
    pub fn peers_for(&self, me: NodeId) -> String {
        self.specs
            .iter()
            .map(|s| {
                let addr = if s.id > me {
                    self.link_proxy(me, s.id)
                } else {
                    s.cluster
                };
                format!("{}={addr}", s.id)
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The running processes.
pub struct Cluster {
    pub layout: Layout,
    warren: PathBuf,
    procs: Vec<Option<Child>>,
    paused: Vec<bool>,
}

impl Cluster {
    pub fn new(layout: Layout, warren: PathBuf) -> Cluster {
        let n = layout.specs.len();
        Cluster {
            layout,
            warren,
            procs: (0..n).map(|_| None).collect(),
            paused: vec![false; n],
        }
    }

    fn idx(id: NodeId) -> usize {
        id as usize - 1
    }

    /// Starts node `id` on its data directory (without waiting for it).
    pub fn spawn(&mut self, id: NodeId) -> Result<()> {
        let i = Self::idx(id);
        assert!(self.procs[i].is_none(), "node {id} is already running");
        let s = self.layout.spec(id).clone();
        std::fs::create_dir_all(&s.data)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .with_context(|| format!("opening {}", s.log.display()))?;
        let mut cmd = Command::new(&self.warren);
        cmd.arg("server")
            .args(["--node-id", &id.to_string()])
            .args(["--amqp-listen", &s.amqp.to_string()])
            .args(["--admin-listen", &s.admin.to_string()])
            .args(["--cluster-listen", &s.cluster.to_string()])
            .arg("--data-dir")
            .arg(&s.data)
            .args(["--peers", &self.layout.peers_for(id)])
            .env("WARREN_CLUSTER_SECRET", SECRET)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        die_with_harness(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.warren.display()))?;
        self.procs[i] = Some(child);
        self.paused[i] = false;
        Ok(())
    }

    fn pid(&self, id: NodeId) -> Option<u32> {
        self.procs[Self::idx(id)].as_ref().and_then(Child::id)
    }

    /// kill -9: no chance to flush or say goodbye.
    pub async fn kill(&mut self, id: NodeId) {
        let i = Self::idx(id);
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        self.paused[i] = false;
    }

    /// SIGTERM, then SIGKILL if the node has not exited within the grace.
    pub async fn stop(&mut self, id: NodeId) {
        self.stop_all(&[id]).await;
    }

    /// SIGTERM to every node in `ids` at once, then each is waited for
    /// (SIGKILL after the grace): a stop of the whole cluster, not a
    /// rolling one.
    pub async fn stop_all(&mut self, ids: &[NodeId]) {
        for &id in ids {
            if self.paused[Self::idx(id)] {
                self.resume(id);
            }
            if let Some(pid) = self.pid(id) {
                let _ = signal(pid, libc::SIGTERM);
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for &id in ids {
            if let Some(c) = self.procs[Self::idx(id)].as_mut() {
                if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
                    tracing::warn!(
                        node = id,
                        "no exit within {STOP_GRACE:?} of SIGTERM; SIGKILL"
                    );
                }
            }
            self.kill(id).await;
        }
    }

    /// SIGSTOP: the process freezes with its sockets open.
    pub fn pause(&mut self, id: NodeId) -> Result<()> {
        let pid = self.pid(id).context("pausing a node that is not running")?;
        signal(pid, libc::SIGSTOP)?;
        self.paused[Self::idx(id)] = true;
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: NodeId) {
        if let Some(pid) = self.pid(id) {
            let _ = signal(pid, libc::SIGCONT);
        }
        self.paused[Self::idx(id)] = false;
    }

    /// Started and not paused.
    pub fn is_serving(&self, id: NodeId) -> bool {
        self.procs[Self::idx(id)].is_some() && !self.paused[Self::idx(id)]
    }

    pub fn is_paused(&self, id: NodeId) -> bool {
        self.paused[Self::idx(id)]
    }

    pub fn is_started(&self, id: NodeId) -> bool {
        self.procs[Self::idx(id)].is_some()
    }

    /// Nodes that died without the harness killing them (each reported
    /// once): a crash is a finding.
    pub fn reap_exited(&mut self) -> Vec<(NodeId, String)> {
        let mut gone = Vec::new();
        for (i, slot) in self.procs.iter_mut().enumerate() {
            if let Some(c) = slot {
                if let Ok(Some(status)) = c.try_wait() {
                    gone.push((i as NodeId + 1, status.to_string()));
                    *slot = None;
                }
            }
        }
        gone
    }

    /// Waits until node `id` answers its health check with 200 and its AMQP
    /// port accepts connections.
    pub async fn wait_ready(&mut self, id: NodeId, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let s = self.layout.spec(id).clone();
        loop {
            if !self.is_started(id) {
                bail!("node {id} is not running");
            }
            let healthy = matches!(
                http_get(s.admin, "/api/health", Duration::from_secs(1)).await,
                Some((200, _))
            );
            if healthy && TcpStream::connect(s.amqp).await.is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.procs[Self::idx(id)].as_mut().map(|c| c.try_wait())
            {
                self.procs[Self::idx(id)] = None;
                bail!(
                    "node {id} exited while starting ({status}); see {}",
                    s.log.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {id} not ready within {within:?}; see {}",
                    s.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills every node (the end of a run).
    pub async fn shutdown(&mut self) {
        for id in self.layout.ids() {
            self.kill(id).await;
        }
    }
}

/// Makes the child die with the harness, so an interrupted run leaves no
/// node holding the fixed ports.
#[cfg(target_os = "linux")]
fn die_with_harness(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe and touches nothing but the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_harness(_cmd: &mut Command) {}

fn signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) has no memory effects; the pid is our own child's.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A plain HTTP/1.1 GET with a deadline: (status, body). `None` when the
/// node does not answer in time (down, paused).
pub async fn http_get(addr: SocketAddr, path: &str, within: Duration) -> Option<(u16, String)> {
    let request = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.ok()?;
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let status = resp.split_whitespace().nth(1)?.parse().ok()?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(within, request).await.ok().flatten()
}

/// One queue as a node's `/api/queues` shows it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct QueueInfo {
    pub name: String,
    pub leader: Option<NodeId>,
    #[serde(default)]
    pub members: Vec<NodeId>,
    #[serde(default)]
    pub messages: u64,
}

/// A node's list of queues, or `None` if it did not answer.
pub async fn queues_of(admin: SocketAddr) -> Option<Vec<QueueInfo>> {
    let (status, body) = http_get(admin, "/api/queues", Duration::from_secs(1)).await?;
    if status != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_point_at_the_proxies_a_node_dials() {
        let l = Layout::new(3, 30000, Path::new("nodes"));
        assert_eq!(
            l.peers_for(1),
            "1=127.0.0.11:30003,2=127.0.0.11:30012,3=127.0.0.11:30013"
        );
        assert_eq!(
            l.peers_for(2),
            "1=127.0.0.11:30003,2=127.0.0.12:30003,3=127.0.0.12:30013"
        );
        assert_eq!(
            l.peers_for(3),
            "1=127.0.0.11:30003,2=127.0.0.12:30003,3=127.0.0.13:30003"
        );
        let links = l.link_proxies();
        assert_eq!(links.len(), 3);
        assert_eq!(
            links[&(1, 3)],
            (
                "127.0.0.11:30013".parse().unwrap(),
                "127.0.0.13:30003".parse().unwrap()
            )
        );
        assert_eq!(
            l.spec(2).uri(),
            "amqp://guest:guest@127.0.0.12:30000/%2f?heartbeat=5"
        );
    }
}
