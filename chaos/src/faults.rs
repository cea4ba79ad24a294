//! Faults: what can be done to a cluster, and the injector that does it,
//! holds it, heals it and records both ends in the history.
//!
//! A fault names its target by role (leader, follower, any node); the
//! injector resolves the role against the monitor's latest view at the
//! moment of injection, so the same seed aims at whichever node leads then.
//! One fault runs at a time and is always healed before the next: the
//! scenarios test recovery from each fault, not an unrecoverable pile-up.

use crate::cluster::Cluster;
use crate::history::{Event, Recorder};
use crate::monitor::View;
use crate::network::{NodeId, Topology};
use crate::proxy::ProxySet;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use std::fmt;
use std::time::Duration;

/// Longest wait for a restarted node to serve clients again.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Which node a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The node leading a randomly chosen queue.
    Leader,
    /// A replica of a randomly chosen queue that does not lead it.
    Follower,
    /// Any node.
    Any,
}

/// One fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9, and start again on the same data after the hold. Publishers
    /// are running, so this is also the crash in the middle of a write.
    Kill(Target),
    /// SIGSTOP, SIGCONT after the hold.
    Pause(Target),
    /// The node loses every link and its clients.
    Isolate(Target),
    /// The host loses its network, then its VM dies (kill -9) while cut
    /// off; it reboots and its network returns after the hold.
    IsolateThenKill(Target),
    /// A random minority cut from the majority. With `clients_follow`,
    /// clients sit with the majority and lose the minority; without, each
    /// client keeps its node and minority-side publishers must not be
    /// confirmed.
    Halves { clients_follow: bool },
    /// Two sides that cannot see each other and one node that sees both.
    Bridge,
    /// Traffic from one node to another vanishes; the reverse flows.
    OneWay,
    /// Every node stopped (SIGTERM when graceful, else kill -9), then all
    /// started at the same instant after the hold.
    RestartAll { graceful: bool },
    /// Each node in turn stopped with SIGTERM, started, and waited for.
    RollingRestart,
}

impl Fault {
    /// A short name, for the report and the timeline.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill(_) => "kill",
            Fault::Pause(_) => "pause",
            Fault::Isolate(_) => "isolate",
            Fault::IsolateThenKill(_) => "vm-loss",
            Fault::Halves { .. } => "partition-halves",
            Fault::Bridge => "partition-bridge",
            Fault::OneWay => "partition-one-way",
            Fault::RestartAll { .. } => "restart-all",
            Fault::RollingRestart => "rolling-restart",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Leader => "leader",
            Target::Follower => "follower",
            Target::Any => "node",
        })
    }
}

/// Everything a fault touches.
pub struct Injector {
    pub cluster: Cluster,
    pub proxies: ProxySet,
    pub view: View,
    pub rec: Recorder,
    next_fault: u32,
}

impl Injector {
    pub fn new(cluster: Cluster, proxies: ProxySet, view: View, rec: Recorder) -> Injector {
        Injector {
            cluster,
            proxies,
            view,
            rec,
            next_fault: 1,
        }
    }

    fn nodes(&self) -> Vec<NodeId> {
        self.cluster.layout.ids()
    }

    /// Picks the node a target names; falls back to any serving node when
    /// the cluster has no agreed leader right now.
    fn resolve(&self, target: Target, rng: &mut StdRng) -> NodeId {
        let serving: Vec<NodeId> = self
            .nodes()
            .into_iter()
            .filter(|&n| self.cluster.is_serving(n))
            .collect();
        let queues: Vec<_> = self.view.get().into_values().collect();
        let picked = queues.choose(rng).and_then(|q| match target {
            Target::Leader => q.leader.filter(|l| serving.contains(l)),
            Target::Follower => {
                let followers: Vec<NodeId> = q
                    .members
                    .iter()
                    .copied()
                    .filter(|m| Some(*m) != q.leader && serving.contains(m))
                    .collect();
                followers.choose(rng).copied()
            }
            Target::Any => None,
        });
        picked.or_else(|| serving.choose(rng).copied()).unwrap_or(1)
    }

