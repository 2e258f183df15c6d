//! The worker's side of one StreamClaims call, for the stream tests and others.

use std::time::Duration;

use leasehold::proto as pb;
use leasehold::proto::stream_claims_request::Msg as Inbound;
use leasehold::proto::stream_claims_response::Msg as Outbound;
use leasehold::proto::worker_service_client::WorkerServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::{PROMPTLY, QUIET};
use crate::harness::TestServer;

/// The worker's side of one StreamClaims call.
pub struct ClaimStream {
    requests: Option<mpsc::Sender<pb::StreamClaimsRequest>>,
    responses: Streaming<pb::StreamClaimsResponse>,
}

impl ClaimStream {
    pub async fn open(server: &TestServer, runtime_id: &str, credits: u32) -> ClaimStream {
        Self::open_on(server.worker.clone(), runtime_id, credits).await
    }

    pub async fn open_on(
        worker: WorkerServiceClient<Channel>,
        runtime_id: &str,
        credits: u32,
    ) -> ClaimStream {
        Self::start(worker, open_message(runtime_id, credits))
            .await
            .expect("open a claim stream")
    }

    pub async fn try_open(
        server: &TestServer,
        runtime_id: &str,
        credits: u32,
    ) -> Result<ClaimStream, Status> {
        Self::start(server.worker.clone(), open_message(runtime_id, credits)).await
    }

    /// Starts a stream whose first message is `first`.
    pub async fn start(
        mut worker: WorkerServiceClient<Channel>,
        first: Inbound,
    ) -> Result<ClaimStream, Status> {
        let (requests, outgoing) = mpsc::channel(16);
        requests
            .send(pb::StreamClaimsRequest { msg: Some(first) })
            .await
            .unwrap();
        let responses = worker
            .stream_claims(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        Ok(ClaimStream {
            requests: Some(requests),
            responses,
        })
    }

    pub async fn grant(&self, n: u32) {
        self.send(Inbound::Credit(pb::GrantCredit { n })).await;
    }

    pub async fn send(&self, msg: Inbound) {
        let requests = self.requests.as_ref().expect("stream still open");
        requests
            .send(pb::StreamClaimsRequest { msg: Some(msg) })
            .await
            .unwrap();
    }

    /// The next message other than a keepalive, within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Outbound> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = tokio::time::timeout_at(deadline, self.responses.message())
                .await
                .ok()?;
            match message {
                Ok(Some(pb::StreamClaimsResponse {
                    msg: Some(Outbound::Keepalive(_)),
                })) => continue,
                Ok(Some(response)) => return response.msg,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    pub async fn next_claimed(&mut self) -> pb::ClaimedTask {
        match self.next(PROMPTLY).await {
            Some(Outbound::Claimed(claimed)) => claimed,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    /// Asserts nothing but keepalives arrives for a while.
    pub async fn expect_quiet(&mut self) {
        if let Some(message) = self.next(QUIET).await {
            panic!("expected nothing, got {message:?}");
        }
    }

    /// Every raw message (keepalives included) until `within` passes or the stream ends.
    pub(super) async fn raw_messages(&mut self, within: Duration) -> Vec<Outbound> {
        let deadline = tokio::time::Instant::now() + within;
        let mut messages = Vec::new();
        while let Ok(Ok(Some(response))) =
            tokio::time::timeout_at(deadline, self.responses.message()).await
        {
            messages.extend(response.msg);
        }
        messages
    }
}

pub(super) fn open_message(runtime_id: &str, credits: u32) -> Inbound {
    Inbound::Open(pb::OpenStream {
        runtime_id: runtime_id.into(),
        credits,
        auto_start: false,
    })
}
