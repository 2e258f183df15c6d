//! Background tasks that come back (spec §10): a task that panics is logged, counted and
//! started again after a pause, so one bad input cannot stop the sweeper (or any other
//! background duty) for the life of the process.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metrics::Metrics;

/// Pause before a panicked task starts again, so a task that panics at once does not spin.
const RESTART_AFTER: Duration = Duration::from_secs(1);

/// Runs `make()` until it returns (it was stopped), starting it again whenever it panics.
pub fn supervise<F, Fut>(
    name: &'static str,
    stop: CancellationToken,
    metrics: Metrics,
    make: F,
) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match tokio::spawn(make()).await {
                Ok(()) => return,
                Err(error) if error.is_panic() => {
                    metrics.background_task_restarted(name);
                    tracing::error!(task = name, "a background task panicked; starting it again");
                }
                Err(_) => return,
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RESTART_AFTER) => {}
            }
        }
    })
}

/// The background duties of one server, stopped together: [`Background::stop_within`] asks
/// them to stop and waits for them to finish (a sweep in progress completes, the last signs of
/// life are recorded) before the store is left. Dropped without that, it only asks.
pub struct Background {
    stop: CancellationToken,
    metrics: Metrics,
    duties: Vec<(&'static str, JoinHandle<()>)>,
}

impl Background {
    pub fn new(stop: CancellationToken, metrics: Metrics) -> Background {
        Background {
            stop,
            metrics,
            duties: Vec::new(),
        }
    }

    /// Starts `make` under [`supervise`], stopped with the others.
    pub fn supervise<F, Fut>(&mut self, name: &'static str, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = supervise(name, self.stop.clone(), self.metrics.clone(), make);
        self.duties.push((name, handle));
    }

    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Asks every duty to stop and waits up to `grace` for all of them; the ones still running
    /// then are abandoned (aborted) and named in the answer.
    pub async fn stop_within(mut self, grace: Duration) -> Vec<&'static str> {
        self.stop.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let mut abandoned = Vec::new();
        for (name, handle) in std::mem::take(&mut self.duties) {
            let abort = handle.abort_handle();
            if tokio::time::timeout_at(deadline, handle).await.is_err() {
                abort.abort();
                tracing::warn!(
                    task = name,
                    ?grace,
                    "a background task did not stop in time"
                );
                abandoned.push(name);
            }
        }
        abandoned
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_started_again() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let supervisor = supervise(
            "test",
            CancellationToken::new(),
            Metrics::new(),
            move || {
                let runs = counted.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("bad input");
                    }
                }
            },
        );
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_waits_for_duties_to_finish_and_abandons_the_stuck() {
        let mut background = Background::new(CancellationToken::new(), Metrics::new());
        let finished = Arc::new(AtomicUsize::new(0));
        let (stop, done) = (background.stop_token().clone(), finished.clone());
        background.supervise("tidy", move || {
            let (stop, done) = (stop.clone(), done.clone());
            async move {
                stop.cancelled().await;
                // Work that must not be cut short: a sweep finishing, a last flush.
                tokio::time::sleep(Duration::from_millis(300)).await;
                done.fetch_add(1, Ordering::SeqCst);
            }
        });
        background.supervise("stuck", std::future::pending::<()>);
        let abandoned = background.stop_within(Duration::from_secs(1)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert_eq!(abandoned, vec!["stuck"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_supervisor_does_not_restart() {
        let stop = CancellationToken::new();
        stop.cancel();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let supervisor = supervise("test", stop, Metrics::new(), move || {
            let runs = counted.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                panic!("always");
            }
        });
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
