//! The run's history: every publish attempt and its outcome, every delivery,
//! every RPC call and its answer, every fault and every leader change,
//! stamped with milliseconds since the run started.
//!
//! Workload, fault and monitor tasks append to one shared [`Recorder`]; the
//! checker, the report and the timeline read the finished history as plain
//! data, so they can be tested on hand-made histories without a cluster.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Milliseconds since the start of the run.
pub type Millis = u64;

/// Most events one run may record. Publishers are rate-limited, so a run
/// reaches this only if it is hours long; past it, events are counted but
/// not kept, and the checker refuses to pass a truncated history.
pub const MAX_EVENTS: usize = 20_000_000;

/// What the broker said about one publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// `basic.ack`: the message is fsync'd on a majority; it must come out.
    Ack,
    /// `basic.nack`: Warren could not replicate it in time; it may or may not
    /// have been enqueued.
    Nack,
    /// No answer: the connection died or the confirm timed out.
    Unknown,
}

/// One thing that happened during the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A publish is about to be sent (recorded before the first byte goes out,
    /// so a message seen by a consumer always has its attempt recorded).
    Publish {
        t: Millis,
        publisher: u32,
        seq: u64,
        queue: String,
        id: String,
        node: u16,
    },
    /// The outcome of the publish with this id.
    Outcome {
        t: Millis,
        id: String,
        outcome: Outcome,
    },
    /// A consumer received a message; it settles it right after (ack, or
    /// reject without requeue on the dead-letter source queue). `session`
    /// counts the consumer's connections, so order is only compared within
    /// one subscription.
    Delivery {
        t: Millis,
        consumer: String,
        session: u32,
        queue: String,
        id: String,
        redelivered: bool,
        node: u16,
    },
    /// A fault began; `nodes` are the nodes it touched.
    FaultStart {
        t: Millis,
        fault: u32,
        kind: String,
        description: String,
        nodes: Vec<u16>,
    },
    /// The fault with this number was healed (process restarted, resumed,
    /// network reopened).
    FaultEnd { t: Millis, fault: u32 },
    /// Every node answers its health check again after the fault with this
    /// number stopped all of them: the moment consumers must receive again
    /// from (the checker's stall rule).
    AllReady { t: Millis, fault: u32 },
    /// An RPC client sent a request (`id` is its correlation id) and will
    /// wait for the reply on `reply_queue`, a server-named exclusive queue
    /// on `node`.
    RpcRequest {
        t: Millis,
        id: String,
        node: u16,
        reply_queue: String,
    },
    /// The reply to the request with this correlation id arrived in time.
    RpcReply { t: Millis, id: String },
    /// No reply within the client's timeout, or the connection died first.
    RpcUnanswered { t: Millis, id: String, why: String },
    /// The RPC server received the request with this correlation id and
    /// published its reply.
    RpcServed { t: Millis, id: String, node: u16 },
    /// The leader of a queue as most answering nodes report it changed.
    Leader {
        t: Millis,
        queue: String,
        node: Option<u16>,
    },
    /// Leadership over every queue, idle ones included, as most answering
    /// nodes see it: leaders per node, queues without one, and how many
    /// queues changed leader since the previous poll. Recorded when it
    /// changes; shows the elections a restart sets off.
    Leadership {
        t: Millis,
        per_node: Vec<(u16, u64)>,
        leaderless: u64,
        moved: u64,
    },
    /// The run moved to another phase (start, warmup, faults, heal,
    /// recovery, drain, final-drain, done). `recovery` begins once the
    /// final heal is complete: every node serves and every watched queue
    /// has a leader.
    Phase { t: Millis, name: String },
    /// Something worth reading in the report that is not a fault.
    Note { t: Millis, text: String },
}

impl Event {
    /// When the event happened.
    pub fn t(&self) -> Millis {
        match self {
            Event::Publish { t, .. }
            | Event::Outcome { t, .. }
            | Event::Delivery { t, .. }
            | Event::FaultStart { t, .. }
            | Event::FaultEnd { t, .. }
            | Event::AllReady { t, .. }
            | Event::RpcRequest { t, .. }
            | Event::RpcReply { t, .. }
            | Event::RpcUnanswered { t, .. }
            | Event::RpcServed { t, .. }
            | Event::Leader { t, .. }
            | Event::Leadership { t, .. }
            | Event::Phase { t, .. }
            | Event::Note { t, .. } => *t,
        }
    }
}

/// The id a publisher puts in `message_id`: unique per run.
pub fn message_id(publisher: u32, seq: u64) -> String {
    format!("p{publisher}-{seq}")
}

/// The publisher and sequence number in a [`message_id`], if it is one.
pub fn parse_message_id(id: &str) -> Option<(u32, u64)> {
    let (p, s) = id.strip_prefix('p')?.split_once('-')?;
    Some((p.parse().ok()?, s.parse().ok()?))
}

/// Shared, append-only event log with the run's clock.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    inner: Arc<Mutex<Log>>,
}

#[derive(Default)]
struct Log {
    events: Vec<Event>,
    dropped: u64,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            inner: Arc::new(Mutex::new(Log::default())),
        }
    }

    /// Milliseconds since the run started.
    pub fn now(&self) -> Millis {
        self.start.elapsed().as_millis() as Millis
    }

    /// Appends an event (or counts it as dropped past [`MAX_EVENTS`]).
    pub fn record(&self, e: Event) {
        // A panicking workload task must not take the history down with it.
        let mut log = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if log.events.len() < MAX_EVENTS {
            log.events.push(e);
        } else {
            log.dropped += 1;
        }
    }

    /// A note, stamped now (also logged, so a live run can be followed).
    pub fn note(&self, text: impl Into<String>) {
        let t = self.now();
        let text = text.into();
        tracing::info!(t, "{text}");
        self.record(Event::Note { t, text });
    }

    /// Marks the start of a phase.
    pub fn phase(&self, name: &str) {
        let t = self.now();
        tracing::info!(t, phase = name, "phase");
        self.record(Event::Phase {
            t,
            name: name.to_owned(),
        });
    }

    /// How many events are kept so far.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .events
            .len()
    }

    /// The events kept from position `from` on (a recent stretch, without
    /// copying the whole history).
    pub fn since(&self, from: usize) -> Vec<Event> {
        let log = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        log.events.get(from..).unwrap_or_default().to_vec()
    }

    /// The events so far, in the order they were recorded, and how many
    /// were dropped for lack of room.
    pub fn snapshot(&self) -> (Vec<Event>, u64) {
        let log = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (log.events.clone(), log.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_round_trip_and_foreign_ids_do_not_parse() {
        assert_eq!(parse_message_id(&message_id(7, 12345)), Some((7, 12345)));
        assert_eq!(parse_message_id("hello"), None);
        assert_eq!(parse_message_id("p1-x"), None);
    }

    #[test]
    fn events_serialise_with_their_type() {
        let e = Event::Outcome {
            t: 5,
            id: "p0-1".into(),
            outcome: Outcome::Ack,
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"type":"outcome","t":5,"id":"p0-1","outcome":"ack"}"#);
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
    }
}
