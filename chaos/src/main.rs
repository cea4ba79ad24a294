//! `warren-chaos`: a Jepsen-style suite that starts a real cluster of
//! `warren` processes, breaks it (kill -9, SIGSTOP, partitions, restarts of
//! every node) under a checked workload, heals it, drains every queue and
//! proves that nothing confirmed was lost.
//!
//! Where to read:
//! - `run.rs`: one run, start to verdict;
//! - `scenarios.rs`: the named scenarios; `faults.rs`: what each fault does;
//! - `cluster.rs`: the processes and their addresses; `proxy.rs` and
//!   `network.rs`: the proxies on every link and how partitions set them;
//! - `setup.rs`: what is declared (checked queues, the dead-letter chain,
//!   the RPC queue, idle queues) and where the chain's clients start;
//! - `workload.rs`: publishers and consumers (acking, rejecting, the RPC
//!   server); `rpc.rs`: the RPC client; `history.rs`: what they record;
//! - `checker.rs`: the verdict (pure, tested); `report.rs`, `svg.rs`: output;
//! - `monitor.rs`: leaders and queue depths from the admin API;
//! - `restart_bench.rs`: `restart-bench`, the time a whole-cluster restart
//!   with many queues takes to serve again (a benchmark, not a check).

mod checker;
mod cluster;
mod faults;
mod history;
mod monitor;
mod network;
mod proxy;
mod report;
mod restart_bench;
mod rpc;
mod run;
mod scenarios;
mod setup;
mod svg;
mod workload;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "warren-chaos",
    about = "Breaks real Warren clusters and checks that no confirmed message is lost"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one scenario against a fresh cluster.
    Run(RunArgs),
    /// List the scenarios.
    List,
    /// Time a whole-cluster restart with many quorum queues (a benchmark).
    RestartBench(RestartArgs),
}

#[derive(Args, Debug)]
struct RestartArgs {
    /// Quorum queues, each holding one message through the restart.
    #[arg(long, default_value_t = 1000)]
    queues: usize,
    /// The warren binary [default: ${CARGO_TARGET_DIR:-target}/release/warren].
    #[arg(long)]
    warren: Option<PathBuf>,
    /// Directory for the nodes' data and logs
    /// [default: ${CARGO_TARGET_DIR:-target}/restart-bench].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// First of the fixed ports every node uses on its own loopback address.
    #[arg(long, default_value_t = 27000)]
    base_port: u16,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Number of nodes (3 to 9).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Scenario name (see `--list`).
    #[arg(long, default_value = "random")]
    scenario: String,
    /// How long faults are injected, e.g. 45s, 10m, 2h.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the fault schedule; random (and printed) when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Directory for report.json, history.jsonl, timeline.svg and node logs
    /// [default: ${CARGO_TARGET_DIR:-target}/chaos/SCENARIO-SEED].
    #[arg(long)]
    report: Option<PathBuf>,
    /// The warren binary [default: ${CARGO_TARGET_DIR:-target}/debug/warren].
    #[arg(long)]
    warren: Option<PathBuf>,
    /// Print the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Quorum queues to spread the load over.
    #[arg(long, default_value_t = 2)]
    queues: usize,
    /// Publishers [default: one per node, at least one per queue].
    #[arg(long)]
    publishers: Option<usize>,
    /// Consumers [default: one per node, at least one per queue].
    #[arg(long)]
    consumers: Option<usize>,
    /// Messages per second per publisher.
    #[arg(long, default_value_t = 40)]
    rate: u32,
    /// Idle quorum queues declared at setup (through every node in turn);
    /// they carry nothing but weigh on every restart and election.
    #[arg(long, default_value_t = 0)]
    idle_queues: usize,
    /// Messages per second into the dead-letter chain (a quorum queue whose
    /// consumer rejects everything, dead-lettered through a fanout exchange
    /// into a quorum queue on another node); 0 leaves the chain out.
    #[arg(long, default_value_t = 20)]
    dead_letter_rate: u32,
    /// RPC calls per second (a client with a node-local reply queue, a
    /// server on another node); 0 leaves the RPC pair out.
    #[arg(long, default_value_t = 4)]
    rpc_rate: u32,
    /// First of the fixed ports every node uses on its own loopback address.
    #[arg(long, default_value_t = 25000)]
    base_port: u16,
}

