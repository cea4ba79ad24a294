//! The checker: Jepsen's total-queue model applied to a finished history,
//! plus the rules for the dead-letter chain, the RPC pair and restarts of
//! the whole cluster.
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
//! A delivery from the dead-letter source counts for the total-queue model
//! (the consumer rejects it right after); a delivery from the dead-letter
//! queue does not, it is checked by the dead-letter rule ([`dead_letters`]).
//! Dead-lettering is at most once, as in RabbitMQ: the source's leader
//! publishes the dead letter without a confirm after the reject is
//! committed, so a crash or a cut between the two loses it. The rule
//! therefore fails the run on a dead letter lost with no fault nearby, and
//! on a chain that no longer works once the cluster has healed.
//!
//! RPC replies travel through node-local queues that die with their node,
//! so unanswered calls during faults are expected; the rule is that calls
//! succeed again after the heal ([`rpc`]). After every restart of the whole
//! cluster the consumers must receive again within [`STALL_LIMIT_MS`] of
//! every node being back ([`restart_gaps`]).
//!
//! It also measures **unavailability**: the windows during faults in which no
//! publish was confirmed anywhere for longer than [`UNAVAILABLE_GAP_MS`]. Only
//! the majority side can confirm, so this is the time the majority side could
//! not publish.
//!
//! Pure: a history in, a [`Verdict`] out.

use crate::history::{Event, Millis, Outcome, parse_message_id};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A stretch without any confirm longer than this, during a fault, counts as
/// unavailable. Publishers confirm several times a second when healthy.
pub const UNAVAILABLE_GAP_MS: Millis = 1_000;

/// A dead letter lost is explained by a fault when the message was
/// rejected at most this long before the fault began or after it was
/// healed. A reject is committed and dead-lettered within milliseconds on
/// a healthy cluster; the margin covers a loaded machine and the elections
/// that follow a heal.
pub const DEAD_LETTER_GRACE_MS: Millis = 5_000;

/// Longest time, after every node is back from a restart of the whole
/// cluster, before each stall-checked queue delivers again.
pub const STALL_LIMIT_MS: Millis = 10_000;

/// How many of the last RPC calls after the heal must all be answered.
pub const RPC_LAST_CALLS: usize = 5;

/// How many example ids each list keeps in the report.
const EXAMPLES: usize = 50;

/// What the checker needs to know of the workload besides the history.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Spec {
    /// The dead-letter chain, if the run had one: (source queue,
    /// dead-letter queue).
    pub dead_letter: Option<(String, String)>,
    /// Whether an RPC client ran.
    pub rpc: bool,
    /// Queues whose consumers must receive again within
    /// [`STALL_LIMIT_MS`] after each restart of the whole cluster.
    pub stall_queues: Vec<String>,
}

/// What the dead-letter rule found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DeadLetterVerdict {
    pub source: String,
    pub target: String,
    /// Distinct messages delivered from the source (each was rejected).
    pub rejected: u64,
    /// Distinct messages seen on the dead-letter queue.
    pub dead_lettered: u64,
    /// Deliveries from the dead-letter queue.
    pub deliveries: u64,
    /// Messages seen more than once on the dead-letter queue.
    pub duplicated: u64,
    /// Rejected and never seen on the dead-letter queue.
    pub lost: u64,
    /// Of those, rejected within [`DEAD_LETTER_GRACE_MS`] of a fault: the
    /// at-most-once window, reported, not failed.
    pub lost_near_fault: u64,
    /// Of those, rejected only far from every fault: the run fails.
    pub lost_unexplained: u64,
    /// Unexplained losses first, then the others.
    pub lost_examples: Vec<String>,
    /// Seen on the dead-letter queue with no delivery from the source
    /// recorded (a message dead-lettered for another reason, e.g. a
    /// delivery limit); reported.
    pub without_reject: u64,
    /// Seen on the dead-letter queue, never published: the run fails.
    pub unexpected: u64,
    pub unexpected_examples: Vec<String>,
    /// Distinct messages rejected after the heal.
    pub rejected_after_heal: u64,
    /// Of those, seen on the dead-letter queue. None at all means the
    /// chain stopped working: the run fails.
    pub dead_lettered_after_heal: u64,
    pub pass: bool,
}

