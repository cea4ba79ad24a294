//! Starting and stopping a node: the AMQP listener, the admin listener and
//! the memory monitor, with an explicit shutdown signal.

use crate::node::Node;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How often resident memory is sampled for the memory alarm.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// Runs the node until `shutdown` turns true.
pub async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let admin = TcpListener::bind(node.config.admin_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for HTTP on {}: {e}",
                node.config.admin_listen
            )
        })?;
    tokio::spawn(memory_monitor(node.clone(), shutdown.clone()));
    let admin_node = node.clone();
    let mut admin_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let app = crate::admin::router(admin_node);
        let _ = axum::serve(admin, app)
            .with_graceful_shutdown(async move {
                let _ = admin_shutdown.wait_for(|s| *s).await;
            })
            .await;
    });
    // Clients are let in once the node has joined a majority and cleaned up
    // after its previous run; until then the AMQP port is closed, so clients
    // try another node or retry.
    let mut ready = node.ready.subscribe();
    tokio::select! {
        _ = ready.wait_for(|r| *r) => {}
        _ = shutdown.wait_for(|s| *s) => return Ok(()),
    }
    let amqp = TcpListener::bind(node.config.amqp_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot listen for AMQP on {}: {e}", node.config.amqp_listen)
        })?;
    tracing::info!(
        amqp = %amqp.local_addr()?,
        admin = %node.config.admin_listen,
        node_id = node.config.node_id,
        "Warren node started"
    );
    loop {
        tokio::select! {
            accepted = amqp.accept() => {
                match accepted {
                    Ok((stream, peer)) => {
                        tokio::spawn(crate::amqp::connection::serve(node.clone(), stream, peer));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little
                        // rather than spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    tracing::info!("Warren node stopped");
    Ok(())
}

/// The memory limit in bytes from the config and the machine's memory.
pub fn memory_limit(config: &crate::config::Config) -> u64 {
    if let Some(b) = config.memory_high_watermark_bytes {
        return b;
    }
    fraction_of_memory(config.memory_high_watermark)
}

/// `fraction` of the machine's memory, in bytes.
pub fn fraction_of_memory(fraction: f64) -> u64 {
    let total = total_memory().unwrap_or(8 << 30);
    (total as f64 * fraction) as u64
}

fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory of this process, from /proc.
pub fn resident_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Raises the memory alarm (blocking publishers) while resident memory is
/// above the limit, and clears it when memory falls back below.
async fn memory_monitor(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(MEMORY_SAMPLE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let used = resident_memory().unwrap_or(0);
        let limit = node.memory_limit.load(std::sync::atomic::Ordering::Relaxed);
        node.metrics.memory_used_bytes.set(used as i64);
        let over = used > limit;
        if over != *node.alarm.borrow() {
            if over {
                tracing::warn!(used, limit, "memory alarm: blocking publishers");
            } else {
                tracing::info!(used, limit, "memory alarm cleared");
            }
            node.metrics.memory_alarm.set(over as i64);
            node.alarm.send_replace(over);
        }
    }
}