/// Parses `500ms`, `45s`, `10m`, `2h` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 45s, 10m or 2h"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n * 1_000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return Err(format!("unknown unit '{unit}' in '{s}' (ms, s, m, h)")),
    };
    Ok(Duration::from_millis(ms))
}

fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn list() {
    for s in scenarios::SCENARIOS {
        println!(
            "{:<22} {}",
            s.name,
            s.about.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// A shell word, quoted only if it needs to be.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

async fn run(args: RunArgs) -> Result<bool> {
    let Some(scenario) = scenarios::find(&args.scenario) else {
        list();
        bail!("no scenario named '{}'", args.scenario);
    };
    if !(3..=cluster::MAX_NODES).contains(&args.nodes) {
        bail!("--nodes must be between 3 and {}", cluster::MAX_NODES);
    }
    if args.queues == 0 || args.rate == 0 {
        bail!("--queues and --rate must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let publishers = args.publishers.unwrap_or(args.nodes).max(args.queues);
    let consumers = args.consumers.unwrap_or(args.nodes).max(args.queues);
    let warren = args
        .warren
        .clone()
        .unwrap_or_else(|| target_dir().join("debug").join("warren"));
    let report_dir = args.report.clone().unwrap_or_else(|| {
        target_dir()
            .join("chaos")
            .join(format!("{}-{seed}", scenario.name))
    });
    let warren = std::path::absolute(&warren).unwrap_or(warren);
    let program = std::env::args()
        .next()
        .unwrap_or_else(|| "warren-chaos".into());
    let reproduce = [
        shell_word(&program),
        "run".into(),
        format!("--nodes {}", args.nodes),
        format!("--scenario {}", scenario.name),
        format!("--duration {}", format_duration(args.duration)),
        format!("--seed {seed}"),
        format!("--queues {}", args.queues),
        format!("--publishers {publishers}"),
        format!("--consumers {consumers}"),
        format!("--rate {}", args.rate),
        format!("--idle-queues {}", args.idle_queues),
        format!("--dead-letter-rate {}", args.dead_letter_rate),
        format!("--rpc-rate {}", args.rpc_rate),
        format!("--base-port {}", args.base_port),
        format!("--warren {}", shell_word(&warren.to_string_lossy())),
        format!("--report {}", shell_word(&report_dir.to_string_lossy())),
    ]
    .join(" ");
    let settings = report::Settings {
        scenario: scenario.name.to_owned(),
        nodes: args.nodes,
        seed,
        duration_ms: args.duration.as_millis() as u64,
        queues: args.queues,
        publishers,
        consumers,
        rate: args.rate,
        idle_queues: args.idle_queues,
        dead_letter_rate: args.dead_letter_rate,
        rpc_rate: args.rpc_rate,
        warren: warren.to_string_lossy().into_owned(),
        reproduce: reproduce.clone(),
    };
    eprintln!("warren-chaos: seed {seed}; to repeat: {reproduce}");
    std::fs::create_dir_all(&report_dir)?;
    let plan = run::Plan {
        scenario,
        settings,
        duration: args.duration,
        report_dir,
        warren,
        base_port: args.base_port,
    };
    let outcome = tokio::select! {
        r = run::run(plan) => r?,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the run kills every node and closes every proxy.
            bail!("interrupted (seed {seed}); to repeat: {reproduce}");
        }
    };
    print!("{}", outcome.summary);
    Ok(outcome.verdict.pass)
}

/// The harness's runtime: two workers, like the machines it runs on.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("warren-chaos: cannot start the runtime: {e}");
            ExitCode::from(2)
        })
}

fn restart_bench(args: RestartArgs) -> ExitCode {
    let warren = args
        .warren
        .unwrap_or_else(|| target_dir().join("release").join("warren"));
    let warren = std::path::absolute(&warren).unwrap_or(warren);
    let dir = args
        .dir
        .unwrap_or_else(|| target_dir().join("restart-bench"));
    let plan = restart_bench::Plan {
        queues: args.queues.max(1),
        warren,
        dir,
        base_port: args.base_port,
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(restart_bench::run(plan)) {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("warren-chaos restart-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHAOS_LOG")
                .unwrap_or_else(|_| "warren_chaos=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let args = match cli.command {
        Command::List => {
            list();
            return ExitCode::SUCCESS;
        }
        Command::RestartBench(args) => return restart_bench(args),
        Command::Run(args) if args.list => {
            list();
            return ExitCode::SUCCESS;
        }
        Command::Run(args) => args,
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("warren-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_word("/a/b-c"), "/a/b-c");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}
