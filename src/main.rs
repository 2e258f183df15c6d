use clap::Parser;

use leasehold::app::App;
use leasehold::config::{Cli, Command, Config};
use leasehold::{shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(config) => serve(*config).await,
        Command::Worker(worker) => worker.run().await,
        Command::Task(command) => command.run().await,
        Command::Queue(command) => command.run().await,
        Command::Runtime(command) => command.run().await,
        Command::Key(command) => command.run().await,
        Command::Bench(args) => leasehold::bench::run(*args).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    telemetry::init(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let app = App::build(config).await?;
    app.run_until_stopped(listener, shutdown::signal()).await?;
    Ok(())
}
