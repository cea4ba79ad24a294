//! The admin HTTP API (axum): health checks, Prometheus metrics, and read
//! endpoints shaped like RabbitMQ's management API.

use crate::node::Node;
use crate::queue::command::QueueCounts;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::{get, put};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/health/checks/alarms", get(alarms))
        .route("/api/cluster", get(cluster))
        .route("/api/aliveness", get(alive))
        .route("/api/overview", get(overview))
        .route("/api/queues", get(queues))
        .route("/api/vm-memory-high-watermark", put(set_watermark))
        .route("/metrics", get(metrics))
        .with_state(node)
}

async fn alive() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// 200 once the node serves clients (it reached a majority and recovered).
async fn health(State(node): State<Arc<Node>>) -> impl IntoResponse {
    if *node.ready.borrow() {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "reason": "waiting for a majority of the cluster"})),
        )
    }
}

/// This node's view of the cluster: which peers it reaches, and every Raft
/// group it holds with its leader and term.
async fn cluster(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let raft = node.raft();
    let reachable: serde_json::Map<String, serde_json::Value> = raft
        .reachable()
        .into_iter()
        .map(|(id, up)| (id.to_string(), json!(up)))
        .collect();
    let groups: Vec<_> = raft
        .status()
        .into_iter()
        .map(|g| {
            json!({
                "group": g.group,
                "leader": g.leader,
                "term": g.term,
                "last_applied": g.last_applied,
                "members": g.members,
            })
        })
        .collect();
    Json(json!({
        "node": node.node_id(),
        "reachable": reachable,
        "groups": groups,
    }))
}

async fn alarms(State(node): State<Arc<Node>>) -> impl IntoResponse {
    if *node.alarm.borrow() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "reason": "memory alarm in effect"})),
        )
    } else {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    }
}

/// Body of `PUT /api/vm-memory-high-watermark`: one of the two.
#[derive(serde::Deserialize)]
struct Watermark {
    fraction: Option<f64>,
    bytes: Option<u64>,
}

/// Changes the memory high watermark at run time, like
/// `rabbitmqctl set_vm_memory_high_watermark`.
async fn set_watermark(
    State(node): State<Arc<Node>>,
    Json(w): Json<Watermark>,
) -> impl IntoResponse {
    let limit = match (w.fraction, w.bytes) {
        (Some(f), None) if f > 0.0 && f <= 1.0 => crate::server::fraction_of_memory(f),
        (None, Some(b)) => b,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "bad_request", "reason": "give either 'fraction' in (0, 1] or 'bytes'"})),
            )
                .into_response();
        }
    };
    node.memory_limit.store(limit, Ordering::Relaxed);
    tracing::info!(limit, "memory high watermark changed");
    StatusCode::NO_CONTENT.into_response()
}

async fn overview(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let queues = node.all_queues();
    let ready: u64 = queues
        .iter()
        .map(|q| q.stats.ready.load(Ordering::Relaxed))
        .sum();
    let unacked: u64 = queues
        .iter()
        .map(|q| q.stats.unacked.load(Ordering::Relaxed))
        .sum();
    Json(json!({
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "node": format!("warren@{}", node.config.node_id),
        "queue_totals": {"messages": ready + unacked, "messages_ready": ready, "messages_unacknowledged": unacked},
        "object_totals": {
            "queues": queues.len(),
            "connections": node.metrics.connections.get(),
            "channels": node.metrics.channels.get(),
        },
    }))
}

