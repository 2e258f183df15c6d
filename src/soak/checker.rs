//! Reads a soak's whole history and the final tasks table and counts what must never happen
//! (spec: no task lost, no superseded worker ever changes one), plus figures that describe the
//! run. Pure: a test feeds it planted violations.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::history::{Event, Kind};

/// A task as the database holds it at the end.
#[derive(Clone, Debug)]
pub struct FinalTask {
    pub id: String,
    pub status: String,
    pub attempt: u32,
    pub result: Option<Vec<u8>>,
}

/// One broken promise, with the task it concerns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub kind: ViolationKind,
    pub task: String,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// Acknowledged at enqueue, then missing or not terminal at the end.
    Lost,
    /// Completed under two different claim tokens.
    DoubleCompletion,
    /// A write accepted for a token after a later claim's StartTask was accepted.
    StaleWriteAccepted,
    /// The stored result is not what the accepting worker sent.
    ResultMismatch,
}

#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    pub counts: BTreeMap<String, usize>,
    pub figures: Figures,
}

#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub tasks_enqueued: usize,
    pub tasks_completed: usize,
    pub tasks_failed: usize,
    /// Accepted StartTask calls per task: 1 is a task that ran once.
    pub executions_per_task_mean: f64,
    pub executions_per_task_max: usize,
    /// Tasks that needed more than one attempt (the database's `attempt`).
    pub tasks_retried: usize,
    pub refusals_by_reason: BTreeMap<String, usize>,
    pub transport_errors: usize,
}

/// The suffix a worker's result carries: `<payload>:<claim token>` from SDK workers,
/// `<payload>:daemon` from the `leasehold worker` daemon's command.
pub const DAEMON_RESULT_SUFFIX: &str = "daemon";

pub fn check(events: &[Event], finals: &[FinalTask]) -> Verdict {
    let mut verdict = Verdict::default();
    let by_task = group_by_task(events);
    let finals: HashMap<&str, &FinalTask> =
        finals.iter().map(|task| (task.id.as_str(), task)).collect();
    let enqueued: BTreeMap<&str, &str> = events
        .iter()
        .filter(|event| event.kind == Kind::Enqueued)
        .map(|event| (event.task.as_str(), event.data.as_str()))
        .collect();

    for (task, payload) in &enqueued {
        let history = by_task.get(task).map(Vec::as_slice).unwrap_or_default();
        match finals.get(task) {
            None => verdict.flag(
                ViolationKind::Lost,
                task,
                "acknowledged, then missing".into(),
            ),
            Some(stored) if !is_terminal(&stored.status) => verdict.flag(
                ViolationKind::Lost,
                task,
                format!("still {} at the end", stored.status),
            ),
            Some(stored) => check_result(&mut verdict, task, payload, stored, history),
        }
        check_completions(&mut verdict, task, history);
        check_stale_writes(&mut verdict, task, history);
    }
    verdict.figures = figures(events, &by_task, &finals, enqueued.len());
    for violation in &verdict.violations {
        *verdict.counts.entry(kind_name(violation.kind)).or_default() += 1;
    }
    for kind in [
        ViolationKind::Lost,
        ViolationKind::DoubleCompletion,
        ViolationKind::StaleWriteAccepted,
        ViolationKind::ResultMismatch,
    ] {
        verdict.counts.entry(kind_name(kind)).or_default();
    }
    verdict
}

impl Verdict {
    fn flag(&mut self, kind: ViolationKind, task: &str, detail: String) {
        self.violations.push(Violation {
            kind,
            task: task.to_owned(),
            detail,
        });
    }
}

fn kind_name(kind: ViolationKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "COMPLETED" | "FAILED" | "CANCELLED")
}

fn group_by_task(events: &[Event]) -> HashMap<&str, Vec<&Event>> {
    let mut by_task: HashMap<&str, Vec<&Event>> = HashMap::new();
    for event in events {
        by_task.entry(event.task.as_str()).or_default().push(event);
    }
    for history in by_task.values_mut() {
        history.sort_by_key(|event| event.t);
    }
    by_task
}

/// Two different tokens both told "completed".
fn check_completions(verdict: &mut Verdict, task: &str, history: &[&Event]) {
    let tokens: BTreeSet<&str> = history
        .iter()
        .filter(|event| event.kind == Kind::CompleteOk)
        .map(|event| event.token.as_str())
        .collect();
    if tokens.len() > 1 {
        verdict.flag(
            ViolationKind::DoubleCompletion,
            task,
            format!("completed under {} tokens: {tokens:?}", tokens.len()),
        );
    }
}

