//! What the soak's clients were told, one JSON object per line: the history the checker reads.
//! Times are milliseconds since the soak started, taken when the answer arrived.

use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The server acknowledged the task (the producer got its id).
    Enqueued,
    Claimed,
    StartOk,
    StartRefused,
    CompleteOk,
    CompleteRefused,
    FailOk,
    FailRefused,
    /// A call whose answer never came (reset, lost response, unavailable replica).
    TransportError,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub t: u64,
    pub worker: String,
    pub kind: Kind,
    pub task: String,
    /// The claim token the call carried (empty for enqueues).
    #[serde(default)]
    pub token: String,
    /// A refusal's ErrorInfo reason, or the transport error's code.
    #[serde(default)]
    pub reason: String,
    /// What an accepted or refused completion sent as its result; the payload for enqueues.
    #[serde(default)]
    pub data: String,
}

/// Appends events to a file, from any task.
pub struct HistoryLog {
    started: Instant,
    file: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl HistoryLog {
    pub fn create(path: &Path, started: Instant) -> std::io::Result<HistoryLog> {
        Ok(HistoryLog {
            started,
            file: Mutex::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        })
    }

    pub fn record(
        &self,
        worker: &str,
        kind: Kind,
        task: &str,
        token: &str,
        reason: &str,
        data: &str,
    ) {
        let event = Event {
            t: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            worker: worker.to_owned(),
            kind,
            task: task.to_owned(),
            token: token.to_owned(),
            reason: reason.to_owned(),
            data: data.to_owned(),
        };
        let line = serde_json::to_string(&event).unwrap_or_default();
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A history that cannot be written makes the soak's verdict meaningless: say so.
        if writeln!(file, "{line}").is_err() {
            tracing::error!("the soak history could not be written");
        }
    }

    pub fn flush(&self) {
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = file.flush();
    }
}

/// Reads a history file back.
pub fn read(path: &Path) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| Ok(serde_json::from_str(line)?))
        .collect()
}
