//! One run from start to verdict:
//! 1. start the proxies and the cluster, wait until every node serves;
//! 2. declare the queues (checked, dead-letter chain, RPC, idle), start the
//!    monitor, wait for leaders, start consumers, the RPC pair, publishers;
//! 3. warm up, then draw the scenario's faults until the duration is used;
//! 4. heal: open the network, resume and restart nodes, wait for leaders,
//!    then (the `recovery` phase) keep the load on a few seconds;
//! 5. drain: stop publishers, let consumers empty the queues, stop the RPC
//!    client, then replace the consumers with fresh drainers (a stale
//!    subscription must not hide a message) until every queue is empty and
//!    quiet;
//! 6. check the history and write the report.

use crate::checker::{Spec, Verdict, check, still_recovering};
use crate::cluster::{Cluster, Layout};
use crate::faults::Injector;
use crate::history::Recorder;
use crate::monitor::{self, View};
use crate::proxy::ProxySet;
use crate::report::{self, Settings};
use crate::rpc::{self, RpcClientConfig};
use crate::scenarios::Scenario;
use crate::setup::{self, DLQ, DLX_SOURCE, Declared, RPC_QUEUE};
use crate::workload::{self, ConsumerConfig, Counters, Endpoints, PublisherConfig, Role};
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
/// Longest the load stays on after healing while the workload is not yet
/// working again everywhere (see `checker::still_recovering`).
const RECOVERY_WITHIN: Duration = Duration::from_secs(30);
/// Longest wait for the cluster to start.
const START_WITHIN: Duration = Duration::from_secs(60);
/// Longest wait for the declarations, on top of [`START_WITHIN`], per idle
/// queue.
const DECLARE_PER_IDLE_QUEUE: Duration = Duration::from_millis(500);
/// Longest wait for every watched queue to have a leader.
const LEADERS_WITHIN: Duration = Duration::from_secs(30);
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
/// Calls the RPC client may make in one run, whatever the duration.
const MAX_RPC_CALLS: u64 = 1_000_000;
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
    let declared = Declared {
        main: (0..s.queues).map(|i| format!("chaos-{i}")).collect(),
        dead_letter: s.dead_letter_rate > 0,
        rpc: s.rpc_rate > 0,
        idle: s.idle_queues,
    };
    let queues = declared.main.clone();
    let watched = declared.watched();
    let mut stall_queues = queues.clone();
    if declared.dead_letter {
        stall_queues.push(DLX_SOURCE.to_owned());
    }
    let spec = Spec {
        dead_letter: declared
            .dead_letter
            .then(|| (DLX_SOURCE.to_owned(), DLQ.to_owned())),
        rpc: declared.rpc,
        stall_queues,
    };
    rec.phase("declare");
    let declare_started = Instant::now();
    let declare_within = START_WITHIN + DECLARE_PER_IDLE_QUEUE * s.idle_queues as u32;
    if let Err(e) = setup::declare(&endpoints, &declared, declare_within).await {
        cluster.shutdown().await;
        return Err(e);
    }
    rec.note(format!(
        "declared {} queues ({} idle) in {:.1}s",
        watched.len() + s.idle_queues,
        s.idle_queues,
        declare_started.elapsed().as_secs_f64()
    ));

    let admins: Vec<_> = layout.specs.iter().map(|n| (n.id, n.admin)).collect();
    let names: Vec<&str> = watched.iter().map(String::as_str).collect();
    let all = setup::leaders(&admins, &names, LEADERS_WITHIN).await;
    rec.note(format!(
        "queue leaders after setup: {}",
        setup::leaders_per_node(&all)
    ));

    let view = View::default();
    let (stop_monitor, monitor_stop) = watch::channel(false);
    let monitor = tokio::spawn(monitor::run(
        admins,
        watched.clone(),
        view.clone(),
        rec.clone(),
        monitor_stop,
    ));
    if !wait_for_leaders(&view, &watched, LEADERS_WITHIN).await {
        rec.note(format!(
            "not every queue had a leader within {LEADERS_WITHIN:?} of the declarations"
        ));
    }
    let nodes = setup::client_nodes(&view.get(), s.nodes);
    let leader = |q: &str| match view.get().get(q).and_then(|v| v.leader) {
        Some(n) => format!("n{n}"),
        None => "no node".to_owned(),
    };
    if declared.dead_letter {
        rec.note(format!(
            "dead-letter chain: {DLX_SOURCE} led by {}, {DLQ} by {}; publisher on n{}, rejecter on n{}, dead-letter consumer on n{}{}",
            leader(DLX_SOURCE),
            leader(DLQ),
            nodes.dlx_publisher + 1,
            nodes.rejecter + 1,
            nodes.dlq_consumer + 1,
            if leader(DLX_SOURCE) == leader(DLQ) {
                " (one leader for both: the dead-letter publish stays on that node until a fault moves a leader)"
            } else {
                ""
            }
        ));
    }
    if declared.rpc {
        rec.note(format!(
            "rpc: {RPC_QUEUE} led by {}, server on n{}, client on n{}",
            leader(RPC_QUEUE),
            nodes.rpc_server + 1,
            nodes.rpc_client + 1
        ));
    }

    let counters = Arc::new(Counters::default());
    let (stop_consumers, consumers_stop) = watch::channel(false);
    let mut consumers = JoinSet::new();
    let mut consumer_configs: Vec<ConsumerConfig> = (0..s.consumers)
        .map(|c| ConsumerConfig {
            name: format!("c{c}"),
            queue: queues[c % queues.len()].clone(),
            first_node: c,
            role: Role::Ack,
        })
        .collect();
    if declared.dead_letter {
        consumer_configs.push(ConsumerConfig {
            name: "dlx-rejecter".into(),
            queue: DLX_SOURCE.into(),
            first_node: nodes.rejecter,
            role: Role::Reject,
        });
        consumer_configs.push(ConsumerConfig {
            name: "dlq-consumer".into(),
            queue: DLQ.into(),
            first_node: nodes.dlq_consumer,
            role: Role::Ack,
        });
    }
    if declared.rpc {
        consumer_configs.push(ConsumerConfig {
            name: "rpc-server".into(),
            queue: RPC_QUEUE.into(),
            first_node: nodes.rpc_server,
            role: Role::RpcServer,
        });
    }
    for cfg in consumer_configs {
        consumers.spawn(workload::consumer(
            cfg,
            endpoints.clone(),
            rec.clone(),
            counters.clone(),
            consumers_stop.clone(),
        ));
    }
    let (stop_rpc, rpc_stop) = watch::channel(false);
    let rpc_client = declared.rpc.then(|| {
        let cfg = RpcClientConfig {
            queue: RPC_QUEUE.into(),
            rate: s.rpc_rate,
            first_node: nodes.rpc_client,
            max_calls: MAX_RPC_CALLS,
        };
        tokio::spawn(rpc::client(cfg, endpoints.clone(), rec.clone(), rpc_stop))
    });
    let (stop_publishers, publishers_stop) = watch::channel(false);
    let mut publishers = JoinSet::new();
    let mut publisher_configs: Vec<PublisherConfig> = (0..s.publishers)
        .map(|p| PublisherConfig {
            id: p as u32,
            queue: queues[p % queues.len()].clone(),
            first_node: p,
            rate: s.rate,
            batch: BATCH,
            max_messages: MAX_MESSAGES_PER_PUBLISHER,
        })
        .collect();
    if declared.dead_letter {
        publisher_configs.push(PublisherConfig {
            id: s.publishers as u32,
            queue: DLX_SOURCE.into(),
            first_node: nodes.dlx_publisher,
            rate: s.dead_letter_rate,
            batch: BATCH,
            max_messages: MAX_MESSAGES_PER_PUBLISHER,
        });
    }
    for cfg in publisher_configs {
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
    if !wait_for_leaders(&view, &watched, LEADERS_WITHIN).await {
        rec.note(format!(
            "not every queue had a leader within {LEADERS_WITHIN:?} of the heal"
        ));
    }
    // The dead-letter and RPC rules judge what happens from here on.
    let healed_at = rec.now();
    rec.phase("recovery");
    let since_heal = rec.len();
    tokio::time::sleep(RECOVERY).await;
    wait_for_recovery(&rec, &spec, healed_at, since_heal).await;

    rec.phase("drain");
    stop_publishers.send_replace(true);
    while publishers.join_next().await.is_some() {}
    let drained = declared.drained();
    drain_until_empty(
        &view,
        &drained,
        &counters,
        &rec,
        DRAIN_WITHIN,
        "the running consumers",
    )
    .await;
    // The RPC client finishes its call in progress before the server goes.
    stop_rpc.send_replace(true);
    if let Some(client) = rpc_client {
        let _ = client.await;
    }
    stop_consumers.send_replace(true);
    while consumers.join_next().await.is_some() {}

    // Fresh subscriptions on every queue: whatever the first consumers held
    // went back to the queue when they closed. The dead-letter source keeps
    // a rejecting consumer, so what is left there is dead-lettered too.
    rec.phase("final-drain");
    let (stop_drainers, drainers_stop) = watch::channel(false);
    let mut drainers = JoinSet::new();
    for (qi, q) in drained.iter().enumerate() {
        let cfg = ConsumerConfig {
            name: format!("drain-{q}"),
            queue: q.clone(),
            first_node: qi,
            role: if q == DLX_SOURCE {
                Role::Reject
            } else {
                Role::Ack
            },
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
        &drained,
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
    let verdict = check(&events, dropped, &spec);
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

/// Keeps the load on until the workload works again everywhere since the
/// heal, or [`RECOVERY_WITHIN`] has passed since it; a recovery slower than
/// [`RECOVERY`] is noted with what it waited for.
async fn wait_for_recovery(rec: &Recorder, spec: &Spec, healed_at: u64, since_heal: usize) {
    let deadline = Instant::now() + RECOVERY_WITHIN.saturating_sub(RECOVERY);
    let mut first_missing: Option<Vec<String>> = None;
    loop {
        let missing = still_recovering(&rec.since(since_heal), spec, healed_at);
        let after = rec.now().saturating_sub(healed_at) as f64 / 1000.0;
        if missing.is_empty() {
            if let Some(waited_for) = first_missing {
                rec.note(format!(
                    "the workload worked again {after:.1}s after the heal (waited for {})",
                    waited_for.join(", ")
                ));
            }
            return;
        }
        if Instant::now() >= deadline {
            rec.note(format!(
                "{after:.1}s after the heal still no {}",
                missing.join(", ")
            ));
            return;
        }
        first_missing.get_or_insert(missing);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until every queue has an agreed leader; false if the time ran
/// out first.
async fn wait_for_leaders(view: &View, queues: &[String], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let v = view.get();
        if queues
            .iter()
            .all(|q| v.get(q).is_some_and(|q| q.leader.is_some()))
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
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
