//! One run from start to verdict:
//! 1. start the proxies and the cluster, wait until every node serves;
//! 2. declare the quorum queues, start the monitor, consumers, publishers;
//! 3. warm up, then draw the scenario's faults until the duration is used;
//! 4. heal: open the network, resume and restart nodes, keep the load on a
//!    few seconds;
//! 5. drain: stop publishers, let consumers empty the queues, then replace
//!    them with fresh drainers (a stale subscription must not hide a
//!    message) until every queue is empty and quiet;
//! 6. check the history and write the report.

use crate::checker::{Verdict, check};
use crate::cluster::{Cluster, Layout};
use crate::faults::Injector;
use crate::history::Recorder;
use crate::monitor::{self, View};
use crate::proxy::ProxySet;
use crate::report::{self, Settings};
use crate::scenarios::Scenario;
use crate::workload::{self, ConsumerConfig, Counters, Endpoints, PublisherConfig};
use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Load before the first fault, so the timeline has a baseline.
const WARMUP: Duration = Duration::from_secs(3);
/// Load after healing, before publishers stop: shows recovery.
const RECOVERY: Duration = Duration::from_secs(5);
/// Longest wait for the cluster to start.
const START_WITHIN: Duration = Duration::from_secs(60);
/// Longest time the running consumers get to empty the queues. Past it,
/// the stall is noted (live subscriptions that stopped receiving are a
/// finding) and fresh consumers take over.
const DRAIN_WITHIN: Duration = Duration::from_secs(20);
/// Longest time the fresh consumers get.
const FINAL_DRAIN_WITHIN: Duration = Duration::from_secs(60);
/// Quiet time (no delivery) after which an empty queue is drained.
const DRAIN_QUIET_MS: u64 = 2_000;
/// Publishes a publisher may make in one run, whatever the duration.
const MAX_MESSAGES_PER_PUBLISHER: u64 = 5_000_000;
/// Messages per publish batch (then the batch's confirms are awaited).
const BATCH: usize = 8;

/// What `warren-chaos run` was asked to do.
pub struct Plan {
    pub scenario: &'static Scenario,
    pub settings: Settings,
    pub duration: Duration,
    pub report_dir: PathBuf,
    pub warren: PathBuf,
    pub base_port: u16,
}

/// The outcome of a run.
pub struct Outcome {
    pub verdict: Verdict,
    pub summary: String,
}