/// How long `/api/queues` waits for the counts of a queue that lives on
/// another node.
const REMOTE_COUNTS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn queues(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let handles = node.all_queues();
    // A node-local queue on another node is counted there: its handle here
    // only forwards. Asked for all at once, each within a bound.
    let remote = handles.iter().enumerate().filter(|(_, q)| q.home.is_some());
    let mut asked = tokio::task::JoinSet::new();
    for (i, q) in remote {
        let q = q.clone();
        asked.spawn(async move {
            let counts = tokio::time::timeout(REMOTE_COUNTS_WAIT, q.counts()).await;
            (i, counts.ok().flatten())
        });
    }
    let mut counted = std::collections::HashMap::new();
    while let Some(answer) = asked.join_next().await {
        if let Ok((i, Some(c))) = answer {
            counted.insert(i, c);
        }
    }
    let list: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let s = &q.stats;
            let c = counted.get(&i).cloned().unwrap_or_else(|| QueueCounts {
                ready: s.ready.load(Ordering::Relaxed),
                unacked: s.unacked.load(Ordering::Relaxed),
                ready_bytes: s.ready_bytes.load(Ordering::Relaxed),
                consumers: s.consumers.load(Ordering::Relaxed),
                dead_lettering: s.dead_lettering.load(Ordering::Relaxed),
            });
            let leader = q.group.and_then(|g| node.raft().leader(g));
            // Where the queue is served: its leader, or its home node.
            let serving = leader.or(q.home).unwrap_or(node.node_id());
            json!({
                "name": &*q.name,
                "vhost": &*q.vhost,
                "type": if q.config.quorum { "quorum" } else { "classic" },
                "messages": c.ready + c.unacked,
                "messages_ready": c.ready,
                "messages_unacknowledged": c.unacked,
                "message_bytes_ready": c.ready_bytes,
                // RabbitMQ's name: messages being dead-lettered at least once.
                "messages_dlx": c.dead_lettering,
                "consumers": c.consumers,
                "node": format!("warren@{serving}"),
                "leader": leader,
                "members": node.meta().queue(&q.vhost, &q.name).map(|d| d.placement.replicas.clone()).unwrap_or_default(),
            })
        })
        .collect();
    Json(list)
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &node.metrics.registry).is_err() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics encoding failed".to_owned(),
        )
            .into_response();
    }
    // The registry's text ends with OpenMetrics' EOF marker, which must stay last.
    if let Some(stripped) = text.strip_suffix("# EOF\n") {
        text.truncate(stripped.len());
    }
    // Per-queue gauges, with RabbitMQ's names and labels.
    let queues = node.all_queues();
    for (name, help, pick) in [
        (
            "rabbitmq_queue_messages_ready",
            "Messages ready to be delivered",
            0,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "Messages delivered and not yet acknowledged",
            1,
        ),
        ("rabbitmq_queue_consumers", "Consumers on a queue", 2),
    ] {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for q in &queues {
            let v = match pick {
                0 => q.stats.ready.load(Ordering::Relaxed),
                1 => q.stats.unacked.load(Ordering::Relaxed),
                _ => q.stats.consumers.load(Ordering::Relaxed),
            };
            text.push_str(&format!(
                "{name}{{vhost=\"{}\",queue=\"{}\"}} {v}\n",
                escape_label(&q.vhost),
                escape_label(&q.name)
            ));
        }
    }
    // Raft, per group this node holds a replica of: RabbitMQ's names for
    // the term and the applied index, labelled with the queue (the metadata
    // group is `queue=""`), plus whether this node leads it.
    let status = node.raft().status();
    let names: std::collections::HashMap<u64, (Arc<str>, Arc<str>)> = queues
        .iter()
        .filter_map(|q| Some((q.group?, (q.vhost.clone(), q.name.clone()))))
        .collect();
    for (name, help, pick) in [
        (
            "rabbitmq_raft_term_total",
            "Current Raft term of the group",
            0,
        ),
        (
            "rabbitmq_raft_log_last_applied_index",
            "Index of the last entry the replica applied",
            1,
        ),
        (
            "warren_raft_leader",
            "1 when this node leads the group, 0 otherwise",
            2,
        ),
    ] {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for g in &status {
            let (vhost, queue) = names
                .get(&g.group)
                .map(|(v, q)| (v.to_string(), q.to_string()))
                .unwrap_or_default();
            let v = match pick {
                0 => g.term,
                1 => g.last_applied,
                _ => u64::from(g.leader == Some(node.node_id())),
            };
            text.push_str(&format!(
                "{name}{{vhost=\"{}\",queue=\"{}\",group=\"{}\"}} {v}\n",
                escape_label(&vhost),
                escape_label(&queue),
                g.group
            ));
        }
    }
    text.push_str("# EOF\n");
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
