//! Bulk operations (CancelTasks, RetryTasks): every task of a queue matching a filter, worked
//! through in pages of [`BULK_BATCH`] ids, each page changed by one statement and announced
//! like the single operation, so no statement holds many row locks and a million tasks never
//! lock the table at once.

use super::*;

/// Tasks one statement of a bulk operation changes.
pub const BULK_BATCH: u32 = 1000;

/// What a bulk operation found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BulkOutcome {
    /// Tasks the filter selected among those the operation can change.
    pub matched: u64,
    /// Tasks changed: none for a dry run; fewer than matched when some moved meanwhile.
    pub changed: u64,
}

/// The change a bulk operation makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BulkChange {
    Cancel,
    Retry,
}

impl BulkChange {
    /// The statuses the change applies to; a filter naming others selects nothing there.
    fn changeable(self) -> &'static [TaskStatus] {
        match self {
            BulkChange::Cancel => &[
                TaskStatus::Queued,
                TaskStatus::Dispatched,
                TaskStatus::Running,
            ],
            BulkChange::Retry => &[TaskStatus::Failed, TaskStatus::Cancelled],
        }
    }
}

impl Coordinator {
    /// CancelTasks: every active task matching `filter` becomes CANCELLED.
    pub async fn cancel_tasks(&self, filter: TaskFilter, dry_run: bool) -> Result<BulkOutcome> {
        self.bulk(BulkChange::Cancel, filter, dry_run).await
    }

    /// RetryTasks: every FAILED or CANCELLED task matching `filter` is redriven (T9).
    pub async fn retry_tasks(&self, filter: TaskFilter, dry_run: bool) -> Result<BulkOutcome> {
        self.bulk(BulkChange::Retry, filter, dry_run).await
    }

    async fn bulk(
        &self,
        change: BulkChange,
        mut filter: TaskFilter,
        dry_run: bool,
    ) -> Result<BulkOutcome> {
        let queue = filter.queue.clone().unwrap_or_default();
        if queue.is_empty() {
            return Err(Error::invalid(
                "filter.queue",
                "a bulk operation needs its queue",
            ));
        }
        validate::queue_name("filter.queue", &queue)?;
        let changeable = change.changeable();
        filter.statuses = if filter.statuses.is_empty() {
            changeable.to_vec()
        } else {
            let asked = std::mem::take(&mut filter.statuses);
            changeable
                .iter()
                .copied()
                .filter(|status| asked.contains(status))
                .collect()
        };
        let mut outcome = BulkOutcome::default();
        if filter.statuses.is_empty() {
            return Ok(outcome);
        }
        let mut after = None;
        loop {
            let page = self
                .store
                .matching_task_ids(&filter, after, BULK_BATCH)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(*last);
            outcome.matched += page.len() as u64;
            if !dry_run {
                let changed = match change {
                    BulkChange::Cancel => self.store.cancel_many(&page).await?,
                    BulkChange::Retry => self.store.retry_many(&page).await?,
                };
                outcome.changed += changed.len() as u64;
                self.announce_changed(&changed).await;
            }
            if page.len() < BULK_BATCH as usize {
                break;
            }
        }
        tracing::info!(?change, queue, dry_run, ?outcome, "bulk operation");
        Ok(outcome)
    }

    /// As the single operations announce: the tasks' topics are woken, and the holders of the
    /// cancelled ones told.
    async fn announce_changed(&self, changed: &[Task]) {
        let moves: Vec<TaskMove> = changed.iter().map(TaskMove::from).collect();
        let cancellations: Vec<Cancellation> = changed
            .iter()
            .filter(|task| task.status == TaskStatus::Cancelled && task.claim_token.is_some())
            .filter_map(|task| {
                Some(Cancellation {
                    runtime: task.claimed_by?,
                    task: task.id,
                })
            })
            .collect();
        self.announce_topics(Wakes::of_moves(&moves), &cancellations)
            .await;
    }
}
