//! A finished task's report (`CompleteTask`, `FailTask`) sent on the open claim stream as a
//! `StreamWrite` instead of a call, when [`super::WorkerConfig::writes_on_stream`] is on: one
//! message each way, no call. The answer comes back as `written` with the same request_id; a
//! refusal carries the call's own status, so the report's retry rules stay the same. When the
//! stream ends before an answer, the report fails as unavailable and its retry goes by call
//! (or by the next stream): reports are token-fenced replays, safe to send twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::grpc::status::status_from_rpc;

use crate::proto::stream_claims_request::Msg as Outbound;
use crate::proto::{self as pb, stream_write::Call};

type Answer = oneshot::Sender<Result<(), Status>>;

/// The writes of one claim stream awaiting their answers.
pub(super) struct StreamWriter {
    /// The stream's request half; taken at close so the stream can end.
    outbound: Mutex<Option<mpsc::Sender<pb::StreamClaimsRequest>>>,
    next_request_id: AtomicU64,
    pending: Mutex<HashMap<u64, Answer>>,
}

impl StreamWriter {
    pub(super) fn new(outbound: mpsc::Sender<pb::StreamClaimsRequest>) -> Self {
        Self {
            outbound: Mutex::new(Some(outbound)),
            next_request_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `call` on the stream and waits for the server's answer.
    pub(super) async fn write(&self, call: Call) -> Result<(), Status> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let Some(outbound) = lock(&self.outbound).clone() else {
            return Err(ended());
        };
        let (answer, answered) = oneshot::channel();
        lock(&self.pending).insert(request_id, answer);
        let write = pb::StreamWrite {
            request_id,
            call: Some(call),
            credit: 0,
        };
        let message = pb::StreamClaimsRequest {
            msg: Some(Outbound::Write(write)),
        };
        if outbound.send(message).await.is_err() {
            lock(&self.pending).remove(&request_id);
            return Err(ended());
        }
        answered.await.unwrap_or_else(|_| Err(ended()))
    }

    /// The server's answer to one of this stream's writes.
    pub(super) fn answered(&self, written: pb::StreamWritten) {
        let Some(answer) = lock(&self.pending).remove(&written.request_id) else {
            return;
        };
        let outcome = match written.error {
            None => Ok(()),
            Some(error) => Err(status_from_rpc(error)),
        };
        let _ = answer.send(outcome);
    }

    /// The stream ended: writes waiting for an answer fail as unavailable (and are retried by
    /// call), and the request half is released so the stream can close.
    pub(super) fn close(&self) {
        lock(&self.outbound).take();
        lock(&self.pending).clear();
    }
}

fn ended() -> Status {
    Status::unavailable("the claim stream ended before the write was answered")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
