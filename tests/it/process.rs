//! The real `leasehold` binary as a separate process: what only a process shows (signals, exit
//! status, its own memory and database traffic).

use std::process::Stdio;
use std::time::Duration;

use leasehold::proto as pb;
use leasehold::proto::stream_claims_response::Msg as Outbound;
use leasehold::proto::task_service_client::TaskServiceClient;
use leasehold::proto::worker_service_client::WorkerServiceClient;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::streams::ClaimStream;

/// A `leasehold serve` process on a free port, killed when dropped.
pub struct ServerProcess {
    child: Child,
    address: String,
}

impl ServerProcess {
    /// Starts the binary with `args` and no database or Redis unless `env` names them.
    pub async fn start(args: &[&str], env: &[(&str, String)]) -> ServerProcess {
        let args = [&["--auth", "none"], args].concat();
        Self::start_logged(&args, env, None).await
    }

    /// As `start`, listening on `host` (a free port) instead of loopback.
    pub async fn start_on(host: &str, args: &[&str], env: &[(&str, String)]) -> ServerProcess {
        let args = [&["--auth", "none"], args].concat();
        Self::spawn(host, &args, env, None).await
    }

    /// As `start`, without `--auth none`, and with everything the process prints (stdout and
    /// stderr) written to `log` when given.
    async fn start_logged(
        args: &[&str],
        env: &[(&str, String)],
        log: Option<&std::path::Path>,
    ) -> ServerProcess {
        Self::spawn("127.0.0.1", args, env, log).await
    }

