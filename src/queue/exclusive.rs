//! Exclusive consumers (`basic.consume` with `exclusive`): while one is
//! registered a queue admits no other consumer, and an exclusive consumer
//! is refused while others are there. Shared by the node-local runner and
//! the replicated queue's state machine, which both sit around a
//! `QueueState` that knows nothing of exclusivity.

use super::command::{Command, ConsumerSpec, OwnerId};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The queue's exclusive consumer, if it has one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Exclusive(Option<(OwnerId, Arc<str>)>);

impl Exclusive {
    /// Forgets the exclusive consumer when `cmd` removes it (its cancel,
    /// or its channel going away).
    pub fn observe(&mut self, cmd: &Command) {
        let gone = match (cmd, &self.0) {
            (Command::Cancel { owner, tag, .. }, Some((o, t))) => o == owner && t == tag,
            (Command::OwnerDown { owner, .. }, Some((o, _))) => o == owner,
            _ => false,
        };
        if gone {
            self.0 = None;
        }
    }

    /// Admits a consumer, given how many the queue has, or returns the
    /// reason it is refused (RabbitMQ's text, sent with 403).
    pub fn admit(
        &mut self,
        spec: &ConsumerSpec,
        exclusive: bool,
        consumers: u64,
        vhost: &str,
        queue: &str,
    ) -> Result<(), String> {
        if self.0.is_some() || (exclusive && consumers > 0) {
            return Err(format!(
                "queue '{queue}' in vhost '{vhost}' in exclusive use"
            ));
        }
        if exclusive {
            self.0 = Some((spec.owner, spec.tag.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(owner: OwnerId, tag: &str) -> ConsumerSpec {
        ConsumerSpec {
            owner,
            tag: Arc::from(tag),
            prefetch: 0,
            priority: 0,
            no_ack: false,
        }
    }

    #[test]
    fn an_exclusive_consumer_keeps_others_out_until_it_goes() {
        let mut x = Exclusive::default();
        assert!(x.admit(&spec(1, "a"), true, 0, "/", "q").is_ok());
        assert!(x.admit(&spec(2, "b"), false, 1, "/", "q").is_err());
        x.observe(&Command::Cancel {
            owner: 1,
            tag: Arc::from("other"),
            now_ms: 0,
        });
        assert!(x.admit(&spec(2, "b"), false, 1, "/", "q").is_err());
        x.observe(&Command::OwnerDown {
            owner: 1,
            now_ms: 0,
        });
        assert!(x.admit(&spec(2, "b"), false, 0, "/", "q").is_ok());
        // An exclusive consumer is refused while another is there.
        assert!(x.admit(&spec(3, "c"), true, 1, "/", "q").is_err());
    }
}
