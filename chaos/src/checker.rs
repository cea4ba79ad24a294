//! The checker: Jepsen's total-queue model applied to a finished history.
//!
//! Once the faults have stopped, the cluster has healed and every queue has
//! been drained, each published message falls in exactly one place:
//! - **lost**: confirmed (`basic.ack`) and never delivered; the promise is
//!   broken, the run fails;
//! - **unexpected**: delivered but never attempted; the broker invented or
//!   corrupted a message, the run fails;
//! - **duplicated**: delivered more than once; a repeat marked `redelivered`
//!   is at-least-once delivery working as designed, an unmarked repeat is the
//!   known retried-forward duplicate (`docs/architecture.md`), both reported;
//! - **recovered**: nacked or unanswered, yet delivered (allowed: the outcome
//!   was unknown to the publisher);
//! - per-publisher **order violations** within one consumer subscription
//!   (reported, not failed: requeues after a crash reorder legitimately).
//!
//! It also measures **unavailability**: the windows during faults in which no
//! publish was confirmed anywhere for longer than [`UNAVAILABLE_GAP_MS`]. Only
//! the majority side can confirm, so this is the time the majority side could
//! not publish.
//!
//! Pure: a history in, a [`Verdict`] out.

use crate::history::{Event, Millis, Outcome, parse_message_id};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// A stretch without any confirm longer than this, during a fault, counts as
/// unavailable. Publishers confirm several times a second when healthy.
pub const UNAVAILABLE_GAP_MS: Millis = 1_000;

/// How many example ids each list keeps in the report.
const EXAMPLES: usize = 50;

/// Everything the checker found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Verdict {
    pub attempted: u64,
    pub confirmed: u64,
    pub nacked: u64,
    /// Attempts with no answer (connection lost, timed out, run ended).
    pub unknown: u64,
    pub deliveries: u64,
    pub delivered_distinct: u64,
    pub lost: u64,
    pub lost_examples: Vec<String>,
    pub unexpected: u64,
    pub unexpected_examples: Vec<String>,
    /// Messages delivered more than once.
    pub duplicated: u64,
    /// Of those, messages with a repeat not marked `redelivered`.
    pub duplicated_unflagged: u64,
    pub duplicated_examples: Vec<String>,
    /// Deliveries beyond the first of each message.
    pub extra_deliveries: u64,
    /// Nacked or unanswered, and delivered anyway.
    pub recovered: u64,
    pub order_violations: u64,
    pub order_examples: Vec<String>,
    pub unavailable_ms: Millis,
    pub unavailable_windows: Vec<(Millis, Millis)>,
    pub leader_changes: u64,
    /// Events the recorder could not keep; a truncated history proves nothing.
    pub dropped_events: u64,
    pub pass: bool,
}

impl Verdict {
    /// Why the run failed, in a line; empty when it passed.
    pub fn failure(&self) -> String {
        let mut why = Vec::new();
        if self.lost > 0 {
            why.push(format!("{} confirmed message(s) lost", self.lost));
        }
        if self.unexpected > 0 {
            why.push(format!("{} unexpected message(s)", self.unexpected));
        }
        if self.dropped_events > 0 {
            why.push(format!(
                "history truncated ({} events dropped)",
                self.dropped_events
            ));
        }
        why.join(", ")
    }
}

/// What the checker remembers of one message id.
#[derive(Default)]
struct Fate {
    attempted: bool,
    acked: bool,
    nacked: bool,
    deliveries: u32,
    unflagged_repeat: bool,
}

/// Checks a finished history.
pub fn check(events: &[Event], dropped_events: u64) -> Verdict {
    let mut fates: BTreeMap<&str, Fate> = BTreeMap::new();
    let mut v = Verdict {
        dropped_events,
        ..Verdict::default()
    };
    for e in events {
        match e {
            Event::Publish { id, .. } => {
                let f = fates.entry(id).or_default();
                assert!(!f.attempted, "message id {id} published twice");
                f.attempted = true;
            }
            Event::Outcome { id, outcome, .. } => {
                let f = fates.entry(id).or_default();
                // An ack anywhere wins: once confirmed, the message must exist.
                match outcome {
                    Outcome::Ack => f.acked = true,
                    Outcome::Nack => f.nacked = true,
                    Outcome::Unknown => {}
                }
            }
            Event::Delivery {
                id, redelivered, ..
            } => {
                v.deliveries += 1;
                let f = fates.entry(id).or_default();
                f.deliveries += 1;
                if f.deliveries > 1 && !redelivered {
                    f.unflagged_repeat = true;
                }
            }
            _ => {}
        }
    }
    for (id, f) in &fates {
        if f.attempted {
            v.attempted += 1;
            if f.acked {
                v.confirmed += 1;
            } else if f.nacked {
                v.nacked += 1;
            } else {
                v.unknown += 1;
            }
        }
        if f.deliveries > 0 {
            v.delivered_distinct += 1;
        }
        if f.acked && f.deliveries == 0 {
            v.lost += 1;
            push_example(&mut v.lost_examples, id);
        }
        if f.deliveries > 0 && !f.attempted {
            v.unexpected += 1;
            push_example(&mut v.unexpected_examples, id);
        }
        if f.deliveries > 1 {
            v.duplicated += 1;
            v.extra_deliveries += u64::from(f.deliveries - 1);
            if f.unflagged_repeat {
                v.duplicated_unflagged += 1;
            }
            push_example(&mut v.duplicated_examples, id);
        }
        if f.attempted && !f.acked && f.deliveries > 0 {
            v.recovered += 1;
        }
    }
    let (count, examples) = order_violations(events);
    v.order_violations = count;
    v.order_examples = examples;
    v.unavailable_windows = unavailable_windows(events, UNAVAILABLE_GAP_MS);
    v.unavailable_ms = v.unavailable_windows.iter().map(|(a, b)| b - a).sum();
    v.leader_changes = leader_changes(events);
    v.pass = v.lost == 0 && v.unexpected == 0 && v.dropped_events == 0;
    debug_assert!(v.confirmed + v.nacked + v.unknown == v.attempted);
    debug_assert!(v.delivered_distinct <= v.deliveries);
    v
}

