//! Credentials and what they may do (spec §9). Pure rules: token text, secrets and their
//! digests, scopes with queue globs, principals. Verifying a credential against what is
//! stored happens in `crate::auth`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::RuntimeId;

/// Prefix of an API key's token text: `lhk_<key id>_<secret>`.
pub const API_KEY_PREFIX: &str = "lhk_";
/// Prefix of a runtime token's text: `lhr_<runtime id>_<secret>`.
pub const RUNTIME_TOKEN_PREFIX: &str = "lhr_";

/// 256 random bits. Shown once (in the token text), stored only as a [`SecretDigest`]. No
/// `Display`, and `Debug` shows nothing of it, so it cannot slip into a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn random() -> Self {
        Self(rand::random())
    }

    pub fn digest(&self) -> SecretDigest {
        SecretDigest::of(&self.0)
    }

    fn encoded(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Secret(<redacted>)")
    }
}

/// SHA-256 of a secret: what is stored, and compared in constant time.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    pub fn of(secret: &[u8]) -> Self {
        Self(Sha256::digest(secret).into())
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time: how much of a digest matched never shows in the time taken.
    pub fn matches(&self, other: &SecretDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("SecretDigest(<redacted>)")
    }
}

/// A bearer token as presented, parsed by its prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presented {
    ApiKey {
        key_id: Uuid,
        secret: Secret,
    },
    Runtime {
        runtime_id: RuntimeId,
        secret: Secret,
    },
    /// Anything else: only the admin token (free text from a file) can match it.
    Other(SecretDigest),
}

impl Presented {
    pub fn parse(token: &str) -> Presented {
        let typed = |prefix: &str| {
            let rest = token.strip_prefix(prefix)?;
            let (id, secret) = rest.split_once('_')?;
            Some((Uuid::try_parse(id).ok()?, Secret::decode(secret)?))
        };
        if let Some((key_id, secret)) = typed(API_KEY_PREFIX) {
            return Presented::ApiKey { key_id, secret };
        }
        if let Some((id, secret)) = typed(RUNTIME_TOKEN_PREFIX) {
            return Presented::Runtime {
                runtime_id: RuntimeId::from_uuid(id),
                secret,
            };
        }
        Presented::Other(SecretDigest::of(token.as_bytes()))
    }

    /// Whether the text had the shape of a leasehold token (a typo in one is `INVALID`, not a
    /// wrong admin token).
    pub fn looks_typed(token: &str) -> bool {
        token.starts_with(API_KEY_PREFIX) || token.starts_with(RUNTIME_TOKEN_PREFIX)
    }
}

/// Token text, shown once when the credential is made. No `Display`; `Debug` redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenText(String);

impl TokenText {
    pub fn api_key(key_id: Uuid, secret: &Secret) -> Self {
        Self(format!(
            "{API_KEY_PREFIX}{}_{}",
            key_id.simple(),
            secret.encoded()
        ))
    }

    pub fn runtime(runtime_id: RuntimeId, secret: &Secret) -> Self {
        Self(format!(
            "{RUNTIME_TOKEN_PREFIX}{}_{}",
            runtime_id.as_uuid().simple(),
            secret.encoded()
        ))
    }

    /// The text, for the one response that hands it out.
    pub fn reveal(self) -> String {
        self.0
    }
}

impl fmt::Debug for TokenText {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("TokenText(<redacted>)")
    }
}

/// What a call needs (spec §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Enqueue,
    Read,
    Manage,
    Register,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Enqueue => "enqueue",
            Scope::Read => "read",
            Scope::Manage => "manage",
            Scope::Register => "register",
            Scope::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Scope> {
        Some(match text {
            "enqueue" => Scope::Enqueue,
            "read" => Scope::Read,
            "manage" => Scope::Manage,
            "register" => Scope::Register,
            "admin" => Scope::Admin,
            _ => return None,
        })
    }
}

/// One scope of an API key, optionally limited to queues matching a glob (`enqueue:emails.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub scope: Scope,
    /// `*` matches any run of characters, `?` one character; absent = every queue.
    pub queues: Option<String>,
}

impl Grant {
    fn covers(&self, scope: Scope, queue: Option<&str>) -> bool {
        if self.scope != scope && self.scope != Scope::Admin {
            return false;
        }
        match (&self.queues, queue) {
            (None, _) => true,
            (Some(pattern), Some(queue)) => glob_matches(pattern, queue),
            // A queue-limited grant does not cover a call that is not about one queue.
            (Some(_), None) => false,
        }
    }
}

impl FromStr for Grant {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (scope, queues) = match text.split_once(':') {
            Some((scope, queues)) => (scope, Some(queues)),
            None => (text, None),
        };
        let scope = Scope::parse(scope).ok_or_else(|| {
            format!("unknown scope {scope:?}; one of enqueue, read, manage, register, admin")
        })?;
        if let Some(queues) = queues {
            let valid = !queues.is_empty()
                && queues.len() <= 128
                && queues
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._:-*?".contains(c));
            if !valid {
                return Err(format!(
                    "the queue glob {queues:?} must be 1-128 characters of [A-Za-z0-9._:-*?]"
                ));
            }
        }
        Ok(Grant {
            scope,
            queues: queues.map(str::to_owned),
        })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.queues {
            Some(queues) => write!(formatter, "{}:{queues}", self.scope.as_str()),
            None => formatter.write_str(self.scope.as_str()),
        }
    }
}

/// `*` matches any run of characters (also none), `?` exactly one; the rest literally.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (pattern, text): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with backtracking to the last star: linear in practice, no recursion.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// An API key as stored and listed (never its secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    pub grants: Vec<Grant>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Why a credential was refused (spec §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialProblem {
    Missing,
    Invalid,
    Expired,
    Revoked,
}

