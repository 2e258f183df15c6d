//! Verifying credentials (spec §9): a bearer token becomes a [`Principal`], or a typed refusal.
//!
//! Verified outcomes are kept in memory, so in the steady state a call costs no database round
//! trip. A revocation or re-registration on this replica forgets them at once; other replicas
//! hear of it through Redis (`forget_everything` via the wake-up relay, which also forgets
//! everything whenever it subscribes again, as messages may have been missed). While Redis
//! carries those messages an outcome is trusted for [`CACHE_WITH_REDIS`]; without Redis,
//! [`CACHE_WITHOUT_REDIS`] bounds how long a revoked credential still works on another
//! replica (spec: 10 s).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::advisory::RedisLink;
use crate::domain::auth::{CredentialProblem, Presented, Principal, SecretDigest};
use crate::domain::{Error, Result};
use crate::store::TaskStore;

/// How long a verified (or refused) credential is trusted while revocations arrive by Redis.
pub const CACHE_WITH_REDIS: Duration = Duration::from_secs(60);
/// ... and when they cannot: a revocation reaches every replica within this.
pub const CACHE_WITHOUT_REDIS: Duration = Duration::from_secs(5);

/// An API key's `last_used_at` is written at most this often (per replica).
const NOTE_USE_EVERY: Duration = Duration::from_secs(60);

/// The cache is cleared rather than grown past this many entries (a flood of made-up tokens).
const MAX_CACHED: usize = 10_000;

/// How often the admin token file is checked for changes.
const ADMIN_FILE_POLL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every call needs a credential (the default).
    Token,
    /// No checks (development on loopback).
    None,
}

pub struct Authenticator {
    mode: AuthMode,
    store: Arc<dyn TaskStore>,
    /// Whether revocations from other replicas can reach this one.
    redis: Option<Arc<RedisLink>>,
    admin_file: Option<PathBuf>,
    /// The admin token's digest and the file's modification time it was read at.
    admin: RwLock<Option<(SecretDigest, Option<SystemTime>)>>,
    /// By the digest of the whole presented token text.
    cache: Mutex<HashMap<SecretDigest, Cached>>,
    /// When each API key's use was last written.
    noted_use: Mutex<HashMap<Uuid, Instant>>,
}

#[derive(Clone)]
struct Cached {
    outcome: std::result::Result<Principal, CredentialProblem>,
    /// An API key's expiry, checked on every use (it may pass while cached).
    expires_at: Option<chrono::DateTime<Utc>>,
    checked_at: Instant,
}

impl Authenticator {
    pub fn new(
        mode: AuthMode,
        store: Arc<dyn TaskStore>,
        redis: Option<Arc<RedisLink>>,
        admin_file: Option<PathBuf>,
    ) -> Self {
        let authenticator = Self {
            mode,
            store,
            redis,
            admin_file,
            admin: RwLock::new(None),
            cache: Mutex::new(HashMap::new()),
            noted_use: Mutex::new(HashMap::new()),
        };
        authenticator.reload_admin_token();
        authenticator
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The caller behind `bearer` (the token text after `Bearer `), or why not.
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal> {
        if self.mode == AuthMode::None {
            return Ok(Principal::Unchecked);
        }
        let token = bearer
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(Error::Unauthenticated(CredentialProblem::Missing))?;
        let cache_key = SecretDigest::of(token.as_bytes());
        let cached = self.cached(&cache_key);
        let cached = match cached {
            Some(cached) => cached,
            None => {
                let verified = self.verify(token).await?;
                self.remember(cache_key, verified.clone());
                verified
            }
        };
        if cached
            .expires_at
            .is_some_and(|expires_at| expires_at <= Utc::now())
        {
            return Err(Error::Unauthenticated(CredentialProblem::Expired));
        }
        let principal = cached.outcome.map_err(Error::Unauthenticated)?;
        if let Principal::ApiKey { key_id, .. } = &principal {
            self.note_use(*key_id);
        }
        Ok(principal)
    }

    /// Forgets every verified credential on this replica: a key was revoked or a runtime
    /// registered again (here or, through Redis, on another replica).
    pub fn forget_everything(&self) {
        self.lock_cache().clear();
    }

    /// Re-reads the admin token file whenever it changes, until `stop`.
    pub async fn watch_admin_token(&self, stop: CancellationToken) {
        if self.admin_file.is_none() {
            return;
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(ADMIN_FILE_POLL) => {}
            }
            let known = self.read_admin().and_then(|(_, modified)| modified);
            let current = self
                .admin_file
                .as_ref()
                .and_then(|path| std::fs::metadata(path).ok())
                .and_then(|metadata| metadata.modified().ok());
            if current != known {
                self.reload_admin_token();
                self.forget_everything();
            }
        }
    }

