//! The console's HTML. Pure functions of what the handlers read: every value is escaped by
//! maud; action forms appear only for a visitor allowed to use them (the handlers check again).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::tasks::{BulkQuery, TaskQuery};
use crate::domain::{QueueInfo, Runtime, Task, TaskStatus};
use crate::store::AttemptFailure;

/// What every page shows around its content.
pub struct Frame<'a> {
    pub title: &'a str,
    pub csrf: &'a str,
    /// A credential signed in (so there is a sign-out); false under `--auth none`.
    pub signed_in: bool,
    pub who: String,
}

fn layout(frame: &Frame<'_>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (frame.title) " · leasehold" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    strong.brand { "leasehold" }
                    nav {
                        a href="/queues" { "Queues" }
                        a href="/tasks" { "Tasks" }
                        a href="/runtimes" { "Runtimes" }
                    }
                    span.who { "Signed in as " (frame.who) }
                    @if frame.signed_in {
                        form.inline method="post" action="/sign-out" {
                            input type="hidden" name="csrf" value=(frame.csrf);
                            button #sign-out { "Sign out" }
                        }
                    }
                }
                main { h1 { (frame.title) } (content) }
            }
        }
    }
}

/// A page with one message (refusals, errors).
pub fn message(title: &str, text: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · leasehold" }
                link rel="stylesheet" href="/assets/console.css";
            }
            body { main { h1 { (title) } p #message { (text) } p { a href="/queues" { "Back to the queues" } } } }
        }
    }
}

pub fn sign_in(csrf: &str, note: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Sign in · leasehold" }
                link rel="stylesheet" href="/assets/console.css";
            }
            body {
                main.narrow {
                    h1 { "Sign in to leasehold" }
                    @if let Some(note) = note { p #message { (note) } }
                    form method="post" action="/sign-in" {
                        input type="hidden" name="csrf" value=(csrf);
                        label for="token" { "API key or admin token" }
                        input #token type="password" name="token" autocomplete="off" required;
                        button #sign-in { "Sign in" }
                    }
                    p.hint { "An API key with the read scope looks; manage acts on queues and tasks; admin also deregisters runtimes." }
                }
            }
        }
    }
}

/// One row of the queue table.
pub struct QueueRow<'a> {
    pub queue: &'a QueueInfo,
    pub chart: Markup,
    pub may_manage: bool,
}

pub fn queues(frame: &Frame<'_>, rows: Markup) -> Markup {
    layout(
        frame,
        html! {
            p.hint {
                "Active counts as of the last sweep, finished counts as of the last tally (a few minutes behind); "
                "the chart shows completed (green) and failed (red) tasks per minute over the last hour. "
                "The table refreshes itself while this page is open."
            }
            table #queues {
                thead { tr {
                    th { "Queue" } th { "Queued" } th { "Dispatched" } th { "Running" }
                    th { "Completed" } th { "Failed" } th { "Cancelled" } th { "Oldest queued" }
                    th { "State" } th { "Last hour" } th { "Actions" }
                } }
                tbody #queue-rows { (rows) }
            }
        },
    )
}