/// What the RPC rule found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RpcVerdict {
    pub requests: u64,
    pub answered: u64,
    pub unanswered: u64,
    /// Requests the server saw and answered (the reply may still be lost).
    pub served: u64,
    /// Requests sent after the heal.
    pub after_heal: u64,
    /// Of the last [`RPC_LAST_CALLS`] requests after the heal, how many
    /// were answered; the run fails unless all of them were.
    pub last_answered: u64,
    /// Unanswered requests after the heal, with the client's reason.
    pub unanswered_after_heal: Vec<String>,
    pub pass: bool,
}

/// The recovery after one restart of the whole cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RestartGap {
    pub fault: u32,
    /// When every node answered its health check again.
    pub ready_ms: Millis,
    /// From then to the moment every stall-checked queue had delivered
    /// again; `None` when one never did.
    pub delivery_gap_ms: Option<Millis>,
    /// The queue that took longest (or never delivered).
    pub slowest_queue: String,
    /// From then to the first confirm anywhere; `None` when none came.
    pub confirm_gap_ms: Option<Millis>,
}

impl RestartGap {
    /// Whether the consumers stalled after this restart.
    pub fn stalled(&self) -> bool {
        self.delivery_gap_ms.is_none_or(|g| g > STALL_LIMIT_MS)
    }
}

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
    /// Leader moves over every queue, idle ones included (the elections
    /// that faults, restarts and rejoins set off).
    pub leader_moves_all: u64,
    /// When the final heal was complete (the `recovery` phase).
    pub healed_at: Option<Millis>,
    pub dead_letter: Option<DeadLetterVerdict>,
    pub rpc: Option<RpcVerdict>,
    /// One entry per restart of the whole cluster every node came back from.
    pub restarts: Vec<RestartGap>,
    /// Restarts after which a consumer stalled.
    pub stalls: u64,
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
        if let Some(d) = &self.dead_letter {
            if d.lost_unexplained > 0 {
                why.push(format!(
                    "{} dead letter(s) lost with no fault nearby",
                    d.lost_unexplained
                ));
            }
            if d.unexpected > 0 {
                why.push(format!("{} unexpected dead letter(s)", d.unexpected));
            }
            if d.dead_lettered_after_heal == 0 {
                why.push(format!(
                    "nothing dead-lettered after the heal ({} rejected)",
                    d.rejected_after_heal
                ));
            }
        }
        if let Some(r) = &self.rpc {
            if !r.pass {
                why.push(format!(
                    "RPC did not recover after the heal ({} of the last {} calls answered, {} calls after the heal)",
                    r.last_answered, RPC_LAST_CALLS, r.after_heal
                ));
            }
        }
        if self.stalls > 0 {
            why.push(format!(
                "consumers stalled after {} restart(s) of every node (no delivery within {}s)",
                self.stalls,
                STALL_LIMIT_MS / 1000
            ));
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
pub fn check(events: &[Event], dropped_events: u64, spec: &Spec) -> Verdict {
    let mut fates: BTreeMap<&str, Fate> = BTreeMap::new();
    let mut v = Verdict {
        dropped_events,
        ..Verdict::default()
    };
    let dead_letter_queue = spec.dead_letter.as_ref().map(|(_, dlq)| dlq.as_str());
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
            Event::Delivery { queue, .. } if Some(queue.as_str()) == dead_letter_queue => {}
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
    let (count, examples) = order_violations(events, dead_letter_queue);
    v.order_violations = count;
    v.order_examples = examples;
    v.unavailable_windows = unavailable_windows(events, UNAVAILABLE_GAP_MS);
    v.unavailable_ms = v.unavailable_windows.iter().map(|(a, b)| b - a).sum();
    v.leader_changes = leader_changes(events);
    v.leader_moves_all = events
        .iter()
        .map(|e| match e {
            Event::Leadership { moved, .. } => *moved,
            _ => 0,
        })
        .sum();
    v.healed_at = healed_at(events);
    v.dead_letter = spec
        .dead_letter
        .as_ref()
        .map(|(source, dlq)| dead_letters(events, source, dlq, v.healed_at));
    v.rpc = spec.rpc.then(|| rpc(events, v.healed_at));
    v.restarts = restart_gaps(events, &spec.stall_queues);
    v.stalls = v.restarts.iter().filter(|r| r.stalled()).count() as u64;
    v.pass = v.lost == 0
        && v.unexpected == 0
        && v.dropped_events == 0
        && v.dead_letter.as_ref().is_none_or(|d| d.pass)
        && v.rpc.as_ref().is_none_or(|r| r.pass)
        && v.stalls == 0;
    debug_assert!(v.confirmed + v.nacked + v.unknown == v.attempted);
    debug_assert!(v.delivered_distinct <= v.deliveries);
    v
}

/// What has not worked again since the heal, judged on the events recorded
/// since then (`healed_at` on): every stall-checked queue must have
/// confirmed a publish made since the heal and delivered a message, the
/// dead-letter chain must have dead-lettered a message rejected since the
/// heal, and the last [`RPC_LAST_CALLS`] RPC calls must have been answered.
/// Empty once everything works; the run keeps its load on until then (or a
/// deadline), so a slow recovery is measured instead of cut short.
pub fn still_recovering(events: &[Event], spec: &Spec, healed_at: Millis) -> Vec<String> {
    let mut queue_of: HashMap<&str, &str> = HashMap::new();
    let mut confirmed: HashSet<&str> = HashSet::new();
    let mut delivered: HashSet<&str> = HashSet::new();
    for e in events {
        match e {
            Event::Publish { t, id, queue, .. } if *t >= healed_at => {
                queue_of.insert(id, queue);
            }
            Event::Outcome {
                id,
                outcome: Outcome::Ack,
                ..
            } => {
                if let Some(q) = queue_of.get(id.as_str()) {
                    confirmed.insert(q);
                }
            }
            Event::Delivery { t, queue, .. } if *t >= healed_at => {
                delivered.insert(queue);
            }
            _ => {}
        }
    }
    let mut missing = Vec::new();
    for q in &spec.stall_queues {
        if !confirmed.contains(q.as_str()) {
            missing.push(format!("a confirm on {q}"));
        }
        if !delivered.contains(q.as_str()) {
            missing.push(format!("a delivery from {q}"));
        }
    }
    if let Some((source, dlq)) = &spec.dead_letter {
        if dead_letters(events, source, dlq, Some(healed_at)).dead_lettered_after_heal == 0 {
            missing.push(format!("a message rejected from {source} reaching {dlq}"));
        }
    }
    if spec.rpc && !rpc(events, Some(healed_at)).pass {
        missing.push(format!("{RPC_LAST_CALLS} RPC calls answered in a row"));
    }
    missing
}

/// When the final heal was complete: the start of the `recovery` phase.
fn healed_at(events: &[Event]) -> Option<Millis> {
    events.iter().rev().find_map(|e| match e {
        Event::Phase { t, name } if name == "recovery" => Some(*t),
        _ => None,
    })
}

/// The dead-letter rule. A message delivered from `source` was rejected
/// (the consumer there rejects everything without requeue) and must show
/// up on `dlq`. One that never does is a loss; it is explained when one of
/// its rejects came within [`DEAD_LETTER_GRACE_MS`] of a fault (the
/// at-most-once window) and fails the run otherwise. Messages rejected
/// after the heal must reach the dead-letter queue: none at all means the
/// chain is broken.
pub fn dead_letters(
    events: &[Event],
    source: &str,
    dlq: &str,
    healed_at: Option<Millis>,
) -> DeadLetterVerdict {
    #[derive(Default)]
    struct Letter {
        rejects: Vec<Millis>,
        dead: u32,
    }
    let mut published: HashSet<&str> = HashSet::new();
    let mut letters: BTreeMap<&str, Letter> = BTreeMap::new();
    let mut d = DeadLetterVerdict {
        source: source.to_owned(),
        target: dlq.to_owned(),
        ..DeadLetterVerdict::default()
    };
    for e in events {
        match e {
            Event::Publish { id, .. } => {
                published.insert(id);
            }
            Event::Delivery { t, queue, id, .. } if queue == source => {
                letters.entry(id).or_default().rejects.push(*t);
            }
            Event::Delivery { queue, id, .. } if queue == dlq => {
                d.deliveries += 1;
                letters.entry(id).or_default().dead += 1;
            }
            _ => {}
        }
    }
    let near: Vec<(Millis, Millis)> = fault_intervals(events)
        .into_iter()
        .map(|(a, b)| {
            (
                a.saturating_sub(DEAD_LETTER_GRACE_MS),
                b + DEAD_LETTER_GRACE_MS,
            )
        })
        .collect();
    let near_fault = |t: Millis| near.iter().any(|&(a, b)| a <= t && t <= b);
    let mut explained = Vec::new();
    for (id, l) in &letters {
        if !l.rejects.is_empty() {
            d.rejected += 1;
        }
        if l.dead > 0 {
            d.dead_lettered += 1;
        }
        if l.dead > 1 {
            d.duplicated += 1;
        }
        if l.dead > 0 && !published.contains(id) {
            d.unexpected += 1;
            push_example(&mut d.unexpected_examples, id);
        } else if l.dead > 0 && l.rejects.is_empty() {
            d.without_reject += 1;
        }
        let after_heal = healed_at.is_some_and(|h| l.rejects.iter().any(|&t| t >= h));
        if after_heal {
            d.rejected_after_heal += 1;
            if l.dead > 0 {
                d.dead_lettered_after_heal += 1;
            }
        }
        if !l.rejects.is_empty() && l.dead == 0 {
            d.lost += 1;
            if l.rejects.iter().any(|&t| near_fault(t)) {
                d.lost_near_fault += 1;
                explained.push(*id);
            } else {
                d.lost_unexplained += 1;
                push_example(&mut d.lost_examples, id);
            }
        }
    }
    for id in explained {
        push_example(&mut d.lost_examples, id);
    }
    d.pass = d.lost_unexplained == 0 && d.unexpected == 0 && d.dead_lettered_after_heal > 0;
    d
}

/// The RPC rule: of the calls made after the heal, the last
/// [`RPC_LAST_CALLS`] must all have been answered (and there must be that
/// many). Earlier calls may go unanswered: their replies crossed faults.
pub fn rpc(events: &[Event], healed_at: Option<Millis>) -> RpcVerdict {
    let mut requests: Vec<(Millis, &str)> = Vec::new();
    let mut answered: HashSet<&str> = HashSet::new();
    let mut why: HashMap<&str, &str> = HashMap::new();
    let mut served: BTreeSet<&str> = BTreeSet::new();
    for e in events {
        match e {
            Event::RpcRequest { t, id, .. } => requests.push((*t, id)),
            Event::RpcReply { id, .. } => {
                answered.insert(id);
            }
            Event::RpcUnanswered { id, why: w, .. } => {
                why.insert(id, w);
            }
            Event::RpcServed { id, .. } => {
                served.insert(id);
            }
            _ => {}
        }
    }
    requests.sort_unstable();
    let mut r = RpcVerdict {
        requests: requests.len() as u64,
        served: served.len() as u64,
        ..RpcVerdict::default()
    };
    r.answered = requests
        .iter()
        .filter(|(_, id)| answered.contains(id))
        .count() as u64;
    r.unanswered = r.requests - r.answered;
    let after: Vec<&str> = match healed_at {
        Some(h) => requests
            .iter()
            .filter(|(t, _)| *t >= h)
            .map(|(_, id)| *id)
            .collect(),
        None => Vec::new(),
    };
    r.after_heal = after.len() as u64;
    for id in after.iter().filter(|id| !answered.contains(*id)) {
        if r.unanswered_after_heal.len() < EXAMPLES {
            let w = why.get(id).copied().unwrap_or("no outcome recorded");
            r.unanswered_after_heal.push(format!("{id}: {w}"));
        }
    }
    let last = &after[after.len().saturating_sub(RPC_LAST_CALLS)..];
    r.last_answered = last.iter().filter(|id| answered.contains(*id)).count() as u64;
    r.pass = last.len() == RPC_LAST_CALLS && r.last_answered == RPC_LAST_CALLS as u64;
    r
}

/// For every restart of the whole cluster that every node came back from
/// (`AllReady`), how long until each of `queues` delivered again and until
/// the first confirm.
pub fn restart_gaps(events: &[Event], queues: &[String]) -> Vec<RestartGap> {
    let mut deliveries: BTreeMap<&str, Vec<Millis>> =
        queues.iter().map(|q| (q.as_str(), Vec::new())).collect();
    let mut acks = Vec::new();
    for e in events {
        match e {
            Event::Delivery { t, queue, .. } => {
                if let Some(ts) = deliveries.get_mut(queue.as_str()) {
                    ts.push(*t);
                }
            }
            Event::Outcome {
                t,
                outcome: Outcome::Ack,
                ..
            } => acks.push(*t),
            _ => {}
        }
    }
    for ts in deliveries.values_mut() {
        ts.sort_unstable();
    }
    acks.sort_unstable();
    let first_after =
        |ts: &[Millis], from: Millis| ts.get(ts.partition_point(|&t| t < from)).map(|&t| t - from);
    events
        .iter()
        .filter_map(|e| match e {
            Event::AllReady { t, fault } => Some((*t, *fault)),
            _ => None,
        })
        .map(|(ready, fault)| {
            let mut gap = Some(0);
            let mut slowest = String::new();
            for (q, ts) in &deliveries {
                let g = first_after(ts, ready);
                let worse = match (g, gap) {
                    (None, Some(_)) => true,
                    (Some(g), Some(cur)) => g >= cur,
                    (_, None) => false,
                };
                if worse {
                    gap = g;
                    slowest = (*q).to_owned();
                }
            }
            RestartGap {
                fault,
                ready_ms: ready,
                delivery_gap_ms: gap,
                slowest_queue: slowest,
                confirm_gap_ms: first_after(&acks, ready),
            }
        })
        .collect()
}

fn push_example(list: &mut Vec<String>, id: &str) {
    if list.len() < EXAMPLES {
        list.push(id.to_owned());
    }
}

/// First deliveries (not marked `redelivered`) of one publisher's messages,
/// seen by one consumer subscription, must come in publish order. A requeue
/// after a crash is marked `redelivered` and is skipped.
fn order_violations(events: &[Event], skip_queue: Option<&str>) -> (u64, Vec<String>) {
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
        // Dead letters arrive in the order of the rejects, not of the
        // publishes.
        if Some(queue.as_str()) == skip_queue {
            continue;
        }
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
        let v = check(&h, 0, &Spec::default());
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
        let v = check(&h, 0, &Spec::default());
        assert!(v.pass, "{v:?}");
        assert_eq!((v.duplicated, v.duplicated_unflagged), (1, 0));
        assert_eq!(v.order_violations, 0);
        assert_eq!(v.failure(), "");
    }

    #[test]
    fn a_truncated_history_does_not_pass() {
        let v = check(&[], 3, &Spec::default());
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
        let v = check(&h, 0, &Spec::default());
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
        assert_eq!(check(&h, 0, &Spec::default()).leader_changes, 2);
    }

    fn delivery_on(t: Millis, queue: &str, id: &str) -> Event {
        Event::Delivery {
            t,
            consumer: format!("on-{queue}"),
            session: 1,
            queue: queue.into(),
            id: id.into(),
            redelivered: false,
            node: 1,
        }
    }

    fn phase(t: Millis, name: &str) -> Event {
        Event::Phase {
            t,
            name: name.into(),
        }
    }

    fn fault(t: Millis, end: Millis) -> [Event; 2] {
        [
            Event::FaultStart {
                t,
                fault: 1,
                kind: "kill".into(),
                description: "kill -9 leader n1".into(),
                nodes: vec![1],
            },
            Event::FaultEnd { t: end, fault: 1 },
        ]
    }

    fn chain() -> Spec {
        Spec {
            dead_letter: Some(("src".into(), "dlq".into())),
            ..Spec::default()
        }
    }

    /// Five messages confirmed into the source, all rejected; one lost in
    /// flight during a fault, one lost with no fault anywhere near.
    fn dead_letter_history() -> Vec<Event> {
        let mut h = Vec::new();
        for seq in 0..5 {
            h.push(publish(seq, seq));
            h.push(outcome(seq + 1, seq, Outcome::Ack));
        }
        let [start, end] = fault(20_000, 25_000);
        h.extend([
            delivery_on(1_000, "src", "p0-0"),
            delivery_on(1_100, "dlq", "p0-0"),
            // Rejected 2 s before the fault: within the grace, explained.
            delivery_on(18_000, "src", "p0-1"),
            start,
            end,
            // Rejected 10 s after the heal of the fault: unexplained.
            delivery_on(35_000, "src", "p0-2"),
            phase(40_000, "recovery"),
            delivery_on(41_000, "src", "p0-3"),
            delivery_on(41_050, "dlq", "p0-3"),
            delivery_on(41_060, "dlq", "p0-3"),
            delivery_on(42_000, "src", "p0-4"),
            delivery_on(42_050, "dlq", "p0-4"),
        ]);
        h
    }

    #[test]
    fn dead_letters_lost_far_from_faults_fail_the_run() {
        let v = check(&dead_letter_history(), 0, &chain());
        // The dead-letter queue's deliveries are not repeats of the
        // source's: nothing is lost or duplicated in the total-queue sense.
        assert_eq!((v.lost, v.duplicated, v.deliveries), (0, 0, 5));
        let d = v.dead_letter.clone().unwrap();
        assert_eq!((d.rejected, d.dead_lettered, d.deliveries), (5, 3, 4));
        assert_eq!(d.duplicated, 1);
        assert_eq!((d.lost, d.lost_near_fault, d.lost_unexplained), (2, 1, 1));
        assert_eq!(d.lost_examples, vec!["p0-2".to_owned(), "p0-1".to_owned()]);
        assert_eq!((d.rejected_after_heal, d.dead_lettered_after_heal), (2, 2));
        assert!(!d.pass && !v.pass);
        assert!(
            v.failure()
                .contains("1 dead letter(s) lost with no fault nearby"),
            "{}",
            v.failure()
        );
    }

    #[test]
    fn dead_letters_lost_only_near_faults_pass() {
        let h: Vec<Event> = dead_letter_history()
            .into_iter()
            .filter(|e| !matches!(e, Event::Delivery { id, .. } if id == "p0-2"))
            .collect();
        let v = check(&h, 0, &chain());
        // p0-2 was confirmed and never delivered from the source: a plain
        // loss, whatever the dead-letter rule says.
        assert_eq!(v.lost, 1);
        let d = v.dead_letter.unwrap();
        assert_eq!((d.lost, d.lost_near_fault, d.lost_unexplained), (1, 1, 0));
        assert!(d.pass);
    }

    #[test]
    fn a_chain_that_stops_after_the_heal_fails_and_strangers_are_unexpected() {
        let h = vec![
            publish(1, 0),
            outcome(2, 0, Outcome::Ack),
            Event::FaultStart {
                t: 3,
                fault: 1,
                kind: "x".into(),
                description: String::new(),
                nodes: vec![],
            },
            phase(10, "recovery"),
            delivery_on(11, "src", "p0-0"),
            delivery_on(12, "dlq", "p7-7"),
        ];
        let v = check(&h, 0, &chain());
        let d = v.dead_letter.clone().unwrap();
        // The fault never ends, so the loss of p0-0 is explained, but the
        // only reject after the heal went nowhere.
        assert_eq!((d.lost_near_fault, d.lost_unexplained), (1, 0));
        assert_eq!((d.rejected_after_heal, d.dead_lettered_after_heal), (1, 0));
        assert_eq!(d.unexpected_examples, vec!["p7-7".to_owned()]);
        assert!(!v.pass);
        let why = v.failure();
        assert!(
            why.contains("nothing dead-lettered after the heal"),
            "{why}"
        );
        assert!(why.contains("1 unexpected dead letter(s)"), "{why}");
    }

    fn call(t: Millis, n: u64, answered: bool) -> Vec<Event> {
        let id = format!("rpc-{n}");
        vec![
            Event::RpcRequest {
                t,
                id: id.clone(),
                node: 2,
                reply_queue: "amq.gen-1".into(),
            },
            if answered {
                Event::RpcReply { t: t + 10, id }
            } else {
                Event::RpcUnanswered {
                    t: t + 5_000,
                    id,
                    why: "no reply within 5s".into(),
                }
            },
        ]
    }

    #[test]
    fn rpc_must_answer_the_last_calls_after_the_heal() {
        let rpc_spec = Spec {
            rpc: true,
            ..Spec::default()
        };
        let mut h = vec![phase(1_000, "recovery")];
        // Lost during a fault, before the heal: allowed.
        h.extend(call(500, 0, false));
        // After the heal: one early miss, then five answered calls.
        h.extend(call(1_100, 1, false));
        for n in 2..7 {
            h.extend(call(1_000 * n + 5_000, n, true));
        }
        let v = check(&h, 0, &rpc_spec);
        let r = v.rpc.clone().unwrap();
        assert_eq!((r.requests, r.answered, r.unanswered), (7, 5, 2));
        assert_eq!((r.after_heal, r.last_answered), (6, 5));
        assert_eq!(r.unanswered_after_heal, vec!["rpc-1: no reply within 5s"]);
        assert!(v.pass, "{}", v.failure());

        // The last call unanswered: the client did not recover.
        h.extend(call(20_000, 7, false));
        let v = check(&h, 0, &rpc_spec);
        assert_eq!(v.rpc.as_ref().unwrap().last_answered, 4);
        assert!(!v.pass);
        assert!(v.failure().contains("RPC did not recover"));

        // Fewer than five calls after the heal prove nothing: fail.
        let short: Vec<Event> = std::iter::once(phase(0, "recovery"))
            .chain((0..3).flat_map(|n| call(100 * n + 1, n, true)))
            .collect();
        assert!(!check(&short, 0, &rpc_spec).pass);
    }

    #[test]
    fn recovery_needs_every_queue_the_chain_and_the_rpc_pair_working_again() {
        let spec = Spec {
            dead_letter: Some(("src".into(), "dlq".into())),
            rpc: true,
            stall_queues: vec!["q".into(), "src".into()],
        };
        let publish_to = |t, seq: u64, queue: &str| Event::Publish {
            t,
            publisher: 0,
            seq,
            queue: queue.into(),
            id: format!("p0-{seq}"),
            node: 1,
        };
        // Before the heal (at 100) everything worked; that does not count.
        let mut h = vec![
            publish_to(10, 0, "q"),
            outcome(11, 0, Outcome::Ack),
            delivery_on(12, "q", "p0-0"),
        ];
        let missing = still_recovering(&h, &spec, 100);
        assert_eq!(missing.len(), 6, "{missing:?}");
        h.extend([
            publish_to(110, 1, "q"),
            outcome(111, 1, Outcome::Ack),
            delivery_on(112, "q", "p0-1"),
            publish_to(120, 2, "src"),
            outcome(121, 2, Outcome::Ack),
            delivery_on(122, "src", "p0-2"),
        ]);
        assert_eq!(
            still_recovering(&h, &spec, 100),
            vec![
                "a message rejected from src reaching dlq".to_owned(),
                "5 RPC calls answered in a row".to_owned()
            ]
        );
        h.push(delivery_on(130, "dlq", "p0-2"));
        for n in 0..5 {
            h.extend(call(200 + n * 100, n, true));
        }
        assert!(still_recovering(&h, &spec, 100).is_empty());
    }

    #[test]
    fn consumers_must_receive_within_ten_seconds_of_every_restart() {
        let spec = Spec {
            stall_queues: vec!["a".into(), "b".into()],
            ..Spec::default()
        };
        let ready = |t, fault| Event::AllReady { t, fault };
        let mut h = vec![
            publish(0, 0),
            outcome(1, 0, Outcome::Ack),
            ready(10_000, 1),
            outcome(12_000, 0, Outcome::Ack),
            delivery_on(11_000, "a", "p0-0"),
            delivery_on(13_500, "b", "p0-0"),
            ready(30_000, 2),
            delivery_on(31_000, "a", "p0-0"),
            delivery_on(40_001, "b", "p0-0"),
        ];
        let v = check(&h, 0, &spec);
        let gaps: Vec<_> = v.restarts.iter().map(|r| r.delivery_gap_ms).collect();
        assert_eq!(gaps, vec![Some(3_500), Some(10_001)]);
        assert_eq!(v.restarts[0].confirm_gap_ms, Some(2_000));
        assert_eq!(v.restarts[1].confirm_gap_ms, None);
        assert_eq!(v.restarts[1].slowest_queue, "b");
        assert_eq!(v.stalls, 1);
        assert!(!v.pass);
        assert!(v.failure().contains("stalled after 1 restart(s)"));

        // A queue that never delivers again stalls too.
        h.push(ready(50_000, 3));
        h.push(delivery_on(50_100, "a", "p0-0"));
        let v = check(&h, 0, &spec);
        assert_eq!(v.restarts[2].delivery_gap_ms, None);
        assert_eq!(v.restarts[2].slowest_queue, "b");
        assert_eq!(v.stalls, 2);
    }
}
