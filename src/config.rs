//! Node settings: embedded defaults, overridden by a TOML file (`--config`),
//! then by `WARREN_*` environment variables and command-line flags (see
//! `cli`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A user allowed to log in. Every user may use every vhost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub password: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id in the cluster (1..=65535).
    pub node_id: u16,
    /// Where the node keeps its data.
    pub data_dir: PathBuf,
    pub amqp_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Heartbeat the server proposes in `connection.tune`, seconds (0: off).
    pub heartbeat: u16,
    /// Largest frame the server accepts, bytes, proposed in `connection.tune`.
    pub frame_max: u32,
    /// Highest channel number, proposed in `connection.tune`.
    pub channel_max: u16,
    /// Time from TCP accept to `connection.open`, milliseconds.
    pub handshake_timeout_ms: u64,
    /// Largest message body accepted, bytes (RabbitMQ's default: 128 MiB).
    pub max_message_size: u64,
    /// Publishers are blocked when the process's resident memory exceeds
    /// this fraction of the machine's memory (RabbitMQ's default: 0.4)...
    pub memory_high_watermark: f64,
    /// ...or this many bytes, when set (takes precedence).
    pub memory_high_watermark_bytes: Option<u64>,
    /// Users; guest/guest by default, allowed from loopback only.
    pub users: Vec<User>,
    /// Whether `guest` may log in from addresses other than loopback.
    pub guest_remote: bool,
    /// Address other nodes reach this one on. Without peers, a loopback
    /// port the system picks (nobody dials a one-node cluster).
    pub cluster_listen: Option<SocketAddr>,
    /// Every node of the cluster, this one included: id -> "host:port".
    /// Empty: a one-node cluster.
    pub peers: BTreeMap<u16, String>,
    /// Shared by every node of a cluster; a peer without it is refused.
    pub cluster_secret: String,
    /// A peer silent this long is taken for down, milliseconds.
    pub failure_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            amqp_listen: "0.0.0.0:5672".parse().expect("literal address"),
            admin_listen: "0.0.0.0:15672".parse().expect("literal address"),
            heartbeat: 60,
            frame_max: 131_072,
            channel_max: 2047,
            handshake_timeout_ms: 10_000,
            max_message_size: 128 * 1024 * 1024,
            memory_high_watermark: 0.4,
            memory_high_watermark_bytes: None,
            users: vec![User {
                name: "guest".into(),
                password: "guest".into(),
            }],
            guest_remote: false,
            cluster_listen: None,
            peers: BTreeMap::new(),
            cluster_secret: String::new(),
            failure_timeout_ms: 1500,
        }
    }
}

impl Config {
    /// The Raft engine's settings.
    pub fn cluster_config(&self) -> warren_raft::ClusterConfig {
        let listen = self
            .cluster_listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut peers: BTreeMap<u64, String> = self
            .peers
            .iter()
            .map(|(id, addr)| (*id as u64, addr.clone()))
            .collect();
        peers
            .entry(self.node_id as u64)
            .or_insert_with(|| listen.to_string());
        warren_raft::ClusterConfig {
            node_id: self.node_id as u64,
            listen,
            peers,
            secret: self.cluster_secret.clone(),
            data_dir: self.data_dir.join("raft"),
            failure_timeout: std::time::Duration::from_millis(self.failure_timeout_ms),
        }
    }

    /// Reads a TOML file; unknown keys are an error so that a typo is not
    /// silently ignored.
    pub fn from_toml_file(path: &std::path::Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_file_overrides_only_what_it_names() {
        let c: Config =
            toml::from_str("heartbeat = 30\n[[users]]\nname='a'\npassword='b'\n").unwrap();
        assert_eq!(c.heartbeat, 30);
        assert_eq!(c.frame_max, 131_072);
        assert_eq!(
            c.users,
            vec![User {
                name: "a".into(),
                password: "b".into()
            }]
        );
    }

    #[test]
    fn an_unknown_key_is_an_error() {
        assert!(toml::from_str::<Config>("hearbeat = 30").is_err());
    }
}
