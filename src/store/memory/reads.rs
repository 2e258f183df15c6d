//! Reads and settings of queues, and pages of tasks, on the embedded store.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, DurationRound as _, Utc};

use super::*;

pub(super) fn list_tasks(
    store: &MemoryStore,
    filter: TaskFilter,
    after: Option<PageCursor>,
    page_size: u32,
) -> Result<TaskPage> {
    let state = store.state();
    let mut matching: Vec<&Task> = state
        .tasks
        .values()
        .filter(|task| {
            filter
                .queue
                .as_ref()
                .is_none_or(|queue| &task.queue == queue)
                && (filter.statuses.is_empty() || filter.statuses.contains(&task.status))
                && filter.runtime_id.is_none_or(|runtime| {
                    task.runtime_id == Some(runtime) || task.claimed_by == Some(runtime)
                })
                && after.is_none_or(|cursor| {
                    (task.created_at, task.id) > (cursor.created_at, cursor.id)
                })
                && filter
                    .created_from
                    .is_none_or(|from| task.created_at >= from)
                && filter
                    .created_before
                    .is_none_or(|before| task.created_at < before)
                && filter
                    .idempotency_key
                    .as_ref()
                    .is_none_or(|key| task.idempotency_key.as_ref() == Some(key))
        })
        .collect();
    matching.sort_by_key(|task| (task.created_at, task.id));
    let more = matching.len() > page_size as usize;
    matching.truncate(page_size as usize);
    let next = if more {
        matching.last().map(|last| PageCursor {
            created_at: last.created_at,
            id: last.id,
        })
    } else {
        None
    };
    Ok(TaskPage {
        tasks: matching.into_iter().cloned().collect(),
        next,
    })
}

pub(super) fn depths(store: &MemoryStore) -> Result<Vec<QueueDepth>> {
    let now = store.now();
    let state = store.state();
    let mut depths: BTreeMap<&str, QueueDepth> = BTreeMap::new();
    for task in state
        .tasks
        .values()
        .filter(|task| !task.status.is_terminal())
    {
        let depth = depths
            .entry(task.queue.as_str())
            .or_insert_with(|| QueueDepth {
                queue: task.queue.clone(),
                queued: 0,
                dispatched: 0,
                running: 0,
                oldest_queued_age: None,
            });
        match task.status {
            TaskStatus::Queued => {
                depth.queued += 1;
                let age = (now - task.created_at).to_std().unwrap_or_default();
                depth.oldest_queued_age = depth.oldest_queued_age.max(Some(age));
            }
            TaskStatus::Dispatched => depth.dispatched += 1,
            _ => depth.running += 1,
        }
    }
    Ok(depths.into_values().collect())
}

pub(super) fn describe(store: &MemoryStore, queue: &str) -> Result<QueueInfo> {
    let state = store.state();
    let settings = state.settings(queue);
    let mut counts = StatusCounts::default();
    let mut oldest_queued_at: Option<DateTime<Utc>> = None;
    for task in state.tasks.values().filter(|task| task.queue == queue) {
        counts.add(task.status, 1);
        if task.status == TaskStatus::Queued {
            oldest_queued_at = Some(
                oldest_queued_at.map_or(task.created_at, |oldest| oldest.min(task.created_at)),
            );
        }
    }
    Ok(QueueInfo {
        name: queue.to_owned(),
        max_concurrent: settings.max_concurrent,
        paused: settings.paused,
        default_execution_timeout: settings.default_execution_timeout,
        counts,
        oldest_queued_at,
    })
}

/// Every queue with settings or tasks, counted exactly (the embedded store is small).
pub(super) fn overview(store: &MemoryStore, limit: u32) -> Result<QueueOverview> {
    let names: BTreeSet<String> = {
        let state = store.state();
        state
            .queues
            .keys()
            .cloned()
            .chain(state.tasks.values().map(|task| task.queue.clone()))
            .collect()
    };
    let queues = names
        .iter()
        .take(limit as usize)
        .map(|name| describe(store, name))
        .collect::<Result<_>>()?;
    Ok(QueueOverview {
        queues,
        counted_at: Some(store.now()),
    })
}

/// Completed and failed tasks per queue and minute, from the tasks themselves.
pub(super) fn throughput(store: &MemoryStore, since: DateTime<Utc>) -> Result<Vec<MinuteCount>> {
    let state = store.state();
    let mut minutes: BTreeMap<(String, DateTime<Utc>), (u64, u64)> = BTreeMap::new();
    for task in state.tasks.values() {
        let Some(finished_at) = task.finished_at else {
            continue;
        };
        let minute = finished_at
            .duration_trunc(chrono::Duration::minutes(1))
            .unwrap_or(finished_at);
        if minute < since {
            continue;
        }
        let counts = minutes.entry((task.queue.clone(), minute)).or_default();
        match task.status {
            TaskStatus::Completed => counts.0 += 1,
            TaskStatus::Failed => counts.1 += 1,
            _ => {}
        }
    }
    Ok(minutes
        .into_iter()
        .map(|((queue, minute), (completed, failed))| MinuteCount {
            queue,
            minute,
            completed,
            failed,
        })
        .collect())
}

pub(super) fn update(store: &MemoryStore, queue: &str, update: QueueUpdate) -> Result<QueueInfo> {
    {
        let mut state = store.state();
        let settings = state.queues.entry(queue.to_owned()).or_default();
        if let Some(max_concurrent) = update.max_concurrent {
            settings.max_concurrent = max_concurrent;
        }
        if let Some(paused) = update.paused {
            settings.paused = paused;
        }
        if let Some(timeout) = update.default_execution_timeout {
            settings.default_execution_timeout = timeout;
        }
    }
    describe(store, queue)
}

/// A task's usage counters, summed over its claims.
pub(super) fn task_usage(store: &MemoryStore, task_id: TaskId) -> Result<BTreeMap<String, i64>> {
    let state = store.state();
    let mut summed = BTreeMap::new();
    for ((_, _), counters) in state.usage.iter().filter(|((id, _), _)| *id == task_id) {
        for (name, value) in counters {
            *summed.entry(name.clone()).or_insert(0) += value;
        }
    }
    Ok(summed)
}

/// Bulk operations' pages: ids matching `filter`, in id order after `after`.
pub(super) fn matching_task_ids(
    store: &MemoryStore,
    filter: &TaskFilter,
    after: Option<TaskId>,
    limit: u32,
) -> Result<Vec<TaskId>> {
    let state = store.state();
    let mut ids: Vec<TaskId> = state
        .tasks
        .values()
        .filter(|task| {
            filter.queue.as_deref() == Some(task.queue.as_str())
                && filter.statuses.contains(&task.status)
                && filter.runtime_id.is_none_or(|runtime| {
                    task.runtime_id == Some(runtime) || task.claimed_by == Some(runtime)
                })
                && after.is_none_or(|after| task.id > after)
        })
        .map(|task| task.id)
        .collect();
    ids.sort();
    ids.truncate(limit as usize);
    Ok(ids)
}