    fn reload_admin_token(&self) {
        let Some(path) = &self.admin_file else {
            return;
        };
        let read = std::fs::read_to_string(path).map(|text| {
            let modified = std::fs::metadata(path).and_then(|metadata| metadata.modified());
            (text.trim().to_owned(), modified.ok())
        });
        let admin = match read {
            Ok((token, modified)) if !token.is_empty() => {
                tracing::info!(path = %path.display(), "admin token loaded");
                Some((SecretDigest::of(token.as_bytes()), modified))
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "the admin token file is empty");
                None
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read the admin token file");
                None
            }
        };
        *self
            .admin
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = admin;
    }

    fn read_admin(&self) -> Option<(SecretDigest, Option<SystemTime>)> {
        *self
            .admin
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks the store. Only an unreachable store is an error here; every verdict about the
    /// credential itself is an outcome, cached like a success.
    async fn verify(&self, token: &str) -> Result<Cached> {
        let (outcome, expires_at) = match Presented::parse(token) {
            Presented::ApiKey { key_id, secret } => {
                match self.store.api_key_credential(key_id).await? {
                    Some((key, digest)) if digest.matches(&secret.digest()) => {
                        let outcome = if key.revoked_at.is_some() {
                            Err(CredentialProblem::Revoked)
                        } else {
                            Ok(Principal::ApiKey {
                                key_id,
                                grants: key.grants,
                            })
                        };
                        (outcome, key.expires_at)
                    }
                    _ => (Err(CredentialProblem::Invalid), None),
                }
            }
            Presented::Runtime { runtime_id, secret } => {
                let digest = secret.digest();
                let outcome = match self.store.runtime_credential(runtime_id).await? {
                    Some(known)
                        if known
                            .current
                            .is_some_and(|current| current.matches(&digest)) =>
                    {
                        Ok(Principal::Runtime(runtime_id))
                    }
                    Some(known) if known.revoked.iter().any(|old| old.matches(&digest)) => {
                        Err(CredentialProblem::Revoked)
                    }
                    _ => Err(CredentialProblem::Invalid),
                };
                (outcome, None)
            }
            Presented::Other(digest) => {
                let outcome = match self.read_admin() {
                    Some((admin, _)) if admin.matches(&digest) => Ok(Principal::Admin),
                    _ => Err(CredentialProblem::Invalid),
                };
                (outcome, None)
            }
        };
        Ok(Cached {
            outcome,
            expires_at,
            checked_at: Instant::now(),
        })
    }

    fn cached(&self, cache_key: &SecretDigest) -> Option<Cached> {
        let trusted_for = match &self.redis {
            Some(redis) if redis.is_healthy() => CACHE_WITH_REDIS,
            _ => CACHE_WITHOUT_REDIS,
        };
        let cache = self.lock_cache();
        cache
            .get(cache_key)
            .filter(|cached| cached.checked_at.elapsed() < trusted_for)
            .cloned()
    }

    fn remember(&self, cache_key: SecretDigest, cached: Cached) {
        let mut cache = self.lock_cache();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(cache_key, cached);
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<SecretDigest, Cached>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `last_used_at` off the call's path, at most once a minute per key.
    fn note_use(&self, key_id: Uuid) {
        {
            let mut noted = self
                .noted_use
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            match noted.get(&key_id) {
                Some(at) if now.duration_since(*at) < NOTE_USE_EVERY => return,
                _ => {
                    noted.insert(key_id, now);
                }
            }
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(error) = store.note_api_key_used(key_id).await {
                tracing::debug!(%key_id, %error, "cannot write an API key's last use");
            }
        });
    }
}
