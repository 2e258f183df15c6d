//! Signing in and out (docs/console.md "Signing in"): the form's own CSRF token lives in a
//! session without a credential; a sign-in replaces it with a new session holding the
//! credential, which must be able to read.

use std::sync::Arc;

use axum::extract::{Form, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use super::{Console, CsrfForm, failure, pages, refusal, session, set_cookie};
use crate::auth::AuthMode;
use crate::domain::Error;
use crate::domain::auth::Scope;

#[derive(Deserialize)]
pub(super) struct SignInQuery {
    ended: Option<String>,
}

pub(super) async fn page(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(query): Query<SignInQuery>,
) -> Response {
    if console.coordinator.auth_mode() == AuthMode::None {
        return Redirect::to("/queues").into_response();
    }
    // A session without a credential carries the sign-in form's CSRF token.
    let session = console.sessions.open(None);
    let note = query
        .ended
        .map(|_| "Your session ended: its credential is no longer valid.");
    let response = Html(pages::sign_in(&session.csrf, note).into_string()).into_response();
    console.with_session_cookie(response, &session, &headers)
}

#[derive(Deserialize)]
pub(super) struct SignInForm {
    #[serde(default)]
    csrf: String,
    token: String,
}

pub(super) async fn sign_in(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let Some(pending) = console.sessions.find(&headers) else {
        return Redirect::to("/sign-in").into_response();
    };
    if !pending.accepts(&form.csrf) {
        return refusal(
            StatusCode::FORBIDDEN,
            "This sign-in form has expired: reload it.",
        );
    }
    let token = form.token.trim().to_owned();
    let principal = match console.coordinator.authenticate(Some(&token)).await {
        Ok(principal) => principal,
        Err(Error::Unauthenticated(problem)) => {
            let note = format!("Sign-in refused: {}.", problem.reason());
            return (
                StatusCode::UNAUTHORIZED,
                Html(pages::sign_in(&pending.csrf, Some(&note)).into_string()),
            )
                .into_response();
        }
        Err(error) => return failure(&error),
    };
    if !principal.has_any(Scope::Read) {
        return refusal(
            StatusCode::FORBIDDEN,
            "This credential cannot read: the console needs an API key with the read scope \
             (manage to act, admin for runtimes), or the admin token.",
        );
    }
    console.sessions.close(&pending.id);
    let session = console.sessions.open(Some(token));
    console.with_session_cookie(Redirect::to("/queues").into_response(), &session, &headers)
}

pub(super) async fn sign_out(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(session) = console.sessions.find(&headers) {
        if !session.accepts(&form.csrf) {
            return refusal(
                StatusCode::FORBIDDEN,
                "This form has expired: reload the page.",
            );
        }
        console.sessions.close(&session.id);
    }
    let mut response = Redirect::to("/sign-in").into_response();
    set_cookie(
        &mut response,
        &session::clear_cookie(console.secure_for(&headers)),
    );
    response
}
