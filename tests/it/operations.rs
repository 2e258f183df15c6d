//! Running for months (spec §11): the store a deployment runs on, migrations as their own
//! step, and rollbacks onto a newer schema. Against the real binary.

use std::process::Output;
use std::time::Duration;

use leasehold::proto as pb;
use leasehold::proto::task_service_client::TaskServiceClient;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

use crate::process::ServerProcess;

/// The URL of the test's own database, for a process.
pub fn database_url(connect: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        connect.get_username(),
        connect.get_host(),
        connect.get_port(),
        connect.get_database().unwrap_or("postgres")
    )
}

/// Runs the binary to its end (at most 30 s), with no database or Redis unless `env` names
/// them.
pub async fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the command ends by itself")
        .unwrap()
}

pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn serve_beyond_loopback_without_a_database_exits_with_a_clear_message() {
    let port = crate::harness::free_port().to_string();
    let everywhere = format!("0.0.0.0:{port}");
    let output = run_to_end(&["serve", "--auth", "none", "--listen", &everywhere], &[]).await;
    assert!(!output.status.success());
    let message = stderr_of(&output);
    assert!(message.contains("DATABASE_URL"), "{message}");
    assert!(message.contains("--store memory"), "{message}");

    let output = run_to_end(&["serve", "--store", "postgres"], &[]).await;
    assert!(!output.status.success());
    assert!(stderr_of(&output).contains("--database-url"));
}

#[tokio::test]
async fn serve_beyond_loopback_on_memory_runs_when_asked_to() {
    let server = ServerProcess::start_on("0.0.0.0", &["--store", "memory"], &[]).await;
    let mut tasks = TaskServiceClient::new(server.channel().await);
    let enqueued = tasks
        .enqueue_task(crate::harness::task_in("explicit-memory"))
        .await
        .unwrap();
    assert!(enqueued.into_inner().task.is_some());
}

async fn applied_versions(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

#[sqlx::test(migrations = false)]
async fn migrate_is_a_step_of_its_own_and_skip_needs_it(
    _pool: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = database_url(&connect);
    let env = [("DATABASE_URL", url.as_str())];
    let refused = run_to_end(&["serve", "--auth", "none", "--migrate", "skip"], &env).await;
    assert!(!refused.status.success());
    let message = stderr_of(&refused);
    assert!(message.contains("leasehold migrate"), "{message}");

    let migrated = run_to_end(&["migrate"], &env).await;
    assert!(migrated.status.success(), "{}", stderr_of(&migrated));
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let known: Vec<i64> = leasehold::store::postgres::schema::migrator()
        .iter()
        .map(|migration| migration.version)
        .collect();
    assert_eq!(applied_versions(&pool).await, known);

    let url_env = [("DATABASE_URL", url.clone())];
    let server = ServerProcess::start(&["--migrate", "skip"], &url_env).await;
    let mut tasks = TaskServiceClient::new(server.channel().await);
    tasks
        .enqueue_task(crate::harness::task_in("after-migrate"))
        .await
        .unwrap();
}

/// What a newer binary's expand step would do: a column this binary does not know, recorded
/// as a migration this binary does not have.
async fn apply_future_migration(pool: &PgPool, version: i64) {
    sqlx::query("ALTER TABLE tasks ADD COLUMN note_from_the_future text")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'a newer binary''s expand step', true, '\\x00'::bytea, 1)",
    )
    .bind(version)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn an_older_binary_serves_on_a_newer_compatible_schema_and_refuses_an_incompatible_one(
    pool: PgPool,
) {
    let connect = (*pool.connect_options()).clone();
    let future = 29_991_231_000_001_i64;
    apply_future_migration(&pool, future).await;

    let env = [("DATABASE_URL", database_url(&connect))];
    let server = ServerProcess::start(&[], &env).await;
    let mut tasks = TaskServiceClient::new(server.channel().await);
    let task = tasks
        .enqueue_task(crate::harness::task_in("rolled-back"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let read = tasks
        .get_task(pb::GetTaskRequest { task_id: task.id })
        .await
        .unwrap();
    assert_eq!(read.into_inner().task.unwrap().queue, "rolled-back");
    drop(server);

    // The newer binary's contract step: binaries that do not know `future` can no longer run.
    sqlx::query("UPDATE schema_compatibility SET oldest_compatible = $1")
        .bind(future)
        .execute(&pool)
        .await
        .unwrap();
    let url = database_url(&connect);
    let refused = run_to_end(
        &["serve", "--auth", "none", "--listen", "127.0.0.1:0"],
        &[("DATABASE_URL", url.as_str())],
    )
    .await;
    assert!(!refused.status.success());
    let message = stderr_of(&refused);
    assert!(message.contains(&future.to_string()), "{message}");
}
