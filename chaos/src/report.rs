//! The run's report: `report.json` (settings, faults, verdict, throughput
//! per second), `history.jsonl` (every event, for digging), `timeline.svg`,
//! and the human summary printed at the end of a run.

use crate::checker::Verdict;
use crate::history::{Event, Millis};
use crate::svg;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

/// The run's settings, as given (and as needed to reproduce it).
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub scenario: String,
    pub nodes: usize,
    pub seed: u64,
    pub duration_ms: u64,
    pub queues: usize,
    pub publishers: usize,
    pub consumers: usize,
    pub rate: u32,
    /// Idle quorum queues declared at setup.
    pub idle_queues: usize,
    /// Messages per second into the dead-letter source (0: no chain).
    pub dead_letter_rate: u32,
    /// RPC calls per second (0: no RPC pair).
    pub rpc_rate: u32,
    pub warren: String,
    /// The command line that repeats this run.
    pub reproduce: String,
}

/// One fault as it happened.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FaultRecord {
    pub fault: u32,
    pub kind: String,
    pub description: String,
    pub nodes: Vec<u16>,
    pub start_ms: Millis,
    pub end_ms: Option<Millis>,
}

#[derive(Serialize)]
pub struct Report<'a> {
    pub settings: &'a Settings,
    pub verdict: &'a Verdict,
    pub faults: Vec<FaultRecord>,
    pub notes: Vec<(Millis, String)>,
    pub phases: Vec<(Millis, String)>,
    /// Confirms per second, from the start of the run.
    pub confirmed_per_second: Vec<u64>,
    pub delivered_per_second: Vec<u64>,
    /// Nodes that did not come back in the heal phase.
    pub unhealed_nodes: Vec<u16>,
}

/// The faults of a history, start and end matched.
pub fn faults(events: &[Event]) -> Vec<FaultRecord> {
    let mut by_id: BTreeMap<u32, FaultRecord> = BTreeMap::new();
    for e in events {
        match e {
            Event::FaultStart {
                t,
                fault,
                kind,
                description,
                nodes,
            } => {
                by_id.insert(
                    *fault,
                    FaultRecord {
                        fault: *fault,
                        kind: kind.clone(),
                        description: description.clone(),
                        nodes: nodes.clone(),
                        start_ms: *t,
                        end_ms: None,
                    },
                );
            }
            Event::FaultEnd { t, fault } => {
                if let Some(f) = by_id.get_mut(fault) {
                    f.end_ms = Some(*t);
                }
            }
            _ => {}
        }
    }
    by_id.into_values().collect()
}

/// Writes every file of the report into `dir`.
pub fn write(
    dir: &Path,
    settings: &Settings,
    verdict: &Verdict,
    events: &[Event],
    unhealed_nodes: Vec<u16>,
) -> Result<()> {
    let report = Report {
        settings,
        verdict,
        faults: faults(events),
        notes: events
            .iter()
            .filter_map(|e| match e {
                Event::Note { t, text } => Some((*t, text.clone())),
                _ => None,
            })
            .collect(),
        phases: events
            .iter()
            .filter_map(|e| match e {
                Event::Phase { t, name } => Some((*t, name.clone())),
                _ => None,
            })
            .collect(),
        confirmed_per_second: svg::per_second(events, svg::is_ack),
        delivered_per_second: svg::per_second(events, svg::is_delivery),
        unhealed_nodes,
    };
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;

    let path = dir.join("history.jsonl");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?,
    );
    for e in events {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;

    let title = format!(
        "warren-chaos {} · {} nodes · seed {} · {}",
        settings.scenario,
        settings.nodes,
        settings.seed,
        if verdict.pass { "PASS" } else { "FAIL" }
    );
    std::fs::write(dir.join("timeline.svg"), svg::timeline(events, &title))?;
    Ok(())
}

