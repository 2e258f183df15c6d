//! Cross-replica wake-ups and cancellations over Redis pub/sub (spec §5): each replica
//! publishes what its committed changes touched and subscribes once (not once per stream) to
//! what the others publish, passing it to its local [`Notifier`].
//!
//! A message is lines of tab-separated fields: the sending replica first (so a replica skips
//! its own messages, already delivered locally), then `q <queue> <waiters>`,
//! `rt <runtime> <waiters>` (how many waiters the change may wake; see [`Wakes`]),
//! `cancel <runtime> <task>` and `revoked` (a credential was revoked or replaced: forget every
//! verified one). Queue names cannot contain tabs or newlines.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::RedisLink;
use crate::domain::{RuntimeId, TaskId};
use crate::wakeups::{Notifier, Topic, Wakes};

/// Pause before subscribing again after the subscription broke.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// A task held by a runtime was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cancellation {
    pub runtime: RuntimeId,
    pub task: TaskId,
}

pub struct WakeRelay {
    replica: Uuid,
}

impl Default for WakeRelay {
    fn default() -> Self {
        Self {
            replica: Uuid::new_v4(),
        }
    }
}

impl WakeRelay {
    /// Adds the PUBLISH of `topics` and `cancellations` to `pipeline`.
    pub fn add_publish(
        &self,
        redis: &RedisLink,
        pipeline: &mut redis::Pipeline,
        wakes: &Wakes,
        cancellations: &[Cancellation],
    ) {
        if wakes.is_empty() && cancellations.is_empty() {
            return;
        }
        pipeline
            .cmd("PUBLISH")
            .arg(channel(redis))
            .arg(self.encode(wakes, cancellations))
            .ignore();
    }

    /// Adds the PUBLISH of a `revoked` line to `pipeline`.
    pub fn add_revocation(&self, redis: &RedisLink, pipeline: &mut redis::Pipeline) {
        pipeline
            .cmd("PUBLISH")
            .arg(channel(redis))
            .arg(format!("{}\nrevoked", self.replica))
            .ignore();
    }

    /// One line per topic: kind, name, and how many waiters it may wake (a line without the
    /// count, from an older replica, wakes them all).
    fn encode(&self, wakes: &Wakes, cancellations: &[Cancellation]) -> String {
        let mut message = self.replica.to_string();
        for (topic, waiters) in wakes.iter() {
            message.push('\n');
            match topic {
                Topic::Queue(queue) => message.push_str(&format!("q\t{queue}\t{waiters}")),
                Topic::Runtime(runtime) => {
                    message.push_str(&format!("rt\t{runtime}\t{waiters}"));
                }
            }
        }
        for cancellation in cancellations {
            message.push_str(&format!(
                "\ncancel\t{}\t{}",
                cancellation.runtime, cancellation.task
            ));
        }
        message
    }

    /// Delivers other replicas' messages to `notifier` until `stop`, subscribing again
    /// whenever the subscription breaks.
    pub async fn run(
        &self,
        redis: Arc<RedisLink>,
        notifier: Arc<Notifier>,
        on_revocation: &(dyn Fn() + Send + Sync),
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                result = self.relay_once(&redis, &notifier, on_revocation) => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "wake-up subscription broke; subscribing again");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            }
        }
    }

    async fn relay_once(
        &self,
        redis: &RedisLink,
        notifier: &Notifier,
        on_revocation: &(dyn Fn() + Send + Sync),
    ) -> redis::RedisResult<()> {
        let mut pubsub = redis.client().get_async_pubsub().await?;
        pubsub.subscribe(channel(redis)).await?;
        // Revocations published while this replica was not subscribed were missed.
        on_revocation();
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            self.deliver(&payload, notifier, on_revocation);
        }
        Ok(())
    }

    fn deliver(
        &self,
        payload: &str,
        notifier: &Notifier,
        on_revocation: &(dyn Fn() + Send + Sync),
    ) {
        let mut lines = payload.lines();
        if lines.next() == Some(self.replica.to_string().as_str()) {
            return;
        }
        let mut wakes = Wakes::default();
        for line in lines {
            let fields: Vec<&str> = line.split('\t').collect();
            match fields.as_slice() {
                ["q", queue, waiters @ ..] => {
                    wakes.add(Topic::Queue((*queue).to_owned()), waiter_count(waiters));
                }
                ["rt", runtime, waiters @ ..] => {
                    if let Some(runtime) = RuntimeId::parse(runtime) {
                        wakes.add(Topic::Runtime(runtime), waiter_count(waiters));
                    }
                }
                ["cancel", runtime, task] => {
                    if let (Some(runtime), Some(task)) =
                        (RuntimeId::parse(runtime), TaskId::parse(task))
                    {
                        notifier.cancelled(runtime, task);
                    }
                }
                ["revoked"] => on_revocation(),
                _ => tracing::debug!(line, "ignoring an unknown wake-up line"),
            }
        }
        notifier.wake(&wakes);
    }
}

/// The count field of a topic line; absent or unreadable = every waiter.
fn waiter_count(fields: &[&str]) -> u32 {
    match fields {
        [count] => count.parse().unwrap_or(Wakes::ALL),
        _ => Wakes::ALL,
    }
}

fn channel(redis: &RedisLink) -> String {
    redis.key(format_args!("wake"))
}
