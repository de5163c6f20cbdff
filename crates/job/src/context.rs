//! A running job's side: the [`JobContext`] its `run` gets (pause points, progress, rate
//! limit, ready, I/O errors), and the supervisor that runs it as a task of its own and
//! abandons it after a force cancel that does not return within the bound.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::driver::*;
use crate::manager::*;
use crate::status::JobStatus;

/// Runs the job's `run` as its own task; after a force cancel it gets `bound` to return, then
/// it is abandoned.
pub(crate) async fn supervise(
    driver: Arc<dyn JobDriver>,
    ctx: JobContext,
    shared: &Shared,
    bound: Duration,
) -> Result<(), String> {
    let shared_run = ctx.shared.clone();
    let manager = ctx.manager.clone();
    let mut body = Box::pin(async move { driver.run(ctx).await });
    // Counts the polls of `run` for `JobManager::quiesce`: a poll that ends is the job waiting
    // again (or returning).
    let observed = std::future::poll_fn(move |cx| {
        let r = std::future::Future::poll(body.as_mut(), cx);
        if r.is_ready() {
            shared_run.returned.store(true, Ordering::SeqCst);
        }
        shared_run.polls.fetch_add(1, Ordering::SeqCst);
        manager.inner.stir.notify_waiters();
        r
    });
    let mut run = tokio::spawn(observed);
    let mut cancelled = shared.force_cancel.subscribe();
    let cancel_requested = async move {
        let _ = cancelled.wait_for(|c| *c).await.map(|_| ());
    };
    let joined = tokio::select! {
        r = &mut run => r,
        () = cancel_requested => {
            match tokio::time::timeout(bound, &mut run).await {
                Ok(r) => r,
                Err(_) => {
                    run.abort();
                    return Err("Operation canceled".into());
                }
            }
        }
    };
    match joined {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err("the job failed unexpectedly (internal error)".into()),
        Err(_) => Err("Operation canceled".into()),
    }
}

/// What a running job uses to cooperate: pause points, cancel checks, progress, speed.
#[derive(Clone)]
pub struct JobContext {
    pub(crate) manager: JobManager,
    pub(crate) id: String,
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext").field("id", &self.id).finish()
    }
}

impl JobContext {
    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Force-cancelled: stop as soon as possible.
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Any cancel requested, soft included (a ready mirror finishes on a soft cancel).
    pub fn cancel_requested(&self) -> bool {
        self.shared.cancel_requested.load(Ordering::SeqCst)
    }