/// The summary a person reads at the end of a run.
pub fn summary(settings: &Settings, verdict: &Verdict, events: &[Event], dir: &Path) -> String {
    let v = verdict;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "warren-chaos: scenario {} · {} nodes · seed {} · faults for {:.0}s",
        settings.scenario,
        settings.nodes,
        settings.seed,
        settings.duration_ms as f64 / 1000.0
    );
    let _ = writeln!(s, "faults:");
    let list = faults(events);
    if list.is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    for f in &list {
        let end = f
            .end_ms
            .map(|e| format!("{:6.1}s", e as f64 / 1000.0))
            .unwrap_or_else(|| "   open".into());
        let _ = writeln!(
            s,
            "  {:6.1}s-{end}  {}",
            f.start_ms as f64 / 1000.0,
            f.description
        );
    }
    let mut rows: Vec<(&str, String)> = vec![
        ("attempted", v.attempted.to_string()),
        ("confirmed", v.confirmed.to_string()),
        ("nacked", v.nacked.to_string()),
        ("unknown outcome", v.unknown.to_string()),
        (
            "delivered",
            format!("{} ({} distinct)", v.deliveries, v.delivered_distinct),
        ),
        ("lost", v.lost.to_string()),
        ("unexpected", v.unexpected.to_string()),
        (
            "duplicated",
            format!(
                "{} ({} without redelivered flag)",
                v.duplicated, v.duplicated_unflagged
            ),
        ),
        ("recovered", v.recovered.to_string()),
        ("order violations", v.order_violations.to_string()),
        (
            "unavailable",
            format!(
                "{:.1}s in {} window(s), longest {:.1}s",
                v.unavailable_ms as f64 / 1000.0,
                v.unavailable_windows.len(),
                v.unavailable_windows
                    .iter()
                    .map(|(a, b)| b - a)
                    .max()
                    .unwrap_or(0) as f64
                    / 1000.0
            ),
        ),
        (
            "leader changes",
            format!(
                "{} (watched queues), {} moves over all queues",
                v.leader_changes, v.leader_moves_all
            ),
        ),
    ];
    if let Some(d) = &v.dead_letter {
        rows.push((
            "dead-lettered",
            format!(
                "{} of {} rejected ({} duplicated)",
                d.dead_lettered, d.rejected, d.duplicated
            ),
        ));
        rows.push((
            "dead-letter lost",
            format!(
                "{} ({} near a fault, {} unexplained)",
                d.lost, d.lost_near_fault, d.lost_unexplained
            ),
        ));
        rows.push((
            "dlx after heal",
            format!(
                "{} of {} rejected",
                d.dead_lettered_after_heal, d.rejected_after_heal
            ),
        ));
    }
    if let Some(r) = &v.rpc {
        rows.push((
            "rpc calls",
            format!(
                "{} answered of {} ({} served)",
                r.answered, r.requests, r.served
            ),
        ));
        rows.push((
            "rpc after heal",
            format!(
                "{} calls, last {} answered of {}",
                r.after_heal,
                r.last_answered,
                crate::checker::RPC_LAST_CALLS
            ),
        ));
    }
    if !v.restarts.is_empty() {
        let gaps: Vec<String> = v
            .restarts
            .iter()
            .map(|r| match r.delivery_gap_ms {
                Some(g) => format!("{:.1}s", g as f64 / 1000.0),
                None => "never".to_owned(),
            })
            .collect();
        rows.push(("restart gaps", gaps.join(" ")));
        rows.push((
            "stalls",
            format!(
                "{} (limit {}s after all nodes ready)",
                v.stalls,
                crate::checker::STALL_LIMIT_MS / 1000
            ),
        ));
    }
    let width = rows
        .iter()
        .map(|(_, val)| val.chars().count())
        .max()
        .unwrap_or(0)
        .max(38);
    let rule = format!("+{}+{}+", "-".repeat(18), "-".repeat(width + 2));
    let _ = writeln!(s, "{rule}");
    for (k, val) in rows {
        let _ = writeln!(s, "| {k:<16} | {val:<width$} |");
    }
    let _ = writeln!(s, "{rule}");
    for r in v.restarts.iter().filter(|r| r.stalled()) {
        let _ = writeln!(
            s,
            "stall: after the restart at fault {} (all nodes ready at {:.1}s) {} did not deliver within {}s",
            r.fault,
            r.ready_ms as f64 / 1000.0,
            r.slowest_queue,
            crate::checker::STALL_LIMIT_MS / 1000
        );
    }
    for e in events {
        if let Event::Note { t, text } = e {
            let _ = writeln!(s, "note at {:.1}s: {text}", *t as f64 / 1000.0);
        }
    }
    if !v.lost_examples.is_empty() {
        let _ = writeln!(s, "lost, e.g.: {}", v.lost_examples.join(" "));
    }
    if !v.unexpected_examples.is_empty() {
        let _ = writeln!(s, "unexpected, e.g.: {}", v.unexpected_examples.join(" "));
    }
    if let Some(d) = &v.dead_letter {
        if d.lost_unexplained > 0 {
            let _ = writeln!(
                s,
                "dead letters lost with no fault nearby, e.g.: {}",
                d.lost_examples.join(" ")
            );
        }
        if !d.unexpected_examples.is_empty() {
            let _ = writeln!(
                s,
                "unexpected dead letters, e.g.: {}",
                d.unexpected_examples.join(" ")
            );
        }
    }
    if let Some(r) = &v.rpc {
        if !r.pass && !r.unanswered_after_heal.is_empty() {
            let _ = writeln!(
                s,
                "unanswered after the heal: {}",
                r.unanswered_after_heal.join("; ")
            );
        }
    }
    let _ = writeln!(s, "report: {}", dir.display());
    if v.pass {
        let _ = writeln!(s, "RESULT: PASS");
    } else {
        let _ = writeln!(s, "RESULT: FAIL: {}", v.failure());
        let _ = writeln!(s, "seed: {}", settings.seed);
        let _ = writeln!(s, "reproduce: {}", settings.reproduce);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::{Spec, check};
    use crate::history::Outcome;

    fn settings() -> Settings {
        Settings {
            scenario: "vm-loss".into(),
            nodes: 3,
            seed: 42,
            duration_ms: 30_000,
            queues: 1,
            publishers: 1,
            consumers: 1,
            rate: 10,
            idle_queues: 0,
            dead_letter_rate: 0,
            rpc_rate: 0,
            warren: "warren".into(),
            reproduce: "warren-chaos run --seed 42".into(),
        }
    }

    #[test]
    fn a_failing_summary_names_the_seed_and_the_command() {
        let events = vec![
            Event::Publish {
                t: 0,
                publisher: 0,
                seq: 0,
                queue: "q".into(),
                id: "p0-0".into(),
                node: 1,
            },
            Event::Outcome {
                t: 1,
                id: "p0-0".into(),
                outcome: Outcome::Ack,
            },
        ];
        let v = check(&events, 0, &Spec::default());
        let s = summary(&settings(), &v, &events, Path::new("out"));
        assert!(s.contains("| lost             | 1 "), "{s}");
        assert!(s.contains("RESULT: FAIL: 1 confirmed message(s) lost"));
        assert!(s.contains("seed: 42"));
        assert!(s.contains("reproduce: warren-chaos run --seed 42"));
        assert!(s.contains("lost, e.g.: p0-0"));
    }

    #[test]
    fn faults_pair_start_and_end() {
        let events = vec![
            Event::FaultStart {
                t: 5,
                fault: 1,
                kind: "kill".into(),
                description: "kill -9 leader n2".into(),
                nodes: vec![2],
            },
            Event::FaultEnd { t: 9, fault: 1 },
        ];
        let f = faults(&events);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].start_ms, f[0].end_ms), (5, Some(9)));
        let v = check(&events, 0, &Spec::default());
        let s = summary(&settings(), &v, &events, Path::new("out"));
        assert!(s.contains("kill -9 leader n2"));
        assert!(s.contains("RESULT: PASS"));
    }
}
