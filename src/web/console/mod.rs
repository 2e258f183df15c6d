//! The operator console (docs/console.md): server-rendered pages over the coordinator, the
//! same operations and scopes as the gRPC API. `read` looks, `manage` acts on a queue's tasks
//! and settings, `admin` deregisters runtimes. Every form carries the session's CSRF token;
//! every page works without JavaScript, which only keeps the queue table live (server-sent
//! events on `/events`).

pub mod chart;
pub mod pages;
pub mod session;
mod sign_in;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, FromRequestParts, Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::Utc;
use futures::Stream;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;

use crate::auth::AuthMode;
use crate::coordinator::Coordinator;
use crate::domain::auth::{Principal, Scope};
use crate::domain::{Error, RuntimeId};
use crate::store::QueueUpdate;
use pages::Frame;
use session::{Session, Sessions};

/// The most queues the queue page shows.
const MAX_QUEUES: u32 = 500;
/// How often the live queue table is sent again.
const LIVE_EVERY: Duration = Duration::from_secs(2);

/// The console's state, shared by every request.
pub struct Console {
    coordinator: Arc<Coordinator>,
    sessions: Sessions,
    /// `--console-secure-cookies`.
    secure: bool,
}

impl Console {
    pub fn new(coordinator: Arc<Coordinator>, session_ttl: Duration, secure: bool) -> Console {
        Console {
            coordinator,
            sessions: Sessions::new(session_ttl),
            secure,
        }
    }

    /// `response`, keeping `session` in the browser.
    fn with_session_cookie(
        &self,
        mut response: Response,
        session: &Session,
        headers: &HeaderMap,
    ) -> Response {
        let cookie = session::set_cookie(session, self.sessions.ttl(), self.secure_for(headers));
        set_cookie(&mut response, &cookie);
        response
    }

    /// Whether cookies get `Secure`: by the flag, or for a request a TLS-terminating proxy
    /// forwarded as https.
    fn secure_for(&self, headers: &HeaderMap) -> bool {
        self.secure
            || headers
                .get("x-forwarded-proto")
                .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"))
    }
}

/// Every console route.
pub fn routes(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/queues") }))
        .route("/sign-in", get(sign_in::page).post(sign_in::sign_in))
        .route("/sign-out", post(sign_in::sign_out))
        .route("/queues", get(queues_page))
        .route("/queues/{queue}", post(queue_action))
        .route("/tasks", get(tasks::list_page))
        .route("/tasks/{id}", get(tasks::task_page))
        .route("/tasks/{id}/{action}", post(tasks::task_action))
        .route("/runtimes", get(runtimes_page))
        .route("/runtimes/{id}/deregister", post(deregister))
        .route("/bulk", get(tasks::bulk_confirm).post(tasks::bulk_run))
        .route("/events", get(events))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(script))
        .layer(axum::middleware::map_response(guarded))
        .with_state(console)
}

