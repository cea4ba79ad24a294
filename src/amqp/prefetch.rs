//! A channel's shared prefetch limit, `basic.qos` with `global` set (pure).
//!
//! RabbitMQ applies a global prefetch count to the channel as a whole: its
//! consumers of classic queues together hold at most that many
//! unacknowledged deliveries. Warren's queues limit each consumer on its
//! own, with credit kept in the queue's state machine, which may be
//! replicated or on another node and so cannot ask the channel before each
//! delivery. The channel therefore enforces the shared limit itself:
//!
//! - each of its consumers of a classic queue is limited at the queue to
//!   the channel's limit (or its own, if lower), so a channel with one
//!   consumer gets exactly what RabbitMQ would send it;
//! - a delivery that would take the channel above its limit waits here,
//!   in arrival order, until acks make room; with several consumers on
//!   the channel, up to (consumers − 1) × limit messages can wait, taken
//!   from their queues (unacknowledged there) but not yet sent.
//!
//! Deliveries without acks (`no_ack`) and `basic.get` do not count, and
//! quorum queues refuse consumers on a channel with a global limit, so
//! neither ever reaches this module.

use crate::message::Message;
use crate::queue::command::MsgId;
use std::collections::VecDeque;
use std::sync::Arc;

/// A delivery to a consumer, as the channel passes it on or holds it back.
#[derive(Debug)]
pub struct Delivery {
    pub queue: Arc<str>,
    pub tag: Arc<str>,
    pub id: MsgId,
    pub msg: Message,
    pub redelivered: bool,
}

#[derive(Default, Debug)]
pub struct SharedPrefetch {
    /// Unacknowledged counted deliveries allowed at once; 0 means no limit.
    limit: u16,
    /// Counted deliveries sent to the client and not yet settled.
    unacked: u32,
    /// Deliveries waiting for room, oldest first.
    held: VecDeque<Delivery>,
}

/// The limit a consumer's queue enforces for it: the lower of its own
/// prefetch and the channel's, 0 meaning no limit for either.
pub fn queue_limit(own: u16, global: u16) -> u32 {
    match (own, global) {
        (0, g) => g.into(),
        (o, 0) => o.into(),
        (o, g) => o.min(g).into(),
    }
}

impl SharedPrefetch {
    pub fn limit(&self) -> u16 {
        self.limit
    }

    /// Changes the limit; call [`release`](Self::release) afterwards, as a
    /// higher limit may let held deliveries go.
    pub fn set_limit(&mut self, limit: u16) {
        self.limit = limit;
    }

    fn has_room(&self) -> bool {
        self.limit == 0 || self.unacked < u32::from(self.limit)
    }

    /// Takes a delivery: returns it (counted) if it may go to the client
    /// now, or keeps it until there is room. Nothing overtakes a held
    /// delivery, so a consumer's messages stay in their queue's order.
    pub fn admit(&mut self, d: Delivery) -> Option<Delivery> {
        if self.held.is_empty() && self.has_room() {
            self.unacked += 1;
            return Some(d);
        }
        self.held.push_back(d);
        None
    }

    /// Held deliveries that may go now, oldest first, counted.
    pub fn release(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        while self.has_room() {
            let Some(d) = self.held.pop_front() else {
                break;
            };
            self.unacked += 1;
            out.push(d);
        }
        debug_assert!(self.held.is_empty() || !self.has_room());
        out
    }

    /// `n` counted deliveries were acked, rejected or recovered; call
    /// [`release`](Self::release) afterwards.
    pub fn settled(&mut self, n: u32) {
        debug_assert!(n <= self.unacked, "settled {n} of {}", self.unacked);
        self.unacked = self.unacked.saturating_sub(n);
    }

    /// `n` counted deliveries are unacknowledged again (`tx.rollback` of
    /// their acks).
    pub fn restored(&mut self, n: u32) {
        self.unacked += n;
    }

    /// Removes and returns the held deliveries of consumer `tag` (it was
    /// cancelled: they go back to their queue).
    pub fn take_consumer(&mut self, tag: &str) -> Vec<Delivery> {
        let (theirs, rest): (VecDeque<Delivery>, VecDeque<Delivery>) =
            std::mem::take(&mut self.held)
                .into_iter()
                .partition(|d| &*d.tag == tag);
        self.held = rest;
        theirs.into()
    }