    /// Adds `n` to the progress done.
    pub fn progress_update(&self, n: u64) {
        self.shared.current.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the remaining work to `n` (total = done + n).
    pub fn progress_set_remaining(&self, n: u64) {
        let done = self.shared.current.load(Ordering::Relaxed);
        self.shared.total.store(done + n, Ordering::Relaxed);
    }

    /// Adds `n` to the total.
    pub fn progress_increase_remaining(&self, n: u64) {
        self.shared.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Stops here while a pause is requested (unless force-cancelled). A user pause shows as
    /// `paused` (or `standby` when ready); an internal one shows nothing.
    pub async fn pause_point(&self) {
        if !self.shared.pause_requested.load(Ordering::SeqCst) || self.is_cancelled() {
            return;
        }
        loop {
            let notified = self.shared.wake.notified();
            {
                let mut st = self.manager.lock().await;
                let Some(i) = st.jobs.iter().position(|j| j.id == self.id) else {
                    return;
                };
                let job = &mut st.jobs[i];
                if job.pause_count == 0 || job.force_cancel {
                    job.parked = false;
                    self.shared.idle.store(false, Ordering::Relaxed);
                    if let Some(back) = job.resume_to.take() {
                        transition(&self.manager.inner.events, job, back);
                    }
                    return;
                }
                job.parked = true;
                self.shared.idle.store(true, Ordering::Relaxed);
                if job.user_paused {
                    self.manager.show_paused(job);
                }
            }
            notified.await;
        }
    }

    /// Awaits `f`, the job's own I/O, showing the job as not busy meanwhile, as QEMU's job
    /// yields while its copy runs.
    pub async fn io_wait<F: std::future::Future>(&self, f: F) -> F::Output {
        self.shared.io_wait.store(true, Ordering::Relaxed);
        let out = f.await;
        self.shared.io_wait.store(false, Ordering::Relaxed);
        out
    }

    /// Sleeps for `d` unless woken by a pause, cancel or speed change; then a pause point.
    pub async fn sleep(&self, d: Duration) {
        if !d.is_zero() && !self.is_cancelled() {
            self.shared.idle.store(true, Ordering::Relaxed);
            let _ = tokio::time::timeout(d, self.shared.wake.notified()).await;
            self.shared.idle.store(false, Ordering::Relaxed);
        }
        self.pause_point().await;
    }

    /// Waits until the speed limit allows the next chunk (a pause point too).
    pub async fn rate_wait(&self) {
        loop {
            let wait = {
                let r = lock_std(&self.shared.rate);
                r.not_before
                    .map(|t| t.saturating_duration_since(Instant::now()))
                    .unwrap_or_default()
            };
            if wait.is_zero() || self.is_cancelled() {
                self.pause_point().await;
                return;
            }
            self.sleep(wait).await;
        }
    }

    /// The speed limit now, bytes/s (0: none).
    pub fn speed(&self) -> u64 {
        lock_std(&self.shared.rate).speed
    }

    /// Charges `n` bytes just copied to the speed limit.
    pub fn rate_charge(&self, n: u64) {
        let mut r = lock_std(&self.shared.rate);
        let now = Instant::now();
        let delay = r.limit.charge_at(n, now);
        r.not_before = (!delay.is_zero()).then(|| now + delay);
    }

    /// Converged: `ready` and BLOCK_JOB_READY.
    pub async fn ready(&self) {
        let mut st = self.manager.lock().await;
        let Some(job) = st.jobs.iter_mut().find(|j| j.id == self.id) else {
            return;
        };
        if job.status == JobStatus::Running {
            transition(&self.manager.inner.events, job, JobStatus::Ready);
            if job.block {
                (self.manager.inner.events)(JobEvent::Ready(job.info()));
            }
        }
    }

    /// Reports an I/O error with the action taken (BLOCK_JOB_ERROR, rate-limited). With
    /// [`ErrorAction::Stop`] the job is paused as if by the user, with io-status failed or
    /// nospace, and this waits until it is resumed or cancelled.
    pub async fn io_error(&self, operation: IoOperation, action: ErrorAction, nospace: bool) {
        let send = {
            let mut last = lock_std(&self.shared.last_error_event);
            let now = Instant::now();
            let repeat = matches!(*last, Some((o, a, t)) if o == operation && a == action
                && now.duration_since(t) < ERROR_EVENT_INTERVAL);
            if !repeat {
                *last = Some((operation, action, now));
            }
            !repeat
        };
        let mut st = self.manager.lock().await;
        let Some(job) = st.jobs.iter_mut().find(|j| j.id == self.id) else {
            return;
        };
        if send {
            (self.manager.inner.events)(JobEvent::Error {
                id: self.id.clone(),
                operation,
                action,
            });
        }
        if action == ErrorAction::Stop && !job.user_paused {
            job.user_paused = true;
            job.pause_count += 1;
            job.io_status = if nospace {
                IoStatus::NoSpace
            } else {
                IoStatus::Failed
            };
            job.set_pause_requested();
        }
        drop(st);
        if action == ErrorAction::Stop {
            self.shared.error_stopped.store(true, Ordering::SeqCst);
            self.pause_point().await;
            self.shared.error_stopped.store(false, Ordering::SeqCst);
        }
    }
}
