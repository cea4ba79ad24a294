//! Partitions as data: which links are cut, in which direction, and whose
//! clients lose their node.
//!
//! Every inter-node link and every node's AMQP port goes through a proxy the
//! harness owns (`proxy.rs`). A [`Topology`] says what each of those proxies
//! should do; `faults.rs` builds one per partition and hands the resulting
//! modes to the proxies. Keeping this pure lets the shapes (isolate, halves,
//! bridge, one-way) be tested without sockets.

use crate::proxy::Mode;
#[cfg(test)]
use std::collections::BTreeMap;
use std::collections::BTreeSet;

/// A node id, as Warren numbers them (1-based).
pub type NodeId = u16;

/// The state of the network between nodes, and between clients and nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Unordered pairs `(low, high)` that cannot talk at all.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Ordered pairs `(from, to)`: bytes from `from` to `to` do not arrive.
    one_way: BTreeSet<(NodeId, NodeId)>,
    /// Nodes the clients cannot reach (they sit on the other side).
    clients_cut: BTreeSet<NodeId>,
}

impl Topology {
    /// Everything open.
    pub fn healed() -> Topology {
        Topology::default()
    }

    /// `node` loses every link and its clients, as when its host's network
    /// goes down.
    pub fn isolate(nodes: &[NodeId], node: NodeId) -> Topology {
        let others: Vec<NodeId> = nodes.iter().copied().filter(|&n| n != node).collect();
        Topology::split(&[vec![node], others], true)
    }

    /// The cluster split into groups that cannot talk to each other. With
    /// `clients_follow_majority`, clients live on the largest group's side
    /// and lose every other node; otherwise each client keeps its node.
    pub fn split(groups: &[Vec<NodeId>], clients_follow_majority: bool) -> Topology {
        let mut t = Topology::default();
        for (gi, a) in groups.iter().enumerate() {
            for b in &groups[gi + 1..] {
                for &x in a {
                    for &y in b {
                        t.cut.insert(pair(x, y));
                    }
                }
            }
        }
        if clients_follow_majority {
            let largest = groups
                .iter()
                .max_by_key(|g| g.len())
                .cloned()
                .unwrap_or_default();
            for g in groups {
                if *g != largest {
                    t.clients_cut.extend(g.iter().copied());
                }
            }
        }
        t
    }

    /// Two sides that cannot talk to each other, and `bridge`, which talks
    /// to both: each side plus the bridge may be a majority, so two nodes
    /// can each believe they may lead. Clients keep their nodes.
    pub fn bridge(nodes: &[NodeId], bridge: NodeId) -> Topology {
        let others: Vec<NodeId> = nodes.iter().copied().filter(|&n| n != bridge).collect();
        let (left, right) = others.split_at(others.len() / 2);
        Topology::split(&[left.to_vec(), right.to_vec()], false)
    }

    /// Traffic from `from` to `to` vanishes; the other direction flows.
    pub fn one_way(from: NodeId, to: NodeId) -> Topology {
        assert_ne!(from, to, "a one-way cut needs two nodes");
        let mut t = Topology::default();
        t.one_way.insert((from, to));
        t
    }

    /// The mode of the proxy on the link between `a` and `b` (either order).
    /// The lower id dials the higher, so "forward" on that proxy is
    /// low -> high.
    pub fn link_mode(&self, a: NodeId, b: NodeId) -> Mode {
        let (lo, hi) = pair(a, b);
        if self.cut.contains(&(lo, hi)) {
            return Mode::Blocked;
        }
        match (
            self.one_way.contains(&(lo, hi)),
            self.one_way.contains(&(hi, lo)),
        ) {
            (true, true) => Mode::Blocked,
            (true, false) => Mode::OneWayForward,
            (false, true) => Mode::OneWayBackward,
            (false, false) => Mode::Open,
        }
    }

    /// The mode of the proxy in front of `node`'s AMQP port.
    pub fn client_mode(&self, node: NodeId) -> Mode {
        if self.clients_cut.contains(&node) {
            Mode::Blocked
        } else {
            Mode::Open
        }
    }

    /// Every link's mode, keyed `(low, high)`.
    #[cfg(test)]
    pub fn link_modes(&self, nodes: &[NodeId]) -> BTreeMap<(NodeId, NodeId), Mode> {
        let mut m = BTreeMap::new();
        for (i, &a) in nodes.iter().enumerate() {
            for &b in &nodes[i + 1..] {
                m.insert(pair(a, b), self.link_mode(a, b));
            }
        }
        m
    }

    /// Whether `a` and `b` can exchange messages in both directions.
    #[cfg(test)]
    pub fn connected(&self, a: NodeId, b: NodeId) -> bool {
        a == b || self.link_mode(a, b) == Mode::Open
    }
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE: [NodeId; 5] = [1, 2, 3, 4, 5];

    #[test]
    fn isolating_a_node_cuts_its_links_and_its_clients_only() {
        let t = Topology::isolate(&FIVE, 3);
        for n in [1, 2, 4, 5] {
            assert_eq!(t.link_mode(3, n), Mode::Blocked);
            assert_eq!(t.client_mode(n), Mode::Open);
        }
        assert_eq!(t.link_mode(1, 2), Mode::Open);
        assert_eq!(t.link_mode(4, 5), Mode::Open);
        assert_eq!(t.client_mode(3), Mode::Blocked);
    }

    #[test]
    fn halves_cut_across_and_clients_stay_with_the_majority() {
        let t = Topology::split(&[vec![1, 2], vec![3, 4, 5]], true);
        let modes = t.link_modes(&FIVE);
        let blocked: Vec<_> = modes
            .iter()
            .filter(|(_, m)| **m == Mode::Blocked)
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(
            blocked,
            vec![(1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5)]
        );
        assert_eq!(t.client_mode(1), Mode::Blocked);
        assert_eq!(t.client_mode(4), Mode::Open);
        let keep = Topology::split(&[vec![1, 2], vec![3, 4, 5]], false);
        assert_eq!(keep.client_mode(1), Mode::Open);
    }

    #[test]
    fn a_bridge_sees_both_sides_which_do_not_see_each_other() {
        let t = Topology::bridge(&FIVE, 3);
        for n in [1, 2, 4, 5] {
            assert!(t.connected(3, n));
        }
        assert!(t.connected(1, 2));
        assert!(t.connected(4, 5));
        assert!(!t.connected(1, 4));
        assert!(!t.connected(2, 5));
    }

    #[test]
    fn one_way_maps_to_the_proxy_direction() {
        // Node 1 dials node 2: 1 -> 2 is forward on that proxy.
        assert_eq!(Topology::one_way(1, 2).link_mode(1, 2), Mode::OneWayForward);
        assert_eq!(
            Topology::one_way(2, 1).link_mode(1, 2),
            Mode::OneWayBackward
        );
        assert_eq!(Topology::one_way(2, 1).link_mode(2, 3), Mode::Open);
        assert_eq!(Topology::healed().link_mode(4, 5), Mode::Open);
    }
}
