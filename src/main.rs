//! The `warren` binary: see `warren --help`.

use clap::Parser;
use warren::cli::{Cli, Command, init_logging};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Server(args) => {
            init_logging(args.log_level.as_deref(), args.log_json);
            let config = args.to_config()?;
            rt.block_on(async move {
                let node = warren::node::Node::start(config).await?;
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    let _ = tx.send(true);
                });
                warren::server::run(node, rx).await
            })
        }
        Command::Perf(args) => {
            init_logging(Some("warn"), false);
            rt.block_on(warren::cli::perf::run(args))
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
