use std::time::Duration;

use clap::Parser;

use anyhow::Context as _;
use leasehold::app::App;
use sqlx::postgres::PgConnectOptions;

use leasehold::cli::{Cli, Command, MigrateArgs};
use leasehold::config::{Config, DatabasePooler};
use leasehold::store::postgres::pooler::Route;
use leasehold::store::postgres::schema;
use leasehold::telemetry::LogFormat;
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
        Command::Migrate(args) => migrate(args).await,
        Command::Soak(args) => {
            telemetry::init(LogFormat::Pretty);
            leasehold::soak::run(*args).await
        }
    }
}

/// `leasehold migrate`: applies pending migrations, then checks this binary can serve on the
/// result.
async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    telemetry::init(LogFormat::Pretty);
    let options: PgConnectOptions = args.database_url.parse().context("invalid DATABASE_URL")?;
    let route = match args.database_pooler {
        DatabasePooler::None => Route::Direct,
        DatabasePooler::Transaction => Route::TransactionPooler {
            // Migrations run without either timeout: an index build may take long.
            statement_timeout: Duration::ZERO,
            lock_timeout: Duration::ZERO,
        },
    };
    let options = match route {
        Route::Direct => options,
        Route::TransactionPooler { .. } => leasehold::app::for_pooler(options),
    };
    schema::apply(&options, route).await?;
    tracing::info!(
        newest = schema::newest_known_version(),
        "the schema holds every migration"
    );
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    telemetry::init(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let app = App::build(config).await?;
    app.run_until_stopped(listener, shutdown::signal()).await?;
    Ok(())
}
