//! Authentication and authorization (spec §9, the credential rows of §4), over real gRPC on
//! both stores: the admin token file, scoped API keys with queue globs, per-runtime tokens, and
//! revocation across replicas.

use std::path::PathBuf;
use std::time::Duration;

use leasehold::auth::AuthMode;
use leasehold::config::Config;
use leasehold::proto as pb;
use leasehold::proto::admin_service_client::AdminServiceClient;
use leasehold::proto::task_service_client::TaskServiceClient;
use leasehold::proto::worker_service_client::WorkerServiceClient;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{
    Backend, EVENTUALLY, TestServer, assert_error, error_metadata, eventually, task_id, task_in,
};

/// Sends `authorization: Bearer <token>` (or nothing) with every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: &str) -> Self {
        Self(Some(format!("Bearer {token}").parse().unwrap()))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Intercepted = InterceptedService<Channel, Bearer>;

/// Clients of one server, all carrying one credential.
pub struct As {
    pub worker: WorkerServiceClient<Intercepted>,
    pub tasks: TaskServiceClient<Intercepted>,
    pub admin: AdminServiceClient<Intercepted>,
}

impl As {
    pub fn new(server: &TestServer, bearer: Bearer) -> Self {
        let channel = server.channel.clone();
        Self {
            worker: WorkerServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            tasks: TaskServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminServiceClient::with_interceptor(channel, bearer),
        }
    }

    pub fn token(server: &TestServer, token: &str) -> Self {
        Self::new(server, Bearer::new(token))
    }

    pub async fn enqueue(&self, queue: &str) -> Result<pb::Task, Status> {
        let response = self.tasks.clone().enqueue_task(task_in(queue)).await?;
        Ok(response.into_inner().task.unwrap())
    }

    pub async fn create_key(&self, scopes: &[&str]) -> String {
        self.try_create_key(scopes, None).await.unwrap().1
    }

    pub async fn try_create_key(
        &self,
        scopes: &[&str],
        expires_in: Option<Duration>,
    ) -> Result<(pb::ApiKey, String), Status> {
        let created = self
            .admin
            .clone()
            .create_api_key(pb::CreateApiKeyRequest {
                name: format!("key for {}", scopes.join(",")),
                scopes: scopes.iter().map(ToString::to_string).collect(),
                expires_in: expires_in.map(|expires_in| expires_in.try_into().unwrap()),
            })
            .await?
            .into_inner();
        Ok((created.api_key.unwrap(), created.token))
    }

    /// Registers a runtime; its id and runtime token.
    pub async fn register(&self, name: &str, queues: &[&str]) -> Result<(String, String), Status> {
        let registered = self
            .worker
            .clone()
            .register_runtime(pb::RegisterRuntimeRequest {
                name: name.into(),
                queues: queues.iter().map(ToString::to_string).collect(),
                labels: Default::default(),
                max_concurrency: 4,
            })
            .await?
            .into_inner();
        Ok((registered.runtime.unwrap().id, registered.runtime_token))
    }

    pub async fn heartbeat(&self, runtime_id: &str) -> Result<(), Status> {
        self.worker
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                runtime_id: runtime_id.into(),
            })
            .await
            .map(drop)
    }

    pub async fn claim(&self, runtime_id: &str) -> Result<Vec<pb::ClaimedTask>, Status> {
        let response = self
            .worker
            .clone()
            .claim_task(pb::ClaimTaskRequest {
                runtime_id: runtime_id.into(),
                max_tasks: Some(1),
                wait: None,
            })
            .await?;
        Ok(response.into_inner().tasks)
    }

    /// Opens a claim stream for `runtime_id`; the error when the server refuses it.
    pub async fn open_stream(&self, runtime_id: &str) -> Result<(), Status> {
        use pb::stream_claims_request::Msg;
        let open = pb::StreamClaimsRequest {
            msg: Some(Msg::Open(pb::OpenStream {
                runtime_id: runtime_id.into(),
                credits: 1,
                auto_start: false,
            })),
        };
        self.worker
            .clone()
            .stream_claims(tokio_stream::iter([open]))
            .await
            .map(drop)
    }

    pub async fn start(&self, claimed: &pb::ClaimedTask) -> Result<pb::Task, Status> {
        let response = self
            .worker
            .clone()
            .start_task(pb::StartTaskRequest {
                task_id: task_id(claimed).into(),
                claim_token: claimed.claim_token.clone(),
            })
            .await?;
        Ok(response.into_inner().task.unwrap())
    }
}