    async fn spawn(
        host: &str,
        args: &[&str],
        env: &[(&str, String)],
        log: Option<&std::path::Path>,
    ) -> ServerProcess {
        let port = crate::harness::free_port();
        let address = format!("127.0.0.1:{port}");
        let mut command = Command::new(env!("CARGO_BIN_EXE_leasehold"));
        command
            .args(["serve", "--listen", &format!("{host}:{port}")])
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        if let Some(log) = log {
            let file = std::fs::File::create(log).unwrap();
            command.stdout(file.try_clone().unwrap()).stderr(file);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let server = ServerProcess {
            child: command.spawn().expect("start the leasehold binary"),
            address,
        };
        server.wait_until_serving().await;
        server
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.address))
            .unwrap()
            .connect()
            .await
            .expect("connect to the server process")
    }

    async fn wait_until_serving(&self) {
        for _ in 0..300 {
            if let Ok(channel) = Channel::from_shared(format!("http://{}", self.address))
                .unwrap()
                .connect()
                .await
            {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let request = tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                };
                if health.check(request).await.is_ok_and(|response| {
                    response.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                }) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the server process never became SERVING");
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// Resident memory, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

async fn register(worker: &mut WorkerServiceClient<Channel>, name: &str) -> String {
    worker
        .register_runtime(pb::RegisterRuntimeRequest {
            name: name.into(),
            queues: vec!["q".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runtime
        .unwrap()
        .id
}

#[tokio::test]
async fn sigterm_drains_streams_and_exits_zero_within_the_grace() {
    let mut server = ServerProcess::start(&["--shutdown-grace", "3s"], &[]).await;
    let channel = server.channel().await;
    let mut worker = WorkerServiceClient::new(channel.clone());
    let runtime = register(&mut worker, "drained").await;
    TaskServiceClient::new(channel)
        .enqueue_task(pb::EnqueueTaskRequest {
            queue: "q".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = ClaimStream::open_on(worker, &runtime, 1).await;
    stream.next_claimed().await;

    let signalled = std::time::Instant::now();
    server.terminate();

    match stream.next(Duration::from_secs(2)).await {
        Some(Outbound::Draining(_)) => {}
        other => panic!("expected draining, got {other:?}"),
    }
    let status = tokio::time::timeout(Duration::from_secs(3), server.child.wait())
        .await
        .expect("the process exits within the grace")
        .unwrap();
    assert!(status.success(), "{status:?}");
    println!("SIGTERM to exit: {:?}", signalled.elapsed());
}

/// 1,000 idle streams (50 runtimes × 20) on one server with PostgreSQL and Redis: after the
/// first claims, their re-checks are answered from the empty-claim cache, so PostgreSQL sees
/// no transactions from them. Prints the server's memory before and after.
#[sqlx::test]
async fn a_thousand_idle_streams_cost_postgres_nothing(
    _pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let database_url = connect.to_url_lossy().to_string();
    let server = ServerProcess::start(
        &[
            "--sweep-interval",
            "1h",
            "--stream-poll-interval",
            "1s",
            // 20 streams per runtime below.
            "--max-streams-per-runtime",
            "20",
        ],
        &[
            ("DATABASE_URL", database_url),
            ("REDIS_URL", crate::redis::redis_url()),
            (
                "LEASEHOLD_REDIS_KEY_PREFIX",
                format!("leasehold-test-{}", uuid::Uuid::new_v4()),
            ),
        ],
    )
    .await;
    let rss_before = server.rss_kib();
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(server.channel().await);
    }
    let mut streams = Vec::new();
    for runtime_index in 0..50 {
        let channel = &channels[runtime_index % channels.len()];
        let mut worker = WorkerServiceClient::new(channel.clone());
        let runtime = register(&mut worker, &format!("idle-{runtime_index}")).await;
        for _ in 0..20 {
            streams.push(ClaimStream::open_on(worker.clone(), &runtime, 1).await);
        }
    }
    // Every stream's first claim reaches PostgreSQL (no verdict is cached yet when 20 streams
    // of a runtime open at once); wait until the server has been quiet for a moment.
    let mut database = connect.connect().await.unwrap();
    let mut quiet_since = db_now(&mut database).await;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if statements_since(&mut database, quiet_since).await == 0 {
            break;
        }
        quiet_since = db_now(&mut database).await;
    }

    // Each stream re-checks about 4 times in this window (poll interval 1s).
    let window_start = db_now(&mut database).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let statements = statements_since(&mut database, window_start).await;
    let rss_after = server.rss_kib();

    println!(
        "1000 idle streams: {statements} server statements in 4s (about 4000 re-checks); \
         server RSS {rss_before} KiB before, {rss_after} KiB with the streams ({} KiB per stream)",
        rss_after.saturating_sub(rss_before) / 1000
    );
    assert_eq!(statements, 0);
    assert_eq!(streams.len(), 1000);
}

async fn db_now(database: &mut sqlx::PgConnection) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *database)
        .await
        .unwrap()
}

/// Statements other sessions of this database started since `since`. (Unlike
/// `pg_stat_database`, whose counters an idle backend may report seconds late, this is
/// current.)
async fn statements_since(
    database: &mut sqlx::PgConnection,
    since: chrono::DateTime<chrono::Utc>,
) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND query_start >= $1",
    )
    .bind(since)
    .fetch_one(&mut *database)
    .await
    .unwrap()
}

/// A full run with credentials, logged at the most verbose level: the log holds none of the
/// secrets issued or presented (admin token, API key, runtime token, claim token's secret
/// parts are not secrets, but the bearer tokens are).
#[tokio::test]
async fn the_server_log_holds_no_secret() {
    use crate::auth::Bearer;
    use leasehold::proto::admin_service_client::AdminServiceClient;
    use tonic::service::interceptor::InterceptedService;

    let admin = "an-admin-token-that-must-not-be-logged";
    let admin_file = crate::auth::admin_token_file(admin);
    let log = std::env::temp_dir().join(format!("leasehold-log-{}", uuid::Uuid::new_v4()));
    let server = ServerProcess::start_logged(
        &[
            "--auth",
            "token",
            "--admin-token-file",
            admin_file.to_str().unwrap(),
        ],
        &[
            ("RUST_LOG", "trace".into()),
            ("LEASEHOLD_LOG_FORMAT", "json".into()),
        ],
        Some(&log),
    )
    .await;
    let channel = server.channel().await;
    type Worker = WorkerServiceClient<InterceptedService<Channel, Bearer>>;
    let as_token = |token: &str| -> (
        Worker,
        TaskServiceClient<InterceptedService<Channel, Bearer>>,
    ) {
        (
            WorkerServiceClient::with_interceptor(channel.clone(), Bearer::new(token)),
            TaskServiceClient::with_interceptor(channel.clone(), Bearer::new(token)),
        )
    };

    let mut keys = AdminServiceClient::with_interceptor(channel.clone(), Bearer::new(admin));
    let key = keys
        .create_api_key(pb::CreateApiKeyRequest {
            name: "producer".into(),
            scopes: vec!["enqueue".into(), "register".into()],
            expires_in: None,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut registrar, mut producer) = as_token(&key.token);
    producer
        .enqueue_task(pb::EnqueueTaskRequest {
            queue: "q".into(),
            payload: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let registered = registrar
        .register_runtime(pb::RegisterRuntimeRequest {
            name: "logged".into(),
            queues: vec!["q".into()],
            labels: Default::default(),
            max_concurrency: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let runtime_id = registered.runtime.unwrap().id;
    let (mut worker, _) = as_token(&registered.runtime_token);
    let claimed = worker
        .claim_task(pb::ClaimTaskRequest {
            runtime_id: runtime_id.clone(),
            max_tasks: Some(1),
            wait: None,
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(claimed.len(), 1);
    // Refused calls are logged too: a wrong token, and a revoked one.
    let (mut wrong, _) = as_token(&format!("{}x", registered.runtime_token));
    let _ = wrong
        .heartbeat(pb::HeartbeatRequest {
            runtime_id: runtime_id.clone(),
        })
        .await
        .unwrap_err();
    keys.revoke_api_key(pb::RevokeApiKeyRequest {
        key_id: key.api_key.unwrap().id,
    })
    .await
    .unwrap();
    let _ = producer
        .enqueue_task(pb::EnqueueTaskRequest {
            queue: "q".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    server.terminate();
    drop(server);

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("call refused"),
        "the log is empty or not verbose"
    );
    for secret in [admin, key.token.as_str(), registered.runtime_token.as_str()] {
        // `lh?_<id>_<secret>`: the whole secret (it may hold `_` itself; a fragment after the
        // last one can be a few letters any log line might contain). The admin token is all secret.
        let secret_part = match secret.split_once('_') {
            Some(("lhk" | "lhr", rest)) => rest.split_once('_').map_or(rest, |(_, secret)| secret),
            _ => secret,
        };
        let leaked: Vec<&str> = logged
            .lines()
            .filter(|line| line.contains(secret_part))
            .collect();
        assert!(leaked.is_empty(), "a secret reached the log: {leaked:?}");
    }
}
