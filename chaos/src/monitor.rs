//! Watches the cluster through the admin API: who leads each queue, and how
//! deep each queue is, twice a second.
//!
//! Leader changes go into the history (for the timeline and the report);
//! the latest view is shared with the fault injector (to aim at a leader) and
//! with the drain (to know when the queues are empty). Only the queues the
//! workload uses are watched: the idle queues would drown the timeline in
//! leader marks and turn "the leader of a queue" into the leader of some
//! idle queue.

use crate::cluster::{QueueInfo, queues_of};
use crate::history::{Event, Recorder};
use crate::network::NodeId;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How often the admin API is polled.
const POLL: Duration = Duration::from_millis(500);

/// What the monitor last saw of one queue.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueView {
    /// The leader most answering nodes agree on.
    pub leader: Option<NodeId>,
    pub members: Vec<NodeId>,
    /// Depth (ready + unacknowledged) as the leader reports it.
    pub messages: Option<u64>,
}

/// The latest view, shared.
#[derive(Clone, Default)]
pub struct View(Arc<Mutex<BTreeMap<String, QueueView>>>);

impl View {
    pub fn get(&self) -> BTreeMap<String, QueueView> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, v: BTreeMap<String, QueueView>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = v;
    }
}

/// Asks every node concurrently; nodes that do not answer within a second
/// are left out.
pub async fn poll(admins: &[(NodeId, SocketAddr)]) -> BTreeMap<NodeId, Vec<QueueInfo>> {
    let mut set = JoinSet::new();
    for &(id, addr) in admins {
        set.spawn(async move { (id, queues_of(addr).await) });
    }
    let mut answers = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok((id, Some(qs))) = r {
            answers.insert(id, qs);
        }
    }
    answers
}

/// Folds the nodes' answers into one view per queue: the leader named by
/// the most nodes (a cut-off old leader may still name itself; the majority
/// side outvotes it), and the depth the leader itself reports.
pub fn agree(answers: &BTreeMap<NodeId, Vec<QueueInfo>>) -> BTreeMap<String, QueueView> {
    let mut votes: BTreeMap<&str, BTreeMap<NodeId, usize>> = BTreeMap::new();
    let mut members: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    for qs in answers.values() {
        for q in qs {
            let v = votes.entry(&q.name).or_default();
            if let Some(l) = q.leader {
                *v.entry(l).or_default() += 1;
            }
            let m = members.entry(&q.name).or_default();
            if m.is_empty() {
                *m = q.members.clone();
            }
        }
    }
    votes
        .into_iter()
        .map(|(name, v)| {
            // Most votes; among equals the lowest id, so the view is stable.
            let leader = v
                .iter()
                .max_by_key(|&(&node, &n)| (n, std::cmp::Reverse(node)))
                .map(|(&node, _)| node);
            let messages = leader.and_then(|l| {
                answers
                    .get(&l)?
                    .iter()
                    .find(|q| q.name == name)
                    .map(|q| q.messages)
            });
            let view = QueueView {
                leader,
                members: members.remove(name).unwrap_or_default(),
                messages,
            };
            (name.to_owned(), view)
        })
        .collect()
}

/// Leaders per node, leaderless queues, and queues whose leader moved to
/// another node since `before` (which is updated), over every queue.
pub fn leadership(
    now: &BTreeMap<String, QueueView>,
    before: &mut BTreeMap<String, NodeId>,
) -> (Vec<(NodeId, u64)>, u64, u64) {
    let mut per_node: BTreeMap<NodeId, u64> = BTreeMap::new();
    let (mut leaderless, mut moved) = (0, 0);
    for (name, q) in now {
        match q.leader {
            Some(l) => {
                *per_node.entry(l).or_default() += 1;
                if before.insert(name.clone(), l).is_some_and(|prev| prev != l) {
                    moved += 1;
                }
            }
            None => leaderless += 1,
        }
    }
    (per_node.into_iter().collect(), leaderless, moved)
}

/// Polls until `stop` turns true, recording the leader changes of the
/// `watched` queues and the leadership over all of them.
pub async fn run(
    admins: Vec<(NodeId, SocketAddr)>,
    watched: Vec<String>,
    view: View,
    rec: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let mut leaders: BTreeMap<String, Option<NodeId>> = BTreeMap::new();
    let mut all_before = BTreeMap::new();
    let mut last_leadership = None;
    while !*stop.borrow() {
        let mut now = agree(&poll(&admins).await);
        // Only when some node answered: silence says nothing of leaders.
        if !now.is_empty() {
            let (per_node, leaderless, moved) = leadership(&now, &mut all_before);
            if moved > 0 || last_leadership.as_ref() != Some(&(per_node.clone(), leaderless)) {
                rec.record(Event::Leadership {
                    t: rec.now(),
                    per_node: per_node.clone(),
                    leaderless,
                    moved,
                });
                last_leadership = Some((per_node, leaderless));
            }
        }
        now.retain(|name, _| watched.contains(name));
        for (name, q) in &now {
            if leaders.get(name) != Some(&q.leader) {
                rec.record(Event::Leader {
                    t: rec.now(),
                    queue: name.clone(),
                    node: q.leader,
                });
                leaders.insert(name.clone(), q.leader);
            }
        }
        // A queue nobody answered for keeps its last view: silence is not
        // an empty queue.
        let mut merged = view.get();
        merged.extend(now);
        view.set(merged);
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(leader: Option<NodeId>, messages: u64) -> Vec<QueueInfo> {
        vec![QueueInfo {
            name: "q".into(),
            leader,
            members: vec![1, 2, 3],
            messages,
        }]
    }

    #[test]
    fn the_majority_names_the_leader_and_the_leader_gives_the_depth() {
        let mut answers = BTreeMap::new();
        answers.insert(1, info(Some(1), 7)); // cut off, still believes
        answers.insert(2, info(Some(3), 5));
        answers.insert(3, info(Some(3), 4));
        let v = agree(&answers);
        assert_eq!(v["q"].leader, Some(3));
        assert_eq!(v["q"].messages, Some(4));
        assert_eq!(v["q"].members, vec![1, 2, 3]);
    }

    #[test]
    fn leadership_counts_leaders_and_moves_over_every_queue() {
        let view = |leaders: &[Option<NodeId>]| -> BTreeMap<String, QueueView> {
            leaders
                .iter()
                .enumerate()
                .map(|(i, &leader)| {
                    let q = QueueView {
                        leader,
                        ..QueueView::default()
                    };
                    (format!("q{i}"), q)
                })
                .collect()
        };
        let mut before = BTreeMap::new();
        let first = leadership(&view(&[Some(3), Some(3), Some(2), None]), &mut before);
        assert_eq!(first, (vec![(2, 1), (3, 2)], 1, 0));
        // q0 moves, q1 loses its leader (not a move yet), q3 gets one.
        let second = leadership(&view(&[Some(1), None, Some(2), Some(2)]), &mut before);
        assert_eq!(second, (vec![(1, 1), (2, 2)], 1, 1));
        // q1 comes back on another node than before: a move.
        let third = leadership(&view(&[Some(1), Some(1), Some(2), Some(2)]), &mut before);
        assert_eq!(third, (vec![(1, 2), (2, 2)], 0, 1));
    }

    #[test]
    fn no_leader_means_no_depth() {
        let mut answers = BTreeMap::new();
        answers.insert(1, info(None, 3));
        let v = agree(&answers);
        assert_eq!(v["q"].leader, None);
        assert_eq!(v["q"].messages, None);
    }
}