    fn start(&mut self, kind: &str, description: String, nodes: Vec<NodeId>) -> u32 {
        let fault = self.next_fault;
        self.next_fault += 1;
        tracing::info!(fault, "{description}");
        self.rec.record(Event::FaultStart {
            t: self.rec.now(),
            fault,
            kind: kind.to_owned(),
            description,
            nodes,
        });
        fault
    }

    fn end(&self, fault: u32) {
        self.rec.record(Event::FaultEnd {
            t: self.rec.now(),
            fault,
        });
    }

    /// Starts a node that was down and waits for it; a node that does not
    /// come back is noted, not fatal (the heal phase tries again).
    async fn restart(&mut self, id: NodeId) {
        if let Err(e) = self.cluster.spawn(id) {
            self.rec.note(format!("node {id} did not start: {e:#}"));
            return;
        }
        if let Err(e) = self.cluster.wait_ready(id, READY_WITHIN).await {
            self.rec.note(format!("{e:#}"));
        }
    }

    fn partition(&self, t: &Topology) {
        self.proxies.apply(t);
    }

    /// Injects `fault`, holds it for `hold`, heals it.
    pub async fn inject(&mut self, fault: Fault, hold: Duration, rng: &mut StdRng) {
        let nodes = self.nodes();
        let kind = fault.kind();
        let secs = hold.as_secs_f64();
        match fault {
            Fault::Kill(target) => {
                let n = self.resolve(target, rng);
                let f = self.start(
                    kind,
                    format!("kill -9 {target} n{n} for {secs:.1}s"),
                    vec![n],
                );
                self.cluster.kill(n).await;
                tokio::time::sleep(hold).await;
                self.restart(n).await;
                self.end(f);
            }
            Fault::Pause(target) => {
                let n = self.resolve(target, rng);
                let f = self.start(
                    kind,
                    format!("SIGSTOP {target} n{n} for {secs:.1}s"),
                    vec![n],
                );
                if let Err(e) = self.cluster.pause(n) {
                    self.rec.note(format!("pause of n{n} failed: {e:#}"));
                }
                tokio::time::sleep(hold).await;
                self.cluster.resume(n);
                self.end(f);
            }
            Fault::Isolate(target) => {
                let n = self.resolve(target, rng);
                let f = self.start(
                    kind,
                    format!("isolate {target} n{n} for {secs:.1}s"),
                    vec![n],
                );
                self.partition(&Topology::isolate(&nodes, n));
                tokio::time::sleep(hold).await;
                self.partition(&Topology::healed());
                self.end(f);
            }
            Fault::IsolateThenKill(target) => {
                let n = self.resolve(target, rng);
                let f = self.start(
                    kind,
                    format!("n{n} ({target}) loses its network, dies, reboots after {secs:.1}s"),
                    vec![n],
                );
                self.partition(&Topology::isolate(&nodes, n));
                let cut_off = (hold / 3).min(Duration::from_secs(3));
                tokio::time::sleep(cut_off).await;
                self.cluster.kill(n).await;
                tokio::time::sleep(hold.saturating_sub(cut_off)).await;
                // The VM boots with its network back.
                self.partition(&Topology::healed());
                self.restart(n).await;
                self.end(f);
            }
            Fault::Halves { clients_follow } => {
                let mut shuffled = nodes.clone();
                shuffled.shuffle(rng);
                let (minority, majority) = shuffled.split_at((nodes.len() - 1) / 2);
                let (mut minority, mut majority) = (minority.to_vec(), majority.to_vec());
                minority.sort_unstable();
                majority.sort_unstable();
                let clients = if clients_follow {
                    "clients with the majority"
                } else {
                    "clients keep their nodes"
                };
                let f = self.start(
                    kind,
                    format!("partition {minority:?} | {majority:?} for {secs:.1}s ({clients})"),
                    minority.clone(),
                );
                self.partition(&Topology::split(&[minority, majority], clients_follow));
                tokio::time::sleep(hold).await;
                self.partition(&Topology::healed());
                self.end(f);
            }
            Fault::Bridge => {
                let b = *nodes.choose(rng).expect("a cluster has nodes");
                let f = self.start(kind, format!("bridge through n{b} for {secs:.1}s"), vec![b]);
                self.partition(&Topology::bridge(&nodes, b));
                tokio::time::sleep(hold).await;
                self.partition(&Topology::healed());
                self.end(f);
            }
            Fault::OneWay => {
                let pair: Vec<NodeId> = nodes.choose_multiple(rng, 2).copied().collect();
                let (from, to) = (pair[0], pair[1]);
                let f = self.start(
                    kind,
                    format!("traffic n{from} -> n{to} lost for {secs:.1}s"),
                    vec![from, to],
                );
                self.partition(&Topology::one_way(from, to));
                tokio::time::sleep(hold).await;
                self.partition(&Topology::healed());
                self.end(f);
            }
            Fault::RestartAll { graceful } => {
                let how = if graceful { "SIGTERM" } else { "kill -9" };
                let f = self.start(
                    kind,
                    format!("{how} every node, all start together after {secs:.1}s"),
                    nodes.clone(),
                );
                if graceful {
                    self.cluster.stop_all(&nodes).await;
                } else {
                    for &n in &nodes {
                        self.cluster.kill(n).await;
                    }
                }
                tokio::time::sleep(hold).await;
                for &n in &nodes {
                    if let Err(e) = self.cluster.spawn(n) {
                        self.rec.note(format!("node {n} did not start: {e:#}"));
                    }
                }
                let mut all_ready = true;
                for &n in &nodes {
                    if let Err(e) = self.cluster.wait_ready(n, READY_WITHIN).await {
                        self.rec.note(format!("{e:#}"));
                        all_ready = false;
                    }
                }
                if all_ready {
                    // The checker measures from here how long the
                    // consumers take to receive again.
                    self.rec.record(Event::AllReady {
                        t: self.rec.now(),
                        fault: f,
                    });
                }
                self.end(f);
            }
            Fault::RollingRestart => {
                for &n in &nodes {
                    let f = self.start(kind, format!("rolling restart: SIGTERM n{n}"), vec![n]);
                    self.cluster.stop(n).await;
                    self.restart(n).await;
                    self.end(f);
                    // Let the restarted node catch up before the next goes.
                    tokio::time::sleep(hold).await;
                }
            }
        }
        for (n, status) in self.cluster.reap_exited() {
            self.rec
                .note(format!("node {n} exited on its own: {status}"));
        }
    }

    /// Undoes everything: network open, paused nodes resumed, dead nodes
    /// started, and waits for each to serve. Returns the nodes that did not
    /// come back.
    pub async fn heal(&mut self) -> Vec<NodeId> {
        self.partition(&Topology::healed());
        debug_assert!(self.proxies.all_open());
        for (n, status) in self.cluster.reap_exited() {
            self.rec
                .note(format!("node {n} exited on its own: {status}"));
        }
        for n in self.nodes() {
            if self.cluster.is_paused(n) {
                self.cluster.resume(n);
            }
            if !self.cluster.is_started(n) {
                if let Err(e) = self.cluster.spawn(n) {
                    self.rec.note(format!("node {n} did not start: {e:#}"));
                }
            }
        }
        let mut missing = Vec::new();
        for n in self.nodes() {
            if self.cluster.is_started(n) {
                if let Err(e) = self.cluster.wait_ready(n, READY_WITHIN).await {
                    self.rec.note(format!("{e:#}"));
                    missing.push(n);
                }
            } else {
                missing.push(n);
            }
        }
        missing
    }
}