/// The queue table's body (also what the live refresh sends).
pub fn queue_rows(
    csrf: &str,
    rows: &[QueueRow<'_>],
    counted_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Markup {
    html! {
        @if rows.is_empty() {
            tr { td colspan="11" { "No queues yet: enqueue a task." } }
        }
        @for row in rows {
            @let queue = row.queue;
            @let counts = &queue.counts;
            tr.queue data-queue=(queue.name) {
                td { a href=(format!("/tasks?queue={}", encode(&queue.name))) { (queue.name) } }
                td.count.queued { (counts.queued) }
                td.count.dispatched { (counts.dispatched) }
                td.count.running { (counts.running) }
                td.count.completed { (counts.completed) }
                td.count.failed { (counts.failed) }
                td.count.cancelled { (counts.cancelled) }
                td { (queue.oldest_queued_at.map(|at| age(now, at)).unwrap_or_else(|| "—".to_owned())) }
                td.state {
                    (if queue.paused { "paused" } else { "running" })
                    @if queue.max_concurrent > 0 { ", cap " (queue.max_concurrent) }
                }
                td { (row.chart) }
                td.actions {
                    @if row.may_manage {
                        form.inline method="post" action=(format!("/queues/{}", encode(&queue.name))) {
                            input type="hidden" name="csrf" value=(csrf);
                            @if queue.paused {
                                button name="action" value="resume" { "Resume" }
                            } @else {
                                button name="action" value="pause" { "Pause" }
                            }
                        }
                        form.inline method="post" action=(format!("/queues/{}", encode(&queue.name))) {
                            input type="hidden" name="csrf" value=(csrf);
                            input type="number" name="max_concurrent" min="0" value=(queue.max_concurrent) aria-label="Cap (0: none)";
                            button name="action" value="cap" { "Set cap" }
                        }
                    }
                }
            }
        }
        @if let Some(at) = counted_at {
            tr.note { td colspan="11" { "Counted " (age(now, at)) " ago." } }
        }
    }
}

pub fn tasks(
    frame: &Frame<'_>,
    query: &TaskQuery,
    tasks: &[Task],
    next: Option<&str>,
    may_manage: bool,
) -> Markup {
    layout(
        frame,
        html! {
            form.filters method="get" action="/tasks" {
                label { "Queue " input name="queue" value=(query.queue); }
                label { "Status "
                    select name="status" {
                        option value="" { "any" }
                        @for status in TaskStatus::ALL {
                            option value=(status.as_str()) selected[query.status == status.as_str()] { (status.as_str()) }
                        }
                    }
                }
                label { "Runtime " input name="runtime" value=(query.runtime) placeholder="runtime id"; }
                label { "Created from " input type="datetime-local" name="from" value=(query.from); }
                label { "to " input type="datetime-local" name="to" value=(query.to); }
                label { "Id or idempotency key " input name="lookup" value=(query.lookup); }
                button #filter { "Show" }
                span.hint { "Times are UTC." }
            }
            @if may_manage {
                form.bulk method="get" action="/bulk" {
                    input type="hidden" name="queue" value=(query.queue);
                    input type="hidden" name="status" value=(query.status);
                    input type="hidden" name="runtime" value=(query.runtime);
                    "Every task of this filter: "
                    button #bulk-cancel name="action" value="cancel" { "Cancel all…" }
                    button #bulk-retry name="action" value="retry" { "Retry all…" }
                }
            }
            table #tasks {
                thead { tr { th { "Task" } th { "Queue" } th { "Status" } th { "Attempt" } th { "Created" } th { "Error" } } }
                tbody {
                    @if tasks.is_empty() { tr { td colspan="6" { "No task matches." } } }
                    @for task in tasks {
                        tr.task data-status=(task.status.as_str()) {
                            td { a href=(format!("/tasks/{}", task.id)) { code { (task.id) } } }
                            td { (task.queue) }
                            td.status { (task.status.as_str()) }
                            td { (task.attempt) " of " (task.max_attempts) }
                            td { (when(task.created_at)) }
                            td.error { (task.error.as_deref().map(shortened).unwrap_or_default()) }
                        }
                    }
                }
            }
            @if let Some(next) = next {
                p { a #next href=(next_page(query, next)) { "Next page →" } }
            }
        },
    )
}

fn next_page(query: &TaskQuery, after: &str) -> String {
    let pairs = [
        ("queue", query.queue.as_str()),
        ("status", query.status.as_str()),
        ("runtime", query.runtime.as_str()),
        ("from", query.from.as_str()),
        ("to", query.to.as_str()),
        ("lookup", query.lookup.as_str()),
        ("after", after),
    ];
    let query: Vec<String> = pairs
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| format!("{key}={}", encode(value)))
        .collect();
    format!("/tasks?{}", query.join("&"))
}

pub fn task(
    frame: &Frame<'_>,
    task: &Task,
    failures: &[AttemptFailure],
    usage: &BTreeMap<String, i64>,
    may_manage: bool,
) -> Markup {
    let optional = |at: Option<DateTime<Utc>>| at.map(when).unwrap_or_else(|| "—".to_owned());
    layout(
        frame,
        html! {
            dl.fields {
                dt { "Id" } dd #task-id { code { (task.id) } }
                dt { "Queue" } dd { a href=(format!("/tasks?queue={}", encode(&task.queue))) { (task.queue) } }
                dt { "Status" } dd #task-status { (task.status.as_str()) }
                dt { "Attempt" } dd { (task.attempt) " of " (task.max_attempts) }
                dt { "Priority" } dd { (task.priority) }
                dt { "Pinned to" } dd { (task.runtime_id.map(|id| id.to_string()).unwrap_or_else(|| "—".to_owned())) }
                dt { "Held by" } dd { (task.claimed_by.map(|id| id.to_string()).unwrap_or_else(|| "—".to_owned())) }
                dt { "Concurrency key" } dd { (task.concurrency_key.as_deref().unwrap_or("—")) }
                dt { "Idempotency key" } dd { (task.idempotency_key.as_deref().unwrap_or("—")) }
                dt { "Execution timeout" } dd { (task.execution_timeout.map(|timeout| humantime::format_duration(timeout).to_string()).unwrap_or_else(|| "—".to_owned())) }
                dt { "Failure reason" } dd { (task.failure_reason.map(|reason| reason.as_str()).unwrap_or("—")) }
                dt { "Error" } dd #task-error { pre { (task.error.as_deref().unwrap_or("—")) } }
                dt { "Payload" } dd { pre { (String::from_utf8_lossy(&task.payload)) } }
                dt { "Result" } dd { pre { (task.result.as_deref().map(String::from_utf8_lossy).unwrap_or_default()) } }
                dt { "Metadata" } dd { @for (key, value) in &task.metadata { code { (key) "=" (value) } " " } }
            }
            h2 { "Timeline" }
            ol.timeline {
                li { "Created " (when(task.created_at)) }
                li { "Available " (when(task.available_at)) }
                li { "Dispatched " (optional(task.dispatched_at)) }
                li { "Started " (optional(task.started_at)) }
                li { "Lease expirations: " (task.lease_expirations) }
                @for failed in failures {
                    li.failure {
                        "Attempt " (failed.attempt) " failed " (when(failed.failed_at))
                        " (" (failed.reason.as_str()) "): " (failed.error.as_deref().map(shortened).unwrap_or_default())
                    }
                }
                li { "Now attempt " (task.attempt) " of " (task.max_attempts) }
                li { "Finished " (optional(task.finished_at)) }
            }
            h2 { "Usage" }
            @if usage.is_empty() { p { "No usage reported." } }
            @else {
                table #usage { @for (name, value) in usage { tr { td { (name) } td { (value) } } } }
            }
            @if may_manage {
                h2 { "Actions" }
                @if !task.status.is_terminal() {
                    form.inline method="post" action=(format!("/tasks/{}/cancel", task.id)) {
                        input type="hidden" name="csrf" value=(frame.csrf);
                        button #cancel { "Cancel" }
                    }
                }
                @if matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
                    form.inline method="post" action=(format!("/tasks/{}/retry", task.id)) {
                        input type="hidden" name="csrf" value=(frame.csrf);
                        button #retry { "Retry" }
                    }
                }
            }
        },
    )
}

