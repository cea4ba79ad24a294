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
    procs: Vec<Option<Child>>,
    logs: Vec<Arc<Mutex<Vec<String>>>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes and waits until every one serves clients.
    pub fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let specs: Vec<NodeSpec> = (1..=n as u16)
            .map(|id| NodeSpec {
                id,
                amqp: free_addr(),
                admin: free_addr(),
                cluster: free_addr(),
                data: dir.path().join(format!("node{id}")),
            })
            .collect();
        let mut c = Cluster {
            procs: (0..n).map(|_| None).collect(),
            logs: (0..n).map(|_| Arc::new(Mutex::new(Vec::new()))).collect(),
            specs,
            _dir: dir,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_ready(i);
        }
        c
    }

    fn peers(&self) -> String {
        self.specs
            .iter()
            .map(|s| format!("{}={}", s.id, s.cluster))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i` (index from 0) without waiting for it.
    pub fn spawn(&mut self, i: usize) {
        let s = &self.specs[i];
        let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("server")
            .args(["--node-id", &s.id.to_string()])
            .args(["--amqp-listen", &s.amqp.to_string()])
            .args(["--admin-listen", &s.admin.to_string()])
            .args(["--cluster-listen", &s.cluster.to_string()])
            .args(["--data-dir", s.data.to_str().unwrap()])
            .args(["--peers", &self.peers()])
            .env("WARREN_CLUSTER_SECRET", SECRET)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("warren binary starts");
        let stderr = child.stderr.take().unwrap();
        let sink = self.logs[i].clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        self.procs[i] = Some(child);
    }

    /// Waits (at most 60 s) until node `i` answers its health check.
    pub fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.http(i, "GET", "/api/health").0 == 200
                && TcpStream::connect(self.specs[i].amqp).is_ok()
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.procs[i].as_mut().map(|c| c.try_wait()) {
                panic!("node {} exited ({status}): {:?}", i + 1, self.log(i));
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
        let (status, body) = self.http(i, "GET", "/api/queues");
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v.as_array()?
            .iter()
            .find(|q| q["name"] == queue)
            .and_then(|q| q["leader"].as_u64())
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