/// Runs the whole thing. An `Err` is a harness failure (could not start the
/// cluster, could not write the report), not a verdict.
pub async fn run(plan: Plan) -> Result<Outcome> {
    let s = &plan.settings;
    let nodes_dir = plan.report_dir.join("nodes");
    if nodes_dir.exists() {
        std::fs::remove_dir_all(&nodes_dir)
            .with_context(|| format!("clearing {}", nodes_dir.display()))?;
    }
    std::fs::create_dir_all(&nodes_dir)?;
    anyhow::ensure!(
        plan.warren.is_file(),
        "no warren binary at {} (build it with `cargo build --bins`, or pass --warren)",
        plan.warren.display()
    );
    let rec = Recorder::new();
    let layout = Layout::new(s.nodes, plan.base_port, &nodes_dir);
    let proxies = ProxySet::start(layout.link_proxies(), layout.client_proxies()).await?;
    let mut cluster = Cluster::new(layout.clone(), plan.warren.clone());

    rec.phase("start");
    for id in layout.ids() {
        cluster.spawn(id)?;
    }
    for id in layout.ids() {
        if let Err(e) = cluster.wait_ready(id, START_WITHIN).await {
            cluster.shutdown().await;
            return Err(e.context("the cluster did not start"));
        }
    }
    let endpoints: Endpoints = Arc::new(layout.specs.iter().map(|n| (n.id, n.uri())).collect());
    let queues: Vec<String> = (0..s.queues).map(|i| format!("chaos-{i}")).collect();
    if let Err(e) = workload::declare_queues(&endpoints, &queues, START_WITHIN).await {
        cluster.shutdown().await;
        return Err(e);
    }

    let view = View::default();
    let (stop_monitor, monitor_stop) = watch::channel(false);
    let admins = layout.specs.iter().map(|n| (n.id, n.admin)).collect();
    let monitor = tokio::spawn(monitor::run(
        admins,
        view.clone(),
        rec.clone(),
        monitor_stop,
    ));

    let counters = Arc::new(Counters::default());
    let (stop_consumers, consumers_stop) = watch::channel(false);
    let mut consumers = JoinSet::new();
    for c in 0..s.consumers {
        let cfg = ConsumerConfig {
            name: format!("c{c}"),
            queue: queues[c % queues.len()].clone(),
            first_node: c,
        };
        consumers.spawn(workload::consumer(
            cfg,
            endpoints.clone(),
            rec.clone(),
            counters.clone(),
            consumers_stop.clone(),
        ));
    }
    let (stop_publishers, publishers_stop) = watch::channel(false);
    let mut publishers = JoinSet::new();
    for p in 0..s.publishers {
        let cfg = PublisherConfig {
            id: p as u32,
            queue: queues[p % queues.len()].clone(),
            rate: s.rate,
            batch: BATCH,
            max_messages: MAX_MESSAGES_PER_PUBLISHER,
        };
        publishers.spawn(workload::publisher(
            cfg,
            endpoints.clone(),
            rec.clone(),
            counters.clone(),
            publishers_stop.clone(),
        ));
    }
    let progress = tokio::spawn(progress(counters.clone(), rec.clone()));

    rec.phase("warmup");
    tokio::time::sleep(WARMUP).await;

    rec.phase("faults");
    let mut injector = Injector::new(cluster, proxies, view.clone(), rec.clone());
    let mut rng = StdRng::seed_from_u64(s.seed);
    let faults_until = Instant::now() + plan.duration;
    let mut i = 0;
    while Instant::now() < faults_until {
        let step = plan.scenario.step(&mut rng, i);
        i += 1;
        injector.inject(step.fault, step.hold, &mut rng).await;
        let rest = step
            .rest
            .min(faults_until.saturating_duration_since(Instant::now()));
        tokio::time::sleep(rest).await;
    }

    rec.phase("heal");
    let unhealed = injector.heal().await;
    wait_for_leaders(&view, &queues, Duration::from_secs(30)).await;
    tokio::time::sleep(RECOVERY).await;

    rec.phase("drain");
    stop_publishers.send_replace(true);
    while publishers.join_next().await.is_some() {}
    drain_until_empty(
        &view,
        &queues,
        &counters,
        &rec,
        DRAIN_WITHIN,
        "the running consumers",
    )
    .await;
    stop_consumers.send_replace(true);
    while consumers.join_next().await.is_some() {}

    // Fresh subscriptions on every queue: whatever the first consumers held
    // went back to the queue when they closed.
    rec.phase("final-drain");
    let (stop_drainers, drainers_stop) = watch::channel(false);
    let mut drainers = JoinSet::new();
    for (qi, q) in queues.iter().enumerate() {
        let cfg = ConsumerConfig {
            name: format!("drain-{q}"),
            queue: q.clone(),
            first_node: qi,
        };
        drainers.spawn(workload::consumer(
            cfg,
            endpoints.clone(),
            rec.clone(),
            counters.clone(),
            drainers_stop.clone(),
        ));
    }
    drain_until_empty(
        &view,
        &queues,
        &counters,
        &rec,
        FINAL_DRAIN_WITHIN,
        "fresh consumers",
    )
    .await;
    stop_drainers.send_replace(true);
    while drainers.join_next().await.is_some() {}

    rec.phase("done");
    stop_monitor.send_replace(true);
    let _ = monitor.await;
    progress.abort();
    injector.cluster.shutdown().await;

    let (events, dropped) = rec.snapshot();
    let verdict = check(&events, dropped);
    report::write(&plan.report_dir, s, &verdict, &events, unhealed)?;
    let summary = report::summary(s, &verdict, &events, &plan.report_dir);
    if verdict.pass {
        // The data directories are only needed to investigate a failure.
        let _ = remove_data_dirs(&nodes_dir);
    }
    Ok(Outcome { verdict, summary })
}

fn remove_data_dirs(nodes_dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(nodes_dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(path)?;
        }
    }
    Ok(())
}

/// Waits until every queue has an agreed leader (or the time is up).
async fn wait_for_leaders(view: &View, queues: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let v = view.get();
        if queues
            .iter()
            .all(|q| v.get(q).is_some_and(|q| q.leader.is_some()))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every queue's leader reports it empty and nothing has been
/// delivered for a while, or `within` passes (which is noted).
async fn drain_until_empty(
    view: &View,
    queues: &[String],
    counters: &Counters,
    rec: &Recorder,
    within: Duration,
    who: &str,
) {
    let deadline = Instant::now() + within;
    let started = rec.now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v = view.get();
        let empty = queues
            .iter()
            .all(|q| v.get(q).and_then(|q| q.messages) == Some(0));
        let last = counters.last_delivery.load(Ordering::Relaxed).max(started);
        if empty && rec.now().saturating_sub(last) >= DRAIN_QUIET_MS {
            return;
        }
    }
    let depths: Vec<String> = queues
        .iter()
        .map(|q| match view.get().get(q).and_then(|v| v.messages) {
            Some(n) => format!("{q}: {n}"),
            None => format!("{q}: unknown"),
        })
        .collect();
    rec.note(format!(
        "{who} did not empty the queues within {within:?} (depth {})",
        depths.join(", ")
    ));
}

/// A progress line every 5 s, so a long run can be followed.
async fn progress(counters: Arc<Counters>, rec: Recorder) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tick.tick().await;
        tracing::info!(
            t = rec.now(),
            attempted = counters.attempted.load(Ordering::Relaxed),
            confirmed = counters.acked.load(Ordering::Relaxed),
            delivered = counters.delivered.load(Ordering::Relaxed),
            "progress"
        );
    }
}
