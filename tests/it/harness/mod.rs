//! A real leasehold server on 127.0.0.1:0 over a fresh PostgreSQL database (one per test, from
//! `#[sqlx::test]`), with typed clients and a shutdown handle.

use std::sync::Arc;
use std::time::Duration;

use leasehold::app::{App, postgres_store, store_policy};
use leasehold::config::Config;
use leasehold::coordinator::Coordinator;
use leasehold::proto as pb;
use leasehold::proto::admin_service_client::AdminServiceClient;
use leasehold::proto::task_service_client::TaskServiceClient;
use leasehold::proto::worker_service_client::WorkerServiceClient;
use leasehold::store::memory::MemoryStore;
use leasehold::store::postgres::PgStore;
use leasehold::store::{StorePolicy, SweepReport, TaskStore};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;

/// Instantiates each named test body (`async fn name(backend: Backend)`) once per store:
/// `name::postgres` on a fresh PostgreSQL database and `name::memory` on the embedded store.
/// A behaviour tested for one store and not the other is a gap in this suite.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[sqlx::test]
            async fn postgres(
                pool: sqlx::postgres::PgPoolOptions,
                connect: sqlx::postgres::PgConnectOptions,
            ) {
                super::$test(crate::harness::Backend::Postgres(Box::new((pool, connect)))).await
            }

            #[tokio::test]
            async fn memory() {
                super::$test(crate::harness::Backend::Memory).await
            }
        }
    )*};
}

/// Which store a test server runs on.
pub enum Backend {
    /// The pool options and connection of the test's own fresh database.
    Postgres(Box<(PgPoolOptions, PgConnectOptions)>),
    Memory,
}

impl Backend {
    pub async fn start(self) -> TestServer {
        self.start_with(|_| {}).await
    }

    pub async fn start_with(self, configure: impl FnOnce(&mut Config)) -> TestServer {
        match self {
            Backend::Postgres(database) => {
                let (pool, connect) = *database;
                TestServer::start_with(pool, connect, configure).await
            }
            Backend::Memory => {
                let mut config = test_config();
                configure(&mut config);
                TestServer::serve(config, None, None).await
            }
        }
    }
}

/// The store behind a test server, for simulating time.
enum Store {
    Postgres(PgPool),
    Memory(Arc<MemoryStore>),
}

pub struct TestServer {
    pub worker: WorkerServiceClient<Channel>,
    pub tasks: TaskServiceClient<Channel>,
    pub admin: AdminServiceClient<Channel>,
    pub channel: Channel,
    pub coordinator: Arc<Coordinator>,
    pub address: std::net::SocketAddr,
    config: Config,
    store: Store,
    store_policy: StorePolicy,
    stop: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The configuration tests run with: the defaults, with a short shutdown grace, no background
/// sweeps (tests that need the sweeper sweep explicitly, or shorten the interval) and no
/// Redis, even when REDIS_URL is set for the suite (tests about Redis opt in).
pub fn test_config() -> Config {
    let mut config = Config::defaults();
    config.redis_url = None;
    // Tests about credentials opt in (tests/it/auth.rs).
    config.auth = leasehold::auth::AuthMode::None;
    config.shutdown_grace = Duration::from_millis(500);
    config.sweep_interval = Duration::from_secs(24 * 60 * 60);
    config
}

impl TestServer {
    pub async fn start(pool_options: PgPoolOptions, connect: PgConnectOptions) -> TestServer {
        Self::start_with(pool_options, connect, |_| {}).await
    }

    pub async fn start_with(
        pool_options: PgPoolOptions,
        connect: PgConnectOptions,
        configure: impl FnOnce(&mut Config),
    ) -> TestServer {
        // As many connections as `#[sqlx::test]` allows (its parent pool holds 20), so racing
        // claimers really run concurrently in PostgreSQL.
        let pool = pool_options
            .max_connections(20)
            .connect_with(connect)
            .await
            .expect("connect to the test database");
        let mut config = test_config();
        configure(&mut config);
        Self::serve(config, Some(pool), None).await
    }

