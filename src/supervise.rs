//! Background tasks that come back (spec §10): a task that panics is logged, counted and
//! started again after a pause, so one bad input cannot stop the sweeper (or any other
//! background duty) for the life of the process.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Pause before a panicked task starts again, so a task that panics at once does not spin.
const RESTART_AFTER: Duration = Duration::from_secs(1);

/// Runs `make()` until it returns (it was stopped), starting it again whenever it panics.
pub fn supervise<F, Fut>(name: &'static str, stop: CancellationToken, make: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match tokio::spawn(make()).await {
                Ok(()) => return,
                Err(error) if error.is_panic() => {
                    metrics::counter!("leasehold_background_task_restarts_total", "task" => name)
                        .increment(1);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_started_again() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let supervisor = supervise("test", CancellationToken::new(), move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("bad input");
                }
            }
        });
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_supervisor_does_not_restart() {
        let stop = CancellationToken::new();
        stop.cancel();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let supervisor = supervise("test", stop, move || {
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
