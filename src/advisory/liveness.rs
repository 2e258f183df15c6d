//! Runtime liveness in Redis (spec §6). Each runtime's record is a hash: `seen`, when it was
//! last heard from, and `flushed`, when its PostgreSQL `last_seen_at` was last written, both
//! in milliseconds of Redis's own clock (so every replica measures on one clock). Every sign
//! of life sets `seen`; `last_seen_at` is written only once `flushed` is older than the flush
//! interval, so while Redis is healthy PostgreSQL hears from each runtime at most that often.
//!
//! A record lives at least twice `--offline-after`, so the sweeper can always read a live
//! runtime's age. An epoch key, set when Redis first holds any record, tells whether Redis
//! kept its data for the whole threshold: only then does a missing record prove silence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::{RedisLink, millis};
use crate::domain::RuntimeId;
use crate::domain::liveness::RedisView;
use crate::store::LivenessOracle;

/// The longest `last_seen_at` may lag behind a live runtime while Redis is healthy.
const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// How often the signs of life gathered by a replica are recorded (see `SignsOfLife`).
pub const RECORD_INTERVAL: Duration = Duration::from_millis(100);

/// KEYS[1] the epoch key, then one record per runtime; ARGV flush interval (ms), TTL (ms).
/// Sets `seen` to now on every record and answers, per runtime, 1 when PostgreSQL must be
/// written (its `flushed` is missing or older than the flush interval), else 0.
const RECORD: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('SET', KEYS[1], now, 'NX')
local answers = {}
for i = 2, #KEYS do
    local flushed = tonumber(redis.call('HGET', KEYS[i], 'flushed') or '')
    redis.call('HSET', KEYS[i], 'seen', now)
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    if flushed and now - flushed < tonumber(ARGV[1]) then
        answers[#answers + 1] = 0
    else
        answers[#answers + 1] = 1
    end
end
return answers
";

/// KEYS: one record per runtime whose `last_seen_at` was just written; ARGV TTL (ms).
const FLUSHED: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
for i = 1, #KEYS do
    redis.call('HSET', KEYS[i], 'flushed', now, 'seen', now)
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return 1
";

/// KEYS[1] the epoch key, then one record per runtime. Answers Redis's clock, the epoch (-1
/// when missing), then each runtime's `seen` (-1 when it has no record).
const READ: &str = r"
local clock = redis.call('TIME')
local answers = {tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)}
answers[2] = tonumber(redis.call('GET', KEYS[1]) or '-1')
for i = 2, #KEYS do
    answers[#answers + 1] = tonumber(redis.call('HGET', KEYS[i], 'seen') or '-1')
end
return answers
";

pub struct Liveness {
    redis: Option<Arc<RedisLink>>,
    /// How long a record lives without a sign of life.
    ttl: Duration,
    flush_every: Duration,
    /// The sweeper's threshold, which absence of a record must cover to prove silence.
    offline_after: Duration,
    record: Script,
    flushed: Script,
    read: Script,
}

impl Liveness {
    /// `ttl` is `--liveness-ttl`; a record is kept at least twice `offline_after` anyway.
    pub fn new(redis: Option<Arc<RedisLink>>, ttl: Duration, offline_after: Duration) -> Self {
        Self {
            redis,
            ttl: ttl.max(offline_after * 2),
            flush_every: Self::flush_interval(offline_after),
            offline_after,
            record: Script::new(RECORD),
            flushed: Script::new(FLUSHED),
            read: Script::new(READ),
        }
    }

    /// How long `last_seen_at` may lag while Redis is healthy: a third of the offline
    /// threshold, at most a minute.
    pub fn flush_interval(offline_after: Duration) -> Duration {
        MAX_FLUSH_INTERVAL.min(offline_after / 3)
    }

    /// The most time between accepting a call and its sign of life reaching a record: one
    /// recording interval plus a Redis call that times out before PostgreSQL is written
    /// instead. The sweeper adds it to `--offline-after`.
    pub fn record_lag(redis_timeout: Duration) -> Duration {
        RECORD_INTERVAL + redis_timeout
    }

    /// Records signs of life in Redis. Per runtime, `true` when PostgreSQL's `last_seen_at`
    /// must be written too (then call [`Liveness::flushed`] once it was); `None` when Redis is
    /// not configured or could not record them: PostgreSQL must take them all.
    pub async fn record(&self, runtimes: &[RuntimeId]) -> Option<Vec<bool>> {
        let redis = self.redis.as_ref()?;
        if runtimes.is_empty() {
            return Some(Vec::new());
        }
        let mut invocation = self.record.key(epoch_key(redis));
        for runtime in runtimes {
            invocation.key(key(redis, *runtime));
        }
        invocation
            .arg(millis(self.flush_every))
            .arg(millis(self.ttl));
        let answers: Vec<i64> = redis
            .call(|mut connection| async move { invocation.invoke_async(&mut connection).await })
            .await?;
        Some(answers.into_iter().map(|answer| answer != 0).collect())
    }

    /// PostgreSQL's `last_seen_at` was just written for these runtimes.
    pub async fn flushed(&self, runtimes: &[RuntimeId]) {
        let Some(redis) = &self.redis else {
            return;
        };
        if runtimes.is_empty() {
            return;
        }
        let mut invocation = self.flushed.prepare_invoke();
        for runtime in runtimes {
            invocation.key(key(redis, *runtime));
        }
        invocation.arg(millis(self.ttl));
        redis
            .call(|mut connection| async move {
                invocation.invoke_async::<i64>(&mut connection).await
            })
            .await;
    }

    /// The runtime left (DeregisterRuntime): its next heartbeat must reach PostgreSQL to bring
    /// it back ONLINE.
    pub async fn forget(&self, runtime: RuntimeId) {
        if let Some(redis) = &self.redis {
            let command = redis::cmd("DEL").arg(key(redis, runtime)).to_owned();
            redis.query::<()>(command).await;
        }
    }

    /// How far `last_seen_at` may lag a sign of life only Redis recorded.
    fn database_lag(&self) -> Duration {
        if self.redis.is_some() {
            self.flush_every
        } else {
            Duration::ZERO
        }
    }
}

#[async_trait]
impl LivenessOracle for Liveness {
    /// One script call. Without Redis, or when it cannot be asked, the view is empty and a
    /// missing record proves nothing.
    async fn view(&self, runtimes: &[RuntimeId]) -> RedisView {
        let mut view = RedisView {
            database_lag: self.database_lag(),
            ..RedisView::default()
        };
        let Some(redis) = &self.redis else {
            return view;
        };
        if runtimes.is_empty() {
            return view;
        }
        let mut invocation = self.read.key(epoch_key(redis));
        for runtime in runtimes {
            invocation.key(key(redis, *runtime));
        }
        let Some(answers) = redis
            .call(|mut connection| async move {
                invocation.invoke_async::<Vec<i64>>(&mut connection).await
            })
            .await
        else {
            return view;
        };
        let [now, epoch, seen @ ..] = answers.as_slice() else {
            return view;
        };
        let age = |at: i64| Duration::from_millis(u64::try_from(now - at).unwrap_or(0));
        view.absence_is_evidence = *epoch >= 0 && age(*epoch) >= self.offline_after;
        view.seen_ago = runtimes
            .iter()
            .zip(seen)
            .filter(|(_, seen)| **seen >= 0)
            .map(|(runtime, seen)| (*runtime, age(*seen)))
            .collect::<HashMap<_, _>>();
        view
    }
}

fn key(redis: &RedisLink, runtime: RuntimeId) -> String {
    redis.key(format_args!("live:{runtime}"))
}

fn epoch_key(redis: &RedisLink) -> String {
    redis.key(format_args!("live-epoch"))
}
