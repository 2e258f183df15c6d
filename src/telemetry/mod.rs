//! Logging: `RUST_LOG` filters (default `info`), human-readable or JSON lines. Metrics: one
//! [`metrics::Metrics`] per server, served as Prometheus text by [`crate::web`].

pub mod metrics;

use tracing_subscriber::EnvFilter;

use clap::ValueEnum;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Logs of `leasehold serve`, on standard output.
pub fn init(format: LogFormat) {
    install(format, std::io::stdout);
}

/// Logs of the client subcommands, on standard error: standard output carries their results
/// (`--output json`, a task's stdout).
pub fn init_stderr(format: LogFormat) {
    install(format, std::io::stderr);
}

fn install<W>(format: LogFormat, writer: W)
where
    W: for<'writer> tracing_subscriber::fmt::MakeWriter<'writer> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
