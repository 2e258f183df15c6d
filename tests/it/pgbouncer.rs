//! Behind a real PgBouncer in transaction-pooling mode (spec §11, docs/operations.md "Behind
//! PgBouncer"): the task lifecycle, two replicas sweeping, and migrations, with
//! `--database-pooler transaction`. Each test starts its own pgbouncer (Debian's package,
//! installed by scripts/test) on a free port, in front of the test's database, with fewer server
//! connections than leasehold opens, so statements of different clients share servers.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use leasehold::config::{Config, DatabasePooler};
use leasehold::proto as pb;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::process::{Child, Command};

use crate::harness::{TestServer, status_of, task_id, wait_for_task};
use crate::operations::{database_url, run_to_end, stderr_of};

/// A pgbouncer of the test's own, in transaction mode, killed when dropped.
struct Pgbouncer {
    port: u16,
    process: Child,
    dir: PathBuf,
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.process.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pgbouncer {
    /// `server_connections` per database and user: fewer than the clients, so they share.
    async fn start(server_connections: u32) -> Pgbouncer {
        let dir =
            std::env::temp_dir().join(format!("leasehold-pgbouncer-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let port = crate::harness::free_port();
        let config = dir.join("pgbouncer.ini");
        let users = dir.join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            &config,
            format!(
                "[databases]\n\
                 * = host=127.0.0.1 port=5432\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {users}\n\
                 pool_mode = transaction\n\
                 default_pool_size = {server_connections}\n\
                 max_client_conn = 500\n\
                 logfile = {log}\n",
                users = users.display(),
                log = dir.join("pgbouncer.log").display(),
            ),
        )
        .unwrap();
        let mut command = pgbouncer_command(&dir);
        let process = command
            .arg(&config)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("pgbouncer installed (scripts/services.sh ensure_pgbouncer)");
        let bouncer = Pgbouncer { port, process, dir };
        bouncer.wait_until_listening().await;
        bouncer
    }

    async fn wait_until_listening(&self) {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("pgbouncer did not start listening on {}", self.port);
    }

    /// `connect` (the test's database), reached through this pgbouncer.
    fn in_front_of(&self, connect: &PgConnectOptions) -> PgConnectOptions {
        leasehold::app::for_pooler(connect.clone().host("127.0.0.1").port(self.port))
    }

    fn pid(&self) -> u32 {
        self.process.id().expect("pgbouncer running")
    }
}

/// pgbouncer refuses to run as root: run it as `postgres` then (setpriv execs it, so the
/// child's pid is pgbouncer's own and killing it stops pgbouncer).
fn pgbouncer_command(dir: &std::path::Path) -> Command {
    let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("pgbouncer"));
    if !running_as_root() {
        return Command::new(binary);
    }
    let status = std::process::Command::new("chown")
        .args(["-R", "postgres"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "chown the pgbouncer directory");
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
        .arg(binary);
    command
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.starts_with(b"0\n"))
}

fn through_pooler(config: &mut Config) {
    config.database_pooler = DatabasePooler::Transaction;
}

/// The check that the pgbouncer really pools transactions: sqlx's default prepared statements
/// (what leasehold sends without `--database-pooler transaction`) break behind it. With one
/// server connection, the second client's first statement meets the first client's.
#[sqlx::test]
async fn prepared_statements_break_behind_a_transaction_pooler(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let bouncer = Pgbouncer::start(1).await;
    let through = bouncer.in_front_of(&connect);
    let mut first = PgConnection::connect_with(&through).await.unwrap();
    let mut second = PgConnection::connect_with(&through).await.unwrap();
    let query = "SELECT $1::int + 1";
    let one: i32 = sqlx::query_scalar(query)
        .bind(1)
        .fetch_one(&mut first)
        .await
        .unwrap();
    assert_eq!(one, 2);
    let error = sqlx::query_scalar::<_, i32>(query)
        .bind(2)
        .fetch_one(&mut second)
        .await
        .expect_err("a named statement of another client is in the way");
    assert!(error.to_string().contains("already exists"), "{error}");
    assert_ne!(bouncer.pid(), 0);
}

/// Every kind of store statement through the pooler, with 16 concurrent workers over 2 server
/// connections: enqueue (single and batch), claim, start, extend, usage, complete, fail with a
/// retry, cancel, queue description and update, runtimes, deregistration and a sweep.
#[sqlx::test]
async fn tasks_live_their_whole_life_behind_a_transaction_pooler(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let bouncer = Pgbouncer::start(2).await;
    let server = TestServer::start_with(pool, bouncer.in_front_of(&connect), through_pooler).await;
    let runtime = server.register("pooled", &["q"]).await;

    let tasks: Vec<pb::EnqueueTaskRequest> =
        (0..64).map(|_| crate::harness::task_in("q")).collect();
    let enqueued = server
        .tasks
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest { requests: tasks })
        .await
        .expect("batch enqueue through the pooler")
        .into_inner();
    assert_eq!(enqueued.results.len(), 64);

