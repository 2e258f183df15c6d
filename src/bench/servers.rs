//! What a bench run measures against: a scratch PostgreSQL database and `leasehold serve`
//! processes (the same binary), each on a free port, stopped when dropped.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::process::{Child, Command};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::client::Client;

/// A database created for one run and dropped after it.
pub(super) struct ScratchDatabase {
    admin_url: String,
    name: String,
    pub(super) url: String,
}

impl ScratchDatabase {
    /// `purpose` tells this run's databases apart (a lowercase word).
    pub(super) async fn create(admin_url: &str, purpose: &str) -> anyhow::Result<ScratchDatabase> {
        let name = format!("leasehold_bench_{}_{purpose}", std::process::id());
        let mut admin = PgConnection::connect(admin_url)
            .await
            .context("connect to --database-url")?;
        // The name is a fixed prefix, our pid and a constant: nothing external reaches this SQL.
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        Ok(ScratchDatabase {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    pub(super) async fn drop_database(self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        let name = &self.name;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
        Ok(())
    }

    /// Transactions committed and rolled back in this database so far, once the counters have
    /// settled: an idle backend reports its counts to the statistics system up to 10 s late
    /// (PostgreSQL 15), so this waits until they stood still for `quiet` seconds.
    pub(super) async fn settled_transactions(&self, quiet: u32) -> anyhow::Result<i64> {
        let mut connection = PgConnection::connect(&self.admin_url).await?;
        let (mut last, mut still) = (-1, 0);
        for _ in 0..60 {
            let count: i64 = sqlx::query_scalar(
                "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
            )
            .bind(&self.name)
            .fetch_one(&mut connection)
            .await?;
            still = if count == last { still + 1 } else { 0 };
            if still >= quiet {
                return Ok(count);
            }
            last = count;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(last)
    }
}

/// One `leasehold serve` process.
pub(super) struct ServerProcess {
    child: Child,
    pub(super) url: String,
    /// With `--auth token`: the admin token its clients carry (the file is removed on drop).
    admin: Option<(String, std::path::PathBuf)>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some((_, file)) = &self.admin {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl ServerProcess {
    /// A server with `--auth none`: the scenarios' clients carry no credential.
    pub(super) async fn start(
        database_url: Option<&str>,
        redis_url: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<ServerProcess> {
        Self::start_with_auth(database_url, redis_url, extra, false).await
    }

    /// With `authenticated`, a server with `--auth token` and a fresh admin token: its
    /// [`ServerProcess::client`] carries that token, and runtimes use their own tokens.
    pub(super) async fn start_with_auth(
        database_url: Option<&str>,
        redis_url: Option<&str>,
        extra: &[&str],
        authenticated: bool,
    ) -> anyhow::Result<ServerProcess> {
        let admin = if authenticated {
            let token = format!("bench-{:032x}", rand::random::<u128>());
            let file =
                std::env::temp_dir().join(format!("leasehold-bench-admin-{}", std::process::id()));
            std::fs::write(&file, &token)?;
            Some((token, file))
        } else {
            None
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let address = format!("127.0.0.1:{port}");
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args([
                "serve",
                "--listen",
                &address,
                "--database-max-connections",
                "32",
            ])
            .args(extra)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        match &admin {
            Some((_, file)) => command
                .args(["--auth", "token", "--admin-token-file"])
                .arg(file),
            None => command.args(["--auth", "none"]),
        };
        if let Some(url) = database_url {
            command.args(["--database-url", url]);
        }
        if let Some(url) = redis_url {
            command.args(["--redis-url", url]);
        }
        let server = ServerProcess {
            child: command.spawn().context("start leasehold serve")?,
            url: format!("http://{address}"),
            admin,
        };
        server.wait_until_serving().await?;
        Ok(server)
    }

    async fn wait_until_serving(&self) -> anyhow::Result<()> {
        for _ in 0..300 {
            let channel = tonic::transport::Endpoint::from_shared(self.url.clone())?;
            if let Ok(channel) = channel.connect().await {
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                let answer = HealthClient::new(channel).check(request).await;
                if answer.is_ok_and(|answer| answer.into_inner().status() == ServingStatus::Serving)
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the server at {} never became SERVING", self.url)
    }

    pub(super) fn client(&self) -> anyhow::Result<Client> {
        let client = Client::connect(self.url.clone())?;
        Ok(match &self.admin {
            Some((token, _)) => client.with_token(token)?,
            None => client,
        })
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Reclaims what earlier scenarios left behind (dead row versions), so each throughput
    /// scenario starts from the state autovacuum keeps a live system in.
    pub(super) async fn vacuum(database_url: &str) -> anyhow::Result<()> {
        let mut connection = PgConnection::connect(database_url).await?;
        sqlx::query("VACUUM ANALYZE")
            .execute(&mut connection)
            .await?;
        Ok(())
    }

    /// Resident memory of the server process, in MiB.
    pub(super) fn rss_mib(&self) -> Option<f64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }
}