fn push_example(list: &mut Vec<String>, id: &str) {
    if list.len() < EXAMPLES {
        list.push(id.to_owned());
    }
}

/// First deliveries (not marked `redelivered`) of one publisher's messages,
/// seen by one consumer subscription, must come in publish order. A requeue
/// after a crash is marked `redelivered` and is skipped.
fn order_violations(events: &[Event]) -> (u64, Vec<String>) {
    // (consumer, session, queue, publisher) -> highest sequence seen so far.
    let mut last: HashMap<(&str, u32, &str, u32), u64> = HashMap::new();
    let mut count = 0;
    let mut examples = Vec::new();
    for e in events {
        let Event::Delivery {
            consumer,
            session,
            queue,
            id,
            redelivered: false,
            ..
        } = e
        else {
            continue;
        };
        let Some((publisher, seq)) = parse_message_id(id) else {
            continue;
        };
        let key = (consumer.as_str(), *session, queue.as_str(), publisher);
        match last.get_mut(&key) {
            Some(prev) if seq < *prev => {
                count += 1;
                if examples.len() < EXAMPLES {
                    examples.push(format!(
                        "{consumer}#{session} got {id} after p{publisher}-{prev}"
                    ));
                }
            }
            Some(prev) => *prev = seq,
            None => {
                last.insert(key, seq);
            }
        }
    }
    (count, examples)
}

