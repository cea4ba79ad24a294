//! What the workload declares before its first message, and where the
//! clients of the dead-letter chain and the RPC pair start.
//!
//! Besides the checked quorum queues (`chaos-N`) a run can declare:
//! - a dead-letter chain: `chaos-dlx-src`, a quorum queue whose
//!   `x-dead-letter-exchange` is the fanout exchange `chaos-dlx`, bound to
//!   the quorum queue `chaos-dlq`. Its clients are placed so that their
//!   traffic crosses nodes (see [`client_nodes`]). Warren has no leader
//!   locator, so where the two queues' leaders start is up to the cluster
//!   (the run notes it); faults move them anyway;
//! - `chaos-rpc`, the quorum queue an RPC server consumes;
//! - idle quorum queues (`chaos-idle-N`) that carry nothing but make every
//!   restart and election as heavy as in a real deployment, where most
//!   queues are quiet. They are declared through every node in turn.

use crate::monitor::{self, QueueView};
use crate::network::NodeId;
use crate::workload::{self, Endpoints, METHOD_TIMEOUT, RETRY_PAUSE};
use anyhow::{Result, bail};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// The queue whose consumer rejects everything.
pub const DLX_SOURCE: &str = "chaos-dlx-src";
/// The source's dead-letter exchange (fanout).
pub const DLX_EXCHANGE: &str = "chaos-dlx";
/// The dead-letter queue, bound to [`DLX_EXCHANGE`].
pub const DLQ: &str = "chaos-dlq";
/// The RPC server's request queue.
pub const RPC_QUEUE: &str = "chaos-rpc";

/// The name of the `i`-th idle queue.
pub fn idle_queue(i: usize) -> String {
    format!("chaos-idle-{i}")
}

/// Which queues a run declares.
#[derive(Clone, Debug)]
pub struct Declared {
    /// The checked queues every publisher and consumer works on.
    pub main: Vec<String>,
    pub dead_letter: bool,
    pub rpc: bool,
    pub idle: usize,
}

impl Declared {
    /// The queues the monitor follows (leaders, depths) and faults aim at:
    /// everything but the idle queues.
    pub fn watched(&self) -> Vec<String> {
        let mut v = self.drained();
        if self.rpc {
            v.push(RPC_QUEUE.to_owned());
        }
        v
    }

    /// The queues that must be empty before the run ends: the checked
    /// queues and the dead-letter chain (RPC requests are not checked).
    pub fn drained(&self) -> Vec<String> {
        let mut v = self.main.clone();
        if self.dead_letter {
            v.push(DLX_SOURCE.to_owned());
            v.push(DLQ.to_owned());
        }
        v
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Arguments that make a durable queue a quorum queue (a Raft group).
pub fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(ShortString::from("x-queue-type"), long_string("quorum"));
    t
}

async fn declare_quorum(ch: &Channel, name: &str, args: FieldTable) -> Result<()> {
    let r = timeout(
        METHOD_TIMEOUT,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        ),
    )
    .await;
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => bail!("declaring {name}: {e}"),
        Err(_) => bail!("declaring {name}: no answer within {METHOD_TIMEOUT:?}"),
    }
}

