//! The operator console over real HTTP (docs/console.md): every page and action, the CSRF
//! check, scopes (a `read` key sees no action and its forged POSTs are refused), sign-in,
//! sign-out, expiry and revocation, on both stores; the queue page's snapshot and per-minute
//! tables on PostgreSQL. `browser.rs` drives the same pages in a real Chromium.

mod browser;
mod client;
mod counts;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use leasehold::proto as pb;

use crate::auth::{ADMIN, As, admin_token_file, with_tokens};
use crate::harness::{Backend, TestServer, free_port, status_of, task_id, task_in};
use client::Visitor;

/// A server with the console on a free port; with `--auth token` and the test's admin token
/// when `signed` is set.
pub async fn console_server(backend: Backend, signed: bool) -> (TestServer, SocketAddr) {
    let address: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let server = backend
        .start_with(move |config| {
            config.http_listen = Some(address);
            config.console_session_ttl = Duration::from_secs(3600);
            if signed {
                with_tokens(admin_token_file(ADMIN))(config);
            }
        })
        .await;
    (server, address)
}

/// `count` rows of `class` in `body`.
fn rows(body: &str, class: &str) -> usize {
    body.matches(&format!("<tr class=\"{class}\"")).count()
}

/// Whether `queue` is paused, asked of the coordinator (the gRPC clients carry no credential).
async fn paused(server: &TestServer, queue: &str) -> bool {
    server
        .coordinator
        .describe_queue(queue)
        .await
        .unwrap()
        .paused
}

/// Signs a fresh visitor in with `token`.
async fn signed_in(address: SocketAddr, token: &str) -> Visitor {
    let mut visitor = Visitor::new(address);
    let form = visitor.get("/sign-in").await;
    let before = visitor.cookie.clone();
    let answer = visitor
        .post("/sign-in", &[("csrf", &form.csrf()), ("token", token)])
        .await;
    assert!(answer.redirects_to("/queues"), "sign-in: {}", answer.body);
    let cookie = answer.set_cookie.expect("a session cookie");
    assert!(cookie.contains("; HttpOnly; SameSite=Strict"), "{cookie}");
    assert_ne!(visitor.cookie, before, "a sign-in gets a new session id");
    visitor
}