/// Headers every console answer carries: never framed by another site (clickjacking), scripts,
/// styles and form targets from the console alone, no MIME sniffing, no referrer beyond it,
/// and pages that show tasks kept out of caches.
async fn guarded(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Who is asking: their session (with its CSRF token) and what their credential allows.
pub(crate) struct Visitor {
    session: Session,
    principal: Principal,
    /// A `Set-Cookie` the response must carry (a session opened by this request).
    set_cookie: Option<String>,
}

impl Visitor {
    fn frame<'a>(&'a self, title: &'a str) -> Frame<'a> {
        Frame {
            title,
            csrf: &self.session.csrf,
            signed_in: self.session.credential.is_some(),
            who: who(&self.principal),
        }
    }

    /// Whether the visitor holds `scope` for `queue`.
    fn may(&self, scope: Scope, queue: &str) -> bool {
        self.principal.has(scope, Some(queue))
    }

    /// `markup` as the response, with the session cookie when it is new.
    fn page(&self, markup: maud::Markup) -> Response {
        let mut response = Html(markup.into_string()).into_response();
        if let Some(cookie) = &self.set_cookie
            && let Ok(value) = cookie.parse()
        {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        response
    }

    /// Refuses the form unless it carries this session's CSRF token.
    fn check_form(&self, csrf: &str) -> Result<(), Refused> {
        if self.session.accepts(csrf) {
            Ok(())
        } else {
            Err(Refused(
                "This form has expired or did not come from this console: reload the page and \
                 try again."
                    .to_owned(),
            ))
        }
    }

    fn require(&self, scope: Scope, queue: Option<&str>) -> Result<(), Refused> {
        if self.principal.has(scope, queue) {
            Ok(())
        } else {
            Err(Refused(format!(
                "Your credential lacks the {} scope for this.",
                scope.as_str()
            )))
        }
    }
}

/// A request refused for its form or its scope: 403 with the reason.
pub(crate) struct Refused(String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        refusal(StatusCode::FORBIDDEN, &self.0)
    }
}

fn who(principal: &Principal) -> String {
    match principal {
        Principal::Unchecked => "anyone (--auth none)".to_owned(),
        Principal::Admin => "the admin token".to_owned(),
        Principal::ApiKey { key_id, .. } => format!("API key {key_id}"),
        Principal::Runtime(runtime) => format!("runtime {runtime}"),
    }
}

/// Every page and action takes its visitor as an extractor: a request without a valid
/// session is answered with the way to sign in before the handler runs.
impl FromRequestParts<Arc<Console>> for Visitor {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Visitor, Response> {
        visitor(console, &parts.headers).await
    }
}

/// The visitor of a request, or the response that sends them to sign in.
async fn visitor(console: &Console, headers: &HeaderMap) -> Result<Visitor, Response> {
    let found = console.sessions.find(headers);
    if console.coordinator.auth_mode() == AuthMode::None {
        let (session, set_cookie) = match found {
            Some(session) => (session, None),
            None => {
                let session = console.sessions.open(None);
                let cookie = session::set_cookie(
                    &session,
                    console.sessions.ttl(),
                    console.secure_for(headers),
                );
                (session, Some(cookie))
            }
        };
        return Ok(Visitor {
            session,
            principal: Principal::Unchecked,
            set_cookie,
        });
    }
    let Some(session) = found else {
        return Err(Redirect::to("/sign-in").into_response());
    };
    let Some(credential) = session.credential.clone() else {
        return Err(Redirect::to("/sign-in").into_response());
    };
    match console.coordinator.authenticate(Some(&credential)).await {
        Ok(principal) => Ok(Visitor {
            session,
            principal,
            set_cookie: None,
        }),
        Err(Error::Unauthenticated(_)) => {
            // Revoked, expired or replaced since sign-in: the session ends with it.
            console.sessions.close(&session.id);
            Err(Redirect::to("/sign-in?ended=1").into_response())
        }
        Err(error) => Err(failure(&error)),
    }
}

/// A page saying why the request was refused.
fn refusal(status: StatusCode, message: &str) -> Response {
    (
        status,
        Html(pages::message("Refused", message).into_string()),
    )
        .into_response()
}

/// A domain error as a page with the matching HTTP status.
pub(crate) fn failure(error: &Error) -> Response {
    let status = match error {
        Error::InvalidField { .. } | Error::MalformedClaimToken | Error::NotRetryable { .. } => {
            StatusCode::BAD_REQUEST
        }
        Error::TaskNotFound(_) | Error::RuntimeNotFound(_) => StatusCode::NOT_FOUND,
        Error::ScopeMissing(_) | Error::RuntimeMismatch => StatusCode::FORBIDDEN,
        Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Error::StoreUnavailable(_) | Error::Draining | Error::Overloaded => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Error::StoreConflict(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refusal(status, &error.to_string())
}

/// A form that carries nothing but its CSRF token.
#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

fn set_cookie(response: &mut Response, cookie: &str) {
    if let Ok(value) = cookie.parse() {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
}

async fn queues_page(State(console): State<Arc<Console>>, visitor: Visitor) -> Response {
    match queue_rows(&console, &visitor).await {
        Ok(rows) => visitor.page(pages::queues(&visitor.frame("Queues"), rows)),
        Err(error) => failure(&error),
    }
}

/// The queue table's rows as `visitor` may see them.
async fn queue_rows(console: &Console, visitor: &Visitor) -> crate::domain::Result<maud::Markup> {
    let now = Utc::now();
    let overview = console.coordinator.queue_overview(MAX_QUEUES).await?;
    let minutes = console
        .coordinator
        .throughput(now - chrono::Duration::hours(1))
        .await?;
    let visible: Vec<_> = overview
        .queues
        .iter()
        .filter(|queue| visitor.may(Scope::Read, &queue.name))
        .collect();
    let rows = visible
        .iter()
        .map(|queue| pages::QueueRow {
            queue,
            chart: chart::throughput(&queue.name, &minutes, now),
            may_manage: visitor.may(Scope::Manage, &queue.name),
        })
        .collect::<Vec<_>>();
    Ok(pages::queue_rows(
        &visitor.session.csrf,
        &rows,
        overview.counted_at,
        now,
    ))
}

#[derive(Deserialize)]
struct QueueForm {
    #[serde(default)]
    csrf: String,
    action: String,
    #[serde(default)]
    max_concurrent: String,
}

async fn queue_action(
    State(console): State<Arc<Console>>,
    visitor: Visitor,
    Path(queue): Path<String>,
    Form(form): Form<QueueForm>,
) -> Response {
    if let Err(response) = visitor
        .check_form(&form.csrf)
        .and_then(|()| visitor.require(Scope::Manage, Some(&queue)))
    {
        return response.into_response();
    }
    let update = match form.action.as_str() {
        "pause" => QueueUpdate {
            paused: Some(true),
            ..QueueUpdate::default()
        },
        "resume" => QueueUpdate {
            paused: Some(false),
            ..QueueUpdate::default()
        },
        "cap" => match form.max_concurrent.trim().parse::<u32>() {
            Ok(cap) => QueueUpdate {
                max_concurrent: Some(cap),
                ..QueueUpdate::default()
            },
            Err(_) => {
                return failure(&Error::invalid(
                    "max_concurrent",
                    "a whole number, 0 for no cap",
                ));
            }
        },
        _ => return failure(&Error::invalid("action", "pause, resume or cap")),
    };
    match console.coordinator.update_queue(&queue, update).await {
        Ok(_) => Redirect::to("/queues").into_response(),
        Err(error) => failure(&error),
    }
}

async fn runtimes_page(State(console): State<Arc<Console>>, visitor: Visitor) -> Response {
    if let Err(response) = visitor.require(Scope::Read, None) {
        return response.into_response();
    }
    let runtimes = match console.coordinator.list_runtimes(None, None, 0).await {
        Ok((runtimes, _)) => runtimes,
        Err(error) => return failure(&error),
    };
    let mut rows = Vec::with_capacity(runtimes.len());
    for runtime in runtimes {
        let held = console
            .coordinator
            .runtime_capacity(runtime.id)
            .await
            .map(|capacity| capacity.held)
            .unwrap_or_default();
        rows.push((runtime, held));
    }
    let may_deregister = visitor.principal.has(Scope::Admin, None);
    visitor.page(pages::runtimes(
        &visitor.frame("Runtimes"),
        &rows,
        may_deregister,
        Utc::now(),
    ))
}

async fn deregister(
    State(console): State<Arc<Console>>,
    visitor: Visitor,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(response) = visitor
        .check_form(&form.csrf)
        .and_then(|()| visitor.require(Scope::Admin, None))
    {
        return response.into_response();
    }
    let Some(runtime_id) = RuntimeId::parse(&id) else {
        return failure(&Error::invalid("runtime_id", "not a UUID"));
    };
    match console.coordinator.deregister_runtime(runtime_id).await {
        Ok(_) => Redirect::to("/runtimes").into_response(),
        Err(error) => failure(&error),
    }
}

/// Server-sent events: the queue table's rows, every [`LIVE_EVERY`], for as long as the
/// page stays open. The session is checked again before every send: a revoked credential
/// ends the stream.
async fn events(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Err(response) = visitor(&console, &headers).await {
        return response.into_response();
    }
    Sse::new(live_rows(console, headers))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn live_rows(
    console: Arc<Console>,
    headers: HeaderMap,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    futures::stream::unfold(
        (console, headers, tokio::time::interval(LIVE_EVERY)),
        |(console, headers, mut ticks)| async move {
            ticks.tick().await;
            let visitor = visitor(&console, &headers).await.ok()?;
            let event = match queue_rows(&console, &visitor).await {
                // One line: the markup holds no newline, which SSE data could not carry.
                Ok(rows) => Event::default()
                    .event("queues")
                    .data(rows.into_string().replace('\n', " ")),
                Err(error) => Event::default().event("trouble").data(error.to_string()),
            };
            Some((Ok(event), (console, headers, ticks)))
        },
    )
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
}
