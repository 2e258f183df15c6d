//! Runtimes on the embedded store: registration, liveness records, pages, capacity,
//! deregistration.

use chrono::{DateTime, Utc};

use super::*;

pub(super) fn register(
    store: &MemoryStore,
    runtime: NewRuntime,
    token_digest: SecretDigest,
) -> Result<Runtime> {
    let now = store.now();
    let mut state = store.state();
    let id = state
        .runtime_names
        .get(&runtime.name)
        .copied()
        .unwrap_or_else(RuntimeId::new_random);
    let registered_at = state
        .runtimes
        .get(&id)
        .map_or(now, |known| known.registered_at);
    let registered = Runtime {
        id,
        name: runtime.name.clone(),
        queues: runtime.queues,
        labels: runtime.labels,
        max_concurrency: runtime.max_concurrency,
        status: RuntimeStatus::Online,
        last_seen_at: now,
        registered_at,
    };
    state.runtime_names.insert(runtime.name, id);
    state.runtimes.insert(id, registered.clone());
    let credential = state.runtime_credentials.entry(id).or_default();
    if let Some(replaced) = credential.current.replace(token_digest) {
        credential.revoked.insert(0, replaced);
        credential.revoked.truncate(REMEMBERED_REVOKED_TOKENS);
    }
    state.offline_since.remove(&id);
    Ok(registered)
}

pub(super) fn heartbeat(store: &MemoryStore, runtime_id: RuntimeId) -> Result<HeartbeatAck> {
    let now = store.now();
    store.state().revive(runtime_id, now)?;
    Ok(HeartbeatAck {
        server_time: now,
        status: RuntimeStatus::Online,
    })
}

pub(super) fn touch(store: &MemoryStore, runtimes: &[RuntimeId]) -> Result<Vec<RuntimeId>> {
    let now = store.now();
    let mut state = store.state();
    Ok(runtimes
        .iter()
        .copied()
        .filter(|id| state.refresh_last_seen(*id, now))
        .collect())
}

pub(super) fn deregister(store: &MemoryStore, runtime_id: RuntimeId) -> Result<Vec<TaskMove>> {
    let now = store.now();
    let mut state = store.state();
    state.mark_offline(runtime_id, now)?;
    let unstarted = state.held_by(runtime_id, |status| status == TaskStatus::Dispatched);
    let mut moved = Vec::with_capacity(unstarted.len());
    for task_id in unstarted {
        let task = state.task_mut(task_id);
        task.previous_claim = task.claim_token.take().map(|token| PreviousClaim {
            token,
            end: ClaimEnd::Requeued,
        });
        task.lease_expires_at = None;
        state.set_status(task_id, TaskStatus::Queued);
        moved.push(TaskMove::from(&*state.task_mut(task_id)));
    }
    Ok(moved)
}

pub(super) fn list(
    store: &MemoryStore,
    status: Option<RuntimeStatus>,
    after: Option<String>,
    limit: u32,
) -> Result<Vec<Runtime>> {
    let state = store.state();
    let mut runtimes: Vec<Runtime> = state
        .runtimes
        .values()
        .filter(|runtime| status.is_none_or(|status| runtime.status == status))
        .filter(|runtime| after.as_ref().is_none_or(|after| runtime.name > *after))
        .cloned()
        .collect();
    runtimes.sort_by(|a, b| a.name.cmp(&b.name));
    runtimes.truncate(limit as usize);
    Ok(runtimes)
}

pub(super) fn capacity(store: &MemoryStore, runtime_id: RuntimeId) -> Result<Capacity> {
    let state = store.state();
    let runtime = state
        .runtimes
        .get(&runtime_id)
        .ok_or(Error::RuntimeNotFound(runtime_id))?;
    let held = state.held_by(runtime_id, TaskStatus::is_active).len();
    Ok(Capacity {
        max_concurrency: runtime.max_concurrency,
        held: u32::try_from(held).unwrap_or(u32::MAX),
    })
}

pub(super) fn horizon(store: &MemoryStore, runtime_id: RuntimeId) -> Result<ClaimHorizon> {
    let now = store.now();
    let state = store.state();
    let runtime = state
        .runtimes
        .get(&runtime_id)
        .ok_or(Error::RuntimeNotFound(runtime_id))?;
    let time_left = |at: DateTime<Utc>| (at - now).to_std().unwrap_or_default();
    let own_lease = state
        .tasks
        .values()
        .filter(|task| task.claimed_by == Some(runtime_id) && task.status == TaskStatus::Dispatched)
        .filter_map(|task| task.lease_expires_at)
        .min()
        .map(time_left);
    let next_available = state
        .tasks
        .values()
        .filter(|task| {
            task.status == TaskStatus::Queued
                && runtime.queues.contains(&task.queue)
                && task.available_at > now
        })
        .map(|task| task.available_at)
        .min()
        .map(time_left);
    let mut queues = runtime.queues.clone();
    queues.sort();
    Ok(ClaimHorizon {
        queues,
        own_lease,
        next_available,
    })
}
