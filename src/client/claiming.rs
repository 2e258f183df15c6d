//! Claiming into free slots: a claim stream with credit-based flow control, or long-poll
//! `ClaimTask` when streaming is unavailable; each claimed task runs in its own task.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use super::backoff::Backoff;
use super::lifecycle::{is_runtime_not_found, reregister};
use super::shared::{Shared, sleep_unless};
use super::stream_writer::StreamWriter;
use super::task_run;
use crate::proto as pb;
use crate::proto::stream_claims_request::Msg as Outbound;
use crate::proto::stream_claims_response::Msg as Inbound;

/// The most tasks one `ClaimTask` may ask for (spec §3.2).
const MAX_TASKS_PER_CLAIM: usize = 32;

/// Claims until `shutdown`, reconnecting with backoff.
pub(super) async fn claim_loop(shared: &Arc<Shared>, shutdown: &CancellationToken) {
    let (base, max) = shared.config.reconnect_backoff;
    let mut backoff = Backoff::new(base, max);
    while !shutdown.is_cancelled() {
        let streaming = shared.streaming.load(Ordering::SeqCst);
        let outcome = if streaming {
            stream_session(shared, shutdown, &mut backoff).await
        } else {
            unary_claim(shared, shutdown, &mut backoff).await
        };
        let Err(status) = outcome else { continue };
        if streaming && status.code() == Code::Unimplemented {
            tracing::warn!("the server does not stream claims; falling back to long-poll");
            shared.streaming.store(false, Ordering::SeqCst);
        } else if is_runtime_not_found(&status) {
            reregister(shared).await;
        } else if super::is_revoked(&status) {
            shared.notice_revocation(&status);
            return;
        } else {
            let delay = backoff.next_delay();
            tracing::warn!(error = %status.message(), ?delay, "claiming failed; reconnecting");
            sleep_unless(shutdown, delay).await;
        }
    }
}

/// Waits for one free slot (or shutdown), then takes every other free slot up to `most`.
pub(super) async fn reserve_slots(
    shared: &Shared,
    shutdown: &CancellationToken,
    most: usize,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        () = shutdown.cancelled() => return None,
        permit = shared.slots.clone().acquire_owned() => permit.ok()?,
    };
    let mut reserved = vec![first];
    reserved.extend(free_slots(shared, most - 1));
    Some(reserved)
}

/// Takes the slots free right now, `most` at the most.
pub(super) fn free_slots(shared: &Shared, most: usize) -> Vec<OwnedSemaphorePermit> {
    let mut taken = Vec::new();
    while taken.len() < most {
        match shared.slots.clone().try_acquire_owned() {
            Ok(permit) => taken.push(permit),
            Err(_) => break,
        }
    }
    taken
}

/// One `StreamClaims` session: credits track reserved slots one to one. Returns `Ok` when the
/// session ended on purpose (shutdown, or the server draining), `Err` when it broke.
pub(super) async fn stream_session(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), Status> {
    // Opened even when every slot is busy (zero credits): the stream also carries the
    // cancellations of the tasks those slots are running.
    let mut reserved = free_slots(shared, usize::MAX);
    let (outbound, requests) = mpsc::channel(16);
    let open = pb::OpenStream {
        runtime_id: shared.runtime_id(),
        credits: reserved.len() as u32,
        auto_start: shared.config.auto_start,
    };
    let _ = outbound.send(outbound_message(Outbound::Open(open))).await;
    let mut worker = shared.client().worker();
    let mut inbound = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        opened = worker.stream_claims(ReceiverStream::new(requests)) => {
            opened?.into_inner()
        }
    };
    backoff.reset();
    let writer = shared.config.writes_on_stream.then(|| {
        let writer = Arc::new(StreamWriter::new(outbound.clone()));
        shared.set_stream_writer(Some(writer.clone()));
        writer
    });
    // Whatever ends the session, its writer goes first: its waiting writes are retried by
    // call, and the stream's request half is released.
    let writer_guard = WriterGuard {
        shared,
        writer: writer.clone(),
    };
    let idle_timeout = shared.config.stream_idle_timeout;
    loop {
        // Dropping `outbound` on return ends the stream; the server then gives back every
        // pushed claim not yet started (T4').
        tokio::select! {
            () = shutdown.cancelled() => {
                writer_guard.close();
                close_gracefully(outbound, inbound).await;
                return Ok(());
            }
            message = tokio::time::timeout(idle_timeout, inbound.message()) => {
                let message = message
                    .map_err(|_| Status::unavailable("the claim stream went silent"))??
                    .and_then(|response| response.msg)
                    .ok_or_else(|| Status::unavailable("the server closed the claim stream"))?;
                match message {
                    Inbound::Claimed(claimed) => match reserved.pop() {
                        Some(slot) => spawn_task(shared, claimed, slot),
                        // The server broke the credit contract; the lease will lapse and the
                        // task return to the queue.
                        None => tracing::error!("claim pushed without a credit; ignored"),
                    },
                    Inbound::Cancelled(cancelled) => shared.cancel(&cancelled.task_id),
                    Inbound::Written(written) => {
                        if let Some(writer) = &writer {
                            writer.answered(written);
                        }
                    }
                    Inbound::Keepalive(_) => {}
                    Inbound::Draining(_) => {
                        tracing::info!("the server is draining; reconnecting");
                        return Ok(());
                    }
                }
            }
            slot = shared.slots.clone().acquire_owned() => {
                let Ok(slot) = slot else { return Ok(()) };
                reserved.push(slot);
                let credit = Outbound::Credit(pb::GrantCredit { n: 1 });
                if outbound.send(outbound_message(credit)).await.is_err() {
                    return Err(Status::unavailable("the claim stream closed"));
                }
            }
        }
    }
}