    /// The channel is closing: its queues take back everything it had.
    pub fn clear(&mut self) {
        self.unacked = 0;
        self.held.clear();
    }

    #[cfg(test)]
    fn held_ids(&self) -> Vec<MsgId> {
        self.held.iter().map(|d| d.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(tag: &str, id: MsgId) -> Delivery {
        Delivery {
            queue: Arc::from("q"),
            tag: Arc::from(tag),
            id,
            msg: Message {
                exchange: Arc::from(""),
                routing_key: Arc::from("q"),
                raw_properties: Bytes::from_static(&[0, 0]),
                body: Bytes::new(),
                priority: 0,
                expiration_ms: None,
            },
            redelivered: false,
        }
    }

    fn ids(ds: Vec<Delivery>) -> Vec<MsgId> {
        ds.into_iter().map(|d| d.id).collect()
    }

    #[test]
    fn queue_limit_is_the_lower_nonzero_of_both() {
        assert_eq!(queue_limit(0, 0), 0);
        assert_eq!(queue_limit(5, 0), 5);
        assert_eq!(queue_limit(0, 7), 7);
        assert_eq!(queue_limit(5, 7), 5);
        assert_eq!(queue_limit(9, 7), 7);
    }

    #[test]
    fn without_a_limit_everything_goes() {
        let mut p = SharedPrefetch::default();
        for id in 1..=100 {
            assert!(p.admit(delivery("a", id)).is_some());
        }
    }

    #[test]
    fn consumers_share_the_limit_and_acks_release_in_arrival_order() {
        let mut p = SharedPrefetch::default();
        p.set_limit(2);
        assert!(p.admit(delivery("a", 1)).is_some());
        assert!(p.admit(delivery("b", 1)).is_some());
        assert!(p.admit(delivery("a", 2)).is_none());
        assert!(p.admit(delivery("b", 2)).is_none());
        assert_eq!(p.held_ids(), [2, 2]);
        p.settled(1);
        let out = p.release();
        assert_eq!((&*out[0].tag, out[0].id), ("a", 2));
        assert_eq!(out.len(), 1);
        assert!(p.release().is_empty(), "no room until the next ack");
        p.settled(2);
        assert_eq!(ids(p.release()), [2]);
        assert!(p.held.is_empty());
    }

    #[test]
    fn a_new_delivery_never_overtakes_a_held_one() {
        let mut p = SharedPrefetch::default();
        p.set_limit(1);
        assert!(p.admit(delivery("a", 1)).is_some());
        assert!(p.admit(delivery("a", 2)).is_none());
        p.settled(1);
        // Room, but 2 is still held: 3 waits behind it.
        assert!(p.admit(delivery("a", 3)).is_none());
        assert_eq!(ids(p.release()), [2]);
    }

    #[test]
    fn raising_or_removing_the_limit_releases_held_deliveries() {
        let mut p = SharedPrefetch::default();
        p.set_limit(1);
        p.admit(delivery("a", 1));
        p.admit(delivery("a", 2));
        p.admit(delivery("a", 3));
        p.admit(delivery("a", 4));
        p.set_limit(3);
        assert_eq!(ids(p.release()), [2, 3]);
        p.set_limit(0);
        assert_eq!(ids(p.release()), [4]);
    }

    #[test]
    fn a_cancelled_consumer_takes_only_its_own_held_deliveries() {
        let mut p = SharedPrefetch::default();
        p.set_limit(1);
        p.admit(delivery("a", 1));
        p.admit(delivery("b", 1));
        p.admit(delivery("a", 2));
        p.admit(delivery("b", 2));
        assert_eq!(ids(p.take_consumer("b")), [1, 2]);
        assert_eq!(p.held_ids(), [2]);
        p.settled(1);
        assert_eq!(ids(p.release()), [2]);
    }

    #[test]
    fn a_rolled_back_ack_counts_again() {
        let mut p = SharedPrefetch::default();
        p.set_limit(1);
        p.admit(delivery("a", 1));
        p.settled(1);
        p.restored(1);
        assert!(p.admit(delivery("a", 2)).is_none());
    }
}
