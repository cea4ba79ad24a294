//! `warren-chaos restart-bench`: how long a whole cluster takes to serve
//! again after every node was killed at once, as after a power cut
//! (incident 3), with many quorum queues.
//!
//! It declares `--queues` quorum queues spread over the nodes, puts one
//! confirmed message in each, kills every node with SIGKILL and starts
//! them all at the same instant. From that instant it measures: when every
//! node answers its health check, when every queue has a leader that all
//! nodes agree on, and when a consumer on every queue (connected to some
//! node, not necessarily the leader's) has received that queue's message.
//! It also counts the WARN and ERROR lines the nodes wrote after the
//! restart. This is a benchmark, not a test: it reports, it does not judge.

use crate::cluster::{Cluster, Layout, queues_of};
use crate::proxy::ProxySet;
use anyhow::{Context, Result, bail};
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::time::timeout;

/// Longest wait for any one phase.
const PHASE_LIMIT: Duration = Duration::from_secs(300);
/// Channels per node on which the consumers subscribe at once.
const CONSUME_CHANNELS: usize = 16;
/// Queues declared (and messages published) in one go on one connection.
const DECLARE_WINDOW: usize = 64;

pub struct Plan {
    pub queues: usize,
    pub warren: PathBuf,
    pub dir: PathBuf,
    pub base_port: u16,
}

fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t
}

async fn connect(uri: &str) -> Result<Connection> {
    timeout(
        Duration::from_secs(20),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .context("connecting timed out")?
    .context("connecting")
}

/// Declares `names` on `uri` and publishes one confirmed message to each.
async fn fill(uri: String, names: Vec<String>) -> Result<()> {
    let conn = connect(&uri).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for chunk in names.chunks(DECLARE_WINDOW) {
        for q in chunk {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                quorum_args(),
            )
            .await
            .with_context(|| format!("declaring {q}"))?;
        }
        let mut confirms = Vec::new();
        for q in chunk {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    q.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?,
            );
        }
        for c in confirms {
            if !c.await?.is_ack() {
                bail!("a publish was nacked");
            }
        }
    }
    let _ = conn.close(200, "filled".into()).await;
    Ok(())
}

/// Consumes every queue of `names` on `uri` (retrying the connection
/// until `deadline`) and counts each first delivery in `received`.
async fn drain(uri: String, names: Vec<String>, received: Arc<AtomicUsize>, deadline: Instant) {
    let mut left: BTreeSet<String> = names.into_iter().collect();
    while !left.is_empty() && Instant::now() < deadline {
        let Ok(conn) = connect(&uri).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // Subscriptions are made on several channels at once (each
        // basic.consume waits for its consume-ok), and one task per
        // subscription waits for its first delivery.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting = tokio::task::JoinSet::new();
        let list: Vec<String> = left.iter().cloned().collect();
        let per_channel = list.len().div_ceil(CONSUME_CHANNELS).max(1);
        for chunk in list.chunks(per_channel) {
            let Ok(ch) = conn.create_channel().await else {
                break;
            };
            let (chunk, tx) = (chunk.to_vec(), tx.clone());
            waiting.spawn(async move {
                let mut firsts = tokio::task::JoinSet::new();
                for q in chunk {
                    let opts = BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    };
                    let Ok(mut c) = ch
                        .basic_consume(q.as_str().into(), "".into(), opts, FieldTable::default())
                        .await
                    else {
                        break;
                    };
                    let tx = tx.clone();
                    firsts.spawn(async move {
                        if let Some(Ok(_)) = c.next().await {
                            let _ = tx.send(q);
                        }
                    });
                }
                while firsts.join_next().await.is_some() {}
            });
        }
        drop(tx);
        while let Ok(Some(q)) = timeout(
            deadline.saturating_duration_since(Instant::now()),
            rx.recv(),
        )
        .await
        {
            if left.remove(&q) {
                received.fetch_add(1, Ordering::Relaxed);
            }
            if left.is_empty() {
                break;
            }
        }
        waiting.abort_all();
        let _ = conn.close(200, "drained".into()).await;
    }
}

/// Lines at WARN or ERROR in `log` after byte offset `from`.
fn warnings_after(log: &std::path::Path, from: u64) -> usize {
    let Ok(text) = std::fs::read(log) else {
        return 0;
    };
    let tail = &text[(from as usize).min(text.len())..];
    String::from_utf8_lossy(tail)
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count()
}

