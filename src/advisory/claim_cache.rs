//! The versioned empty-claim cache (spec §6): lets an idle runtime's claims skip PostgreSQL.
//!
//! Every queue, and every runtime's pin set, has a version in Redis, replaced with a fresh
//! random value whenever work may have become claimable there (enqueue, requeue, retry, a task
//! leaving DISPATCHED/RUNNING, a queue update) — after the change commits. A claim reads the
//! versions of everything its runtime serves *before* it asks PostgreSQL; when PostgreSQL finds
//! nothing, that verdict is stored tagged with those versions. A later claim trusts the
//! verdict only while every version still matches, so any change that committed after the
//! versions were read invalidates it.
//!
//! Two things can make work claimable without any write: one of the runtime's own leases
//! expiring (its preflight would requeue it) and a delayed task's `available_at` passing. A
//! verdict therefore lives no longer than the store's [`ClaimHorizon`], and at most
//! [`VERDICT_TTL`]. The runtime's own version is bumped whenever it claims something, so a
//! verdict computed concurrently with that claim cannot outlive the new lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{RedisLink, VERSION_TTL, millis, random_version};
use crate::domain::RuntimeId;
use crate::store::ClaimHorizon;
use crate::wakeups::Topic;

/// The longest a "nothing claimable" verdict is trusted.
pub const VERDICT_TTL: Duration = Duration::from_secs(180);

/// The versions a claim read before asking PostgreSQL, and the verdict stored at that time.
#[derive(Clone, Debug)]
pub struct Snapshot {
    queues: Arc<[String]>,
    verdict: Option<String>,
    versions: String,
}

impl Snapshot {
    /// A stored verdict says nothing is claimable, and nothing changed since.
    pub fn says_empty(&self) -> bool {
        self.verdict.as_deref() == Some(self.versions.as_str())
    }
}

pub struct ClaimCache {
    redis: Option<Arc<RedisLink>>,
    /// The queues each runtime serves, as last seen in the store: which versions to read.
    served: Mutex<HashMap<RuntimeId, Arc<[String]>>>,
}

impl ClaimCache {
    pub fn new(redis: Option<Arc<RedisLink>>) -> Self {
        Self {
            redis,
            served: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a verdict could be stored now.
    pub fn is_active(&self) -> bool {
        self.redis.as_ref().is_some_and(|redis| redis.is_healthy())
    }

    /// The runtime serves these queues (sorted), as the store just said.
    pub fn learn_queues(&self, runtime: RuntimeId, queues: &[String]) {
        self.served_queues().insert(runtime, queues.into());
    }

    /// The queues `runtime` serves, when this replica has seen them.
    pub fn known_queues(&self, runtime: RuntimeId) -> Option<Arc<[String]>> {
        self.served_queues().get(&runtime).cloned()
    }

    /// One MGET: the verdict and the current versions. `None` without a healthy Redis or
    /// before this replica knows the runtime's queues.
    pub async fn snapshot(&self, runtime: RuntimeId) -> Option<Snapshot> {
        let redis = self.redis.as_ref()?;
        let queues = self.served_queues().get(&runtime).cloned()?;
        let mut keys = vec![verdict_key(redis, runtime), redis.epoch_key()];
        keys.extend(version_keys(redis, runtime, &queues));
        let command = redis::cmd("MGET").arg(keys).to_owned();
        let mut values = redis
            .query::<Vec<Option<String>>>(command)
            .await?
            .into_iter();
        let verdict = values.next().flatten();
        let versions: Vec<String> = values
            .map(|value| value.unwrap_or_else(|| "-".to_owned()))
            .collect();
        Some(Snapshot {
            queues,
            verdict,
            versions: versions.join(","),
        })
    }

    /// PostgreSQL found nothing claimable for `runtime` after `snapshot` was read: store the
    /// verdict for as long as `horizon` allows. Skipped when the runtime's queues changed
    /// since the snapshot (the versions read were the wrong ones); the next claim reads the
    /// right ones.
    pub async fn remember_empty(
        &self,
        runtime: RuntimeId,
        snapshot: Option<Snapshot>,
        horizon: &ClaimHorizon,
    ) {
        self.learn_queues(runtime, &horizon.queues);
        let (Some(redis), Some(snapshot)) = (&self.redis, snapshot) else {
            return;
        };
        let Some(trust_for) = horizon.trust_for(VERDICT_TTL) else {
            return;
        };
        if *snapshot.queues != *horizon.queues {
            return;
        }
        let command = redis::cmd("SET")
            .arg(verdict_key(redis, runtime))
            .arg(snapshot.versions)
            .arg("PX")
            .arg(millis(trust_for))
            .to_owned();
        redis.query::<()>(command).await;
    }

    /// Replaces the runtime's own version, so a verdict recorded before now is not trusted.
    pub async fn invalidate(&self, runtime: RuntimeId) {
        if let Some(redis) = &self.redis {
            let mut pipeline = redis::pipe();
            add_bumps(redis, &mut pipeline, [&Topic::Runtime(runtime)]);
            redis.query_pipeline(pipeline).await;
        }
    }

    fn served_queues(&self) -> std::sync::MutexGuard<'_, HashMap<RuntimeId, Arc<[String]>>> {
        self.served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Adds to `pipeline` the replacement of these topics' versions, which invalidates every
/// verdict that recorded them. Run it after the change committed.
pub fn add_bumps<'a>(
    redis: &RedisLink,
    pipeline: &mut redis::Pipeline,
    topics: impl IntoIterator<Item = &'a Topic>,
) {
    for topic in topics {
        pipeline
            .cmd("SET")
            .arg(version_key(redis, topic))
            .arg(random_version())
            .arg("PX")
            .arg(millis(VERSION_TTL))
            .ignore();
    }
}

fn verdict_key(redis: &RedisLink, runtime: RuntimeId) -> String {
    redis.key(format_args!("empty:{runtime}"))
}

fn version_key(redis: &RedisLink, topic: &Topic) -> String {
    match topic {
        Topic::Queue(queue) => redis.key(format_args!("ver:q:{queue}")),
        Topic::Runtime(runtime) => redis.key(format_args!("ver:rt:{runtime}")),
    }
}

/// The versions a runtime's verdict depends on: its own, then each queue's.
fn version_keys<'a>(
    redis: &'a RedisLink,
    runtime: RuntimeId,
    queues: &'a [String],
) -> impl Iterator<Item = String> + 'a {
    std::iter::once(version_key(redis, &Topic::Runtime(runtime))).chain(
        queues
            .iter()
            .map(|queue| version_key(redis, &Topic::Queue(queue.clone()))),
    )
}