/// The dead-letter queue and its binding.
async fn declare_dead_letter_queue(ch: &Channel) -> Result<()> {
    declare_quorum(ch, DLQ, quorum_args()).await?;
    let r = timeout(
        METHOD_TIMEOUT,
        ch.queue_bind(
            DLQ.into(),
            DLX_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    if !matches!(r, Ok(Ok(()))) {
        bail!("binding {DLQ} to {DLX_EXCHANGE}: {r:?}");
    }
    Ok(())
}

/// The workload's own queues and the dead-letter chain.
async fn declare_workload(ch: &Channel, d: &Declared) -> Result<()> {
    for q in &d.main {
        declare_quorum(ch, q, quorum_args()).await?;
    }
    if d.dead_letter {
        let mut source_args = quorum_args();
        source_args.insert(
            ShortString::from("x-dead-letter-exchange"),
            long_string(DLX_EXCHANGE),
        );
        declare_quorum(ch, DLX_SOURCE, source_args).await?;
        let r = timeout(
            METHOD_TIMEOUT,
            ch.exchange_declare(
                DLX_EXCHANGE.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        if !matches!(r, Ok(Ok(()))) {
            bail!("declaring the exchange {DLX_EXCHANGE}: {r:?}");
        }
        declare_dead_letter_queue(ch).await?;
    }
    if d.rpc {
        declare_quorum(ch, RPC_QUEUE, quorum_args()).await?;
    }
    Ok(())
}

/// Declares everything in `d`, trying the nodes in turn until `within`
/// has passed. Declarations are idempotent, so a retry after a failure
/// part-way repeats the ones already made.
pub async fn declare(endpoints: &Endpoints, d: &Declared, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut attempt = 0;
    let mut last_error = String::from("no attempt");
    let mut workload_done = false;
    while !workload_done && Instant::now() < deadline {
        let (_, uri) = &endpoints[attempt % endpoints.len()];
        attempt += 1;
        let Some((conn, ch)) = workload::connect(uri, "chaos-setup").await else {
            last_error = format!("cannot connect to {uri}");
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        match declare_workload(&ch, d).await {
            Ok(()) => workload_done = true,
            Err(e) => last_error = format!("{e:#}"),
        }
        workload::close(conn).await;
    }
    if !workload_done {
        bail!("could not declare the queues: {last_error}");
    }
    if d.idle > 0 {
        declare_idle(endpoints, d.idle, deadline).await?;
    }
    Ok(())
}

/// Declares the idle queues through every node at once: node k's
/// connection declares every queue whose number is k modulo the cluster's
/// size, moving to the next node if its own fails.
async fn declare_idle(endpoints: &Endpoints, count: usize, deadline: Instant) -> Result<()> {
    let n = endpoints.len();
    let mut tasks = JoinSet::new();
    for first in 0..n {
        let endpoints = endpoints.clone();
        let names: Vec<String> = (first..count).step_by(n).map(idle_queue).collect();
        tasks.spawn(async move {
            let mut attempt = first;
            let mut next = 0;
            let mut last_error = String::from("no attempt");
            while next < names.len() {
                if Instant::now() >= deadline {
                    bail!(
                        "declared {next} of {} idle queues through node {}: {last_error}",
                        names.len(),
                        first + 1
                    );
                }
                let (_, uri) = &endpoints[attempt % endpoints.len()];
                let Some((conn, ch)) = workload::connect(uri, "chaos-setup-idle").await else {
                    attempt += 1;
                    last_error = format!("cannot connect to {uri}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                };
                while next < names.len() && Instant::now() < deadline {
                    match declare_quorum(&ch, &names[next], quorum_args()).await {
                        Ok(()) => next += 1,
                        Err(e) => {
                            last_error = format!("{e:#}");
                            attempt += 1;
                            break;
                        }
                    }
                }
                workload::close(conn).await;
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// The leaders of every queue, as most nodes see them, once every queue in
/// `queues` has one (or `within` has passed).
pub async fn leaders(
    admins: &[(NodeId, SocketAddr)],
    queues: &[&str],
    within: Duration,
) -> BTreeMap<String, QueueView> {
    let deadline = Instant::now() + within;
    loop {
        let view = monitor::agree(&monitor::poll(admins).await);
        let all = queues
            .iter()
            .all(|q| view.get(*q).is_some_and(|v| v.leader.is_some()));
        if all || Instant::now() >= deadline {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Queue leaders per node, e.g. `n1: 101, n2: 99, n3: 105`, for the notes.
pub fn leaders_per_node(view: &BTreeMap<String, QueueView>) -> String {
    let mut per: BTreeMap<Option<NodeId>, usize> = BTreeMap::new();
    for v in view.values() {
        *per.entry(v.leader).or_default() += 1;
    }
    per.iter()
        .map(|(n, c)| match n {
            Some(n) => format!("n{n}: {c}"),
            None => format!("no leader: {c}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The node (0-based index into the endpoints) each client of the
/// dead-letter chain and the RPC pair starts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientNodes {
    /// Publishes into the source.
    pub dlx_publisher: usize,
    /// Rejects everything from the source.
    pub rejecter: usize,
    /// Consumes the dead-letter queue.
    pub dlq_consumer: usize,
    /// The RPC server: on the node after the request queue's leader.
    pub rpc_server: usize,
    /// The RPC client and its node-local reply queue: on the node after
    /// the server's, so requests and replies both cross nodes.
    pub rpc_client: usize,
}

/// Picks the clients' nodes from the leaders the monitor sees, falling
/// back to fixed nodes for a queue without a leader yet.
///
/// When the source and the dead-letter queue have different leaders, the
/// publisher sits on the dead-letter queue's leader (its publishes travel
/// to the source's leader), the rejecter on a third node (its rejects
/// too), and the dead-letter consumer on the source's leader (dead letters
/// come back across the cluster). When one node leads both, no client sits
/// there: only the dead-letter publish itself stays on that node.
pub fn client_nodes(view: &BTreeMap<String, QueueView>, nodes: usize) -> ClientNodes {
    assert!(nodes >= 3, "the chain needs three nodes");
    let leader = |q: &str| view.get(q).and_then(|v| v.leader);
    let next = |n: NodeId| n % nodes as NodeId + 1;
    let index = |n: NodeId| usize::from(n) - 1;
    let src = leader(DLX_SOURCE).unwrap_or(1);
    let (dlx_publisher, rejecter, dlq_consumer) = match leader(DLQ) {
        Some(dlq) if dlq != src => {
            let third = (1..=nodes as NodeId)
                .find(|n| *n != src && *n != dlq)
                .expect("three nodes");
            (dlq, third, src)
        }
        _ => {
            let (a, b) = (next(src), next(next(src)));
            // A third node besides the leader when there is one.
            let c = if nodes > 3 { next(b) } else { a };
            (a, b, c)
        }
    };
    let rpc_server = next(leader(RPC_QUEUE).unwrap_or(1));
    ClientNodes {
        dlx_publisher: index(dlx_publisher),
        rejecter: index(rejecter),
        dlq_consumer: index(dlq_consumer),
        rpc_server: index(rpc_server),
        rpc_client: index(next(rpc_server)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn led_by(pairs: &[(&str, NodeId)]) -> BTreeMap<String, QueueView> {
        pairs
            .iter()
            .map(|&(q, l)| {
                (
                    q.to_owned(),
                    QueueView {
                        leader: Some(l),
                        ..QueueView::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn every_hop_of_the_chain_and_the_rpc_pair_crosses_nodes() {
        let view = led_by(&[(DLX_SOURCE, 3), (DLQ, 1), (RPC_QUEUE, 2)]);
        let c = client_nodes(&view, 3);
        assert_eq!(
            c,
            ClientNodes {
                dlx_publisher: 0,
                rejecter: 1,
                dlq_consumer: 2,
                rpc_server: 2,
                rpc_client: 0,
            }
        );
    }

    #[test]
    fn a_leader_of_both_queues_gets_no_client_of_the_chain() {
        for nodes in [3, 5] {
            for view in [
                BTreeMap::new(),
                led_by(&[(DLX_SOURCE, 2), (DLQ, 2), (RPC_QUEUE, 3)]),
            ] {
                let c = client_nodes(&view, nodes);
                let leader = view.get(DLX_SOURCE).and_then(|v| v.leader).unwrap_or(1);
                let clients = [c.dlx_publisher, c.rejecter, c.dlq_consumer];
                assert!(
                    clients.iter().all(|&i| i != usize::from(leader) - 1),
                    "{nodes} nodes: {c:?}"
                );
                assert_ne!(c.dlx_publisher, c.rejecter, "{c:?}");
                if nodes > 3 {
                    assert_ne!(c.dlq_consumer, c.rejecter, "{c:?}");
                    assert_ne!(c.dlq_consumer, c.dlx_publisher, "{c:?}");
                }
                assert_ne!(c.rpc_server, c.rpc_client, "{c:?}");
                assert!(clients.iter().all(|&i| i < nodes));
            }
        }
    }

    #[test]
    fn the_idle_queues_are_watched_by_nobody() {
        let d = Declared {
            main: vec!["chaos-0".into()],
            dead_letter: true,
            rpc: true,
            idle: 300,
        };
        assert_eq!(d.watched(), ["chaos-0", DLX_SOURCE, DLQ, RPC_QUEUE]);
        assert_eq!(d.drained(), ["chaos-0", DLX_SOURCE, DLQ]);
        assert_eq!(idle_queue(7), "chaos-idle-7");
    }
}
