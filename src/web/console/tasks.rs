//! The task pages: a filtered, cursor-paged list (or a lookup by id or idempotency key), one
//! task with its timeline, its cancel and retry, and bulk cancel / retry by filter after a
//! confirmation that shows how many tasks would change (a dry run).

use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;

use super::{Console, Visitor, failure, pages};
use crate::domain::auth::Scope;
use crate::domain::{Error, RuntimeId, Task, TaskId, TaskStatus};
use crate::store::{PageCursor, TaskFilter};

/// Tasks per page of the list.
const PAGE_SIZE: u32 = 50;

/// The list's filter, as the form sends it (every field optional, empty = not set).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TaskQuery {
    #[serde(default)]
    pub queue: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub runtime: String,
    /// `YYYY-MM-DDTHH:MM` (a `datetime-local` input), read as UTC.
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    /// A task id, or an idempotency key (with `queue`).
    #[serde(default)]
    pub lookup: String,
    /// Where the page starts: `<created_at>~<id>` of the previous page's last task.
    #[serde(default)]
    pub after: String,
}

impl TaskQuery {
    fn filter(&self) -> crate::domain::Result<TaskFilter> {
        let mut filter = TaskFilter {
            queue: non_empty(&self.queue),
            ..TaskFilter::default()
        };
        if let Some(status) = non_empty(&self.status) {
            let parsed = TaskStatus::parse(&status)
                .ok_or_else(|| Error::invalid("status", "not a task status"))?;
            filter.statuses = vec![parsed];
        }
        if let Some(runtime) = non_empty(&self.runtime) {
            filter.runtime_id = Some(
                RuntimeId::parse(&runtime)
                    .ok_or_else(|| Error::invalid("runtime", "not a runtime id"))?,
            );
        }
        filter.created_from = moment("from", &self.from)?;
        filter.created_before = moment("to", &self.to)?;
        Ok(filter)
    }

    fn cursor(&self) -> crate::domain::Result<Option<PageCursor>> {
        let Some(after) = non_empty(&self.after) else {
            return Ok(None);
        };
        let invalid = || Error::invalid("after", "not a page cursor");
        let (at, id) = after.split_once('~').ok_or_else(invalid)?;
        Ok(Some(PageCursor {
            created_at: DateTime::parse_from_rfc3339(at)
                .map_err(|_| invalid())?
                .with_timezone(&Utc),
            id: TaskId::parse(id).ok_or_else(invalid)?,
        }))
    }
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// A `datetime-local` value (or RFC 3339), as UTC.
fn moment(field: &str, text: &str) -> crate::domain::Result<Option<DateTime<Utc>>> {
    let Some(text) = non_empty(text) else {
        return Ok(None);
    };
    if let Ok(at) = DateTime::parse_from_rfc3339(&text) {
        return Ok(Some(at.with_timezone(&Utc)));
    }
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(&text, format).ok())
        .map(|at| Some(at.and_utc()))
        .ok_or_else(|| Error::invalid(field, "a date and time, YYYY-MM-DDTHH:MM (UTC)"))
}

pub(super) async fn list_page(
    State(console): State<Arc<Console>>,
    visitor: Visitor,
    Query(query): Query<TaskQuery>,
) -> Response {
    let queue = non_empty(&query.queue);
    if let Err(response) = visitor.require(Scope::Read, queue.as_deref()) {
        return response.into_response();
    }
    if let Some(lookup) = non_empty(&query.lookup)
        && let Some(task_id) = TaskId::parse(&lookup)
    {
        return Redirect::to(&format!("/tasks/{task_id}")).into_response();
    }
    let (filter, cursor) = match (query.filter(), query.cursor()) {
        (Ok(mut filter), Ok(cursor)) => {
            // A lookup that is not an id is an idempotency key, which belongs to a queue.
            if let Some(key) = non_empty(&query.lookup) {
                if filter.queue.is_none() {
                    return failure(&Error::invalid(
                        "lookup",
                        "an idempotency key is looked up within a queue: choose the queue",
                    ));
                }
                filter.idempotency_key = Some(key);
            }
            (filter, cursor)
        }
        (Err(error), _) | (_, Err(error)) => return failure(&error),
    };
    match console
        .coordinator
        .list_tasks(filter, cursor, PAGE_SIZE)
        .await
    {
        Ok(page) => {
            let next = page.next.map(|cursor| {
                format!(
                    "{}~{}",
                    cursor
                        .created_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    cursor.id
                )
            });
            let may_manage = queue
                .as_deref()
                .is_some_and(|queue| visitor.may(Scope::Manage, queue));
            visitor.page(pages::tasks(
                &visitor.frame("Tasks"),
                &query,
                &page.tasks,
                next.as_deref(),
                may_manage,
            ))
        }
        Err(error) => failure(&error),
    }
}