/// A fresh file holding `token`.
pub fn admin_token_file(token: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("leasehold-admin-{}", uuid::Uuid::new_v4()));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

pub fn with_tokens(admin_file: PathBuf) -> impl FnOnce(&mut Config) {
    move |config| {
        config.auth = AuthMode::Token;
        config.admin_token_file = Some(admin_file);
    }
}

pub const ADMIN: &str = "the-admin-token-of-this-test";

async fn start(backend: Backend) -> (TestServer, As) {
    let server = backend
        .start_with(with_tokens(admin_token_file(ADMIN)))
        .await;
    let admin = As::token(&server, ADMIN);
    (server, admin)
}

async fn calls_without_a_valid_credential_are_unauthenticated(backend: Backend) {
    let (server, _admin) = start(backend).await;

    let missing = As::new(&server, Bearer(None))
        .enqueue("q")
        .await
        .unwrap_err();
    assert_error(&missing, Code::Unauthenticated, "CREDENTIALS_MISSING");
    for token in ["wrong", "lhk_nonsense", "lhr_0_abc"] {
        let invalid = As::token(&server, token).enqueue("q").await.unwrap_err();
        assert_error(&invalid, Code::Unauthenticated, "CREDENTIALS_INVALID");
    }
    // A well-formed key that does not exist.
    let made_up = format!("lhk_{}_{}", uuid::Uuid::new_v4().simple(), "A".repeat(43));
    let unknown = As::token(&server, &made_up).enqueue("q").await.unwrap_err();
    assert_error(&unknown, Code::Unauthenticated, "CREDENTIALS_INVALID");
    // Health needs no credential.
    let health = HealthClient::new(server.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok());
}

