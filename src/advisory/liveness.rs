//! Runtime liveness (spec §6). A heartbeat, and any claim, sets the runtime's liveness key
//! with the liveness TTL. The key's value is when the runtime's `last_seen_at` was last written
//! to PostgreSQL, which lets every replica agree that the database needs that write at most
//! once per flush interval while Redis is healthy; without Redis, every heartbeat writes it.
//!
//! The sweeper trusts a live key over a stale `last_seen_at`, so the flush interval, the
//! heartbeat interval and the sweep interval together must stay below `--offline-after`
//! (the flush interval is derived to keep its share small).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::Script;

use super::{RedisLink, millis};
use crate::domain::RuntimeId;
use crate::store::LivenessOracle;

/// The longest `last_seen_at` may lag behind a live runtime while Redis is healthy.
const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// KEYS[1] the liveness key; ARGV now (ms), flush interval (ms), TTL (ms).
/// Refreshes the key and answers 1 when PostgreSQL heard from the runtime recently enough;
/// answers 0 (touching nothing) when PostgreSQL must be written first.
const BEAT: &str = r"
local flushed = tonumber(redis.call('GET', KEYS[1]) or '')
if flushed and tonumber(ARGV[1]) - flushed < tonumber(ARGV[2]) then
    redis.call('SET', KEYS[1], flushed, 'PX', ARGV[3])
    return 1
end
return 0
";

pub struct Liveness {
    redis: Option<Arc<RedisLink>>,
    ttl: Duration,
    flush_every: Duration,
    beat: Script,
}

impl Liveness {
    pub fn new(redis: Option<Arc<RedisLink>>, ttl: Duration, offline_after: Duration) -> Self {
        Self {
            redis,
            ttl,
            flush_every: Self::flush_interval(offline_after),
            beat: Script::new(BEAT),
        }
    }

    /// How long `last_seen_at` may lag while Redis is healthy: a third of the offline
    /// threshold, at most a minute.
    pub fn flush_interval(offline_after: Duration) -> Duration {
        MAX_FLUSH_INTERVAL.min(offline_after / 3)
    }

    /// Records a sign of life in Redis. `true` means PostgreSQL's `last_seen_at` is recent
    /// enough that this beat needs no database write; `false` means the caller must write it
    /// (and then call [`Liveness::flushed`]).
    pub async fn beat(&self, runtime: RuntimeId) -> bool {
        let Some(redis) = &self.redis else {
            return false;
        };
        let key = key(redis, runtime);
        let (now, flush_every, ttl) = (now_millis(), millis(self.flush_every), millis(self.ttl));
        let recorded: Option<i64> = redis
            .call(|mut connection| async move {
                self.beat
                    .key(key)
                    .arg(now)
                    .arg(flush_every)
                    .arg(ttl)
                    .invoke_async(&mut connection)
                    .await
            })
            .await;
        recorded == Some(1)
    }

    /// PostgreSQL's `last_seen_at` was just written.
    pub async fn flushed(&self, runtime: RuntimeId) {
        if let Some(redis) = &self.redis {
            let command = redis::cmd("SET")
                .arg(key(redis, runtime))
                .arg(now_millis())
                .arg("PX")
                .arg(millis(self.ttl))
                .to_owned();
            redis.query::<()>(command).await;
        }
    }

    /// The runtime left (DeregisterRuntime): its next heartbeat must reach PostgreSQL to bring
    /// it back ONLINE.
    pub async fn forget(&self, runtime: RuntimeId) {
        if let Some(redis) = &self.redis {
            let command = redis::cmd("DEL").arg(key(redis, runtime)).to_owned();
            redis.query::<()>(command).await;
        }
    }
}

#[async_trait]
impl LivenessOracle for Liveness {
    /// One MGET. Without Redis, nobody is known to be alive: `last_seen_at` decides alone.
    async fn alive(&self, runtimes: &[RuntimeId]) -> HashSet<RuntimeId> {
        let Some(redis) = &self.redis else {
            return HashSet::new();
        };
        if runtimes.is_empty() {
            return HashSet::new();
        }
        let keys: Vec<String> = runtimes.iter().map(|id| key(redis, *id)).collect();
        let command = redis::cmd("MGET").arg(keys).to_owned();
        let Some(values) = redis.query::<Vec<Option<String>>>(command).await else {
            return HashSet::new();
        };
        runtimes
            .iter()
            .zip(values)
            .filter_map(|(id, value)| value.map(|_| *id))
            .collect()
    }
}

fn key(redis: &RedisLink, runtime: RuntimeId) -> String {
    redis.key(format_args!("live:{runtime}"))
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}
