//! The operations a random sequence is made of, and how proptest draws them.

use super::*;

#[derive(Clone, Copy, Debug)]
pub(super) enum TokenPick {
    /// The token of the task's latest claim.
    Current,
    /// The token of the claim before that.
    Stale,
    /// A token no claim ever had.
    Unknown,
}

#[derive(Clone, Debug)]
pub(super) enum Op {
    Enqueue {
        queue: usize,
        priority: i32,
        pin: Option<usize>,
        key: Option<u8>,
        delayed: bool,
        max_attempts: u32,
        idempotency: Option<u8>,
    },
    Claim {
        runtime: usize,
        max_tasks: u32,
        auto_start: bool,
    },
    Start {
        task: usize,
        token: TokenPick,
    },
    Extend {
        task: usize,
        token: TokenPick,
    },
    Complete {
        task: usize,
        token: TokenPick,
    },
    Fail {
        task: usize,
        token: TokenPick,
        retryable: bool,
    },
    Usage {
        task: usize,
        token: TokenPick,
        value: i64,
    },
    Cancel {
        task: usize,
    },
    Cap {
        queue: usize,
        max_concurrent: u32,
    },
    Pause {
        queue: usize,
        paused: bool,
    },
    Advance {
        seconds: u64,
    },
}

fn token_pick() -> impl Strategy<Value = TokenPick> {
    prop_oneof![6 => Just(TokenPick::Current), 2 => Just(TokenPick::Stale), 1 => Just(TokenPick::Unknown)]
}

pub(super) fn op() -> impl Strategy<Value = Op> {
    let task = 0..8usize;
    prop_oneof![
        4 => (0..QUEUES, -1..=1i32, prop::option::weighted(0.2, 0..RUNTIMES), prop::option::weighted(0.3, 0..2u8),
              prop::bool::weighted(0.15), 1..=3u32, prop::option::weighted(0.15, 0..2u8))
            .prop_map(|(queue, priority, pin, key, delayed, max_attempts, idempotency)| Op::Enqueue {
                queue, priority, pin, key, delayed, max_attempts, idempotency
            }),
        4 => (0..RUNTIMES, 0..=3u32, any::<bool>())
            .prop_map(|(runtime, max_tasks, auto_start)| Op::Claim { runtime, max_tasks, auto_start }),
        3 => (task.clone(), token_pick()).prop_map(|(task, token)| Op::Start { task, token }),
        1 => (task.clone(), token_pick()).prop_map(|(task, token)| Op::Extend { task, token }),
        2 => (task.clone(), token_pick()).prop_map(|(task, token)| Op::Complete { task, token }),
        2 => (task.clone(), token_pick(), any::<bool>()).prop_map(|(task, token, retryable)| Op::Fail { task, token, retryable }),
        1 => (task.clone(), token_pick(), 0..3i64)
            .prop_map(|(task, token, value)| Op::Usage { task, token, value }),
        1 => task.prop_map(|task| Op::Cancel { task }),
        1 => (0..QUEUES, 0..=2u32).prop_map(|(queue, max_concurrent)| Op::Cap { queue, max_concurrent }),
        1 => (0..QUEUES, any::<bool>()).prop_map(|(queue, paused)| Op::Pause { queue, paused }),
        2 => prop::sample::select(&ADVANCES[..]).prop_map(|seconds| Op::Advance { seconds }),
    ]
}
