//! Wake-ups: hints that work may have become claimable, for claim streams and long-polling
//! claims (spec §5). A waiter subscribes to the topics it cares about (its runtime's queues
//! and its own pin set); every change that commits wakes the topics it touches, locally and,
//! through Redis pub/sub, on every other replica. A missed wake-up costs at most one poll
//! interval: correctness never depends on them.
//!
//! Each waiter has one `Notify`, so a wake-up that arrives while the waiter is busy claiming is
//! kept as a permit rather than lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::domain::{RuntimeId, TaskId};
use crate::store::TaskMove;

/// Something a change touches: a queue (its capacity, its unpinned work) or a runtime's pin
/// set. Empty-claim cache versions and wake-ups are both keyed by topic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Topic {
    Queue(String),
    /// The runtime's pinned work, and its own claims.
    Runtime(RuntimeId),
}

impl Topic {
    /// What a task's move touches: its queue and its pin.
    pub fn for_move(moved: &TaskMove) -> impl Iterator<Item = Topic> {
        std::iter::once(Topic::Queue(moved.queue.clone()))
            .chain(moved.pinned_to.map(Topic::Runtime))
    }
}

pub fn topics_of<'a>(moves: impl IntoIterator<Item = &'a TaskMove>) -> BTreeSet<Topic> {
    moves.into_iter().flat_map(Topic::for_move).collect()
}

/// Cancellations waiting to be pushed to one stream; when a stream falls this far behind,
/// further ones are dropped (the worker's status polling still sees them).
const CANCELLATION_BACKLOG: usize = 256;

#[derive(Default)]
pub struct Notifier {
    waiters: Mutex<HashMap<Topic, Vec<Arc<Notify>>>>,
    /// Open claim streams per runtime, for pushing cancellations of the tasks it holds.
    holders: Mutex<HashMap<RuntimeId, Vec<mpsc::Sender<TaskId>>>>,
}

impl Notifier {
    pub fn new() -> Arc<Notifier> {
        Arc::new(Notifier::default())
    }

    /// Wakes everyone waiting on any of `topics`.
    pub fn wake(&self, topics: &BTreeSet<Topic>) {
        let waiters = lock(&self.waiters);
        for topic in topics {
            for waiter in waiters.get(topic).into_iter().flatten() {
                waiter.notify_one();
            }
        }
    }

    /// A waiter for `topics`, until the subscription is dropped.
    pub fn subscribe(self: &Arc<Self>, topics: Vec<Topic>) -> Subscription {
        let notify = Arc::new(Notify::new());
        let mut waiters = lock(&self.waiters);
        for topic in &topics {
            waiters
                .entry(topic.clone())
                .or_default()
                .push(notify.clone());
        }
        Subscription {
            notifier: self.clone(),
            notify,
            topics,
        }
    }

    /// Tells every open stream of `runtime` that it should drop `task`.
    pub fn cancelled(&self, runtime: RuntimeId, task: TaskId) {
        let mut holders = lock(&self.holders);
        if let Some(streams) = holders.get_mut(&runtime) {
            streams.retain(|stream| !stream.is_closed());
            for stream in streams.iter() {
                if stream.try_send(task).is_err() {
                    tracing::warn!(%runtime, %task, "a claim stream is too far behind to be told of a cancellation");
                }
            }
        }
    }

    /// Cancellations of tasks `runtime` holds arrive on the returned receiver while it is open.
    pub fn hold(&self, runtime: RuntimeId) -> mpsc::Receiver<TaskId> {
        let (sender, receiver) = mpsc::channel(CANCELLATION_BACKLOG);
        let mut holders = lock(&self.holders);
        let streams = holders.entry(runtime).or_default();
        streams.retain(|stream| !stream.is_closed());
        streams.push(sender);
        receiver
    }
}

/// Granularity of [`DueWakeups`]: tasks coming due within one slot share one wake-up.
const DUE_SLOT: Duration = Duration::from_millis(10);