pub fn runtimes(
    frame: &Frame<'_>,
    rows: &[(Runtime, u32)],
    may_deregister: bool,
    now: DateTime<Utc>,
) -> Markup {
    layout(
        frame,
        html! {
            table #runtimes {
                thead { tr { th { "Name" } th { "Id" } th { "Status" } th { "Queues" } th { "Labels" } th { "Tasks held" } th { "Last seen" } th { "Actions" } } }
                tbody {
                    @if rows.is_empty() { tr { td colspan="8" { "No runtime is registered." } } }
                    @for (runtime, held) in rows {
                        tr.runtime {
                            td { (runtime.name) }
                            td { code { (runtime.id) } }
                            td { (runtime.status.as_str()) }
                            td { (runtime.queues.join(", ")) }
                            td { @for (key, value) in &runtime.labels { code { (key) "=" (value) } " " } }
                            td { (held) @if runtime.max_concurrency > 0 { " of " (runtime.max_concurrency) } }
                            td { (age(now, runtime.last_seen_at)) " ago" }
                            td {
                                @if may_deregister {
                                    form.inline method="post" action=(format!("/runtimes/{}/deregister", runtime.id)) {
                                        input type="hidden" name="csrf" value=(frame.csrf);
                                        button { "Deregister" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

fn bulk_description(query: &BulkQuery) -> String {
    let mut parts = vec![format!("queue {}", query.queue)];
    if !query.status.is_empty() {
        parts.push(format!("status {}", query.status));
    }
    if !query.runtime.is_empty() {
        parts.push(format!("runtime {}", query.runtime));
    }
    parts.join(", ")
}

pub fn bulk_confirm(frame: &Frame<'_>, query: &BulkQuery, matched: u64) -> Markup {
    let verb = if query.action == "retry" {
        "Retry"
    } else {
        "Cancel"
    };
    layout(
        frame,
        html! {
            p #confirm-count data-matched=(matched) {
                (verb) " " strong { (matched) } " task(s) of " (bulk_description(query)) "?"
            }
            p.hint { "The count is taken now; tasks that change meanwhile are left as they are." }
            form method="post" action="/bulk" {
                input type="hidden" name="csrf" value=(frame.csrf);
                input type="hidden" name="queue" value=(query.queue);
                input type="hidden" name="status" value=(query.status);
                input type="hidden" name="runtime" value=(query.runtime);
                input type="hidden" name="action" value=(query.action);
                button #confirm { (verb) " " (matched) " task(s)" }
                " "
                a href=(format!("/tasks?queue={}", encode(&query.queue))) { "Back" }
            }
        },
    )
}

pub fn bulk_done(frame: &Frame<'_>, query: &BulkQuery, changed: u64) -> Markup {
    let verb = if query.action == "retry" {
        "Retried"
    } else {
        "Cancelled"
    };
    layout(
        frame,
        html! {
            p #done data-changed=(changed) { (verb) " " strong { (changed) } " task(s) of " (bulk_description(query)) "." }
            p { a href=(format!("/tasks?queue={}", encode(&query.queue))) { "See the tasks" } }
        },
    )
}

fn when(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `now - at`, to the second.
fn age(now: DateTime<Utc>, at: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds().max(0).unsigned_abs();
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

fn shortened(text: &str) -> String {
    const MOST: usize = 120;
    match text.char_indices().nth(MOST) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Percent-encodes `text` for a URL's path segment or query value.
fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}
