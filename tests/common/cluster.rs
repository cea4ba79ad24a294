//! Test support for clusters: several `warren server` processes on loopback,
//! each with its own ports and data directory, that a test can kill with
//! SIGKILL and start again on the same data.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-cluster-secret";

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// One node's fixed identity: id, addresses and data directory.
pub struct NodeSpec {
    pub id: u16,
    pub amqp: SocketAddr,
    pub admin: SocketAddr,
    pub cluster: SocketAddr,
    pub data: PathBuf,
}

pub struct Cluster {
    pub specs: Vec<NodeSpec>,
    /// Links that go through a [`LinkCutter`]: (dialer id, acceptor id) ->
    /// the address the dialer uses for the acceptor.
    relayed: Vec<((u16, u16), SocketAddr)>,
    procs: Vec<Option<Child>>,
    logs: Vec<Arc<Mutex<Vec<String>>>>,
    /// The threads copying each node's stderr into `logs`.
    readers: Vec<Option<std::thread::JoinHandle<()>>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes and waits until every one serves clients.
    ///
    /// Ports are picked free and released before the nodes bind them, so
    /// another process may take one in between (a parallel test's
    /// connection): a start where a node finds its address in use is tried
    /// again on other ports.
    pub fn start(n: usize) -> Cluster {
        for _ in 0..4 {
            let dir = tempfile::tempdir().expect("temp dir");
            let specs = Self::specs(n, &dir);
            match Cluster::try_start(n, specs, dir, Vec::new()) {
                Ok(c) => return c,
                Err(log) if log.iter().any(|l| l.contains("Address already in use")) => continue,
                Err(log) => panic!("a node exited while starting: {log:?}"),
            }
        }
        panic!("the cluster found its ports taken four times in a row");
    }

    /// Like [`Cluster::start`], with the link from node `dialer` to node
    /// `acceptor` (ids; the lower id dials) going through a relay that the
    /// returned [`LinkCutter`] can break at will.
    pub fn start_with_cutter(n: usize, dialer: u16, acceptor: u16) -> (Cluster, LinkCutter) {
        assert!(dialer < acceptor, "the lower id dials");
        let dir = tempfile::tempdir().expect("temp dir");
        let specs = Self::specs(n, &dir);
        let cutter = LinkCutter::start(specs[acceptor as usize - 1].cluster);
        let relayed = vec![((dialer, acceptor), cutter.addr)];
        (Cluster::start_relayed(n, specs, dir, relayed), cutter)
    }

    fn specs(n: usize, dir: &tempfile::TempDir) -> Vec<NodeSpec> {
        (1..=n as u16)
            .map(|id| NodeSpec {
                id,
                amqp: free_addr(),
                admin: free_addr(),
                cluster: free_addr(),
                data: dir.path().join(format!("node{id}")),
            })
            .collect()
    }

    fn start_relayed(
        n: usize,
        specs: Vec<NodeSpec>,
        dir: tempfile::TempDir,
        relayed: Vec<((u16, u16), SocketAddr)>,
    ) -> Cluster {
        Cluster::try_start(n, specs, dir, relayed)
            .unwrap_or_else(|log| panic!("a node exited while starting: {log:?}"))
    }

    /// Starts every node and waits until each serves; the log of a node
    /// that exited instead.
    fn try_start(
        n: usize,
        specs: Vec<NodeSpec>,
        dir: tempfile::TempDir,
        relayed: Vec<((u16, u16), SocketAddr)>,
    ) -> Result<Cluster, Vec<String>> {
        let mut c = Cluster {
            relayed,
            procs: (0..n).map(|_| None).collect(),
            logs: (0..n).map(|_| Arc::new(Mutex::new(Vec::new()))).collect(),
            readers: (0..n).map(|_| None).collect(),
            specs,
            _dir: dir,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_until_ready(i)?;
        }
        Ok(c)
    }