/// Fault intervals, merged where they overlap. A fault never healed lasts
/// until the last event.
pub fn fault_intervals(events: &[Event]) -> Vec<(Millis, Millis)> {
    let end_of_history = events.iter().map(Event::t).max().unwrap_or(0);
    let mut open: BTreeMap<u32, Millis> = BTreeMap::new();
    let mut spans = Vec::new();
    for e in events {
        match e {
            Event::FaultStart { t, fault, .. } => {
                open.insert(*fault, *t);
            }
            Event::FaultEnd { t, fault } => {
                if let Some(start) = open.remove(fault) {
                    spans.push((start, (*t).max(start)));
                }
            }
            _ => {}
        }
    }
    spans.extend(
        open.values()
            .map(|&start| (start, end_of_history.max(start))),
    );
    spans.sort_unstable();
    let mut merged: Vec<(Millis, Millis)> = Vec::new();
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// Windows inside fault intervals with no confirm for longer than `gap`.
pub fn unavailable_windows(events: &[Event], gap: Millis) -> Vec<(Millis, Millis)> {
    let mut acks: Vec<Millis> = events
        .iter()
        .filter_map(|e| match e {
            Event::Outcome {
                t,
                outcome: Outcome::Ack,
                ..
            } => Some(*t),
            _ => None,
        })
        .collect();
    acks.sort_unstable();
    let mut windows = Vec::new();
    for (start, end) in fault_intervals(events) {
        let mut prev = start;
        let from = acks.partition_point(|&t| t <= start);
        for &t in acks[from..].iter().take_while(|&&t| t <= end) {
            if t - prev > gap {
                windows.push((prev, t));
            }
            prev = t;
        }
        if end - prev > gap {
            windows.push((prev, end));
        }
    }
    windows
}

/// How often a queue's leader moved from one node to another (a queue
/// getting its first leader, or losing it for a while, is not a change).
fn leader_changes(events: &[Event]) -> u64 {
    let mut current: HashMap<&str, u16> = HashMap::new();
    let mut changes = 0;
    for e in events {
        if let Event::Leader {
            queue,
            node: Some(n),
            ..
        } = e
        {
            if let Some(prev) = current.insert(queue, *n) {
                if prev != *n {
                    changes += 1;
                }
            }
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(t: Millis, seq: u64) -> Event {
        Event::Publish {
            t,
            publisher: 0,
            seq,
            queue: "q".into(),
            id: format!("p0-{seq}"),
            node: 1,
        }
    }

    fn outcome(t: Millis, seq: u64, outcome: Outcome) -> Event {
        Event::Outcome {
            t,
            id: format!("p0-{seq}"),
            outcome,
        }
    }

    fn deliver(t: Millis, id: &str, redelivered: bool) -> Event {
        Event::Delivery {
            t,
            consumer: "c0".into(),
            session: 1,
            queue: "q".into(),
            id: id.into(),
            redelivered,
            node: 2,
        }
    }

    /// One lost, one duplicated (unflagged), one unexpected, one recovered,
    /// one out of order: each is reported, and the run fails.
    #[test]
    fn reports_lost_duplicated_unexpected_recovered_and_reordered() {
        let h = vec![
            publish(1, 0),
            publish(2, 1),
            publish(3, 2),
            publish(4, 3),
            publish(5, 4),
            outcome(10, 0, Outcome::Ack),
            outcome(11, 1, Outcome::Ack), // never delivered: lost
            outcome(12, 2, Outcome::Ack),
            outcome(13, 3, Outcome::Nack), // delivered anyway: recovered
            outcome(14, 4, Outcome::Unknown), // never delivered: fine
            deliver(20, "p0-0", false),
            deliver(21, "p0-3", false),
            deliver(22, "p0-2", false), // after p0-3: out of order
            deliver(23, "p0-2", false), // again, unflagged: duplicated
            deliver(24, "p9-9", false), // never published: unexpected
        ];
        let v = check(&h, 0);
        assert_eq!(v.attempted, 5);
        assert_eq!(v.confirmed, 3);
        assert_eq!(v.nacked, 1);
        assert_eq!(v.unknown, 1);
        assert_eq!((v.lost, v.lost_examples.clone()), (1, vec!["p0-1".into()]));
        assert_eq!(
            (v.unexpected, v.unexpected_examples.clone()),
            (1, vec!["p9-9".into()])
        );
        assert_eq!((v.duplicated, v.duplicated_unflagged), (1, 1));
        assert_eq!(v.duplicated_examples, vec!["p0-2".to_owned()]);
        assert_eq!(v.extra_deliveries, 1);
        assert_eq!(v.recovered, 1);
        assert_eq!(v.order_violations, 2, "{:?}", v.order_examples);
        assert_eq!(v.deliveries, 5);
        assert_eq!(v.delivered_distinct, 4);
        assert!(!v.pass);
        assert!(v.failure().contains("1 confirmed message(s) lost"));
        assert!(v.failure().contains("1 unexpected"));
    }

    #[test]
    fn a_clean_history_with_flagged_redeliveries_passes() {
        let h = vec![
            publish(1, 0),
            publish(2, 1),
            outcome(3, 0, Outcome::Ack),
            outcome(4, 1, Outcome::Ack),
            deliver(5, "p0-0", false),
            deliver(6, "p0-1", false),
            deliver(7, "p0-0", true),
        ];
        let v = check(&h, 0);
        assert!(v.pass, "{v:?}");
        assert_eq!((v.duplicated, v.duplicated_unflagged), (1, 0));
        assert_eq!(v.order_violations, 0);
        assert_eq!(v.failure(), "");
    }

    #[test]
    fn a_truncated_history_does_not_pass() {
        let v = check(&[], 3);
        assert!(!v.pass);
        assert!(v.failure().contains("truncated"));
    }

    #[test]
    fn unavailability_is_the_confirm_free_time_inside_faults() {
        let h = vec![
            Event::FaultStart {
                t: 1_000,
                fault: 1,
                kind: "kill".into(),
                description: "kill -9 n1".into(),
                nodes: vec![1],
            },
            outcome(500, 0, Outcome::Ack),
            outcome(1_500, 1, Outcome::Ack),
            outcome(4_000, 2, Outcome::Ack),
            Event::FaultEnd { t: 5_000, fault: 1 },
            outcome(6_000, 3, Outcome::Ack),
        ];
        let v = check(&h, 0);
        assert_eq!(v.unavailable_windows, vec![(1_500, 4_000)]);
        assert_eq!(v.unavailable_ms, 2_500);
        // With a finer threshold the tail of the fault counts too.
        assert_eq!(
            unavailable_windows(&h, 900),
            vec![(1_500, 4_000), (4_000, 5_000)]
        );
    }

    #[test]
    fn overlapping_and_unhealed_faults_merge() {
        let start = |t, fault| Event::FaultStart {
            t,
            fault,
            kind: "x".into(),
            description: String::new(),
            nodes: vec![],
        };
        let h = vec![
            start(0, 1),
            start(5, 2),
            Event::FaultEnd { t: 10, fault: 1 },
            Event::FaultEnd { t: 20, fault: 2 },
            start(30, 3),
            Event::Phase {
                t: 40,
                name: "done".into(),
            },
        ];
        assert_eq!(fault_intervals(&h), vec![(0, 20), (30, 40)]);
    }

    #[test]
    fn leader_changes_count_moves_only() {
        let leader = |t, node| Event::Leader {
            t,
            queue: "q".into(),
            node,
        };
        let h = vec![
            leader(0, Some(1)),
            leader(1, None),
            leader(2, Some(1)),
            leader(3, Some(2)),
            leader(4, Some(3)),
        ];
        assert_eq!(check(&h, 0).leader_changes, 2);
    }
}
