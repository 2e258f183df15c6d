//! What the soak runs against, all of it its own and restartable: a PostgreSQL cluster in a
//! scratch directory, a Redis, and `leasehold serve` replicas (processes of this binary).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// Picks a free loopback port (the listener is closed again at once).
pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `command` as the postgres user when we are root (initdb and postgres refuse to run as root).
fn as_postgres_user(program: &Path) -> Command {
    if nix::unistd::Uid::effective().is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

async fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// A private PostgreSQL cluster (`initdb` into the scratch directory), restartable.
pub(super) struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    pub(super) port: u16,
}

impl Postgres {
    pub(super) async fn start(scratch: &Path) -> anyhow::Result<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL's server binaries are not installed (/usr/lib/postgresql)")?
            .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql/*/bin")?;
        let data = scratch.join("postgres");
        std::fs::create_dir_all(&data)?;
        if nix::unistd::Uid::effective().is_root() {
            run(
                {
                    let mut chown = Command::new("chown");
                    chown.args(["-R", "postgres:postgres"]).arg(&data);
                    chown
                },
                "chown",
            )
            .await?;
        }
        let mut initdb = as_postgres_user(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(data.join("db"))
            .args(["-U", "postgres", "-A", "trust"]);
        run(initdb, "initdb").await?;
        let postgres = Postgres {
            bin,
            data,
            port: free_port()?,
        };
        postgres.pg_ctl("start").await?;
        Ok(postgres)
    }

    pub(super) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn pg_ctl(&self, action: &str) -> anyhow::Result<()> {
        let mut pg_ctl = as_postgres_user(&self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(self.data.join("db"))
            .arg("-l")
            .arg(self.data.join("log"))
            .args(["-w", "-m", "fast", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
                self.port,
                self.data.display()
            ))
            .arg(action);
        run(pg_ctl, &format!("pg_ctl {action}")).await
    }

    /// A fast shutdown (every connection is cut), then a start.
    pub(super) async fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl("restart").await
    }

    pub(super) async fn stop(&self) -> anyhow::Result<()> {
        self.pg_ctl("stop").await
    }
}

/// A private Redis keeping nothing on disk; killed and restarted empty.
pub(super) struct Redis {
    child: Option<Child>,
    pub(super) port: u16,
}

impl Redis {
    pub(super) async fn start() -> anyhow::Result<Redis> {
        let mut redis = Redis {
            child: None,
            port: free_port()?,
        };
        redis.spawn()?;
        Ok(redis)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server")?;
        self.child = Some(child);
        Ok(())
    }

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// kill -9, a second of absence, and a fresh empty Redis on the same port.
    pub(super) async fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.spawn()
    }
}

/// One `leasehold serve` replica on a fixed port, logging to a file.
pub(super) struct Replica {
    pub(super) name: String,
    pub(super) port: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    pub(super) fn new(name: &str, args: Vec<String>, scratch: &Path) -> anyhow::Result<Replica> {
        Ok(Replica {
            name: name.to_owned(),
            port: free_port()?,
            args,
            log: scratch.join(format!("{name}.log")),
            child: None,
        })
    }

    pub(super) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(super) fn log(&self) -> &Path {
        &self.log
    }

    pub(super) fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--listen", &self.address()])
            .args(&self.args)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a replica")?;
        self.child = Some(child);
        Ok(())
    }

    pub(super) fn pid(&self) -> Option<i32> {
        self.child
            .as_ref()?
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
    }

    /// kill -9: no drain, streams and connections cut.
    pub(super) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM: the graceful drain, waited for (at most `patience`), then kill -9.
    pub(super) async fn terminate(&mut self, patience: Duration) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(child) = self.child.as_mut()
            && tokio::time::timeout(patience, child.wait()).await.is_err()
        {
            self.kill().await;
        }
        self.child = None;
    }
}
