//! Temporary entry point for developing `warren perf` alone.
use clap::Parser;
#[derive(Parser)]
struct Cli { #[command(subcommand)] cmd: Cmd }
#[derive(clap::Subcommand)]
enum Cmd { Perf(warren::cli::perf::PerfArgs) }
fn main() -> anyhow::Result<()> {
    let Cli { cmd: Cmd::Perf(a) } = Cli::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(warren::cli::perf::run(a))
}
