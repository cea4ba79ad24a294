//! openraft's network, carried over the node's transport: how a group's
//! Raft RPCs reach the same group on another node, and how a node answers
//! them.
//!
//! A group's network client is only a (transport, group, target) triple;
//! every group shares the one connection per peer. Snapshots are sent whole
//! (`full_snapshot`): a Warren snapshot is the state machine's state without
//! message bodies, small enough for one frame.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetworkV2};
use serde::{Deserialize, Serialize};

use crate::state_machine::{GroupStateMachine, Snapshot, SnapshotMeta};
use crate::transport::{CallError, Transport};
use crate::types::{GroupId, NodeId, Raft, TypeConfig, Vote};
use crate::wire::{Reply, Request};

/// A Raft RPC addressed to one group.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        data: Bytes,
    },
}

/// The answer to a [`RaftRpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    Append(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    Snapshot(SnapshotResponse<TypeConfig>),
}

/// Hands a group's openraft instance its clients.
pub(crate) struct NetworkFactory {
    pub(crate) transport: Arc<Transport>,
    pub(crate) group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> GroupNetwork {
        GroupNetwork {
            transport: self.transport.clone(),
            group: self.group,
            target,
        }
    }
}

/// One group's client to one peer.
pub(crate) struct GroupNetwork {
    transport: Arc<Transport>,
    group: GroupId,
    target: NodeId,
}

impl GroupNetwork {
    async fn rpc(
        &self,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> Result<RaftReply, RPCError<TypeConfig>> {
        let request = Request::Raft {
            group: self.group,
            rpc,
        };
        match self.transport.call(self.target, request, timeout).await {
            Ok(Reply::Raft(reply)) => Ok(reply),
            Ok(_) => Err(RPCError::Network(NetworkError::from_string(
                "peer answered a Raft RPC with something else",
            ))),
            // A peer that is down, or does not have the group (yet), is
            // retried after openraft's backoff rather than at once.
            Err(e @ (CallError::Unreachable(..) | CallError::Remote(..))) => {
                Err(RPCError::Unreachable(Unreachable::from_string(e)))
            }
            Err(e @ CallError::Timeout(_)) => Err(RPCError::Network(NetworkError::from_string(e))),
        }
    }
}

fn mismatch() -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(
        "peer answered with the wrong kind of reply",
    ))
}

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = Bytes;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.rpc(RaftRpc::Append(rpc), option.hard_ttl()).await? {
            RaftReply::Append(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.rpc(RaftRpc::Vote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let rpc = RaftRpc::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        let sent = tokio::select! {
            sent = self.rpc(rpc, option.hard_ttl()) => sent,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        match sent {
            Ok(RaftReply::Snapshot(r)) => Ok(r),
            Ok(_) => Err(StreamingError::Network(NetworkError::from_string(
                "peer answered a snapshot with the wrong kind of reply",
            ))),
            Err(RPCError::Unreachable(e)) => Err(StreamingError::Unreachable(e)),
            Err(RPCError::Network(e)) => Err(StreamingError::Network(e)),
            Err(e) => Err(StreamingError::Network(NetworkError::from_string(e))),
        }
    }
}

/// Answers a Raft RPC with the local instance of the group.
pub(crate) async fn serve(
    raft: &Raft<GroupStateMachine>,
    rpc: RaftRpc,
) -> Result<RaftReply, String> {
    match rpc {
        RaftRpc::Append(req) => raft
            .append_entries(req)
            .await
            .map(RaftReply::Append)
            .map_err(|e| e.to_string()),
        RaftRpc::Vote(req) => raft
            .vote(req)
            .await
            .map(RaftReply::Vote)
            .map_err(|e| e.to_string()),
        RaftRpc::Snapshot { vote, meta, data } => raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: data,
                },
            )
            .await
            .map(RaftReply::Snapshot)
            .map_err(|e| e.to_string()),
    }
}
