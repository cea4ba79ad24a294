//! Named scenarios: each turns a seeded random generator into a stream of
//! steps (a fault, how long it is held, how long the cluster then rests).
//!
//! The runner keeps drawing steps until the scenario's duration is used up,
//! so the same seed gives the same sequence of faults and timings; which
//! node is the leader when a fault lands is up to the cluster. Each
//! scenario comes from an incident in the project's incident list.

use crate::faults::{Fault, Target};
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use std::time::Duration;

/// One fault and its timing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub fault: Fault,
    pub hold: Duration,
    /// Quiet time after the fault is healed, before the next one.
    pub rest: Duration,
}

/// A named scenario.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// The `i`-th step (from 0), drawn from `rng`.
    next: fn(&mut StdRng, usize) -> Step,
}

impl Scenario {
    pub fn step(&self, rng: &mut StdRng, i: usize) -> Step {
        (self.next)(rng, i)
    }
}

fn secs(rng: &mut StdRng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.random_range(lo..hi))
}

/// Every scenario, in the order `--list` shows them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "vm-loss",
        about: "A node's host loses its network, its VM dies (kill -9) and reboots on the same \
                disk; alternated with plain kill -9 of a leader or a follower. Incident 1.",
        next: |rng, i| {
            let fault = match i % 4 {
                0 => Fault::IsolateThenKill(Target::Leader),
                1 => Fault::Kill(Target::Follower),
                2 => Fault::IsolateThenKill(Target::Any),
                _ => Fault::Kill(Target::Leader),
            };
            Step {
                fault,
                hold: secs(rng, 5.0, 10.0),
                rest: secs(rng, 4.0, 6.0),
            }
        },
    },
    Scenario {
        name: "simultaneous-restart",
        about: "Every node stopped (alternately kill -9 and SIGTERM) under load, then all started \
                at the same instant. Incident 3.",
        next: |rng, i| Step {
            fault: Fault::RestartAll {
                graceful: i % 2 == 1,
            },
            hold: secs(rng, 0.5, 3.0),
            rest: secs(rng, 5.0, 8.0),
        },
    },
    Scenario {
        name: "flapping-network",
        about: "Short partitions one after another: a node isolated, halves, a bridge, one-way \
                loss; held 1-4 s with 1-3 s between. Incident 1 (nodes regaining the network at \
                different times).",
        next: |rng, _| {
            let faults = [
                Fault::Isolate(Target::Any),
                Fault::Isolate(Target::Leader),
                Fault::Halves {
                    clients_follow: true,
                },
                Fault::Bridge,
                Fault::OneWay,
            ];
            Step {
                fault: *faults.choose(rng).expect("non-empty"),
                hold: secs(rng, 1.0, 4.0),
                rest: secs(rng, 1.0, 3.0),
            }
        },
    },
    Scenario {
        name: "partition-minority",
        about: "A random minority cut off from the majority for 8-15 s; clients alternately stay \
                with the majority or keep their (minority) node, whose publishes must not be \
                confirmed.",
        next: |rng, i| Step {
            fault: Fault::Halves {
                clients_follow: i % 2 == 0,
            },
            hold: secs(rng, 8.0, 15.0),
            rest: secs(rng, 4.0, 6.0),
        },
    },
    Scenario {
        name: "partition-leader",
        about: "The leader of a queue isolated (links and clients) for 8-15 s, then healed.",
        next: |rng, _| Step {
            fault: Fault::Isolate(Target::Leader),
            hold: secs(rng, 8.0, 15.0),
            rest: secs(rng, 4.0, 6.0),
        },
    },
    Scenario {
        name: "pause-leader",
        about: "The leader of a queue frozen with SIGSTOP for 2-12 s (around the failure \
                detector's 1.5 s and the 10 s publish timeout), then SIGCONT.",
        next: |rng, _| Step {
            fault: Fault::Pause(Target::Leader),
            hold: secs(rng, 2.0, 12.0),
            rest: secs(rng, 4.0, 6.0),
        },
    },
    Scenario {
        name: "rolling-restart",
        about: "Every node in turn stopped with SIGTERM, started and waited for, 3 s apart, as \
                in an upgrade.",
        next: |rng, _| Step {
            fault: Fault::RollingRestart,
            hold: Duration::from_secs(3),
            rest: secs(rng, 3.0, 5.0),
        },
    },
    Scenario {
        name: "random",
        about: "A seeded mix of every fault above: kill -9 (leader, follower, any: crashes in \
                the middle of writes), pauses, isolation, halves, bridge, one-way, restart of \
                every node.",
        next: |rng, _| {
            let faults = [
                Fault::Kill(Target::Leader),
                Fault::Kill(Target::Follower),
                Fault::Kill(Target::Any),
                Fault::Pause(Target::Leader),
                Fault::Pause(Target::Follower),
                Fault::Isolate(Target::Leader),
                Fault::Isolate(Target::Any),
                Fault::IsolateThenKill(Target::Any),
                Fault::Halves {
                    clients_follow: true,
                },
                Fault::Halves {
                    clients_follow: false,
                },
                Fault::Bridge,
                Fault::OneWay,
                Fault::RestartAll { graceful: false },
            ];
            Step {
                fault: *faults.choose(rng).expect("non-empty"),
                hold: secs(rng, 2.0, 12.0),
                rest: secs(rng, 2.0, 6.0),
            }
        },
    },
];

/// The scenario with this name.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn every_named_scenario_exists() {
        for name in [
            "vm-loss",
            "simultaneous-restart",
            "flapping-network",
            "partition-minority",
            "partition-leader",
            "pause-leader",
            "rolling-restart",
            "random",
        ] {
            assert!(find(name).is_some(), "{name}");
        }
        assert!(find("nope").is_none());
    }

    #[test]
    fn the_same_seed_gives_the_same_steps_and_holds_are_bounded() {
        for s in SCENARIOS {
            let draw = |seed| {
                let mut rng = StdRng::seed_from_u64(seed);
                (0..50).map(|i| s.step(&mut rng, i)).collect::<Vec<_>>()
            };
            let steps = draw(7);
            assert_eq!(steps, draw(7), "{}", s.name);
            for st in steps {
                assert!(st.hold <= Duration::from_secs(15), "{}: {st:?}", s.name);
                assert!(st.rest >= Duration::from_secs(1), "{}: {st:?}", s.name);
            }
        }
    }

    #[test]
    fn random_mixes_several_kinds_of_fault() {
        let s = find("random").unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let kinds: std::collections::BTreeSet<&str> =
            (0..100).map(|i| s.step(&mut rng, i).fault.kind()).collect();
        assert!(kinds.len() >= 6, "{kinds:?}");
    }
}
