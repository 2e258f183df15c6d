//! Console sessions: a random id in an HttpOnly, SameSite=Strict cookie (Secure when the
//! console is reached over TLS), mapped in this replica's memory to the credential that signed
//! in and a CSRF token every form carries. The credential is verified again on every request,
//! so a revoked key or a changed admin token signs the session out at once.
//!
//! Under `--auth none` a session carries no credential: it exists for its CSRF token alone.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use subtle::ConstantTimeEq as _;

pub const COOKIE: &str = "leasehold_session";

/// The most sessions one replica keeps; the oldest are dropped beyond it.
const MAX_SESSIONS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    /// The bearer token that signed in; `None` before sign-in and under `--auth none`.
    pub credential: Option<String>,
    pub csrf: String,
    expires_at: Instant,
}

/// This replica's sessions.
pub struct Sessions {
    ttl: Duration,
    by_id: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            by_id: Mutex::default(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new session holding `credential`, with a fresh id and CSRF token (a sign-in never
    /// keeps the id it arrived with: no session fixation).
    pub fn open(&self, credential: Option<String>) -> Session {
        let session = Session {
            id: random_text(),
            credential,
            csrf: random_text(),
            expires_at: Instant::now() + self.ttl,
        };
        let mut sessions = self.lock();
        let now = Instant::now();
        sessions.retain(|_, kept| kept.expires_at > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .values()
                .min_by_key(|kept| kept.expires_at)
                .map(|kept| kept.id.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(session.id.clone(), session.clone());
        session
    }

    /// The unexpired session the request's cookie names.
    pub fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = self.lock();
        match sessions.get(&id) {
            Some(session) if session.expires_at > Instant::now() => Some(session.clone()),
            Some(_) => {
                sessions.remove(&id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.by_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Session {
    /// Whether a form's `csrf` field is this session's token (compared in constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        !presented.is_empty() && bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }
}

/// The `Set-Cookie` value that keeps `session` for `ttl`.
pub fn set_cookie(session: &Session, ttl: Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        session.id,
        ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that forgets the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

/// 32 random bytes, URL-safe.
fn random_text() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_until_it_closes() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let session = sessions.open(Some("token".into()));
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            format!("other=1; {COOKIE}={}", session.id).parse().unwrap(),
        );
        assert_eq!(
            sessions.find(&headers).and_then(|found| found.credential),
            Some("token".into())
        );
        sessions.close(&session.id);
        assert!(sessions.find(&headers).is_none());
    }

    #[test]
    fn an_expired_session_is_gone() {
        let sessions = Sessions::new(Duration::ZERO);
        let session = sessions.open(None);
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            format!("{COOKIE}={}", session.id).parse().unwrap(),
        );
        assert!(sessions.find(&headers).is_none());
    }

    #[test]
    fn only_the_sessions_own_csrf_token_is_accepted() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let (one, other) = (sessions.open(None), sessions.open(None));
        assert!(one.accepts(&one.csrf));
        assert!(!one.accepts(&other.csrf));
        assert!(!one.accepts(""));
    }

    #[test]
    fn the_cookie_is_http_only_and_strict_and_secure_under_tls() {
        let session = Sessions::new(Duration::from_secs(60)).open(None);
        let plain = set_cookie(&session, Duration::from_secs(60), false);
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict"));
        assert!(!plain.contains("Secure"));
        assert!(set_cookie(&session, Duration::from_secs(60), true).ends_with("; Secure"));
    }
}
