//! The owner writes (start, extend, complete, fail, usage) on the embedded store: each applies
//! only for the current claim token, else `domain::fence` says whether it was a replay or why
//! it is refused, exactly as on PostgreSQL.

use super::*;

pub(super) fn start(
    store: &MemoryStore,
    task_id: TaskId,
    token: ClaimToken,
    acting: Option<RuntimeId>,
) -> Result<Task> {
    let start = |state: &mut State, task_id, now| {
        let task = state.task_mut(task_id);
        task.started_at = Some(now);
        state.set_status(task_id, TaskStatus::Running);
    };
    let (task, _) = store.fenced(OwnerWrite::Start, task_id, token, acting, start)?;
    Ok(task)
}

pub(super) fn extend_lease(
    store: &MemoryStore,
    task_id: TaskId,
    token: ClaimToken,
    extend_by: Duration,
    acting: Option<RuntimeId>,
) -> Result<LeaseRenewal> {
    let (task, _) = store.fenced(
        OwnerWrite::ExtendLease,
        task_id,
        token,
        acting,
        |state, task_id, now| {
            let task = state.task_mut(task_id);
            let renewed = now + to_chrono(extend_by);
            task.lease_expires_at = task.lease_expires_at.max(Some(renewed));
        },
    )?;
    let lease_expires_at = task
        .lease_expires_at
        .ok_or_else(|| Error::Internal("an extended lease has no expiry".into()))?;
    Ok(LeaseRenewal {
        lease_expires_at,
        runtime_id: task.claimed_by,
    })
}

pub(super) fn complete(
    store: &MemoryStore,
    task_id: TaskId,
    token: ClaimToken,
    result: Vec<u8>,
    acting: Option<RuntimeId>,
) -> Result<Task> {
    let (task, _) = store.fenced(
        OwnerWrite::Complete,
        task_id,
        token,
        acting,
        |state, task_id, now| {
            let task = state.task_mut(task_id);
            task.result = Some(result);
            task.finished_at = Some(now);
            task.lease_expires_at = None;
            state.set_status(task_id, TaskStatus::Completed);
        },
    )?;
    Ok(task)
}

pub(super) fn fail(
    store: &MemoryStore,
    task_id: TaskId,
    token: ClaimToken,
    failure: Failure,
    acting: Option<RuntimeId>,
) -> Result<FailOutcome> {
    let policy = store.policy;
    let (task, verdict) = store.fenced(
        OwnerWrite::Fail,
        task_id,
        token,
        acting,
        |state, task_id, now| {
            state.fail(task_id, &failure, &policy, now);
        },
    )?;
    let will_retry = match verdict {
        Verdict::Replay => fence::replayed_fail_retried(&task, token),
        _ => task.status == TaskStatus::Queued,
    };
    Ok(FailOutcome { task, will_retry })
}

pub(super) fn report_usage(
    store: &MemoryStore,
    task_id: TaskId,
    token: ClaimToken,
    counters: BTreeMap<String, i64>,
    acting: Option<RuntimeId>,
) -> Result<Option<RuntimeId>> {
    let now = store.now();
    let mut state = store.state();
    let task = state.task(task_id)?;
    let holder = task.claimed_by;
    let held_by_another = fence::held_by_another(task, acting);
    if State::holds_active_claim(task, token, now) && !held_by_another {
        state
            .usage
            .entry((task_id, token))
            .or_default()
            .extend(counters);
        return Ok(holder);
    }
    let stored = state.usage.get(&(task_id, token));
    let already_reported = !counters.is_empty()
        && stored.is_some_and(|stored| {
            counters
                .iter()
                .all(|(name, value)| stored.get(name) == Some(value))
        });
    if already_reported {
        return Ok(holder);
    }
    if held_by_another {
        return Err(Error::RuntimeMismatch);
    }
    match fence::judge(OwnerWrite::ReportUsage, task, token, now) {
        Verdict::Refuse(refusal) => Err(Error::refused(refusal, task)),
        Verdict::Apply | Verdict::Replay => Err(Error::Internal(
            "the fence allowed a usage report the claim check refused".into(),
        )),
    }
}
