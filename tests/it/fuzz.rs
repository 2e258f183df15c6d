//! A request fuzzer (spec §10): for every RPC, garbage bytes as the message, valid messages
//! with bytes flipped or cut, random field values at and beyond every limit, unknown enum
//! numbers, and random claim-stream message orders, against a real server on each store. Every
//! answer must be a success or a typed error (a code other than INTERNAL or UNKNOWN, with an
//! ErrorInfo in leasehold's domain), never a dropped connection; afterwards the server is
//! SERVING and its background sweeper still ticks.
//!
//! CI tries `FUZZ_CASES` (default 150) requests per store; run it long by hand with
//! `FUZZ_CASES=20000 FUZZ_SEED=7 scripts/test -E 'test(fuzz)'` (another seed, another
//! sequence). Cases come from proptest's generators
//! without shrinking: a failure prints the request that caused it.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use leasehold::proto as pb;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::harness::{Backend, TestServer};

/// Every unary RPC, by path.
const UNARY: [&str; 24] = [
    "/leasehold.v1.WorkerService/RegisterRuntime",
    "/leasehold.v1.WorkerService/Heartbeat",
    "/leasehold.v1.WorkerService/DeregisterRuntime",
    "/leasehold.v1.WorkerService/RecoverOrphans",
    "/leasehold.v1.WorkerService/ClaimTask",
    "/leasehold.v1.WorkerService/StartTask",
    "/leasehold.v1.WorkerService/ExtendLease",
    "/leasehold.v1.WorkerService/CompleteTask",
    "/leasehold.v1.WorkerService/FailTask",
    "/leasehold.v1.WorkerService/ReportUsage",
    "/leasehold.v1.WorkerService/GetTaskStatus",
    "/leasehold.v1.TaskService/EnqueueTask",
    "/leasehold.v1.TaskService/EnqueueTasks",
    "/leasehold.v1.TaskService/GetTask",
    "/leasehold.v1.TaskService/ListTasks",
    "/leasehold.v1.TaskService/CancelTask",
    "/leasehold.v1.AdminService/ListRuntimes",
    "/leasehold.v1.AdminService/DescribeQueue",
    "/leasehold.v1.AdminService/UpdateQueue",
    "/leasehold.v1.AdminService/RetryTask",
    "/leasehold.v1.AdminService/CreateApiKey",
    "/leasehold.v1.AdminService/ListApiKeys",
    "/leasehold.v1.TaskService/CancelTasks",
    "/leasehold.v1.AdminService/RetryTasks",
];

/// Sends and receives message bytes as they are: the fuzzer's messages need not be valid.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// One fuzzed request.
#[derive(Clone, Debug)]
enum Case {
    /// Bytes sent as the message of a unary RPC.
    Raw { path: &'static str, bytes: Vec<u8> },
    /// A claim stream: these messages, in this order.
    Stream(Vec<pb::StreamClaimsRequest>),
}

/// Text at and beyond the limits: empty, NUL, non-ASCII, long.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z.:_-]{1,8}",
        "\\PC{0,20}",
        Just("a\0b".to_owned()),
        (0usize..5).prop_map(|power| "x".repeat(10usize.pow(power as u32) + 1)),
        Just(uuid::Uuid::new_v4().to_string()),
        Just("00000000-0000-0000-0000-000000000000".to_owned()),
    ]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
        (0i64..100).prop_map(|seconds| Some(prost_types::Duration { seconds, nanos: 0 })),
        Just(Some(prost_types::Duration {
            seconds: 10_000_000_000_000,
            nanos: 0
        })),
    ]
}

fn string_map() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        Just(HashMap::new()),
        proptest::collection::hash_map(text(), text(), 0..4),
        (60usize..70).prop_map(|entries| {
            (0..entries)
                .map(|index| (index.to_string(), "v".into()))
                .collect()
        }),
    ]
}

fn enqueue() -> impl Strategy<Value = pb::EnqueueTaskRequest> {
    (
        text(),
        proptest::collection::vec(any::<u8>(), 0..64),
        string_map(),
        any::<i32>(),
        text(),
        (text(), text()),
        any::<u32>(),
        (duration(), duration()),
    )
        .prop_map(
            |(queue, payload, metadata, priority, runtime_id, keys, max_attempts, times)| {
                pb::EnqueueTaskRequest {
                    queue,
                    payload,
                    metadata,
                    priority,
                    runtime_id,
                    concurrency_key: keys.0,
                    idempotency_key: keys.1,
                    max_attempts,
                    delay: times.0,
                    execution_timeout: times.1,
                }
            },
        )
}

