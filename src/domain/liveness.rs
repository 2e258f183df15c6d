//! When a runtime is OFFLINE (spec §6): only after `--offline-after` without any accepted call
//! of its own, judged on the later of its two records (Redis, PostgreSQL's `last_seen_at`),
//! each measured on its own store's clock. These are the rules both stores' sweepers apply;
//! the stores only gather the ages.

use std::collections::HashMap;
use std::time::Duration;

use super::RuntimeId;

/// What Redis holds about the runtimes the sweeper asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedisView {
    /// How long ago each runtime that has a record was last seen, on Redis's clock.
    pub seen_ago: HashMap<RuntimeId, Duration>,
    /// Redis has kept its data long enough that a runtime without a record was not seen within
    /// the threshold. False right after Redis lost its data (a restart), and when it could
    /// not be asked: then a missing record proves nothing.
    pub absence_is_evidence: bool,
    /// How far `last_seen_at` may lag behind a sign of life that only Redis recorded (the
    /// flush interval; zero without Redis, where every sign of life reaches PostgreSQL).
    pub database_lag: Duration,
}

/// The sweeper's verdict on a runtime whose `last_seen_at` is older than the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Redis saw it this long ago, within the threshold: copy that into `last_seen_at`.
    Alive {
        seen_ago: Duration,
    },
    Offline,
    /// Neither record proves it silent for the whole threshold yet: look again next sweep.
    Undecided,
}

/// `threshold`: `--offline-after` plus the time a sign of life may take to reach a record.
/// `database_age`: how long ago `last_seen_at` was, on the database's clock.
pub fn verdict(
    runtime: RuntimeId,
    database_age: Duration,
    redis: &RedisView,
    threshold: Duration,
) -> Verdict {
    if database_age < threshold {
        return Verdict::Undecided;
    }
    match redis.seen_ago.get(&runtime) {
        Some(&seen_ago) if seen_ago < threshold => Verdict::Alive { seen_ago },
        Some(_) => Verdict::Offline,
        None if redis.absence_is_evidence => Verdict::Offline,
        // Only `last_seen_at` is left, and it may miss the latest Redis-only signs of life.
        None if database_age >= threshold + redis.database_lag => Verdict::Offline,
        None => Verdict::Undecided,
    }
}

/// Time during which the sweeper could not run (database unreachable, every replica down or
/// cut off) is time in which no runtime could be judged, and often none could be heard: it
/// does not count against them. `gap` is the time since the previous sweep began; a gap over
/// two intervals credits every ONLINE runtime with what exceeds one interval.
pub fn blackout_credit(gap: Duration, interval: Duration) -> Option<Duration> {
    (gap > interval * 2).then(|| gap - interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    const THRESHOLD: Duration = Duration::from_secs(150);

    fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn view(seen: Option<(RuntimeId, u64)>, evidence: bool) -> RedisView {
        RedisView {
            seen_ago: seen.into_iter().map(|(id, ago)| (id, secs(ago))).collect(),
            absence_is_evidence: evidence,
            database_lag: secs(50),
        }
    }

    #[test]
    fn a_recent_redis_record_outvotes_a_stale_last_seen_at() {
        let runtime = RuntimeId::new_random();
        let redis = view(Some((runtime, 10)), true);
        assert_eq!(
            verdict(runtime, secs(400), &redis, THRESHOLD),
            Verdict::Alive { seen_ago: secs(10) }
        );
    }

    #[test]
    fn both_records_stale_means_offline() {
        let runtime = RuntimeId::new_random();
        let redis = view(Some((runtime, 150)), false);
        assert_eq!(
            verdict(runtime, secs(151), &redis, THRESHOLD),
            Verdict::Offline
        );
    }

    #[test]
    fn a_missing_record_counts_only_when_redis_kept_its_data() {
        let runtime = RuntimeId::new_random();
        let kept = view(None, true);
        assert_eq!(
            verdict(runtime, secs(151), &kept, THRESHOLD),
            Verdict::Offline
        );
        let lost = view(None, false);
        assert_eq!(
            verdict(runtime, secs(151), &lost, THRESHOLD),
            Verdict::Undecided,
            "last_seen_at may lag a Redis-only beat by the flush interval"
        );
        assert_eq!(
            verdict(runtime, secs(200), &lost, THRESHOLD),
            Verdict::Offline
        );
    }

    #[test]
    fn a_fresh_last_seen_at_needs_no_verdict() {
        let runtime = RuntimeId::new_random();
        assert_eq!(
            verdict(runtime, secs(149), &view(None, true), THRESHOLD),
            Verdict::Undecided
        );
    }

    #[test]
    fn only_a_gap_over_two_intervals_is_credited() {
        assert_eq!(blackout_credit(secs(59), secs(30)), None);
        assert_eq!(blackout_credit(secs(100), secs(30)), Some(secs(70)));
    }
}
