//! The run's timeline as an SVG picture, written by hand: confirms and
//! deliveries per second, fault intervals shaded and labelled, leader
//! changes as marks along the top, phases as dashed lines.
//!
//! A reader should see at a glance where throughput dropped, which fault
//! caused it and how long recovery took.

use crate::checker::fault_intervals;
use crate::history::{Event, Millis, Outcome};
use std::collections::BTreeMap;
use std::fmt::Write;

const WIDTH: f64 = 1100.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 50.0;

/// Per-second counts of one kind of event.
pub fn per_second(events: &[Event], keep: impl Fn(&Event) -> bool) -> Vec<u64> {
    let end = events.iter().map(Event::t).max().unwrap_or(0);
    let mut counts = vec![0u64; (end / 1000 + 1) as usize];
    for e in events.iter().filter(|e| keep(e)) {
        counts[(e.t() / 1000) as usize] += 1;
    }
    counts
}

pub fn is_ack(e: &Event) -> bool {
    matches!(
        e,
        Event::Outcome {
            outcome: Outcome::Ack,
            ..
        }
    )
}

pub fn is_delivery(e: &Event) -> bool {
    matches!(e, Event::Delivery { .. })
}

fn is_failed_publish(e: &Event) -> bool {
    matches!(
        e,
        Event::Outcome {
            outcome: Outcome::Nack | Outcome::Unknown,
            ..
        }
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The timeline of `events` under `title`.
pub fn timeline(events: &[Event], title: &str) -> String {
    let acks = per_second(events, is_ack);
    let deliveries = per_second(events, is_delivery);
    let failed = per_second(events, is_failed_publish);
    let seconds = acks.len().max(1) as f64;
    let peak = acks
        .iter()
        .chain(&deliveries)
        .chain(&failed)
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |ms: Millis| LEFT + plot_w * (ms as f64 / 1000.0) / seconds;
    let y = |v: f64| TOP + plot_h * (1.0 - v / peak);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );

    // Faults first, so the lines are drawn over them.
    let starts: BTreeMap<Millis, String> = events
        .iter()
        .filter_map(|e| match e {
            Event::FaultStart { t, kind, .. } => Some((*t, kind.clone())),
            _ => None,
        })
        .collect();
    for (a, b) in fault_intervals(events) {
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{TOP}" width="{:.1}" height="{plot_h}" fill="#f4a582" fill-opacity="0.35"/>"##,
            x(a),
            (x(b) - x(a)).max(1.0)
        );
    }
    for (t, kind) in &starts {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#b2182b" transform="rotate(-90 {:.1} {:.1})">{}</text>"##,
            x(*t) + 9.0,
            TOP + plot_h - 4.0,
            x(*t) + 9.0,
            TOP + plot_h - 4.0,
            escape(kind)
        );
    }

    // Phases, labels on two alternating rows so close phases stay legible.
    let phases = events.iter().filter_map(|e| match e {
        Event::Phase { t, name } => Some((t, name)),
        _ => None,
    });
    for (row, (t, name)) in phases.enumerate() {
        // Near the right edge the label goes to the left of its line.
        let (anchor, dx) = if x(*t) > WIDTH - RIGHT - 80.0 {
            ("end", -2.0)
        } else {
            ("start", 2.0)
        };
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{TOP}" y2="{1}" stroke="#555" stroke-dasharray="4 3"/><text x="{2:.1}" y="{3}" fill="#555" text-anchor="{anchor}">{4}</text>"##,
            x(*t),
            TOP + plot_h,
            x(*t) + dx,
            TOP + plot_h + 28.0 + 11.0 * (row % 2) as f64,
            escape(name)
        );
    }

    // Axes and grid.
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{0}" stroke="black"/><line x1="{LEFT}" x2="{1}" y1="{0}" y2="{0}" stroke="black"/>"##,
        TOP + plot_h,
        LEFT + plot_w
    );
    for k in 0..=4 {
        let v = peak * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{0}" y1="{1:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{4:.0}</text>"##,
            LEFT + plot_w,
            y(v),
            LEFT - 4.0,
            y(v) + 4.0,
            v
        );
    }
    let tick = [1u64, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600]
        .into_iter()
        .find(|&t| seconds / t as f64 <= 12.0)
        .unwrap_or(7200);
    let mut sec = 0u64;
    while (sec as f64) <= seconds {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{sec}s</text>"#,
            x(sec * 1000),
            TOP + plot_h + 14.0
        );
        sec += tick;
    }
    let _ = writeln!(
        s,
        r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">messages / s</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );

    // Series.
    for (series, color, label, row) in [
        (&acks, "#2166ac", "confirmed", 0),
        (&deliveries, "#1b7837", "delivered", 1),
        (&failed, "#d6604d", "nacked / unknown", 2),
    ] {
        let points: Vec<String> = series
            .iter()
            .enumerate()
            .map(|(i, &v)| format!("{:.1},{:.1}", x(i as u64 * 1000 + 500), y(v as f64)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
        let lx = WIDTH - RIGHT - 330.0 + 110.0 * f64::from(row);
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{0}" y1="14" y2="14" stroke="{color}" stroke-width="3"/><text x="{1}" y="18">{label}</text>"#,
            lx + 16.0,
            lx + 20.0
        );
    }

    // Leader changes: a mark per change, with the new leader's id.
    let mut current: BTreeMap<&str, Option<u16>> = BTreeMap::new();
    for e in events {
        if let Event::Leader { t, queue, node } = e {
            let prev = current.insert(queue, *node);
            if let (Some(Some(_)), Some(n)) = (prev, node) {
                let _ = writeln!(
                    s,
                    r##"<path d="M{0:.1},{1} l-4,-8 h8 z" fill="#762a83"><title>{2}: leader n{n} at {3:.1}s</title></path><text x="{0:.1}" y="{4}" text-anchor="middle" font-size="9" fill="#762a83">n{n}</text>"##,
                    x(*t),
                    TOP - 2.0,
                    escape(queue),
                    *t as f64 / 1000.0,
                    TOP - 12.0
                );
            } else if prev.is_some() && node.is_none() {
                let _ = writeln!(
                    s,
                    r##"<circle cx="{:.1}" cy="{}" r="2.5" fill="none" stroke="#762a83"><title>{}: no leader at {:.1}s</title></circle>"##,
                    x(*t),
                    TOP - 5.0,
                    escape(queue),
                    *t as f64 / 1000.0
                );
            }
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="38" fill="#762a83">▼ leader change (new leader)   ○ queue without leader   shaded: fault</text>"##
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_shows_throughput_faults_and_leader_changes() {
        let events = vec![
            Event::Leader {
                t: 0,
                queue: "q".into(),
                node: Some(1),
            },
            Event::Outcome {
                t: 100,
                id: "p0-0".into(),
                outcome: Outcome::Ack,
            },
            Event::FaultStart {
                t: 1_000,
                fault: 1,
                kind: "kill".into(),
                description: "kill -9 leader n1".into(),
                nodes: vec![1],
            },
            Event::Leader {
                t: 2_500,
                queue: "q".into(),
                node: Some(2),
            },
            Event::FaultEnd { t: 3_000, fault: 1 },
            Event::Phase {
                t: 3_500,
                name: "drain".into(),
            },
        ];
        assert_eq!(per_second(&events, is_ack), vec![1, 0, 0, 0]);
        let svg = timeline(&events, "test <run>");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("test &lt;run&gt;"));
        assert!(svg.contains(">kill</text>"));
        assert!(svg.contains("leader n2"));
        assert!(svg.contains(">drain</text>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
    }
}