/// Detaches a stream session's writer when the session ends.
struct WriterGuard<'a> {
    shared: &'a Shared,
    writer: Option<Arc<StreamWriter>>,
}

impl WriterGuard<'_> {
    fn close(&self) {
        if let Some(writer) = &self.writer {
            self.shared.set_stream_writer(None);
            writer.close();
        }
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

/// At shutdown: ends the request stream and waits (briefly) for the server to end its side,
/// which it does once the stream's unstarted claims went back. Only then may the runtime
/// deregister: a stream still open on the server could claim for it afterwards. Claims pushed
/// meanwhile are not run; the server gives them back (an auto-started one is failed for a
/// retry when the runtime goes OFFLINE).
async fn close_gracefully(
    outbound: mpsc::Sender<pb::StreamClaimsRequest>,
    mut inbound: tonic::Streaming<pb::StreamClaimsResponse>,
) {
    drop(outbound);
    let drained = async { while let Ok(Some(_)) = inbound.message().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
}

pub(super) fn outbound_message(msg: Outbound) -> pb::StreamClaimsRequest {
    pb::StreamClaimsRequest { msg: Some(msg) }
}

/// One long-poll `ClaimTask` for as many tasks as there are free slots.
pub(super) async fn unary_claim(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), Status> {
    let Some(mut reserved) = reserve_slots(shared, shutdown, MAX_TASKS_PER_CLAIM).await else {
        return Ok(());
    };
    let wait = shared.config.long_poll_wait;
    let mut request = tonic::Request::new(pb::ClaimTaskRequest {
        runtime_id: shared.runtime_id(),
        max_tasks: Some(reserved.len() as u32),
        wait: prost_types::Duration::try_from(wait).ok(),
    });
    request.set_timeout(wait + Duration::from_secs(5));
    let mut worker = shared.client().worker();
    let claimed = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        response = worker.claim_task(request) => response?.into_inner().tasks,
    };
    backoff.reset();
    for task in claimed {
        if let Some(slot) = reserved.pop() {
            spawn_task(shared, task, slot);
        }
    }
    Ok(())
}

pub(super) fn spawn_task(
    shared: &Arc<Shared>,
    claimed: pb::ClaimedTask,
    slot: OwnedSemaphorePermit,
) {
    shared
        .tasks
        .spawn(task_run::process(shared.clone(), claimed, slot));
}

/// Lets in-flight tasks finish within the grace period, then cancels the rest and waits for
/// their final reports.
pub(super) async fn drain_in_flight(shared: &Shared) {
    shared.tasks.close();
    let grace = shared.config.shutdown_grace;
    if tokio::time::timeout(grace, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            still_running = shared.tasks.len(),
            "shutdown grace over; cancelling in-flight tasks"
        );
        shared.abort.cancel();
        shared.tasks.wait().await;
    }
}