async fn without_auth_pages_open_and_forms_need_their_csrf_token(backend: Backend) {
    let (server, address) = console_server(backend, false).await;
    server.enqueue_to("emails").await;
    server.enqueue_to("emails").await;
    server.sweep().await;
    let mut visitor = Visitor::new(address);
    assert!(visitor.get("/").await.redirects_to("/queues"));
    let page = visitor.get("/queues").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("data-queue=\"emails\""), "{}", page.body);
    assert!(page.body.contains("<td class=\"count queued\">2</td>"));
    assert!(
        !page.body.contains("Sign out"),
        "no sign-in under --auth none"
    );
    let header = |name: &str| page.headers.get(name).map(|value| value.to_str().unwrap());
    assert_eq!(header("x-frame-options"), Some("DENY"));
    assert!(
        header("content-security-policy")
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(header("cache-control"), Some("no-store"));
    let csrf = page.csrf();

    let forged = visitor.post("/queues/emails", &[("action", "pause")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let foreign = Visitor::new(address)
        .post("/queues/emails", &[("csrf", &csrf), ("action", "pause")])
        .await;
    assert_eq!(
        foreign.status,
        StatusCode::FORBIDDEN,
        "another session's token"
    );
    assert!(!server.describe_queue("emails").await.paused);

    let paused = visitor
        .post("/queues/emails", &[("csrf", &csrf), ("action", "pause")])
        .await;
    assert!(paused.redirects_to("/queues"), "{}", paused.body);
    assert!(server.describe_queue("emails").await.paused);
    let capped = visitor
        .post(
            "/queues/emails",
            &[("csrf", &csrf), ("action", "cap"), ("max_concurrent", "3")],
        )
        .await;
    assert!(capped.status.is_redirection());
    assert_eq!(server.describe_queue("emails").await.max_concurrent, 3);
    let bad_cap = visitor
        .post(
            "/queues/emails",
            &[
                ("csrf", &csrf),
                ("action", "cap"),
                ("max_concurrent", "many"),
            ],
        )
        .await;
    assert_eq!(bad_cap.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.describe_queue("emails").await.max_concurrent, 3);

    let metrics = visitor.get("/metrics").await;
    assert!(metrics.body.contains("leasehold_rpc_requests_total"));
}

async fn sign_in_scopes_and_sign_out(backend: Backend) {
    let (server, address) = console_server(backend, true).await;
    let admin = As::token(&server, ADMIN);
    let task = admin.enqueue("reports").await.unwrap();
    server.sweep().await;

    let mut stranger = Visitor::new(address);
    assert!(stranger.get("/queues").await.redirects_to("/sign-in"));
    let form = stranger.get("/sign-in").await;
    let refused = stranger
        .post(
            "/sign-in",
            &[("csrf", &form.csrf()), ("token", "lh_not_a_key")],
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(stranger.get("/queues").await.redirects_to("/sign-in"));

    let (_, runtime_token) = admin.register("w1", &["reports"]).await.unwrap();
    let form = stranger.get("/sign-in").await;
    let runtime = stranger
        .post(
            "/sign-in",
            &[("csrf", &form.csrf()), ("token", &runtime_token)],
        )
        .await;
    assert_eq!(
        runtime.status,
        StatusCode::FORBIDDEN,
        "a runtime token cannot sign in"
    );

    // read: looks, no actions, and a forged POST with its own session's token is refused.
    let read_key = admin.create_key(&["read"]).await;
    let mut reader = signed_in(address, &read_key).await;
    let page = reader.get("/queues").await;
    assert!(page.body.contains("data-queue=\"reports\""));
    assert!(
        !page.body.contains("value=\"pause\""),
        "no pause button for read"
    );
    let csrf = page.csrf();
    let forged = reader
        .post("/queues/reports", &[("csrf", &csrf), ("action", "pause")])
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(!paused(&server, "reports").await);
    let task_page = reader.get(&format!("/tasks/{}", task.id)).await;
    assert!(task_page.body.contains(&task.id));
    assert!(!task_page.body.contains("id=\"cancel\""));
    let forged_cancel = reader
        .post(&format!("/tasks/{}/cancel", task.id), &[("csrf", &csrf)])
        .await;
    assert_eq!(forged_cancel.status, StatusCode::FORBIDDEN);
    let unchanged = server
        .coordinator
        .get_task(leasehold::domain::TaskId::parse(&task.id).unwrap())
        .await
        .unwrap();
    assert_eq!(unchanged.status, leasehold::domain::TaskStatus::Queued);
    let runtimes = reader.get("/runtimes").await;
    assert!(runtimes.body.contains("w1") && !runtimes.body.contains("Deregister"));

    // manage: acts on queues and tasks.
    let manage_key = admin.create_key(&["read", "manage"]).await;
    let mut manager = signed_in(address, &manage_key).await;
    let page = manager.get("/queues").await;
    assert!(page.body.contains("value=\"pause\""));
    let pause = manager
        .post(
            "/queues/reports",
            &[("csrf", &page.csrf()), ("action", "pause")],
        )
        .await;
    assert!(pause.status.is_redirection());
    assert!(paused(&server, "reports").await);

    // Sign-out ends the session: its cookie opens nothing more.
    let cookie = manager.cookie.clone();
    let out = manager.post("/sign-out", &[("csrf", &page.csrf())]).await;
    assert!(out.redirects_to("/sign-in"));
    manager.cookie = cookie;
    assert!(manager.get("/queues").await.redirects_to("/sign-in"));
}

async fn a_revoked_key_ends_its_session(backend: Backend) {
    let (server, address) = console_server(backend, true).await;
    let admin = As::token(&server, ADMIN);
    let (key, token) = admin.try_create_key(&["read"], None).await.unwrap();
    let mut visitor = signed_in(address, &token).await;
    assert_eq!(visitor.get("/queues").await.status, StatusCode::OK);
    admin
        .admin
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest { key_id: key.id })
        .await
        .unwrap();
    crate::harness::eventually("the session ends", crate::harness::EVENTUALLY, async || {
        let page = visitor.get("/queues").await;
        page.redirects_to("/sign-in?ended=1").then_some(())
    })
    .await;
}

async fn tasks_are_filtered_looked_up_and_paged(backend: Backend) {
    let (server, address) = console_server(backend, false).await;
    for _ in 0..54 {
        server.enqueue_to("bulk").await;
    }
    let keyed = server
        .enqueue(pb::EnqueueTaskRequest {
            idempotency_key: "order-7".into(),
            ..task_in("bulk")
        })
        .await;
    server.enqueue_to("other").await;
    let mut visitor = Visitor::new(address);

    let first = visitor.get("/tasks?queue=bulk").await;
    assert_eq!(rows(&first.body, "task"), 50);
    let next = first
        .body
        .split("id=\"next\" href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a next-page link")
        .replace("&amp;", "&");
    let second = visitor.get(&next).await;
    assert_eq!(rows(&second.body, "task"), 5, "{next}");
    assert!(!second.body.contains("id=\"next\""));
    assert_eq!(rows(&visitor.get("/tasks").await.body, "task"), 50);
    assert_eq!(
        rows(&visitor.get("/tasks?queue=other").await.body, "task"),
        1
    );

    let by_id = visitor.get(&format!("/tasks?lookup={}", keyed.id)).await;
    assert!(by_id.redirects_to(&format!("/tasks/{}", keyed.id)));
    let by_key = visitor.get("/tasks?queue=bulk&lookup=order-7").await;
    assert_eq!(rows(&by_key.body, "task"), 1);
    assert!(by_key.body.contains(&keyed.id));
    let keyless = visitor.get("/tasks?lookup=order-7").await;
    assert_eq!(
        keyless.status,
        StatusCode::BAD_REQUEST,
        "a key needs its queue"
    );

    let running = visitor.get("/tasks?queue=bulk&status=RUNNING").await;
    assert_eq!(rows(&running.body, "task"), 0);
    let future = visitor.get("/tasks?queue=bulk&from=2999-01-01T00:00").await;
    assert_eq!(rows(&future.body, "task"), 0);
    let past = visitor.get("/tasks?queue=other&to=2999-01-01T00:00").await;
    assert_eq!(rows(&past.body, "task"), 1);
    let nonsense = visitor.get("/tasks?status=SLEEPING").await;
    assert_eq!(nonsense.status, StatusCode::BAD_REQUEST);
}

async fn a_failed_task_shows_its_error_and_usage_and_is_retried_then_cancelled(backend: Backend) {
    let (server, address) = console_server(backend, false).await;
    let runtime = server.register("w1", &["jobs"]).await;
    server.enqueue_to("jobs").await;
    let claimed = server.claim_one(&runtime).await;
    server.start_task(&claimed).await.unwrap();
    server
        .worker
        .clone()
        .report_usage(pb::ReportUsageRequest {
            task_id: task_id(&claimed).into(),
            claim_token: claimed.claim_token.clone(),
            counters: [("rows_read".to_owned(), 42)].into(),
        })
        .await
        .unwrap();
    server.fail(&claimed, true).await.unwrap();
    // The retry, past its backoff, fails for good: both attempts are on the timeline.
    server.advance_time(Duration::from_secs(600)).await;
    let again = server.claim_one(&runtime).await;
    server.start_task(&again).await.unwrap();
    server.fail(&again, false).await.unwrap();
    let mut visitor = Visitor::new(address);
    let path = format!("/tasks/{}", task_id(&claimed));
    let page = visitor.get(&path).await;
    let failures: Vec<&str> = page.body.split("<li class=\"failure\">").skip(1).collect();
    assert_eq!(failures.len(), 2, "{}", page.body);
    assert!(
        failures[0].starts_with("Attempt 1 failed") && failures[0].contains("(TASK_ERROR): boom")
    );
    assert!(failures[1].starts_with("Attempt 2 failed"));
    assert!(
        page.body.contains("<dd id=\"task-status\">FAILED</dd>"),
        "{}",
        page.body
    );
    assert!(page.body.contains("boom"));
    assert!(page.body.contains("rows_read") && page.body.contains("42"));
    assert!(
        !page.body.contains(&claimed.claim_token),
        "never the claim token"
    );
    assert!(page.body.contains("id=\"retry\""));

    let retried = visitor
        .post(&format!("{path}/retry"), &[("csrf", &page.csrf())])
        .await;
    assert!(retried.redirects_to(&path));
    let page = visitor.get(&path).await;
    assert!(page.body.contains("<dd id=\"task-status\">QUEUED</dd>"));
    let again = visitor
        .post(&format!("{path}/retry"), &[("csrf", &page.csrf())])
        .await;
    assert_eq!(
        again.status,
        StatusCode::BAD_REQUEST,
        "a QUEUED task is not retried"
    );
    let cancelled = visitor
        .post(&format!("{path}/cancel"), &[("csrf", &page.csrf())])
        .await;
    assert!(cancelled.status.is_redirection());
    assert_eq!(
        status_of(&server.get_task(task_id(&claimed)).await),
        pb::TaskStatus::Cancelled
    );
    let missing = visitor
        .get(&format!("/tasks/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

async fn runtimes_are_listed_with_what_they_hold_and_deregistered(backend: Backend) {
    let (server, address) = console_server(backend, false).await;
    let runtime = server.register("worker-7", &["jobs"]).await;
    server.enqueue_to("jobs").await;
    let claimed_id = task_id(&server.claim_one(&runtime).await).to_owned();
    let mut visitor = Visitor::new(address);
    let page = visitor.get("/runtimes").await;
    assert!(page.body.contains("worker-7") && page.body.contains(&runtime));
    assert_eq!(rows(&page.body, "runtime"), 1);
    assert!(page.body.contains("<td>1 of 4</td>") || page.body.contains("<td>1</td>"));
    let gone = visitor
        .post(
            &format!("/runtimes/{runtime}/deregister"),
            &[("csrf", &page.csrf())],
        )
        .await;
    assert!(gone.redirects_to("/runtimes"), "{}", gone.body);
    let after = visitor.get("/runtimes").await;
    assert!(after.body.contains("<td>OFFLINE</td>"), "{}", after.body);
    assert!(after.body.contains("<td>0 of 4</td>") || after.body.contains("<td>0</td>"));
    assert_eq!(
        status_of(&server.get_task(&claimed_id).await),
        pb::TaskStatus::Queued,
        "its claim went back"
    );
}

async fn bulk_cancel_confirms_the_count_then_cancels(backend: Backend) {
    let (server, address) = console_server(backend, false).await;
    for _ in 0..7 {
        server.enqueue_to("batch").await;
    }
    server.enqueue_to("spared").await;
    let mut visitor = Visitor::new(address);
    let confirm = visitor
        .get("/bulk?queue=batch&status=&runtime=&action=cancel")
        .await;
    assert!(
        confirm.body.contains("data-matched=\"7\""),
        "{}",
        confirm.body
    );
    assert_eq!(
        server.describe_queue("batch").await.counts.unwrap().queued,
        7,
        "a dry run changes nothing"
    );
    let done = visitor
        .post(
            "/bulk",
            &[
                ("csrf", &confirm.csrf()),
                ("queue", "batch"),
                ("status", ""),
                ("runtime", ""),
                ("action", "cancel"),
            ],
        )
        .await;
    assert!(done.body.contains("data-changed=\"7\""), "{}", done.body);
    let counts = server.describe_queue("batch").await.counts.unwrap();
    assert_eq!((counts.queued, counts.cancelled), (0, 7));
    assert_eq!(
        server.describe_queue("spared").await.counts.unwrap().queued,
        1
    );
    let retried = visitor.get("/bulk?queue=batch&action=retry").await;
    assert!(retried.body.contains("data-matched=\"7\""));
    let forged = visitor
        .post("/bulk", &[("queue", "batch"), ("action", "retry")])
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(
        server
            .describe_queue("batch")
            .await
            .counts
            .unwrap()
            .cancelled,
        7
    );
}

async fn the_queue_table_goes_live_over_server_sent_events(backend: Backend) {
    let (server, address) = console_server(backend, false).await;
    server.enqueue_to("live").await;
    server.sweep().await;
    let mut visitor = Visitor::new(address);
    visitor.get("/queues").await;
    let event = client::first_event(address, visitor.cookie.as_deref().unwrap(), "queues").await;
    assert!(event.contains("data-queue=\\\"live\\\"") || event.contains("data-queue=\"live\""));
    assert!(!event.contains('\n'), "one data line");
}

conformance!(
    without_auth_pages_open_and_forms_need_their_csrf_token,
    sign_in_scopes_and_sign_out,
    a_revoked_key_ends_its_session,
    tasks_are_filtered_looked_up_and_paged,
    a_failed_task_shows_its_error_and_usage_and_is_retried_then_cancelled,
    runtimes_are_listed_with_what_they_hold_and_deregistered,
    bulk_cancel_confirms_the_count_then_cancels,
    the_queue_table_goes_live_over_server_sent_events,
);

#[tokio::test]
async fn a_session_ends_after_its_lifetime() {
    let address: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let _server = Backend::Memory
        .start_with(move |config| {
            config.http_listen = Some(address);
            config.console_session_ttl = Duration::from_secs(1);
            with_tokens(admin_token_file(ADMIN))(config);
        })
        .await;
    let mut visitor = signed_in(address, ADMIN).await;
    assert_eq!(visitor.get("/queues").await.status, StatusCode::OK);
    let cookie = visitor.cookie.clone().unwrap();
    assert!(cookie.starts_with("leasehold_session="));
    // The lifetime is time itself: nothing to poll for but the clock.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert!(visitor.get("/queues").await.redirects_to("/sign-in"));
}
