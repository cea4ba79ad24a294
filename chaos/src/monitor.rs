//! Watches the cluster through the admin API: who leads each queue, and how
//! deep each queue is, twice a second.
//!
//! Leader changes go into the history (for the timeline and the report);
//! the latest view is shared with the fault injector (to aim at a leader) and
//! with the drain (to know when the queues are empty).

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

/// Polls until `stop` turns true, recording leader changes.
pub async fn run(
    admins: Vec<(NodeId, SocketAddr)>,
    view: View,
    rec: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let mut leaders: BTreeMap<String, Option<NodeId>> = BTreeMap::new();
    while !*stop.borrow() {
        let now = agree(&poll(&admins).await);
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
    fn no_leader_means_no_depth() {
        let mut answers = BTreeMap::new();
        answers.insert(1, info(None, 3));
        let v = agree(&answers);
        assert_eq!(v["q"].leader, None);
        assert_eq!(v["q"].messages, None);
    }
}