/// A token is superseded once a later claim's StartTask was accepted; any write accepted for
/// it after that moment broke the fence.
fn check_stale_writes(verdict: &mut Verdict, task: &str, history: &[&Event]) {
    let mut claimed_at: HashMap<&str, u64> = HashMap::new();
    for event in history.iter().filter(|event| event.kind == Kind::Claimed) {
        claimed_at.entry(event.token.as_str()).or_insert(event.t);
    }
    let starts: Vec<&&Event> = history
        .iter()
        .filter(|event| event.kind == Kind::StartOk)
        .collect();
    for write in history
        .iter()
        .filter(|event| matches!(event.kind, Kind::StartOk | Kind::CompleteOk | Kind::FailOk))
    {
        let Some(written_claim) = claimed_at.get(write.token.as_str()) else {
            continue;
        };
        let superseded_by = starts.iter().find(|start| {
            start.token != write.token
                && start.t < write.t
                && claimed_at
                    .get(start.token.as_str())
                    .is_some_and(|later| later > written_claim)
        });
        if let Some(start) = superseded_by {
            verdict.flag(
                ViolationKind::StaleWriteAccepted,
                task,
                format!(
                    "{:?} accepted at {} ms for token {} after token {} started at {} ms",
                    write.kind, write.t, write.token, start.token, start.t
                ),
            );
        }
    }
}

/// A COMPLETED task's result is `<payload>:<token or daemon>`: the payload it was enqueued
/// with, and a token that claimed it (and, when a completion was acknowledged, that one).
fn check_result(
    verdict: &mut Verdict,
    task: &str,
    payload: &str,
    stored: &FinalTask,
    history: &[&Event],
) {
    if stored.status != "COMPLETED" {
        return;
    }
    let result = String::from_utf8_lossy(stored.result.as_deref().unwrap_or_default()).into_owned();
    let Some((sent_payload, suffix)) = result.rsplit_once(':') else {
        verdict.flag(
            ViolationKind::ResultMismatch,
            task,
            format!("result {result:?} has no suffix"),
        );
        return;
    };
    if sent_payload != payload {
        verdict.flag(
            ViolationKind::ResultMismatch,
            task,
            format!("result carries payload {sent_payload:?}, the task was {payload:?}"),
        );
        return;
    }
    if suffix == DAEMON_RESULT_SUFFIX {
        return;
    }
    let acknowledged: Vec<&str> = history
        .iter()
        .filter(|event| event.kind == Kind::CompleteOk)
        .map(|event| event.token.as_str())
        .collect();
    let claimed = history
        .iter()
        .any(|event| event.kind == Kind::Claimed && event.token == suffix);
    if !claimed || acknowledged.iter().any(|token| *token != suffix) {
        verdict.flag(
            ViolationKind::ResultMismatch,
            task,
            format!(
                "stored result is token {suffix}'s; acknowledged completions: {acknowledged:?}"
            ),
        );
    }
}

