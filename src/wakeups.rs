//! Wake-ups: hints that work may have become claimable, for claim streams and long-polling
//! claims (spec §5). A waiter subscribes to the topics it cares about (its runtime's queues
//! and its own pin set); every change that commits wakes, on each topic it touches, as many
//! waiters as it moved tasks there ([`Wakes`]), locally and, through Redis pub/sub, on every
//! other replica. A missed wake-up costs at most one poll interval: correctness never depends
//! on them.
//!
//! Each waiter has one `Notify`, so a wake-up that arrives while the waiter is busy claiming is
//! kept as a permit rather than lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// The topics a change touched, and how many waiters of each it may satisfy: one per task it
/// moved (an enqueued task is claimed by one waiter, a finished one frees one slot), or all of
/// them (a queue's cap or pause changed). Waking more would send every idle worker of a queue
/// to PostgreSQL for each task, and all but one would find nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wakes(BTreeMap<Topic, u32>);

impl Wakes {
    /// Every waiter of the topic.
    pub const ALL: u32 = u32::MAX;

    /// Every waiter of each of `topics`.
    pub fn all(topics: impl IntoIterator<Item = Topic>) -> Wakes {
        let mut wakes = Wakes::default();
        for topic in topics {
            wakes.add(topic, Wakes::ALL);
        }
        wakes
    }

