//! The command line (clap): `warren server`, `warren perf`.
//!
//! Every server setting can come from a TOML file (`--config`), a `WARREN_*`
//! environment variable or a flag; flags and variables win over the file.

pub mod perf;

use crate::config::Config;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "warren",
    version,
    about = "An AMQP 0-9-1 message broker whose durable queues are Raft groups"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a broker node (one node with data in ./data by default).
    Server(Box<ServerArgs>),
    /// Load generator: publishers with confirms and consumers with prefetch,
    /// reporting msgs/s and latency percentiles.
    Perf(perf::PerfArgs),
}

#[derive(Args, Debug, Default)]
pub struct ServerArgs {
    /// TOML file with any of the settings below (and [[users]] entries).
    #[arg(long, env = "WARREN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the node's data [default: ./data]
    #[arg(long, env = "WARREN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// AMQP listen address [default: 0.0.0.0:5672]
    #[arg(long, env = "WARREN_AMQP_LISTEN")]
    pub amqp_listen: Option<SocketAddr>,
    /// Admin HTTP listen address [default: 0.0.0.0:15672]
    #[arg(long, env = "WARREN_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// This node's id [default: 1]
    #[arg(long, env = "WARREN_NODE_ID")]
    pub node_id: Option<u16>,
    /// Address other nodes reach this one on (cluster traffic)
    #[arg(long, env = "WARREN_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// Every node of the cluster, this one included: 1=host:port,2=host:port,...
    #[arg(long, env = "WARREN_PEERS", value_parser = parse_peers)]
    pub peers: Option<std::collections::BTreeMap<u16, String>>,
    /// Secret shared by the cluster's nodes (required with --peers)
    #[arg(long, env = "WARREN_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// A peer silent this long is taken for down, ms [default: 1500]
    #[arg(long, env = "WARREN_FAILURE_TIMEOUT_MS")]
    pub failure_timeout_ms: Option<u64>,
    /// Heartbeat proposed to clients, seconds; 0 disables [default: 60]
    #[arg(long, env = "WARREN_HEARTBEAT")]
    pub heartbeat: Option<u16>,
    /// Largest frame accepted, bytes [default: 131072]
    #[arg(long, env = "WARREN_FRAME_MAX")]
    pub frame_max: Option<u32>,
    /// Highest channel number per connection [default: 2047]
    #[arg(long, env = "WARREN_CHANNEL_MAX")]
    pub channel_max: Option<u16>,
    /// Time allowed from TCP accept to connection.open, ms [default: 10000]
    #[arg(long, env = "WARREN_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Largest message body accepted, bytes [default: 134217728]
    #[arg(long, env = "WARREN_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<u64>,
    /// Block publishers above this fraction of machine memory [default: 0.4]
    #[arg(long, env = "WARREN_MEMORY_HIGH_WATERMARK")]
    pub memory_high_watermark: Option<f64>,
    /// Block publishers above this many bytes of resident memory (overrides the fraction)
    #[arg(long, env = "WARREN_MEMORY_HIGH_WATERMARK_BYTES")]
    pub memory_high_watermark_bytes: Option<u64>,
    /// Log level or filter (e.g. info, warren=debug); RUST_LOG also works [default: info]
    #[arg(long, env = "WARREN_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log as JSON lines instead of text
    #[arg(long, env = "WARREN_LOG_JSON")]
    pub log_json: bool,
}

impl ServerArgs {
    /// The effective settings: defaults, then the file, then flags/variables.
    pub fn to_config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_toml_file(p)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$f = v; } )* };
        }
        set!(
            data_dir,
            amqp_listen,
            admin_listen,
            node_id,
            heartbeat,
            frame_max,
            channel_max,
            handshake_timeout_ms,
            max_message_size,
            memory_high_watermark,
            peers,
            cluster_secret,
            failure_timeout_ms
        );
        if self.cluster_listen.is_some() {
            c.cluster_listen = self.cluster_listen;
        }
        if c.peers.len() > 1 && c.cluster_secret.is_empty() {
            anyhow::bail!("a cluster needs --cluster-secret (or WARREN_CLUSTER_SECRET)");
        }
        if !c.peers.is_empty() && !c.peers.contains_key(&c.node_id) {
            anyhow::bail!("--peers must list this node ({})", c.node_id);
        }
        if let Some(addr) = c.peers.get(&c.node_id) {
            if c.cluster_listen.is_none() {
                c.cluster_listen = Some(addr.parse().map_err(|e| {
                    anyhow::anyhow!("this node's peer address {addr} is not an address: {e}")
                })?);
            }
        }
        if self.memory_high_watermark_bytes.is_some() {
            c.memory_high_watermark_bytes = self.memory_high_watermark_bytes;
        }
        if c.frame_max < crate::amqp::frame::FRAME_MIN_SIZE {
            anyhow::bail!(
                "frame_max must be at least {}",
                crate::amqp::frame::FRAME_MIN_SIZE
            );
        }
        if c.node_id == 0 {
            anyhow::bail!("node_id must be at least 1");
        }
        Ok(c)
    }
}

/// The default log filter. openraft reports every failed RPC of every group
/// at WARN (a vote sent to a node still opening its groups, a replication
/// call to a restarting peer); with a thousand groups a restart would write
/// tens of thousands of lines, so only its errors show. Warren logs what a
/// restart or an election round amounts to, once per node.
pub const DEFAULT_LOG: &str = "info,openraft=error";

/// Sets up logging: `RUST_LOG` wins, then `--log-level`, then
/// [`DEFAULT_LOG`].
pub fn init_logging(level: Option<&str>, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .ok()
        .or_else(|| level.and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_LOG));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Parses `1=host:port,2=host:port`.
fn parse_peers(s: &str) -> Result<std::collections::BTreeMap<u16, String>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (id, addr) = p
                .split_once('=')
                .ok_or_else(|| format!("'{p}' is not id=host:port"))?;
            let id: u16 = id
                .trim()
                .parse()
                .map_err(|_| format!("'{id}' is not a node id"))?;
            Ok((id, addr.trim().to_owned()))
        })
        .collect()
}