/// Wake-ups owed later: a delayed or backed-off task becomes claimable when its time comes,
/// with no write to announce it. One background loop announces them as they come due; they are
/// grouped in 10ms slots, so memory grows with distinct moments, not with tasks. (A restart
/// forgets them; the sweeper's stage 5 and the poll interval remain.)
pub struct DueWakeups {
    origin: Instant,
    /// Slot (multiples of `DUE_SLOT` after `origin`) → topics.
    slots: Mutex<BTreeMap<u64, BTreeSet<Topic>>>,
    changed: Notify,
}

impl Default for DueWakeups {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            slots: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
        }
    }
}

impl DueWakeups {
    /// Owes a wake-up of `topics` `after` from now.
    pub fn schedule(&self, after: Duration, topics: impl IntoIterator<Item = Topic>) {
        let since_origin = self.origin.elapsed() + after;
        // Rounded up: never early.
        let slot = u64::try_from(since_origin.as_millis().div_ceil(DUE_SLOT.as_millis()))
            .unwrap_or(u64::MAX);
        lock(&self.slots).entry(slot).or_default().extend(topics);
        self.changed.notify_one();
    }

    /// Waits until the earliest owed wake-up comes due; returns every topic due by then.
    pub async fn next_due(&self) -> BTreeSet<Topic> {
        loop {
            let earliest = lock(&self.slots).keys().next().copied();
            let Some(slot) = earliest else {
                self.changed.notified().await;
                continue;
            };
            let due_at = self.origin + DUE_SLOT * u32::try_from(slot).unwrap_or(u32::MAX);
            tokio::select! {
                () = tokio::time::sleep_until(due_at) => {}
                () = self.changed.notified() => continue,
            }
            let mut slots = lock(&self.slots);
            let later = slots.split_off(&(slot + 1));
            let due = std::mem::replace(&mut *slots, later);
            return due.into_values().flatten().collect();
        }
    }
}

pub struct Subscription {
    notifier: Arc<Notifier>,
    notify: Arc<Notify>,
    topics: Vec<Topic>,
}

impl Subscription {
    /// Resolves at the next wake-up (at once if one arrived since the last).
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut waiters = lock(&self.notifier.waiters);
        for topic in &self.topics {
            if let Some(list) = waiters.get_mut(topic) {
                list.retain(|waiter| !Arc::ptr_eq(waiter, &self.notify));
                if list.is_empty() {
                    waiters.remove(topic);
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str) -> Topic {
        Topic::Queue(name.into())
    }

    #[tokio::test]
    async fn a_wake_up_before_waiting_is_kept() {
        let notifier = Notifier::new();
        let subscription = notifier.subscribe(vec![queue("q")]);
        notifier.wake(&BTreeSet::from([queue("q")]));
        tokio::time::timeout(std::time::Duration::from_secs(1), subscription.woken())
            .await
            .expect("the earlier wake-up was kept");
    }

    #[tokio::test]
    async fn other_topics_do_not_wake() {
        let notifier = Notifier::new();
        let subscription = notifier.subscribe(vec![queue("q")]);
        notifier.wake(&BTreeSet::from([queue("other")]));
        let woken =
            tokio::time::timeout(std::time::Duration::from_millis(50), subscription.woken()).await;
        assert!(woken.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn owed_wake_ups_come_due_in_order_and_not_early() {
        let due = DueWakeups::default();
        due.schedule(Duration::from_secs(5), [queue("late")]);
        due.schedule(Duration::from_secs(1), [queue("early")]);
        let started = Instant::now();

        assert_eq!(due.next_due().await, BTreeSet::from([queue("early")]));
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(due.next_due().await, BTreeSet::from([queue("late")]));
        assert!(started.elapsed() >= Duration::from_secs(5));
    }

    #[test]
    fn a_dropped_subscription_leaves_nothing_behind() {
        let notifier = Notifier::new();
        drop(notifier.subscribe(vec![queue("q"), queue("r")]));
        assert!(lock(&notifier.waiters).is_empty());
    }
}
