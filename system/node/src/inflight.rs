//! Work a draining node waits for before it flushes its events and exits: stream
//! generators, resumes, and the tasks that finish a client's action after its
//! acknowledgement (offline notifications). Each holds a guard while it runs.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Default)]
struct Inner {
    running: AtomicUsize,
    idle: Notify,
}

/// Counts running tasks; cheap to clone.
#[derive(Clone, Default)]
pub struct InFlight {
    inner: Arc<Inner>,
}

/// Held by a running task; dropping it ends the task's share.
pub struct Guard {
    inner: Arc<Inner>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.inner.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

impl InFlight {
    pub fn enter(&self) -> Guard {
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        Guard {
            inner: self.inner.clone(),
        }
    }

    /// Spawns `task`, counted until it ends (or panics: the guard drops with it).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let guard = self.enter();
        tokio::spawn(async move {
            let _guard = guard;
            task.await;
        });
    }

    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Waits until nothing runs or `deadline` passes; true when nothing runs.
    pub async fn idle(&self, deadline: Instant) -> bool {
        loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a task ending in between still wakes us.
            idle.as_mut().enable();
            if self.running() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.running() == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_spawned_work_and_gives_up_at_the_deadline() {
        let work = InFlight::default();
        work.spawn(tokio::time::sleep(Duration::from_millis(50)));
        assert_eq!(work.running(), 1);
        assert!(work.idle(Instant::now() + Duration::from_secs(5)).await);
        let held = work.enter();
        assert!(!work.idle(Instant::now() + Duration::from_millis(20)).await);
        drop(held);
        assert!(work.idle(Instant::now()).await);
    }
}