    let workers: Vec<_> = (0..16)
        .map(|_| {
            let server = &server;
            let runtime = runtime.clone();
            async move {
                let mut done = 0;
                loop {
                    let claimed = server.claim(&runtime, Some(1)).await;
                    let Some(claimed) = claimed.first() else {
                        return done;
                    };
                    server.start_task(claimed).await.expect("start");
                    server.complete(claimed, b"ok").await.expect("complete");
                    done += 1;
                }
            }
        })
        .collect();
    let done: usize = futures::future::join_all(workers).await.into_iter().sum();
    assert_eq!(done, 64, "every task completed exactly once");

    // A failure that retries, then a cancel.
    let retried = server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    server.start_task(&claimed).await.unwrap();
    let failed = server.fail(&claimed, true).await.unwrap();
    assert!(failed.will_retry);
    assert_eq!(
        status_of(&server.cancel(&retried.id).await),
        pb::TaskStatus::Cancelled
    );

    let queue = server.describe_queue("q").await;
    assert_eq!(queue.counts.unwrap().queued, 0);
    server.update_queue("q", Some(3), None).await;
    assert_eq!(server.describe_queue("q").await.max_concurrent, 3);
    assert_eq!(
        server.heartbeat(&runtime).await.status(),
        pb::RuntimeStatus::Online
    );

    // A claimed task of a deregistered runtime goes back to the queue; a sweep runs.
    let held = server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    assert_eq!(task_id(&claimed), held.id);
    assert_eq!(server.deregister(&runtime).await, 1);
    assert_eq!(
        status_of(&server.get_task(&held.id).await),
        pb::TaskStatus::Queued
    );
    server.sweep().await;
    assert!(!server.runtimes(None).await.is_empty());
}

/// Two replicas behind the pooler, each sweeping every 100 ms: one leads throughout (the
/// lease row holds across pooled connections, where a session advisory lock could not), and
/// the silent runtime's task is failed and retried once it is marked OFFLINE.
#[sqlx::test]
async fn two_replicas_sweep_behind_a_transaction_pooler(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let bouncer = Pgbouncer::start(2).await;
    let configure = |config: &mut Config| {
        through_pooler(config);
        config.sweep_interval = Duration::from_millis(100);
        config.offline_after = Duration::from_secs(1);
    };
    let through = bouncer.in_front_of(&connect);
    let first = TestServer::start_with(pool.clone(), through.clone(), configure).await;
    let second = TestServer::start_with(pool, through, configure).await;
    let silent = first.register("silent", &["q"]).await;
    let task = first.enqueue_to("q").await;
    let claimed = first.claim_one(&silent).await;
    first.start_task(&claimed).await.unwrap();

    wait_for_task(&second, &task.id, |now| {
        status_of(now) == pb::TaskStatus::Queued && now.attempt == 2
    })
    .await;
    assert_eq!(
        second.runtime_status(&silent).await,
        pb::RuntimeStatus::Offline
    );
    let direct = PgPool::connect_with(connect).await.unwrap();
    let (epoch,): (i64,) = sqlx::query_as("SELECT epoch FROM leadership WHERE role = 'sweeper'")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(epoch, 1, "leadership never changed hands");
}

/// `leasehold migrate --database-pooler transaction` through the pooler, twice at once on an
/// empty database: each migration is applied once, both runs succeed, a third finds nothing to
/// do, sqlx's own migrator (the direct route) accepts what they recorded, and a server starts
/// through the pooler with `--migrate skip`.
#[sqlx::test(migrations = false)]
async fn migrations_apply_behind_a_transaction_pooler(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let bouncer = Pgbouncer::start(3).await;
    let url = database_url(&bouncer.in_front_of(&connect));
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("LEASEHOLD_DATABASE_POOLER", "transaction"),
    ];
    let (one, two) = tokio::join!(
        run_to_end(&["migrate"], &env),
        run_to_end(&["migrate"], &env)
    );
    for output in [&one, &two] {
        assert!(output.status.success(), "{}", stderr_of(output));
    }
    let direct = PgPool::connect_with(connect.clone()).await.unwrap();
    let versions: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT version, count(*) FROM _sqlx_migrations WHERE success GROUP BY version \
         ORDER BY version",
    )
    .fetch_all(&direct)
    .await
    .unwrap();
    let known: Vec<i64> = leasehold::store::postgres::schema::migrator()
        .iter()
        .map(|migration| migration.version)
        .collect();
    assert_eq!(
        versions,
        known
            .iter()
            .map(|version| (*version, 1))
            .collect::<Vec<_>>()
    );

    let again = run_to_end(&["migrate"], &env).await;
    assert!(again.status.success(), "{}", stderr_of(&again));
    // sqlx checks the checksums of what is applied: ours match its own.
    leasehold::store::postgres::schema::apply(&connect, Default::default())
        .await
        .expect("the direct migrator accepts the pooled migrations");

    let server = crate::process::ServerProcess::start(
        &["--migrate", "skip"],
        &[
            ("DATABASE_URL", url.clone()),
            ("LEASEHOLD_DATABASE_POOLER", "transaction".into()),
        ],
    )
    .await;
    let mut tasks = pb::task_service_client::TaskServiceClient::new(server.channel().await);
    let task = tasks
        .enqueue_task(crate::harness::task_in("q"))
        .await
        .expect("the server serves through the pooler")
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status_of(&task), pb::TaskStatus::Queued);
}
