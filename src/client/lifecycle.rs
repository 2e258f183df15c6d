//! The runtime's life: registration (again when the server forgot it), recovery of an earlier
//! life's orphans, heartbeats at the interval the server gave, deregistration.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::backoff::Backoff;
use super::error_reason;
use super::shared::{Registration, Shared, sleep_unless};
use crate::proto as pb;

/// Registers, retrying transient failures with backoff. `Ok(false)`: shutdown came first.
pub(super) async fn register_until_done(
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<bool, Status> {
    let (base, max) = shared.config.reconnect_backoff;
    let mut backoff = Backoff::new(base, max);
    loop {
        match register(shared).await {
            Ok(()) => return Ok(true),
            Err(status) if super::is_transient(&status) => {
                tracing::warn!(error = %status.message(), "cannot register yet; retrying");
            }
            Err(status) => return Err(status),
        }
        if !sleep_unless(shutdown, backoff.next_delay()).await {
            return Ok(false);
        }
    }
}

pub(super) async fn register(shared: &Shared) -> Result<(), Status> {
    let config = &shared.config;
    let response = shared
        .registrar
        .worker()
        .register_runtime(pb::RegisterRuntimeRequest {
            name: config.name.clone(),
            queues: config.queues.clone(),
            labels: config.labels.clone(),
            max_concurrency: config.concurrency,
        })
        .await?
        .into_inner();
    let runtime_id = response
        .runtime
        .map(|runtime| runtime.id)
        .unwrap_or_default();
    // Empty when the server runs `--auth none`: the registrar's connection serves then.
    let runtime_client = match response.runtime_token.as_str() {
        "" => None,
        token => Some(
            shared
                .registrar
                .with_token(token)
                .map_err(|error| Status::internal(error.to_string()))?,
        ),
    };
    *shared
        .runtime_client
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = runtime_client;
    let registration = Registration {
        heartbeat_interval: std_duration(response.heartbeat_interval, Duration::from_secs(15)),
        lease_duration: std_duration(response.lease_duration, Duration::from_secs(60)),
        runtime_id,
    };
    tracing::info!(runtime_id = %registration.runtime_id, name = %config.name, "registered");
    *shared
        .registration
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(registration);
    Ok(())
}

pub(super) fn std_duration(duration: Option<prost_types::Duration>, default: Duration) -> Duration {
    duration
        .and_then(|duration| Duration::try_from(duration).ok())
        .filter(|duration| !duration.is_zero())
        .unwrap_or(default)
}

/// Once per process start: whatever the runtime held in an earlier life is lost; fail it now
/// (retried per policy) instead of waiting for offline detection.
pub(super) async fn recover_orphans(shared: &Shared) {
    let request = pb::RecoverOrphansRequest {
        runtime_id: shared.runtime_id(),
    };
    match shared.client().worker().recover_orphans(request).await {
        Ok(response) => {
            let response = response.into_inner();
            if response.failed > 0 {
                tracing::warn!(
                    failed = response.failed,
                    retried = response.retried,
                    "recovered tasks held by this runtime before it restarted"
                );
            }
        }
        Err(status) => tracing::warn!(error = %status.message(), "RecoverOrphans failed"),
    }
}

pub(super) async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let interval = shared
            .registration()
            .map_or(Duration::from_secs(15), |registration| {
                registration.heartbeat_interval
            });
        if !sleep_unless(&stop, interval).await {
            return;
        }
        let request = pb::HeartbeatRequest {
            runtime_id: shared.runtime_id(),
        };
        match shared.client().worker().heartbeat(request).await {
            Ok(_) => {}
            Err(status) if is_runtime_not_found(&status) => reregister(&shared).await,
            Err(status) if super::is_revoked(&status) => {
                shared.notice_revocation(&status);
                return;
            }
            Err(status) => tracing::warn!(error = %status.message(), "heartbeat failed"),
        }
    }
}

pub(super) fn is_runtime_not_found(status: &Status) -> bool {
    error_reason(status).as_deref() == Some("RUNTIME_NOT_FOUND")
}

/// The server no longer knows this runtime (its store was reset): register again, by name.
pub(super) async fn reregister(shared: &Shared) {
    tracing::warn!("the server does not know this runtime; registering again");
    if let Err(status) = register(shared).await {
        tracing::warn!(error = %status.message(), "re-registering failed");
    }
}

/// Tries a few times before giving up on a transient error: a runtime left ONLINE keeps its
/// unstarted claims until their leases pass and is only declared OFFLINE by the sweeper.
const DEREGISTER_ATTEMPTS: u32 = 3;

pub(super) async fn deregister(shared: &Shared) {
    for attempt in 1..=DEREGISTER_ATTEMPTS {
        let request = pb::DeregisterRuntimeRequest {
            runtime_id: shared.runtime_id(),
        };
        match shared.client().worker().deregister_runtime(request).await {
            Ok(response) => {
                tracing::info!(requeued = response.into_inner().requeued, "deregistered");
                return;
            }
            Err(status) if super::is_transient(&status) && attempt < DEREGISTER_ATTEMPTS => {
                tracing::debug!(error = %status.message(), "DeregisterRuntime failed; again");
                tokio::time::sleep(Duration::from_millis(200) * attempt).await;
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), "DeregisterRuntime failed");
                return;
            }
        }
    }
}
