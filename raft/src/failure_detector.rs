//! The node-level failure detector: one heartbeat per peer connection instead
//! of one per group, so idle groups cost nothing.
//!
//! Every [`HEARTBEAT_INTERVAL`] the node sends each connected peer a heartbeat
//! carrying its incarnation (its start time). Any frame from a peer counts as
//! a sign of life. A peer silent for the failure timeout is declared down; a
//! peer announcing a new incarnation has restarted. The node reacts (in
//! `registry.rs`) by starting elections in the groups that peer led.
//!
//! [`Liveness`] is the pure bookkeeping (what the detector concluded, from
//! timestamps it is given); the loop around it is [`run`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::transport::Transport;
use crate::types::NodeId;
use crate::wire::Frame;

/// How often a node tells each peer it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);

/// A change in the detector's view of a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The peer is reachable (again).
    Up(NodeId),
    /// The peer was silent for the failure timeout.
    Down(NodeId),
    /// The peer restarted (new incarnation seen).
    Restarted(NodeId),
    /// A new connection to the peer replaced one that broke. One-way
    /// messages queued on the old connection, or in flight when it broke,
    /// may never have arrived: whoever sent something that matters that
    /// way sends it again. (Raised by the transport, not the detector.)
    Reconnected(NodeId),
}

#[derive(Default)]
struct PeerState {
    up: bool,
    /// Up at least once since this node started.
    seen_up: bool,
    incarnation: u64,
}

/// What the detector believes about every peer.
pub(crate) struct Liveness {
    timeout_ms: u64,
    peers: BTreeMap<NodeId, PeerState>,
    /// When the node started: a peer not heard from yet is not judged down
    /// before the failure timeout has passed since then.
    started: std::time::Instant,
}

impl Liveness {
    pub(crate) fn new(peers: impl IntoIterator<Item = NodeId>, timeout: Duration) -> Liveness {
        Liveness {
            timeout_ms: timeout.as_millis().max(1) as u64,
            peers: peers
                .into_iter()
                .map(|p| (p, PeerState::default()))
                .collect(),
            started: std::time::Instant::now(),
        }
    }

    /// Updates the view of `peer`, last heard at `last_heard_ms` (0: never)
    /// with `incarnation` (0: unknown), as of `now_ms`. Returns what changed.
    pub(crate) fn observe(
        &mut self,
        peer: NodeId,
        last_heard_ms: u64,
        incarnation: u64,
        now_ms: u64,
    ) -> Vec<PeerEvent> {
        let Some(state) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        let mut events = Vec::new();
        if incarnation != 0 {
            if state.incarnation != 0 && state.incarnation != incarnation {
                events.push(PeerEvent::Restarted(peer));
            }
            state.incarnation = incarnation;
        }
        let alive = last_heard_ms != 0 && now_ms.saturating_sub(last_heard_ms) < self.timeout_ms;
        if alive != state.up {
            state.up = alive;
            state.seen_up |= alive;
            events.push(if alive {
                PeerEvent::Up(peer)
            } else {
                PeerEvent::Down(peer)
            });
        }
        debug_assert!(events.len() <= 2);
        events
    }

    pub(crate) fn is_up(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(|s| s.up)
    }

    /// Whether `peer` is judged down: not up, and either seen up before or
    /// silent for a whole failure timeout since this node started. Right
    /// after a start every peer is not up yet without being down: a group
    /// whose leader (known from its persisted vote) is on such a peer is
    /// not leaderless, and electing against it would only be a vote storm.
    pub(crate) fn is_down(&self, peer: NodeId) -> bool {
        match self.peers.get(&peer) {
            Some(s) => {
                !s.up && (s.seen_up || self.started.elapsed().as_millis() as u64 >= self.timeout_ms)
            }
            None => true,
        }
    }

    pub(crate) fn view(&self) -> BTreeMap<NodeId, bool> {
        self.peers.iter().map(|(p, s)| (*p, s.up)).collect()
    }
}

/// What the detector asks of the node when a peer goes down or restarts.
pub(crate) trait OnPeerLost: Send + Sync + 'static {
    fn peer_lost(&self, peer: NodeId);
}

/// Heartbeats and checks until the node goes away or `stopped` is set.
pub(crate) async fn run(
    transport: Arc<Transport>,
    incarnation: u64,
    liveness: Arc<Mutex<Liveness>>,
    events: broadcast::Sender<PeerEvent>,
    node: Weak<dyn OnPeerLost>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let Some(node) = node.upgrade() else { return };
        let now = transport.now_ms();
        let mut changes = Vec::new();
        for link in transport.links() {
            if link.is_connected() {
                transport.send_frame(link.peer, Frame::Heartbeat { incarnation });
            }
            let (heard, peer_incarnation) = link.heard();
            let mut liveness = liveness.lock().unwrap_or_else(|p| p.into_inner());
            changes.extend(liveness.observe(link.peer, heard, peer_incarnation, now));
        }
        for event in changes {
            tracing::info!(?event, "peer liveness changed");
            if let PeerEvent::Down(peer) | PeerEvent::Restarted(peer) = event {
                node.peer_lost(peer);
            }
            // Nobody listening is fine.
            let _ = events.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_down_restart() {
        let mut l = Liveness::new([2, 3], Duration::from_millis(1000));
        assert!(l.observe(2, 0, 0, 10).is_empty());
        assert!(!l.is_down(2), "not judged before it was ever heard");
        assert_eq!(l.observe(2, 10, 5, 20), vec![PeerEvent::Up(2)]);
        assert!(l.observe(2, 10, 5, 900).is_empty());
        assert_eq!(l.observe(2, 10, 5, 1010), vec![PeerEvent::Down(2)]);
        assert!(l.is_down(2), "down once it was seen up and went silent");
        assert_eq!(
            l.observe(2, 1500, 6, 1500),
            vec![PeerEvent::Restarted(2), PeerEvent::Up(2)]
        );
        assert!(l.is_up(2) && !l.is_up(3));
        assert!(l.observe(9, 1, 1, 1).is_empty());
    }
}