    /// Serves the database behind `pool`, or a fresh memory store, on `address` or on a free
    /// port.
    async fn serve(
        config: Config,
        pool: Option<PgPool>,
        address: Option<std::net::SocketAddr>,
    ) -> TestServer {
        let policy = store_policy(&config);
        let (store, task_store): (Store, Arc<dyn TaskStore>) = match pool {
            Some(pool) => {
                let task_store = Arc::new(postgres_store(pool.clone(), &config));
                (Store::Postgres(pool), task_store)
            }
            None => {
                let memory = Arc::new(MemoryStore::new(policy));
                (Store::Memory(memory.clone()), memory)
            }
        };
        let app = App::with_store(config.clone(), task_store).expect("app");
        let coordinator = app.coordinator().clone();
        let store_policy = app.store_policy();
        let listener = bind(address.unwrap_or(([127, 0, 0, 1], 0).into())).await;
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(app.run_until_stopped(listener, async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to the test server");
        TestServer {
            worker: WorkerServiceClient::new(channel.clone()),
            tasks: TaskServiceClient::new(channel.clone()),
            admin: AdminServiceClient::new(channel.clone()),
            channel,
            coordinator,
            address,
            config,
            store,
            store_policy,
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Stops the server and starts a new one on the same address and database (the memory
    /// store starts empty, as the embedded store does after a restart).
    pub async fn restart(self) -> TestServer {
        let (config, address) = (self.config.clone(), self.address);
        let pool = match &self.store {
            Store::Postgres(pool) => Some(pool.clone()),
            Store::Memory(_) => None,
        };
        self.shutdown().await.expect("server stopped cleanly");
        TestServer::serve(config, pool, Some(address)).await
    }

    /// Signals shutdown (as SIGTERM would) without waiting for the server to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals shutdown and waits for the server to stop.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        match self.served.take() {
            Some(served) => served.await?,
            None => Ok(()),
        }
    }

    pub async fn register(&self, name: &str, queues: &[&str]) -> String {
        let response = self
            .worker
            .clone()
            .register_runtime(pb::RegisterRuntimeRequest {
                name: name.into(),
                queues: queues.iter().map(|queue| queue.to_string()).collect(),
                labels: Default::default(),
                max_concurrency: 0,
            })
            .await
            .expect("register runtime");
        response.into_inner().runtime.unwrap().id
    }

    pub async fn enqueue(&self, request: pb::EnqueueTaskRequest) -> pb::Task {
        self.tasks
            .clone()
            .enqueue_task(request)
            .await
            .expect("enqueue")
            .into_inner()
            .task
            .unwrap()
    }

    pub async fn enqueue_to(&self, queue: &str) -> pb::Task {
        self.enqueue(task_in(queue)).await
    }

    pub async fn claim(&self, runtime_id: &str, max_tasks: Option<u32>) -> Vec<pb::ClaimedTask> {
        self.try_claim(runtime_id, max_tasks).await.expect("claim")
    }

    pub async fn try_claim(
        &self,
        runtime_id: &str,
        max_tasks: Option<u32>,
    ) -> Result<Vec<pb::ClaimedTask>, Status> {
        let response = self
            .worker
            .clone()
            .claim_task(pb::ClaimTaskRequest {
                runtime_id: runtime_id.into(),
                max_tasks,
                wait: None,
            })
            .await?;
        Ok(response.into_inner().tasks)
    }

    /// Claims exactly one task, failing the test otherwise.
    pub async fn claim_one(&self, runtime_id: &str) -> pb::ClaimedTask {
        let mut claimed = self.claim(runtime_id, Some(1)).await;
        assert_eq!(claimed.len(), 1, "expected one claimable task");
        claimed.remove(0)
    }

    pub async fn start_task(&self, claimed: &pb::ClaimedTask) -> Result<pb::Task, Status> {
        self.start_with_token(task_id(claimed), &claimed.claim_token)
            .await
    }

    pub async fn start_with_token(&self, task_id: &str, token: &str) -> Result<pb::Task, Status> {
        let response = self
            .worker
            .clone()
            .start_task(pb::StartTaskRequest {
                task_id: task_id.into(),
                claim_token: token.into(),
            })
            .await?;
        Ok(response.into_inner().task.unwrap())
    }

    pub async fn complete(
        &self,
        claimed: &pb::ClaimedTask,
        result: &[u8],
    ) -> Result<pb::Task, Status> {
        let response = self
            .worker
            .clone()
            .complete_task(pb::CompleteTaskRequest {
                task_id: task_id(claimed).into(),
                claim_token: claimed.claim_token.clone(),
                result: result.to_vec(),
            })
            .await?;
        Ok(response.into_inner().task.unwrap())
    }

    pub async fn fail(
        &self,
        claimed: &pb::ClaimedTask,
        retryable: bool,
    ) -> Result<pb::FailTaskResponse, Status> {
        let response = self
            .worker
            .clone()
            .fail_task(pb::FailTaskRequest {
                task_id: task_id(claimed).into(),
                claim_token: claimed.claim_token.clone(),
                error: "boom".into(),
                retryable,
            })
            .await?;
        Ok(response.into_inner())
    }

    pub async fn cancel(&self, task_id: &str) -> pb::Task {
        let request = pb::CancelTaskRequest {
            task_id: task_id.into(),
        };
        let response = self
            .tasks
            .clone()
            .cancel_task(request)
            .await
            .expect("cancel");
        response.into_inner().task.unwrap()
    }

    pub async fn get_task(&self, task_id: &str) -> pb::Task {
        self.tasks
            .clone()
            .get_task(pb::GetTaskRequest {
                task_id: task_id.into(),
            })
            .await
            .expect("get task")
            .into_inner()
            .task
            .unwrap()
    }

    /// The store itself, for tests that drive it below the gRPC layer.
    pub fn store(&self) -> Arc<dyn TaskStore> {
        match &self.store {
            Store::Postgres(pool) => Arc::new(PgStore::new(pool.clone(), self.store_policy)),
            Store::Memory(store) => store.clone(),
        }
    }

    pub async fn describe_queue(&self, queue: &str) -> pb::DescribeQueueResponse {
        self.admin
            .clone()
            .describe_queue(pb::DescribeQueueRequest {
                queue: queue.into(),
            })
            .await
            .expect("describe queue")
            .into_inner()
    }

    /// DeregisterRuntime; answers how many claims were requeued.
    pub async fn deregister(&self, runtime_id: &str) -> u32 {
        self.worker
            .clone()
            .deregister_runtime(pb::DeregisterRuntimeRequest {
                runtime_id: runtime_id.into(),
            })
            .await
            .expect("deregister runtime")
            .into_inner()
            .requeued
    }

    /// Runs one sweep now, as the background sweeper would.
    pub async fn sweep(&self) -> SweepReport {
        self.coordinator
            .sweep(None)
            .await
            .expect("sweep")
            .expect("no other replica sweeps this store")
    }

    pub async fn runtimes(&self, status: Option<pb::RuntimeStatus>) -> Vec<pb::Runtime> {
        self.admin
            .clone()
            .list_runtimes(pb::ListRuntimesRequest {
                status: status.map(Into::into),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("list runtimes")
            .into_inner()
            .runtimes
    }

    pub async fn runtime_status(&self, runtime_id: &str) -> pb::RuntimeStatus {
        let runtimes = self.runtimes(None).await;
        let runtime = runtimes
            .iter()
            .find(|runtime| runtime.id == runtime_id)
            .expect("a registered runtime");
        runtime.status()
    }

    /// The PostgreSQL test database, for tests that are about PostgreSQL itself.
    pub fn pool(&self) -> &PgPool {
        match &self.store {
            Store::Postgres(pool) => pool,
            Store::Memory(_) => panic!("this test needs the PostgreSQL store"),
        }
    }

    /// Lets `by` pass for the store: PostgreSQL's stored timestamps move back by `by` (its
    /// clock cannot move), the memory store's clock moves forward by it. Either way every
    /// lease, delay and backoff comes `by` closer to its end.
    pub async fn advance_time(&self, by: Duration) {
        // Signs of life noted before now are recorded before time moves, as they would be.
        self.coordinator.flush_signs_of_life().await;
        match &self.store {
            Store::Memory(store) => store.advance_clock(by),
            Store::Postgres(pool) => {
                let shift = sqlx::postgres::types::PgInterval::try_from(by).unwrap();
                sqlx::query(
                    "UPDATE tasks SET created_at = created_at - $1, available_at = available_at - $1,
                         dispatched_at = dispatched_at - $1, started_at = started_at - $1,
                         finished_at = finished_at - $1, lease_expires_at = lease_expires_at - $1",
                )
                .bind(shift)
                .execute(pool)
                .await
                .unwrap();
                sqlx::query(
                    "UPDATE runtimes SET last_seen_at = last_seen_at - $1,
                         registered_at = registered_at - $1, offline_since = offline_since - $1",
                )
                .bind(shift)
                .execute(pool)
                .await
                .unwrap();
                sqlx::query("UPDATE sweep_progress SET swept_at = swept_at - $1")
                    .bind(shift)
                    .execute(pool)
                    .await
                    .unwrap();
                // The tally's watermark moves with the rows it counted up to.
                sqlx::query(
                    "UPDATE finished_tally_progress SET counted_through = counted_through - $1",
                )
                .bind(shift)
                .execute(pool)
                .await
                .unwrap();
            }
        }
    }

    /// Lets every lease run out (the default lease is 60s).
    pub async fn let_leases_expire(&self) {
        self.advance_time(Duration::from_secs(61)).await;
    }

    pub async fn update_queue(
        &self,
        queue: &str,
        max_concurrent: Option<u32>,
        paused: Option<bool>,
    ) -> pb::DescribeQueueResponse {
        self.admin
            .clone()
            .update_queue(pb::UpdateQueueRequest {
                queue: queue.into(),
                max_concurrent,
                paused,
                default_execution_timeout: None,
            })
            .await
            .expect("update queue")
            .into_inner()
    }

    pub async fn heartbeat(&self, runtime_id: &str) -> pb::HeartbeatResponse {
        self.worker
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                runtime_id: runtime_id.into(),
            })
            .await
            .expect("heartbeat")
            .into_inner()
    }

    /// The store's current time, as a heartbeat reports it.
    pub async fn store_time(&self, runtime_id: &str) -> prost_types::Timestamp {
        self.heartbeat(runtime_id).await.server_time.unwrap()
    }
}

mod support;

pub use support::*;
