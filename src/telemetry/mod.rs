//! Logging: `RUST_LOG` filters (default `info`), human-readable or JSON lines. Metrics:
//! Prometheus text on `--metrics-listen` (`/metrics`).

pub mod metrics;

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

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

/// Latency buckets (seconds) of every duration histogram: 0.5ms to 10s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Serves Prometheus metrics on `address` for the rest of the process. The recorder is
/// process-wide: a second server in the same process (tests) keeps the first one's.
pub fn serve_metrics(address: SocketAddr) -> anyhow::Result<()> {
    let installed = PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets(&LATENCY_BUCKETS)?
        .install();
    match installed {
        Ok(()) => {
            metrics::describe();
            tracing::info!(%address, "serving metrics");
            Ok(())
        }
        Err(metrics_exporter_prometheus::BuildError::FailedToSetGlobalRecorder(_)) => {
            tracing::warn!("a metrics recorder is already installed in this process");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}