fn figures(
    events: &[Event],
    by_task: &HashMap<&str, Vec<&Event>>,
    finals: &HashMap<&str, &FinalTask>,
    enqueued: usize,
) -> Figures {
    let executions: Vec<usize> = by_task
        .values()
        .map(|history| {
            history
                .iter()
                .filter(|event| event.kind == Kind::StartOk)
                .count()
        })
        .filter(|starts| *starts > 0)
        .collect();
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    for event in events.iter().filter(|event| {
        matches!(
            event.kind,
            Kind::StartRefused | Kind::CompleteRefused | Kind::FailRefused
        )
    }) {
        *refusals.entry(event.reason.clone()).or_default() += 1;
    }
    let status_count = |status: &str| finals.values().filter(|task| task.status == status).count();
    Figures {
        tasks_enqueued: enqueued,
        tasks_completed: status_count("COMPLETED"),
        tasks_failed: status_count("FAILED"),
        executions_per_task_mean: if executions.is_empty() {
            0.0
        } else {
            executions.iter().sum::<usize>() as f64 / executions.len() as f64
        },
        executions_per_task_max: executions.iter().copied().max().unwrap_or(0),
        tasks_retried: finals.values().filter(|task| task.attempt > 1).count(),
        refusals_by_reason: refusals,
        transport_errors: events
            .iter()
            .filter(|event| event.kind == Kind::TransportError)
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(t: u64, kind: Kind, task: &str, token: &str, data: &str) -> Event {
        Event {
            t,
            worker: "w".into(),
            kind,
            task: task.into(),
            token: token.into(),
            reason: String::new(),
            data: data.into(),
        }
    }

    fn completed(id: &str, result: &str) -> FinalTask {
        FinalTask {
            id: id.into(),
            status: "COMPLETED".into(),
            attempt: 1,
            result: Some(result.as_bytes().to_vec()),
        }
    }

    /// A clean task: enqueued, claimed, started, completed by one token.
    fn clean(task: &str, token: &str, t: u64) -> Vec<Event> {
        vec![
            event(t, Kind::Enqueued, task, "", "p"),
            event(t + 1, Kind::Claimed, task, token, ""),
            event(t + 2, Kind::StartOk, task, token, ""),
            event(t + 3, Kind::CompleteOk, task, token, &format!("p:{token}")),
        ]
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        let mut events = clean("a", "t1", 0);
        // A retry after the first claim was superseded: legitimate.
        events.extend([
            event(10, Kind::Enqueued, "b", "", "p"),
            event(11, Kind::Claimed, "b", "t2", ""),
            event(12, Kind::StartOk, "b", "t2", ""),
            event(20, Kind::Claimed, "b", "t3", ""),
            event(21, Kind::StartOk, "b", "t3", ""),
            event(22, Kind::CompleteRefused, "b", "t2", "p:t2"),
            event(23, Kind::CompleteOk, "b", "t3", "p:t3"),
        ]);
        let finals = [completed("a", "p:t1"), completed("b", "p:t3")];
        let verdict = check(&events, &finals);
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.figures.executions_per_task_max, 2);
        assert_eq!(verdict.counts["lost"], 0);
    }

    #[test]
    fn planted_violations_are_each_counted() {
        let mut events = Vec::new();
        // Lost: acknowledged, never in the table.
        events.push(event(0, Kind::Enqueued, "lost", "", "p"));
        // Double completion: two tokens told "completed".
        events.extend(clean("double", "t1", 10));
        events.extend([
            event(20, Kind::Claimed, "double", "t2", ""),
            event(21, Kind::StartOk, "double", "t2", ""),
            event(22, Kind::CompleteOk, "double", "t2", "p:t2"),
        ]);
        // Stale write: t3 superseded by t4's start, then t3's completion accepted.
        events.extend([
            event(30, Kind::Enqueued, "stale", "", "p"),
            event(31, Kind::Claimed, "stale", "t3", ""),
            event(32, Kind::StartOk, "stale", "t3", ""),
            event(40, Kind::Claimed, "stale", "t4", ""),
            event(41, Kind::StartOk, "stale", "t4", ""),
            event(42, Kind::CompleteOk, "stale", "t3", "p:t3"),
        ]);
        // Result mismatch: completed by t5, stored something else.
        events.extend(clean("mismatch", "t5", 50));
        let finals = [
            completed("double", "p:t2"),
            completed("stale", "p:t3"),
            completed("mismatch", "other:t5"),
        ];
        let verdict = check(&events, &finals);
        assert_eq!(verdict.counts["lost"], 1, "{verdict:?}");
        assert_eq!(verdict.counts["double_completion"], 1, "{verdict:?}");
        assert_eq!(verdict.counts["stale_write_accepted"], 1, "{verdict:?}");
        assert_eq!(verdict.counts["result_mismatch"], 2, "{verdict:?}");
        let tasks: BTreeSet<&str> = verdict.violations.iter().map(|v| v.task.as_str()).collect();
        assert_eq!(
            tasks,
            BTreeSet::from(["lost", "double", "stale", "mismatch"])
        );
    }

    #[test]
    fn a_task_left_queued_is_lost_and_a_daemon_result_is_accepted() {
        let events = vec![
            event(0, Kind::Enqueued, "stuck", "", "p"),
            event(0, Kind::Enqueued, "daemon", "", "q"),
        ];
        let finals = [
            FinalTask {
                id: "stuck".into(),
                status: "QUEUED".into(),
                attempt: 1,
                result: None,
            },
            completed("daemon", "q:daemon"),
        ];
        let verdict = check(&events, &finals);
        assert_eq!(verdict.counts["lost"], 1);
        assert_eq!(verdict.violations.len(), 1, "{verdict:?}");
    }
}
