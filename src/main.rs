use clap::Parser;

use leasehold::app::App;
use leasehold::config::Cli;
use leasehold::{shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Cli::parse().into_config();
    telemetry::init(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let app = App::build(config).await?;
    app.run_until_stopped(listener, shutdown::signal()).await?;
    Ok(())
}