async fn api_keys_hold_their_scopes_and_queue_globs(backend: Backend) {
    let (server, admin) = start(backend).await;
    let emails = As::token(&server, &admin.create_key(&["enqueue:emails.*"]).await);
    let reader = As::token(&server, &admin.create_key(&["read"]).await);
    let manager = As::token(&server, &admin.create_key(&["manage:emails.*"]).await);

    let task = emails.enqueue("emails.welcome").await.unwrap();
    let outside = emails.enqueue("billing").await.unwrap_err();
    assert_error(&outside, Code::PermissionDenied, "SCOPE_MISSING");
    assert_eq!(
        error_metadata(&outside, "scope").as_deref(),
        Some("enqueue:billing")
    );
    let read = emails
        .tasks
        .clone()
        .get_task(pb::GetTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .unwrap_err();
    assert_error(&read, Code::PermissionDenied, "SCOPE_MISSING");
    let worker_call = emails
        .claim(&uuid::Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    assert_error(&worker_call, Code::PermissionDenied, "SCOPE_MISSING");
    let key_management = emails
        .admin
        .clone()
        .list_api_keys(pb::ListApiKeysRequest {})
        .await
        .unwrap_err();
    assert_error(&key_management, Code::PermissionDenied, "SCOPE_MISSING");

    assert!(
        reader
            .tasks
            .clone()
            .get_task(pb::GetTaskRequest {
                task_id: task.id.clone()
            })
            .await
            .is_ok()
    );
    assert!(
        reader
            .admin
            .clone()
            .list_runtimes(pb::ListRuntimesRequest {
                status: None,
                ..Default::default()
            })
            .await
            .is_ok()
    );
    let cancel = pb::CancelTaskRequest {
        task_id: task.id.clone(),
    };
    let not_manager = reader
        .tasks
        .clone()
        .cancel_task(cancel.clone())
        .await
        .unwrap_err();
    assert_error(&not_manager, Code::PermissionDenied, "SCOPE_MISSING");
    assert!(manager.tasks.clone().cancel_task(cancel).await.is_ok());
    let billing = admin.enqueue("billing").await.unwrap();
    let other_queue = manager
        .tasks
        .clone()
        .cancel_task(pb::CancelTaskRequest {
            task_id: billing.id,
        })
        .await
        .unwrap_err();
    assert_error(&other_queue, Code::PermissionDenied, "SCOPE_MISSING");

    // An `admin` key holds every scope: key management, and any runtime's calls.
    let admin_key = As::token(&server, &admin.create_key(&["admin"]).await);
    assert!(admin_key.create_key(&["read"]).await.starts_with("lhk_"));
    let (runtime_id, _) = admin_key.register("anyone", &["q"]).await.unwrap();
    assert!(admin_key.heartbeat(&runtime_id).await.is_ok());
    assert!(admin_key.claim(&runtime_id).await.is_ok());
}

async fn a_register_key_registers_only_matching_queues(backend: Backend) {
    let (server, admin) = start(backend).await;
    let gpu = As::token(&server, &admin.create_key(&["register:gpu-*"]).await);

    assert!(gpu.register("gpu-box", &["gpu-a", "gpu-b"]).await.is_ok());
    let denied = gpu
        .register("sneaky", &["gpu-a", "payroll"])
        .await
        .unwrap_err();
    assert_error(&denied, Code::PermissionDenied, "SCOPE_MISSING");
}

async fn api_keys_are_listed_without_secrets_and_expire_and_revoke(backend: Backend) {
    let (server, admin) = start(backend).await;
    let (key, token) = admin.try_create_key(&["read"], None).await.unwrap();
    assert!(token.starts_with(&format!("lhk_{}_", key.id.replace('-', ""))));
    let (_, short_lived) = admin
        .try_create_key(&["read"], Some(Duration::from_millis(800)))
        .await
        .unwrap();
    let reader = As::token(&server, &token);
    let list = pb::ListRuntimesRequest {
        status: None,
        ..Default::default()
    };
    assert!(reader.admin.clone().list_runtimes(list).await.is_ok());

    let list_keys = || {
        let mut keys = admin.admin.clone();
        async move {
            keys.list_api_keys(pb::ListApiKeysRequest {})
                .await
                .unwrap()
                .into_inner()
                .api_keys
        }
    };
    let listed = list_keys().await;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].scopes, ["read"]);
    assert!(listed[1].expires_at.is_some());
    assert!(!format!("{listed:?}").contains(&token));
    // The use above is written down (off the call's path, so it may take a moment); the key
    // never used has no last use.
    eventually("the key's use is recorded", EVENTUALLY, async || {
        let keys = list_keys().await;
        assert!(keys[1].last_used_at.is_none());
        keys[0].last_used_at.is_some().then_some(())
    })
    .await;

    tokio::time::sleep(Duration::from_millis(900)).await;
    let expired = As::token(&server, &short_lived)
        .admin
        .clone()
        .list_runtimes(pb::ListRuntimesRequest {
            status: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&expired, Code::Unauthenticated, "CREDENTIALS_EXPIRED");

    let revoked = admin
        .admin
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    let refused = reader
        .admin
        .clone()
        .list_runtimes(pb::ListRuntimesRequest {
            status: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&refused, Code::Unauthenticated, "CREDENTIALS_REVOKED");
    let unknown = admin
        .admin
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_error(&unknown, Code::NotFound, "API_KEY_NOT_FOUND");
    let bad_scope = admin.try_create_key(&["destroy"], None).await.unwrap_err();
    assert_error(&bad_scope, Code::InvalidArgument, "INVALID_FIELD");
}

/// A runtime token acts for its own runtime only: not for another runtime's calls, and not on
/// another runtime's task even with that task's (leaked) claim token.
async fn a_runtime_token_acts_only_for_its_own_runtime(backend: Backend) {
    let (server, admin) = start(backend).await;
    let registrar = As::token(&server, &admin.create_key(&["register"]).await);
    let (a_id, a_token) = registrar.register("a", &["q"]).await.unwrap();
    let (b_id, b_token) = registrar.register("b", &["q"]).await.unwrap();
    assert!(a_token.starts_with(&format!("lhr_{}_", a_id.replace('-', ""))));
    let (a, b) = (As::token(&server, &a_token), As::token(&server, &b_token));

    assert!(a.heartbeat(&a_id).await.is_ok());
    let heartbeat = a.heartbeat(&b_id).await.unwrap_err();
    assert_error(&heartbeat, Code::PermissionDenied, "RUNTIME_MISMATCH");
    let claim = a.claim(&b_id).await.unwrap_err();
    assert_error(&claim, Code::PermissionDenied, "RUNTIME_MISMATCH");
    let stream = b.open_stream(&a_id).await.unwrap_err();
    assert_error(&stream, Code::PermissionDenied, "RUNTIME_MISMATCH");
    let enqueue = a.enqueue("q").await.unwrap_err();
    assert_error(&enqueue, Code::PermissionDenied, "SCOPE_MISSING");

    admin.enqueue("q").await.unwrap();
    let claimed = a.claim(&a_id).await.unwrap().pop().unwrap();
    // B holds A's claim token (leaked): it is useless to B.
    let stolen = b.start(&claimed).await.unwrap_err();
    assert_error(&stolen, Code::PermissionDenied, "RUNTIME_MISMATCH");
    let status = b
        .worker
        .clone()
        .get_task_status(pb::GetTaskStatusRequest {
            task_id: task_id(&claimed).into(),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::PermissionDenied, "RUNTIME_MISMATCH");
    let started = a.start(&claimed).await.unwrap();
    assert_eq!(started.status(), pb::TaskStatus::Running);
    let complete = pb::CompleteTaskRequest {
        task_id: task_id(&claimed).into(),
        claim_token: claimed.claim_token.clone(),
        result: b"mine".to_vec(),
    };
    let stolen = b
        .worker
        .clone()
        .complete_task(complete.clone())
        .await
        .unwrap_err();
    assert_error(&stolen, Code::PermissionDenied, "RUNTIME_MISMATCH");
    assert!(
        a.worker
            .clone()
            .complete_task(complete.clone())
            .await
            .is_ok()
    );
    // The admin acts for any runtime; the replay is a success.
    assert!(admin.worker.clone().complete_task(complete).await.is_ok());
    assert!(admin.heartbeat(&b_id).await.is_ok());
}

async fn registering_a_name_again_revokes_the_previous_runtime_token(backend: Backend) {
    let (server, admin) = start(backend).await;
    let registrar = As::token(&server, &admin.create_key(&["register"]).await);
    let (id, first) = registrar.register("daemon", &["q"]).await.unwrap();
    let (same_id, second) = registrar.register("daemon", &["q"]).await.unwrap();
    assert_eq!(id, same_id);
    assert_ne!(first, second);

    let old = As::token(&server, &first).heartbeat(&id).await.unwrap_err();
    assert_error(&old, Code::Unauthenticated, "CREDENTIALS_REVOKED");
    assert!(As::token(&server, &second).heartbeat(&id).await.is_ok());
}

conformance!(
    calls_without_a_valid_credential_are_unauthenticated,
    api_keys_hold_their_scopes_and_queue_globs,
    a_register_key_registers_only_matching_queues,
    api_keys_are_listed_without_secrets_and_expire_and_revoke,
    a_runtime_token_acts_only_for_its_own_runtime,
    registering_a_name_again_revokes_the_previous_runtime_token,
);

mod changes;