impl CredentialProblem {
    pub fn reason(self) -> &'static str {
        match self {
            CredentialProblem::Missing => "CREDENTIALS_MISSING",
            CredentialProblem::Invalid => "CREDENTIALS_INVALID",
            CredentialProblem::Expired => "CREDENTIALS_EXPIRED",
            CredentialProblem::Revoked => "CREDENTIALS_REVOKED",
        }
    }
}

/// Who is calling, once the credential was verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// `--auth none`: no checks at all.
    Unchecked,
    /// The admin token: every scope.
    Admin,
    ApiKey {
        key_id: Uuid,
        grants: Vec<Grant>,
    },
    /// A runtime token: that runtime's own calls only.
    Runtime(RuntimeId),
}

impl Principal {
    /// Whether this principal holds `scope` (for `queue`, when the call is about one).
    pub fn has(&self, scope: Scope, queue: Option<&str>) -> bool {
        match self {
            Principal::Unchecked | Principal::Admin => true,
            Principal::ApiKey { grants, .. } => {
                grants.iter().any(|grant| grant.covers(scope, queue))
            }
            Principal::Runtime(_) => false,
        }
    }

    /// Whether this principal holds `scope` for at least some queue.
    pub fn has_any(&self, scope: Scope) -> bool {
        match self {
            Principal::Unchecked | Principal::Admin => true,
            Principal::ApiKey { grants, .. } => grants
                .iter()
                .any(|grant| grant.scope == scope || grant.scope == Scope::Admin),
            Principal::Runtime(_) => false,
        }
    }

    /// Whether this principal may act as `runtime`: the runtime itself, or `admin`.
    pub fn may_act_as(&self, runtime: RuntimeId) -> bool {
        match self {
            Principal::Runtime(own) => *own == runtime,
            other => other.has(Scope::Admin, None),
        }
    }

    /// The runtime a task-scoped call must hold the task as, if any: a runtime token's own.
    /// Admin (and unchecked) calls act on any task.
    pub fn acting_runtime(&self) -> Option<RuntimeId> {
        match self {
            Principal::Runtime(runtime) => Some(*runtime),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_and_single_characters() {
        assert!(glob_matches("emails.*", "emails.bulk"));
        assert!(glob_matches("emails.*", "emails."));
        assert!(!glob_matches("emails.*", "email"));
        assert!(!glob_matches("emails.*", "sms.emails.x"));
        assert!(glob_matches("gpu-?", "gpu-1"));
        assert!(!glob_matches("gpu-?", "gpu-12"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("a*b*c", "a-x-b-y-c"));
        assert!(!glob_matches("a*b*c", "a-x-b-y"));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exactly"));
    }

    #[test]
    fn a_queue_limited_grant_covers_only_matching_queues() {
        let key = Principal::ApiKey {
            key_id: Uuid::new_v4(),
            grants: vec!["enqueue:emails.*".parse().unwrap(), "read".parse().unwrap()],
        };
        assert!(key.has(Scope::Enqueue, Some("emails.welcome")));
        assert!(!key.has(Scope::Enqueue, Some("billing")));
        assert!(key.has(Scope::Read, Some("billing")));
        assert!(key.has(Scope::Read, None));
        assert!(!key.has(Scope::Manage, Some("emails.welcome")));
        assert!(!key.has(Scope::Admin, None));
    }

    #[test]
    fn admin_grants_cover_every_scope() {
        let key = Principal::ApiKey {
            key_id: Uuid::new_v4(),
            grants: vec!["admin".parse().unwrap()],
        };
        assert!(key.has(Scope::Manage, Some("q")));
        assert!(key.may_act_as(RuntimeId::new_random()));
    }

    #[test]
    fn a_runtime_acts_only_as_itself() {
        let runtime = RuntimeId::new_random();
        let principal = Principal::Runtime(runtime);
        assert!(principal.may_act_as(runtime));
        assert!(!principal.may_act_as(RuntimeId::new_random()));
        assert!(!principal.has(Scope::Read, None));
    }

    #[test]
    fn grants_are_validated() {
        assert!("enqueue:emails.*".parse::<Grant>().is_ok());
        assert!("destroy".parse::<Grant>().is_err());
        assert!("enqueue:".parse::<Grant>().is_err());
        assert!("enqueue:bad queue".parse::<Grant>().is_err());
    }

    #[test]
    fn token_text_parses_back_to_its_id_and_secret() {
        let secret = Secret::random();
        let key_id = Uuid::new_v4();
        let text = TokenText::api_key(key_id, &secret).reveal();
        assert!(text.starts_with("lhk_"));
        assert_eq!(
            Presented::parse(&text),
            Presented::ApiKey {
                key_id,
                secret: secret.clone()
            }
        );
        let runtime = RuntimeId::new_random();
        let text = TokenText::runtime(runtime, &secret).reveal();
        assert_eq!(
            Presented::parse(&text),
            Presented::Runtime {
                runtime_id: runtime,
                secret
            }
        );
        assert!(matches!(
            Presented::parse("lhk_not-a-token"),
            Presented::Other(_)
        ));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let secret = Secret::random();
        let text = TokenText::api_key(Uuid::new_v4(), &secret);
        let shown = format!("{secret:?} {text:?} {:?}", secret.digest());
        assert!(!shown.contains(&secret.encoded()));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn digests_compare_by_content() {
        let secret = Secret::random();
        assert!(secret.digest().matches(&secret.digest()));
        assert!(!secret.digest().matches(&Secret::random().digest()));
    }
}