pub async fn run(plan: Plan) -> Result<String> {
    let nodes_dir = plan.dir.join("nodes");
    if nodes_dir.exists() {
        std::fs::remove_dir_all(&nodes_dir)?;
    }
    std::fs::create_dir_all(&nodes_dir)?;
    let layout = Layout::new(3, plan.base_port, &nodes_dir);
    let _proxies = ProxySet::start(layout.link_proxies(), layout.client_proxies()).await?;
    let mut cluster = Cluster::new(layout.clone(), plan.warren.clone());
    let result = measure(&plan, &layout, &mut cluster).await;
    cluster.shutdown().await;
    result
}

async fn measure(plan: &Plan, layout: &Layout, cluster: &mut Cluster) -> Result<String> {
    let ids = layout.ids();
    for id in &ids {
        cluster.spawn(*id)?;
    }
    for id in &ids {
        cluster.wait_ready(*id, PHASE_LIMIT).await?;
    }
    let uris: Vec<String> = layout.specs.iter().map(|s| s.uri()).collect();
    let names: Vec<String> = (0..plan.queues).map(|i| format!("restart-{i}")).collect();
    let share =
        |k: usize| -> Vec<String> { names.iter().skip(k).step_by(uris.len()).cloned().collect() };
    let started = Instant::now();
    let mut fills = tokio::task::JoinSet::new();
    for (k, uri) in uris.iter().enumerate() {
        fills.spawn(fill(uri.clone(), share(k)));
    }
    while let Some(r) = fills.join_next().await {
        r??;
    }
    eprintln!(
        "restart-bench: {} queues declared and filled in {:.1} s",
        plan.queues,
        started.elapsed().as_secs_f64()
    );

    for id in &ids {
        cluster.kill(*id).await;
    }
    let offsets: Vec<u64> = layout
        .specs
        .iter()
        .map(|s| std::fs::metadata(&s.log).map(|m| m.len()).unwrap_or(0))
        .collect();
    let t0 = Instant::now();
    for id in &ids {
        cluster.spawn(*id)?;
    }
    for id in &ids {
        cluster.wait_ready(*id, PHASE_LIMIT).await?;
    }
    let ready = t0.elapsed();

    // Consumers start as soon as the nodes serve; each node's consumer
    // takes the queues whose share is the next node's (so most are led
    // elsewhere).
    let received = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut drains = tokio::task::JoinSet::new();
    for (k, uri) in uris.iter().enumerate() {
        drains.spawn(drain(
            uri.clone(),
            share((k + 1) % uris.len()),
            received.clone(),
            deadline,
        ));
    }

    let mut leaders = None;
    while leaders.is_none() && Instant::now() < deadline {
        let mut agreed: Option<BTreeSet<(String, u16)>> = None;
        let mut all = true;
        for s in &layout.specs {
            let Some(list) = queues_of(s.admin).await else {
                all = false;
                break;
            };
            let led: BTreeSet<(String, u16)> = list
                .into_iter()
                .filter_map(|q| q.leader.map(|l| (q.name, l)))
                .filter(|(n, _)| n.starts_with("restart-"))
                .collect();
            if led.len() < plan.queues || agreed.as_ref().is_some_and(|a| *a != led) {
                all = false;
                break;
            }
            agreed = Some(led);
        }
        if all {
            leaders = Some(t0.elapsed());
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    while drains.join_next().await.is_some() {}
    let delivered = received.load(Ordering::Relaxed);
    let served = t0.elapsed();
    let warnings: Vec<usize> = layout
        .specs
        .iter()
        .zip(&offsets)
        .map(|(s, from)| warnings_after(&s.log, *from))
        .collect();
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    Ok(format!(
        "restart-bench: {} quorum queues on 3 nodes, all killed and started at once\n\
         \x20 every node healthy:            {}\n\
         \x20 every queue led (agreed):      {}\n\
         \x20 a consumer on every queue got its message: {} ({}/{} queues)\n\
         \x20 WARN/ERROR lines after the restart, per node: {:?}\n\
         \x20 node logs: {}\n",
        plan.queues,
        secs(ready),
        leaders.map(secs).unwrap_or_else(|| "never".into()),
        if delivered == plan.queues {
            secs(served)
        } else {
            "not within the limit".into()
        },
        delivered,
        plan.queues,
        warnings,
        plan.dir.join("nodes").display(),
    ))
}
