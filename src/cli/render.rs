//! Printing answers: aligned tables for people, proto3-JSON-shaped documents for scripts
//! (lowerCamelCase names, enum value names, RFC 3339 timestamps, bytes as base64).

use base64::Engine;
use serde_json::{Value, json};

use crate::proto as pb;

/// Columns padded to their widest cell, two spaces apart.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut lines = vec![line(headers.to_vec())];
    lines.extend(
        rows.iter()
            .map(|row| line(row.iter().map(String::as_str).collect())),
    );
    lines.join("\n")
}

/// `name: value` lines for one object.
pub(super) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(name, _)| name.len()).max().unwrap_or(0) + 1;
    pairs
        .iter()
        .map(|(name, value)| format!("{:<width$} {value}", format!("{name}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

pub(super) fn timestamp(timestamp: Option<&prost_types::Timestamp>) -> Option<String> {
    let timestamp = timestamp?;
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    let time = chrono::DateTime::from_timestamp(timestamp.seconds, nanos)?;
    Some(time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn timestamp_or_dash(timestamp_value: Option<&prost_types::Timestamp>) -> String {
    timestamp(timestamp_value).unwrap_or_else(|| "-".into())
}

pub(super) fn task_status(status: i32) -> &'static str {
    pb::TaskStatus::try_from(status).map_or("UNKNOWN", |status| {
        status.as_str_name().trim_start_matches("TASK_STATUS_")
    })
}

fn failure_reason(reason: i32) -> &'static str {
    pb::FailureReason::try_from(reason).map_or("UNKNOWN", |reason| reason.as_str_name())
}

pub(super) fn runtime_status(status: i32) -> &'static str {
    pb::RuntimeStatus::try_from(status).map_or("UNKNOWN", |status| {
        status.as_str_name().trim_start_matches("RUNTIME_STATUS_")
    })
}

/// Bytes as text when they are UTF-8, else as base64 (marked so).
fn bytes_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("base64:{}", base64_of(bytes)),
    }
}

fn base64_of(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.into()
    }
}

pub(super) fn task_json(task: &pb::Task) -> Value {
    json!({
        "id": task.id,
        "queue": task.queue,
        "runtimeId": task.runtime_id,
        "concurrencyKey": task.concurrency_key,
        "priority": task.priority,
        "payload": base64_of(&task.payload),
        "metadata": task.metadata,
        "status": pb::TaskStatus::try_from(task.status).map_or("UNKNOWN", |s| s.as_str_name()),
        "attempt": task.attempt,
        "maxAttempts": task.max_attempts,
        "leaseExpirations": task.lease_expirations,
        "claimedBy": task.claimed_by,
        "idempotencyKey": task.idempotency_key,
        "createdAt": timestamp(task.created_at.as_ref()),
        "availableAt": timestamp(task.available_at.as_ref()),
        "dispatchedAt": timestamp(task.dispatched_at.as_ref()),
        "startedAt": timestamp(task.started_at.as_ref()),
        "finishedAt": timestamp(task.finished_at.as_ref()),
        "leaseExpiresAt": timestamp(task.lease_expires_at.as_ref()),
        "result": base64_of(&task.result),
        "error": task.error,
        "failureReason": failure_reason(task.failure_reason),
    })
}

pub(super) fn task_fields(task: &pb::Task) -> String {
    let mut metadata: Vec<String> = task
        .metadata
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    metadata.sort();
    fields(&[
        ("id", task.id.clone()),
        ("queue", task.queue.clone()),
        ("status", task_status(task.status).into()),
        (
            "attempt",
            format!("{} of {}", task.attempt, task.max_attempts),
        ),
        ("priority", task.priority.to_string()),
        ("claimed by", or_dash(&task.claimed_by)),
        ("pinned to", or_dash(&task.runtime_id)),
        ("metadata", or_dash(&metadata.join(", "))),
        ("payload", bytes_text(&task.payload)),
        ("result", bytes_text(&task.result)),
        ("error", or_dash(&task.error)),
        ("created", timestamp_or_dash(task.created_at.as_ref())),
        ("available", timestamp_or_dash(task.available_at.as_ref())),
        ("finished", timestamp_or_dash(task.finished_at.as_ref())),
    ])
}

pub(super) fn task_rows(tasks: &[pb::Task]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|task| {
            vec![
                task.id.clone(),
                task.queue.clone(),
                task_status(task.status).into(),
                task.attempt.to_string(),
                task.priority.to_string(),
                timestamp_or_dash(task.created_at.as_ref()),
                or_dash(&task.claimed_by),
            ]
        })
        .collect();
    let headers = [
        "ID",
        "QUEUE",
        "STATUS",
        "ATTEMPT",
        "PRIORITY",
        "CREATED",
        "CLAIMED BY",
    ];
    table(&headers, &rows)
}