/// A valid-shaped message of some RPC, with random field values.
fn structured() -> impl Strategy<Value = Case> {
    let raw = |path: &'static str, message: Vec<u8>| Case::Raw {
        path,
        bytes: message,
    };
    prop_oneof![
        enqueue().prop_map(move |request| raw(UNARY[11], request.encode_to_vec())),
        proptest::collection::vec(enqueue(), 0..4).prop_map(move |requests| {
            raw(
                UNARY[12],
                pb::EnqueueTasksRequest { requests }.encode_to_vec(),
            )
        }),
        (
            text(),
            proptest::collection::vec(text(), 0..3),
            string_map(),
            any::<u32>()
        )
            .prop_map(move |(name, queues, labels, max_concurrency)| {
                let request = pb::RegisterRuntimeRequest {
                    name,
                    queues,
                    labels,
                    max_concurrency,
                };
                raw(UNARY[0], request.encode_to_vec())
            }),
        (text(), any::<Option<u32>>(), duration()).prop_map(
            move |(runtime_id, max_tasks, wait)| {
                let request = pb::ClaimTaskRequest {
                    runtime_id,
                    max_tasks,
                    wait,
                };
                raw(UNARY[4], request.encode_to_vec())
            }
        ),
        (
            text(),
            text(),
            proptest::collection::vec(any::<u8>(), 0..16),
            text(),
            any::<bool>()
        )
            .prop_map(move |(task_id, claim_token, result, error, retryable)| {
                let complete = pb::CompleteTaskRequest {
                    task_id: task_id.clone(),
                    claim_token: claim_token.clone(),
                    result,
                };
                let fail = pb::FailTaskRequest {
                    task_id,
                    claim_token,
                    error,
                    retryable,
                };
                if retryable {
                    raw(UNARY[7], complete.encode_to_vec())
                } else {
                    raw(UNARY[8], fail.encode_to_vec())
                }
            }),
        (text(), text(), duration()).prop_map(move |(task_id, claim_token, extend_by)| {
            let request = pb::ExtendLeaseRequest {
                task_id,
                claim_token,
                extend_by,
            };
            raw(UNARY[6], request.encode_to_vec())
        }),
        (
            text(),
            proptest::collection::vec(any::<i32>(), 0..4),
            text(),
            any::<u32>(),
            text()
        )
            .prop_map(
                move |(queue, statuses, runtime_id, page_size, page_token)| {
                    let request = pb::ListTasksRequest {
                        queue,
                        statuses,
                        runtime_id,
                        page_size,
                        page_token,
                    };
                    raw(UNARY[14], request.encode_to_vec())
                }
            ),
        (
            text(),
            any::<Option<u32>>(),
            any::<Option<bool>>(),
            duration()
        )
            .prop_map(
                move |(queue, max_concurrent, paused, default_execution_timeout)| {
                    let request = pb::UpdateQueueRequest {
                        queue,
                        max_concurrent,
                        paused,
                        default_execution_timeout,
                    };
                    raw(UNARY[18], request.encode_to_vec())
                }
            ),
        any::<Option<i32>>().prop_map(move |status| {
            raw(
                UNARY[16],
                pb::ListRuntimesRequest {
                    status,
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        }),
        (text(), proptest::collection::vec(text(), 0..3), duration()).prop_map(
            move |(name, scopes, expires_in)| {
                let request = pb::CreateApiKeyRequest {
                    name,
                    scopes,
                    expires_in,
                };
                raw(UNARY[20], request.encode_to_vec())
            }
        ),
    ]
}

/// A valid message of some RPC with random bytes flipped, cut off or appended.
fn mutated() -> impl Strategy<Value = Case> {
    (
        structured(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        any::<bool>(),
    )
        .prop_map(|(case, flips, cut)| match case {
            Case::Raw { path, mut bytes } => {
                if !bytes.is_empty() {
                    for (index, value) in &flips {
                        let at = index.index(bytes.len());
                        bytes[at] = *value;
                    }
                    if cut {
                        bytes.truncate(flips[0].0.index(bytes.len()));
                    }
                } else {
                    bytes = flips.iter().map(|(_, value)| *value).collect();
                }
                Case::Raw { path, bytes }
            }
            other => other,
        })
}

fn stream_message() -> impl Strategy<Value = pb::StreamClaimsRequest> {
    use pb::stream_claims_request::Msg;
    prop_oneof![
        Just(pb::StreamClaimsRequest { msg: None }),
        (text(), any::<u32>(), any::<bool>()).prop_map(|(runtime_id, credits, auto_start)| {
            pb::StreamClaimsRequest {
                msg: Some(Msg::Open(pb::OpenStream {
                    runtime_id,
                    credits,
                    auto_start,
                })),
            }
        }),
        any::<u32>().prop_map(|n| pb::StreamClaimsRequest {
            msg: Some(Msg::Credit(pb::GrantCredit { n }))
        }),
        text().prop_map(|task_id| pb::StreamClaimsRequest {
            msg: Some(Msg::Ack(pb::AckClaim { task_id }))
        }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![
        (
            prop::sample::select(UNARY.to_vec()),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(path, bytes)| Case::Raw { path, bytes }),
        structured(),
        mutated(),
        proptest::collection::vec(stream_message(), 0..5).prop_map(Case::Stream),
    ]
}

/// A success, or a typed error.
fn check(case: &Case, answer: Result<(), Status>) {
    let Err(status) = answer else {
        return;
    };
    // A case can hold megabytes; its beginning says enough.
    let mut case = format!("{case:?}");
    case.truncate(600);
    assert!(
        !matches!(status.code(), Code::Internal | Code::Unknown),
        "{case:?} answered {status:?}"
    );
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("{case:?} answered {status:?} without an ErrorInfo"));
    assert_eq!(info.domain, "leasehold.v1", "{case:?}");
}

async fn send(server: &TestServer, case: &Case) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel.clone());
    grpc.ready()
        .await
        .map_err(|error| Status::unknown(format!("the connection broke: {error}")))?;
    match case {
        Case::Raw { path, bytes } => grpc
            .unary(
                tonic::Request::new(bytes.clone()),
                PathAndQuery::from_static(path),
                RawCodec,
            )
            .await
            .map(drop),
        Case::Stream(messages) => {
            let mut worker = server.worker.clone();
            let answer = tokio::time::timeout(
                Duration::from_secs(15),
                worker.stream_claims(tokio_stream::iter(messages.clone())),
            )
            .await
            .map_err(|_| Status::unknown("the stream call never answered"))?;
            let mut responses = answer?.into_inner();
            // Read what comes until the stream ends or goes quiet.
            while let Ok(message) =
                tokio::time::timeout(Duration::from_millis(50), responses.message()).await
            {
                match message {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(status) => return Err(status),
                }
            }
            Ok(())
        }
    }
}

/// `total` cases, made on a thread with a large stack: the nested generators are deep in a
/// debug build.
fn generate(total: u32) -> Vec<Case> {
    std::thread::Builder::new()
        .stack_size(256 * 1024 * 1024)
        .spawn(move || {
            // FUZZ_SEED picks another sequence (a long run by hand); CI always tries the same.
            let seed: u64 = std::env::var("FUZZ_SEED")
                .ok()
                .and_then(|seed| seed.parse().ok())
                .unwrap_or(0);
            let mut seed_bytes = [0u8; 32];
            seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
            let rng = proptest::test_runner::TestRng::from_seed(
                proptest::test_runner::RngAlgorithm::ChaCha,
                &seed_bytes,
            );
            let mut runner =
                TestRunner::new_with_rng(proptest::test_runner::Config::default(), rng);
            let strategy = case();
            (0..total)
                .map(|_| strategy.new_tree(&mut runner).expect("a case").current())
                .collect()
        })
        .unwrap()
        .join()
        .unwrap()
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(150)
}

async fn every_fuzzed_request_gets_a_typed_answer(backend: Backend) {
    let server = backend
        .start_with(|config| {
            config.offline_after = Duration::from_millis(500);
            config.sweep_interval = Duration::from_millis(200);
        })
        .await;
    // A runtime no fuzzed request can name: the sweeper must still mark it OFFLINE afterwards.
    let canary = server.register("canary", &["canary-queue"]).await;
    let total = cases();
    for case in generate(total) {
        let answer = send(&server, &case).await;
        check(&case, answer);
    }
    eprintln!("fuzzed {total} requests");

    let health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("the server still answers")
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let mut offline = false;
    for _ in 0..100 {
        if server.runtime_status(&canary).await == pb::RuntimeStatus::Offline {
            offline = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(offline, "the background sweeper stopped ticking");
}

conformance!(every_fuzzed_request_gets_a_typed_answer);
