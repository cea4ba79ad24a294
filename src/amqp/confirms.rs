//! Publisher-confirm bookkeeping for one channel (pure).
//!
//! A publish is confirmed once every queue it was routed to has accepted it;
//! it is nacked if any refused it. Confirms leave in batches: a run of
//! acknowledged sequence numbers below the oldest one still pending is sent
//! as a single `basic.ack` with `multiple=true`.

use std::collections::BTreeMap;

#[derive(Default, Debug)]
pub struct Confirms {
    /// Sequence number of the last publish (the first is 1).
    last_seq: u64,
    /// Publishes waiting for queues: seq -> (queues still to answer, nacked).
    pending: BTreeMap<u64, (u32, bool)>,
    /// Answered since the last flush, in sequence order once sorted.
    done: Vec<(u64, bool)>,
}

impl Confirms {
    /// Registers the next publish, routed to `queues` queues; returns its
    /// sequence number. A publish routed nowhere is confirmed at once.
    pub fn publish(&mut self, queues: u32) -> u64 {
        self.last_seq += 1;
        if queues == 0 {
            self.done.push((self.last_seq, true));
        } else {
            self.pending.insert(self.last_seq, (queues, false));
        }
        self.last_seq
    }

    /// A queue answered for `seq`.
    pub fn answer(&mut self, seq: u64, accepted: bool) {
        let finished = match self.pending.get_mut(&seq) {
            Some((left, nacked)) => {
                *nacked |= !accepted;
                *left -= 1;
                (*left == 0).then_some(!*nacked)
            }
            None => None,
        };
        if let Some(ack) = finished {
            self.pending.remove(&seq);
            self.done.push((seq, ack));
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The frames to send now: `(delivery_tag, multiple, ack)`.
    pub fn flush(&mut self) -> Vec<(u64, bool, bool)> {
        if self.done.is_empty() {
            return Vec::new();
        }
        self.done.sort_unstable();
        let oldest_pending = self.pending.keys().next().copied().unwrap_or(u64::MAX);
        let mut out = Vec::new();
        // Everything below the oldest pending publish is answered, so one
        // multiple ack covers a run of acks there.
        let below: Vec<(u64, bool)> = self
            .done
            .iter()
            .copied()
            .filter(|(s, _)| *s < oldest_pending)
            .collect();
        if !below.is_empty() && below.iter().all(|(_, ack)| *ack) {
            let last = below[below.len() - 1].0;
            out.push((last, below.len() > 1, true));
        } else {
            out.extend(below.iter().map(|(s, ack)| (*s, false, *ack)));
        }
        out.extend(
            self.done
                .iter()
                .filter(|(s, _)| *s > oldest_pending)
                .map(|(s, ack)| (*s, false, *ack)),
        );
        self.done.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_below_the_oldest_pending_publish_go_out_as_one_multiple_ack() {
        let mut c = Confirms::default();
        let a = c.publish(1);
        let b = c.publish(1);
        let d = c.publish(1);
        c.answer(b, true);
        c.answer(a, true);
        assert_eq!(c.flush(), vec![(b, true, true)]);
        c.answer(d, true);
        assert_eq!(c.flush(), vec![(d, false, true)]);
    }

    #[test]
    fn a_publish_routed_to_two_queues_waits_for_both_and_any_refusal_nacks() {
        let mut c = Confirms::default();
        let a = c.publish(2);
        c.answer(a, true);
        assert!(c.flush().is_empty());
        c.answer(a, false);
        assert_eq!(c.flush(), vec![(a, false, false)]);
    }

    #[test]
    fn an_answer_above_a_pending_publish_is_sent_alone() {
        let mut c = Confirms::default();
        let a = c.publish(1);
        let b = c.publish(1);
        c.answer(b, true);
        assert_eq!(c.flush(), vec![(b, false, true)]);
        c.answer(a, true);
        assert_eq!(c.flush(), vec![(a, false, true)]);
    }

    #[test]
    fn unroutable_publishes_are_confirmed_at_once() {
        let mut c = Confirms::default();
        let a = c.publish(0);
        assert_eq!(c.flush(), vec![(a, false, true)]);
    }
}