pub(super) fn runtime_json(runtime: &pb::Runtime) -> Value {
    json!({
        "id": runtime.id,
        "name": runtime.name,
        "queues": runtime.queues,
        "labels": runtime.labels,
        "maxConcurrency": runtime.max_concurrency,
        "status": pb::RuntimeStatus::try_from(runtime.status).map_or("UNKNOWN", |s| s.as_str_name()),
        "lastSeenAt": timestamp(runtime.last_seen_at.as_ref()),
        "registeredAt": timestamp(runtime.registered_at.as_ref()),
    })
}

pub(super) fn runtime_rows(runtimes: &[pb::Runtime]) -> String {
    let rows: Vec<Vec<String>> = runtimes
        .iter()
        .map(|runtime| {
            vec![
                runtime.id.clone(),
                runtime.name.clone(),
                runtime_status(runtime.status).into(),
                runtime.queues.join(","),
                runtime.max_concurrency.to_string(),
                timestamp_or_dash(runtime.last_seen_at.as_ref()),
            ]
        })
        .collect();
    let headers = ["ID", "NAME", "STATUS", "QUEUES", "CONCURRENCY", "LAST SEEN"];
    table(&headers, &rows)
}

pub(super) fn api_key_json(key: &pb::ApiKey) -> Value {
    json!({
        "id": key.id,
        "name": key.name,
        "scopes": key.scopes,
        "createdAt": timestamp(key.created_at.as_ref()),
        "expiresAt": timestamp(key.expires_at.as_ref()),
        "lastUsedAt": timestamp(key.last_used_at.as_ref()),
        "revokedAt": timestamp(key.revoked_at.as_ref()),
    })
}

pub(super) fn api_key_rows(keys: &[pb::ApiKey]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|key| {
            vec![
                key.id.clone(),
                key.name.clone(),
                key.scopes.join(","),
                timestamp_or_dash(key.expires_at.as_ref()),
                timestamp_or_dash(key.last_used_at.as_ref()),
                timestamp_or_dash(key.revoked_at.as_ref()),
            ]
        })
        .collect();
    let headers = ["ID", "NAME", "SCOPES", "EXPIRES", "LAST USED", "REVOKED"];
    table(&headers, &rows)
}

pub(super) fn queue_json(queue: &pb::DescribeQueueResponse) -> Value {
    let counts = queue.counts.unwrap_or_default();
    json!({
        "queue": queue.queue,
        "maxConcurrent": queue.max_concurrent,
        "paused": queue.paused,
        "counts": {
            "queued": counts.queued,
            "dispatched": counts.dispatched,
            "running": counts.running,
            "completed": counts.completed,
            "failed": counts.failed,
            "cancelled": counts.cancelled,
        },
        "oldestQueuedAt": timestamp(queue.oldest_queued_at.as_ref()),
        // As protobuf's JSON mapping writes a Duration: seconds with an `s`.
        "defaultExecutionTimeout": queue
            .default_execution_timeout
            .map(|timeout| format!("{}s", wire_seconds(&timeout))),
    })
}

fn wire_seconds(duration: &prost_types::Duration) -> f64 {
    duration.seconds as f64 + f64::from(duration.nanos) / 1e9
}

pub(super) fn queue_fields(queue: &pb::DescribeQueueResponse) -> String {
    let counts = queue.counts.unwrap_or_default();
    let cap = match queue.max_concurrent {
        0 => "unlimited".to_owned(),
        cap => cap.to_string(),
    };
    fields(&[
        ("queue", queue.queue.clone()),
        ("paused", queue.paused.to_string()),
        ("max concurrent", cap),
        ("queued", counts.queued.to_string()),
        ("dispatched", counts.dispatched.to_string()),
        ("running", counts.running.to_string()),
        ("completed", counts.completed.to_string()),
        ("failed", counts.failed.to_string()),
        ("cancelled", counts.cancelled.to_string()),
        (
            "oldest queued",
            timestamp_or_dash(queue.oldest_queued_at.as_ref()),
        ),
        (
            "execution timeout",
            queue
                .default_execution_timeout
                .map_or("-".to_owned(), |timeout| {
                    humantime::format_duration(std::time::Duration::from_secs_f64(
                        wire_seconds(&timeout).max(0.0),
                    ))
                    .to_string()
                }),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_pads_every_column_to_its_widest_cell() {
        let rows = vec![
            vec!["a".to_owned(), "long value".to_owned()],
            vec!["bbbb".to_owned(), "x".to_owned()],
        ];
        let printed = table(&["K", "VALUE"], &rows);
        assert_eq!(printed, "K     VALUE\na     long value\nbbbb  x");
    }

    #[test]
    fn timestamps_print_as_rfc3339_utc() {
        let at = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5_000_000,
        };
        assert_eq!(
            timestamp(Some(&at)).as_deref(),
            Some("2023-11-14T22:13:20.005Z")
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_print_as_base64() {
        assert_eq!(bytes_text(b"hello"), "hello");
        assert_eq!(bytes_text(&[0xff, 0x00]), "base64:/wA=");
    }
}