    /// The peer list node `me` is started with: relayed links point at
    /// their relay.
    fn peers(&self, me: u16) -> String {
        self.specs
            .iter()
            .map(|s| {
                let addr = self
                    .relayed
                    .iter()
                    .find(|((d, a), _)| *d == me && *a == s.id)
                    .map(|(_, relay)| *relay)
                    .unwrap_or(s.cluster);
                format!("{}={}", s.id, addr)
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i` (index from 0) without waiting for it.
    pub fn spawn(&mut self, i: usize) {
        let peers = self.peers(self.specs[i].id);
        let s = &self.specs[i];
        let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("server")
            .args(["--node-id", &s.id.to_string()])
            .args(["--amqp-listen", &s.amqp.to_string()])
            .args(["--admin-listen", &s.admin.to_string()])
            .args(["--cluster-listen", &s.cluster.to_string()])
            .args(["--data-dir", s.data.to_str().unwrap()])
            .args(["--peers", &peers])
            .env("WARREN_CLUSTER_SECRET", SECRET)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("warren binary starts");
        let stderr = child.stderr.take().unwrap();
        let sink = self.logs[i].clone();
        self.readers[i] = Some(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        }));
        self.procs[i] = Some(child);
    }

    /// Waits (at most 60 s) until node `i` answers its health check.
    pub fn wait_ready(&mut self, i: usize) {
        if let Err(log) = self.wait_until_ready(i) {
            panic!("node {} exited: {log:?}", i + 1);
        }
    }

    /// [`Cluster::wait_ready`], with the node's log as the error when it
    /// exits instead.
    fn wait_until_ready(&mut self, i: usize) -> Result<(), Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.http(i, "GET", "/api/health").0 == 200
                && TcpStream::connect(self.specs[i].amqp).is_ok()
            {
                return Ok(());
            }
            if let Some(Ok(Some(_))) = self.procs[i].as_mut().map(|c| c.try_wait()) {
                self.procs[i] = None;
                if let Some(reader) = self.readers[i].take() {
                    let _ = reader.join();
                }
                return Err(self.log(i));
            }
            assert!(
                Instant::now() < deadline,
                "node {} not ready in 60 s: {:?}",
                i + 1,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the process gets no chance to flush or say goodbye.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.procs[i].is_some()
    }

    pub fn log(&self, i: usize) -> Vec<String> {
        self.logs[i].lock().unwrap().clone()
    }

    pub fn uri(&self, i: usize) -> String {
        format!("amqp://guest:guest@{}/%2f", self.specs[i].amqp)
    }

    /// An HTTP request to node `i`'s admin API: (status, body).
    pub fn http(&self, i: usize, method: &str, path: &str) -> (u16, String) {
        super::http(self.specs[i].admin, method, path, "")
    }

    /// The leader of a queue as node `i` sees it (from `/api/queues`).
    pub fn queue_leader(&self, i: usize, queue: &str) -> Option<u64> {
        self.queue_number(i, queue, "leader")
    }

    /// A number from a queue's entry in node `i`'s `/api/queues`.
    pub fn queue_number(&self, i: usize, queue: &str, field: &str) -> Option<u64> {
        let (status, body) = self.http(i, "GET", "/api/queues");
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v.as_array()?
            .iter()
            .find(|q| q["name"] == queue)
            .and_then(|q| q[field].as_u64())
    }

    /// Waits until every running node agrees on one leader for `queue` and
    /// returns its node id.
    pub fn wait_queue_leader(&self, queue: &str, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let seen: Vec<Option<u64>> = (0..self.specs.len())
                .filter(|&i| self.is_up(i))
                .map(|i| self.queue_leader(i, queue))
                .collect();
            if let Some(Some(first)) = seen.first() {
                if seen.iter().all(|l| *l == Some(*first)) && self.is_up(*first as usize - 1) {
                    return *first;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader for {queue}: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(i);
        }
    }
}

/// A TCP relay on loopback in front of one node's cluster listener, for one
/// inter-node link. `cut` closes every connection it carries; the dialing
/// node then reconnects through it, as after a brief network fault.
pub struct LinkCutter {
    pub addr: SocketAddr,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl LinkCutter {
    fn start(target: SocketAddr) -> LinkCutter {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a relay port");
        let addr = listener.local_addr().unwrap();
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let g = generation.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let born = g.load(std::sync::atomic::Ordering::SeqCst);
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let g = g.clone();
                    std::thread::spawn(move || pump(from, to, g, born));
                }
            }
        });
        LinkCutter { addr, generation }
    }

    /// Breaks the connections the relay carries now.
    pub fn cut(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either side closes or the relay is cut.
fn pump(mut from: TcpStream, mut to: TcpStream, g: Arc<std::sync::atomic::AtomicU64>, born: u64) {
    use std::io::{Read, Write};
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if g.load(std::sync::atomic::Ordering::SeqCst) != born {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