    /// One waiter per task moved, for each topic the move touches.
    pub fn of_moves<'a>(moves: impl IntoIterator<Item = &'a TaskMove>) -> Wakes {
        let mut wakes = Wakes::default();
        for moved in moves {
            wakes.add_move(moved);
        }
        wakes
    }

    pub fn add_move(&mut self, moved: &TaskMove) {
        for topic in Topic::for_move(moved) {
            self.add(topic, 1);
        }
    }

    pub fn add(&mut self, topic: Topic, waiters: u32) {
        let count = self.0.entry(topic).or_default();
        *count = count.saturating_add(waiters);
    }

    pub fn merge(&mut self, other: Wakes) {
        for (topic, waiters) in other.0 {
            self.add(topic, waiters);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn topics(&self) -> impl Iterator<Item = &Topic> {
        self.0.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Topic, u32)> {
        self.0.iter().map(|(topic, waiters)| (topic, *waiters))
    }
}

/// Cancellations waiting to be pushed to one stream; when a stream falls this far behind,
/// further ones are dropped (the worker's status polling still sees them).
const CANCELLATION_BACKLOG: usize = 256;

/// One subscription's wake-up slot.
#[derive(Default)]
struct Waiter {
    notify: Notify,
    /// Waiting in [`Subscription::woken`] right now, and not yet picked by a wake-up.
    idle: AtomicBool,
}

/// A topic's waiters; wake-ups start at `next` and rotate, so work is spread over them.
#[derive(Default)]
struct TopicWaiters {
    waiters: Vec<Arc<Waiter>>,
    next: usize,
}

#[derive(Default)]
pub struct Notifier {
    waiters: Mutex<HashMap<Topic, TopicWaiters>>,
    /// Open claim streams per runtime, for pushing cancellations of the tasks it holds.
    holders: Mutex<HashMap<RuntimeId, Vec<mpsc::Sender<TaskId>>>>,
}

impl Notifier {
    pub fn new() -> Arc<Notifier> {
        Arc::new(Notifier::default())
    }

    /// Wakes as many waiters of each topic as `wakes` says: idle ones first (they claim at
    /// once), then busy ones, whose wake-up is kept until they wait again (one of them may
    /// have just missed the change).
    pub fn wake(&self, wakes: &Wakes) {
        let mut waiters = lock(&self.waiters);
        for (topic, count) in wakes.iter() {
            if let Some(topic_waiters) = waiters.get_mut(topic) {
                topic_waiters.wake(count);
            }
        }
    }

    /// A waiter for `topics`, until the subscription is dropped.
    pub fn subscribe(self: &Arc<Self>, topics: Vec<Topic>) -> Subscription {
        let waiter = Arc::new(Waiter::default());
        let mut waiters = lock(&self.waiters);
        for topic in &topics {
            waiters
                .entry(topic.clone())
                .or_default()
                .waiters
                .push(waiter.clone());
        }
        Subscription {
            notifier: self.clone(),
            waiter,
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
    /// Slot (multiples of `DUE_SLOT` after `origin`) → what comes due in it.
    slots: Mutex<BTreeMap<u64, Wakes>>,
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
    /// Owes the wake-ups of a task that becomes claimable `after` from now.
    pub fn schedule(&self, after: Duration, moved: &TaskMove) {
        let since_origin = self.origin.elapsed() + after;
        // Rounded up: never early.
        let slot = u64::try_from(since_origin.as_millis().div_ceil(DUE_SLOT.as_millis()))
            .unwrap_or(u64::MAX);
        lock(&self.slots).entry(slot).or_default().add_move(moved);
        self.changed.notify_one();
    }

    /// Waits until the earliest owed wake-up comes due; returns every wake-up due by then.
    pub async fn next_due(&self) -> Wakes {
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
            let mut wakes = Wakes::default();
            for slot in due.into_values() {
                wakes.merge(slot);
            }
            return wakes;
        }
    }
}

impl TopicWaiters {
    fn wake(&mut self, count: u32) {
        let total = self.waiters.len();
        let wanted = usize::try_from(count).unwrap_or(usize::MAX).min(total);
        let start = self.next % total.max(1);
        self.next = start + 1;
        let in_turn = || (0..total).map(|offset| &self.waiters[(start + offset) % total]);
        let mut woken = 0;
        for waiter in in_turn() {
            if woken == wanted {
                return;
            }
            if waiter.idle.swap(false, Ordering::AcqRel) {
                waiter.notify.notify_one();
                woken += 1;
            }
        }
        for waiter in in_turn().take(wanted - woken) {
            waiter.notify.notify_one();
        }
    }
}

pub struct Subscription {
    notifier: Arc<Notifier>,
    waiter: Arc<Waiter>,
    topics: Vec<Topic>,
}

impl Subscription {
    /// Resolves at the next wake-up (at once if one arrived since the last). While it waits,
    /// the waiter counts as idle: the first to be picked for new work.
    pub async fn woken(&self) {
        let _idle = IdleWhileWaiting::new(&self.waiter.idle);
        self.waiter.notify.notified().await;
    }
}

/// Marks a waiter idle for as long as it waits.
struct IdleWhileWaiting<'a>(&'a AtomicBool);

impl<'a> IdleWhileWaiting<'a> {
    fn new(idle: &'a AtomicBool) -> Self {
        idle.store(true, Ordering::Release);
        Self(idle)
    }
}

impl Drop for IdleWhileWaiting<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut waiters = lock(&self.notifier.waiters);
        for topic in &self.topics {
            if let Some(topic_waiters) = waiters.get_mut(topic) {
                topic_waiters
                    .waiters
                    .retain(|waiter| !Arc::ptr_eq(waiter, &self.waiter));
                if topic_waiters.waiters.is_empty() {
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

    fn one(topic: Topic) -> Wakes {
        let mut wakes = Wakes::default();
        wakes.add(topic, 1);
        wakes
    }

    fn moved_in(queue_name: &str) -> TaskMove {
        TaskMove {
            task_id: TaskId::new_random(),
            queue: queue_name.into(),
            pinned_to: None,
            status: crate::domain::TaskStatus::Queued,
            available_at: chrono::Utc::now(),
        }
    }

    /// Whether `subscription` has a wake-up waiting (without waiting for one).
    async fn was_woken(subscription: &Subscription) -> bool {
        tokio::time::timeout(Duration::from_millis(20), subscription.woken())
            .await
            .is_ok()
    }

    /// Lets each subscription reach its wait, as a stream with nothing to do does.
    fn wait_idle(subscriptions: &[Subscription]) -> Vec<impl Future<Output = ()> + '_> {
        let mut waits: Vec<_> = subscriptions
            .iter()
            .map(|subscription| Box::pin(subscription.woken()))
            .collect();
        let waker = futures::task::noop_waker();
        let mut context = std::task::Context::from_waker(&waker);
        for wait in &mut waits {
            assert!(wait.as_mut().poll(&mut context).is_pending());
        }
        waits
    }

    #[tokio::test]
    async fn a_wake_up_before_waiting_is_kept() {
        let notifier = Notifier::new();
        let subscription = notifier.subscribe(vec![queue("q")]);
        notifier.wake(&one(queue("q")));
        assert!(
            was_woken(&subscription).await,
            "the earlier wake-up was kept"
        );
    }

    #[tokio::test]
    async fn other_topics_do_not_wake() {
        let notifier = Notifier::new();
        let subscription = notifier.subscribe(vec![queue("q")]);
        notifier.wake(&one(queue("other")));
        assert!(!was_woken(&subscription).await);
    }

    #[tokio::test]
    async fn one_task_wakes_one_idle_waiter_and_the_next_wakes_another() {
        let notifier = Notifier::new();
        let subscriptions: Vec<_> = (0..4)
            .map(|_| notifier.subscribe(vec![queue("q")]))
            .collect();
        let waits = wait_idle(&subscriptions);

        notifier.wake(&one(queue("q")));
        notifier.wake(&one(queue("q")));
        drop(waits);

        let mut woken = 0;
        for subscription in &subscriptions {
            woken += usize::from(was_woken(subscription).await);
        }
        assert_eq!(woken, 2, "two tasks, two waiters");
    }

    #[tokio::test]
    async fn idle_waiters_are_picked_before_busy_ones() {
        let notifier = Notifier::new();
        let busy = notifier.subscribe(vec![queue("q")]);
        let idle = [notifier.subscribe(vec![queue("q")])];
        let waits = wait_idle(&idle);

        notifier.wake(&one(queue("q")));
        drop(waits);

        assert!(was_woken(&idle[0]).await);
        assert!(!was_woken(&busy).await);
    }

    #[tokio::test]
    async fn with_no_idle_waiter_a_busy_one_keeps_the_wake_up() {
        let notifier = Notifier::new();
        let busy = notifier.subscribe(vec![queue("q")]);
        notifier.wake(&one(queue("q")));
        assert!(was_woken(&busy).await);
    }

    #[tokio::test]
    async fn a_cap_change_wakes_every_waiter() {
        let notifier = Notifier::new();
        let subscriptions: Vec<_> = (0..3)
            .map(|_| notifier.subscribe(vec![queue("q")]))
            .collect();
        notifier.wake(&Wakes::all([queue("q")]));
        for subscription in &subscriptions {
            assert!(was_woken(subscription).await);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn owed_wake_ups_come_due_in_order_and_not_early() {
        let due = DueWakeups::default();
        due.schedule(Duration::from_secs(5), &moved_in("late"));
        due.schedule(Duration::from_secs(1), &moved_in("early"));
        let started = Instant::now();

        assert_eq!(due.next_due().await, one(queue("early")));
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(due.next_due().await, one(queue("late")));
        assert!(started.elapsed() >= Duration::from_secs(5));
    }

    #[test]
    fn a_dropped_subscription_leaves_nothing_behind() {
        let notifier = Notifier::new();
        drop(notifier.subscribe(vec![queue("q"), queue("r")]));
        assert!(lock(&notifier.waiters).is_empty());
    }
}
