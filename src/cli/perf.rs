//! placeholder until the load generator lands
#[derive(clap::Args, Debug, Clone)]
pub struct PerfArgs {}
pub async fn run(_args: PerfArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