/// The task a path names.
async fn task_named(console: &Console, id: &str) -> crate::domain::Result<Task> {
    let task_id = TaskId::parse(id).ok_or_else(|| Error::invalid("task_id", "not a UUID"))?;
    console.coordinator.get_task(task_id).await
}

pub(super) async fn task_page(
    State(console): State<Arc<Console>>,
    visitor: Visitor,
    Path(id): Path<String>,
) -> Response {
    let task = match task_named(&console, &id).await {
        Ok(task) => task,
        Err(error) => return failure(&error),
    };
    let task_id = task.id;
    if let Err(response) = visitor.require(Scope::Read, Some(&task.queue)) {
        return response.into_response();
    }
    let usage = match console.coordinator.task_usage(task_id).await {
        Ok(usage) => usage,
        Err(error) => return failure(&error),
    };
    let failures = match console.coordinator.task_failures(task_id).await {
        Ok(failures) => failures,
        Err(error) => return failure(&error),
    };
    let may_manage = visitor.may(Scope::Manage, &task.queue);
    visitor.page(pages::task(
        &visitor.frame("Task"),
        &task,
        &failures,
        &usage,
        may_manage,
    ))
}

#[derive(Deserialize)]
pub(super) struct ActionForm {
    #[serde(default)]
    csrf: String,
}

pub(super) async fn task_action(
    State(console): State<Arc<Console>>,
    visitor: Visitor,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(response) = visitor.check_form(&form.csrf) {
        return response.into_response();
    }
    let task = match task_named(&console, &id).await {
        Ok(task) => task,
        Err(error) => return failure(&error),
    };
    let task_id = task.id;
    if let Err(response) = visitor.require(Scope::Manage, Some(&task.queue)) {
        return response.into_response();
    }
    let done = match action.as_str() {
        "cancel" => console.coordinator.cancel(task_id).await,
        "retry" => console.coordinator.retry_task(task_id).await,
        _ => Err(Error::invalid("action", "cancel or retry")),
    };
    match done {
        Ok(_) => Redirect::to(&format!("/tasks/{task_id}")).into_response(),
        Err(error) => failure(&error),
    }
}

/// A bulk operation's filter and action, from the tasks page's bulk form.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct BulkQuery {
    #[serde(default)]
    pub queue: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub runtime: String,
    /// `cancel` or `retry`.
    #[serde(default)]
    pub action: String,
}

impl BulkQuery {
    fn as_task_query(&self) -> TaskQuery {
        TaskQuery {
            queue: self.queue.clone(),
            status: self.status.clone(),
            runtime: self.runtime.clone(),
            ..TaskQuery::default()
        }
    }
}

/// Runs the bulk operation `query` names, for real or as a dry run.
async fn run_bulk(
    console: &Console,
    query: &BulkQuery,
    dry_run: bool,
) -> crate::domain::Result<crate::coordinator::BulkOutcome> {
    let filter = query.as_task_query().filter()?;
    match query.action.as_str() {
        "cancel" => console.coordinator.cancel_tasks(filter, dry_run).await,
        "retry" => console.coordinator.retry_tasks(filter, dry_run).await,
        _ => Err(Error::invalid("action", "cancel or retry")),
    }
}

/// The confirmation: how many tasks the operation would change now.
pub(super) async fn bulk_confirm(
    State(console): State<Arc<Console>>,
    visitor: Visitor,
    Query(query): Query<BulkQuery>,
) -> Response {
    if let Err(response) = visitor.require(Scope::Manage, non_empty(&query.queue).as_deref()) {
        return response.into_response();
    }
    match run_bulk(&console, &query, true).await {
        Ok(outcome) => visitor.page(pages::bulk_confirm(
            &visitor.frame("Confirm"),
            &query,
            outcome.matched,
        )),
        Err(error) => failure(&error),
    }
}

#[derive(Deserialize)]
pub(super) struct BulkForm {
    #[serde(default)]
    csrf: String,
    #[serde(flatten)]
    query: BulkQuery,
}

pub(super) async fn bulk_run(
    State(console): State<Arc<Console>>,
    visitor: Visitor,
    Form(form): Form<BulkForm>,
) -> Response {
    if let Err(response) = visitor
        .check_form(&form.csrf)
        .and_then(|()| visitor.require(Scope::Manage, non_empty(&form.query.queue).as_deref()))
    {
        return response.into_response();
    }
    match run_bulk(&console, &form.query, false).await {
        Ok(outcome) => visitor.page(pages::bulk_done(
            &visitor.frame("Done"),
            &form.query,
            outcome.changed,
        )),
        Err(error) => failure(&error),
    }
}
