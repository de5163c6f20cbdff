//! The job manager: every job's state, the verbs, transactions, and the events they cause.
//! Job drivers and their vocabulary are in `driver`, a running job's context in `context`,
//! the verbs in `verbs`, the end of a job (waiting, finalize, abort) in `finalize`.
//!
//! ```text
//!  control plane ── create/start/pause/resume/cancel/complete/finalize/dismiss ──┐
//!                                                                              ▼
//!                                                          State (one async mutex) ──▶ events
//!                                                                              ▲     (in order)
//!  job task ── run(ctx): pause points, progress, rate limit, ready ─────────────┘
//!      └── run returns ─▶ completed: waiting → (whole txn waiting) → pending → finalize
//!                                    or aborting → (whole txn done) → abort → concluded
//! ```
//!
//! All transitions happen under one lock and emit `JOB_STATUS_CHANGE` through the one
//! `transition` function, so events come out in the order the transitions happen. The
//! driver callbacks of finalization (prepare, commit, abort, clean) run without that lock, so
//! a long one (a graph edit that drains a busy node) never blocks `query-jobs` or another
//! job's verbs; they may call back into the manager.
//!
//! Where this differs from QEMU, on purpose:
//! - Internal pauses ([`JobManager::pause_internal`], e.g. while the graph changes) stop a job
//!   at its next pause point without a status change; QEMU flaps paused/running.
//! - A force-cancelled job whose `run` does not return within the cancel bound is abandoned
//!   (its future is dropped) and concludes as cancelled; QEMU can wait forever on a stuck
//!   target.
//! - Repeated identical error events of one job are sent at most once per
//!   [`ERROR_EVENT_INTERVAL`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Mutex, MutexGuard, Notify};

use crate::rate::RateLimit;
use crate::status::{transition_allowed, JobStatus, JobVerb};

use crate::context::supervise;
pub use crate::context::JobContext;
use crate::driver::refused;
pub use crate::driver::{
    ErrorAction, EventSink, IoOperation, IoStatus, JobDriver, JobError, JobEvent, JobInfo,
    JobOptions, TxnId,
};
use crate::verbs::check;

/// Repeated `BLOCK_JOB_ERROR` events of one job (same operation and action) closer together
/// than this are dropped.
pub const ERROR_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// Default time a force-cancelled job gets to return before it is abandoned.
pub const DEFAULT_CANCEL_BOUND: Duration = Duration::from_secs(5);

/// Data shared between the manager and the running job without the lock.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) current: AtomicU64,
    pub(crate) total: AtomicU64,
    /// Some pause is requested: the job checks at its next pause point.
    pub(crate) pause_requested: AtomicBool,
    /// Force-cancelled.
    pub(crate) cancelled: AtomicBool,
    /// Any cancel requested (soft or forced).
    pub(crate) cancel_requested: AtomicBool,
    /// Stopped at a pause point or sleeping.
    pub(crate) idle: AtomicBool,
    /// Waiting for its own I/O (QEMU's job has yielded until its copy calls back): not
    /// `busy` in the queries, but not idle either (a wake-up is noticed only after the I/O).
    pub(crate) io_wait: AtomicBool,
    pub(crate) wake: Notify,
    pub(crate) force_cancel: watch::Sender<bool>,
    pub(crate) rate: StdMutex<Rate>,
    pub(crate) last_error_event: StdMutex<Option<(IoOperation, ErrorAction, Instant)>>,
    /// Polls of `run` so far (see [`JobManager::quiesce`]).
    pub(crate) polls: AtomicU64,
    /// `run` has to be polled up to here before the job has reacted to its last wake-up.
    pub(crate) kick_mark: AtomicU64,
    /// `run` returned.
    pub(crate) returned: AtomicBool,
    /// The job's task ended: what followed `run` (waiting, finalization) is done.
    pub(crate) finished: AtomicBool,
    /// Paused by an I/O error (`stop`/`enospc`).
    pub(crate) error_stopped: AtomicBool,
}

impl Shared {
    /// Wakes the job. A job that was idle (sleeping or parked) has to run until it waits
    /// again before the control plane replies: QEMU enters an idle job's coroutine inside
    /// the command, so what it does then (pausing, ending) comes before the reply. A busy
    /// job only notices later, in QEMU too.
    ///
    /// A job paused by an I/O error is the exception: QEMU's backup goes back to its copy
    /// before it looks at a cancel, so the events of a cancel come after the reply there.
    pub(crate) fn kick(&self) {
        if self.idle.load(Ordering::SeqCst) && !self.error_stopped.load(Ordering::SeqCst) {
            let next = self.polls.load(Ordering::SeqCst) + 1;
            self.kick_mark.fetch_max(next, Ordering::SeqCst);
        }
        self.wake.notify_one();
    }

    /// Still owes a reaction to a wake-up, or is between `run` returning and its task's end.
    fn unsettled(&self) -> bool {
        if self.finished.load(Ordering::SeqCst) {
            return false;
        }
        self.returned.load(Ordering::SeqCst)
            || self.kick_mark.load(Ordering::SeqCst) > self.polls.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
pub(crate) struct Rate {
    pub(crate) limit: RateLimit,
    pub(crate) speed: u64,
    pub(crate) not_before: Option<Instant>,
}

pub(crate) struct JobRec {
    pub(crate) id: String,
    pub(crate) driver: Arc<dyn JobDriver>,
    pub(crate) block: bool,
    pub(crate) status: JobStatus,
    pub(crate) txn: TxnId,
    pub(crate) in_txn: bool,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
    pub(crate) started: bool,
    pub(crate) user_paused: bool,
    /// User, error and internal pauses.
    pub(crate) pause_count: u32,
    /// The job is parked at a pause point.
    pub(crate) parked: bool,
    /// The status it had before a visible pause (running or ready).
    pub(crate) resume_to: Option<JobStatus>,
    pub(crate) cancelled: bool,
    pub(crate) force_cancel: bool,
    /// `run` has returned.
    pub(crate) run_done: bool,
    pub(crate) error: Option<String>,
    pub(crate) io_status: IoStatus,
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for JobRec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobRec")
            .field("id", &self.id)
            .field("status", &self.status)
            .finish()
    }
}

impl JobRec {
    pub(crate) fn info(&self) -> JobInfo {
        let speed = lock_std(&self.shared.rate).speed;
        JobInfo {
            id: self.id.clone(),
            job_type: self.driver.job_type(),
            block: self.block,
            status: self.status,
            current: self.shared.current.load(Ordering::Relaxed),
            total: self.shared.total.load(Ordering::Relaxed),
            speed,
            error: self.error.clone(),
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            paused: self.user_paused,
            busy: self.started
                && !self.run_done
                && !self.shared.idle.load(Ordering::Relaxed)
                && !self.shared.io_wait.load(Ordering::Relaxed),
            io_status: self.io_status,
        }
    }

    pub(crate) fn set_pause_requested(&self) {
        self.shared
            .pause_requested
            .store(self.pause_count > 0, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) jobs: Vec<JobRec>,
    pub(crate) aborting_txns: Vec<TxnId>,
    pub(crate) next_txn: u64,
    /// Transactions whose finalization was decided and waits to run (see `finalize`).
    pub(crate) deferred: std::collections::VecDeque<(TxnId, bool)>,
    /// Transactions being finalized right now, their drivers' callbacks running unlocked.
    pub(crate) finalizing: Vec<TxnId>,
}

impl State {
    pub(crate) fn get(&self, id: &str) -> Option<&JobRec> {
        self.jobs.iter().find(|j| j.id == id)
    }

    pub(crate) fn idx(&self, id: &str) -> Result<usize, JobError> {
        self.jobs
            .iter()
            .position(|j| j.id == id)
            .ok_or(JobError::NotFound)
    }

    /// The jobs of `txn`, newest first: QEMU keeps a transaction's jobs newest first and
    /// walks them in that order (pending, finalization, abort), so events come in that order.
    pub(crate) fn members(&self, txn: TxnId) -> Vec<usize> {
        (0..self.jobs.len())
            .rev()
            .filter(|&i| self.jobs[i].in_txn && self.jobs[i].txn == txn)
            .collect()
    }
}

pub(crate) fn lock_std<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct Inner {
    pub(crate) state: Mutex<State>,
    pub(crate) events: EventSink,
    pub(crate) cancel_bound: Duration,
    /// Some job ran (a poll of `run`, its task's end, a finalization): for
    /// [`JobManager::quiesce`].
    pub(crate) stir: Notify,
}

/// Owns every job. Cheap to clone.
#[derive(Clone)]
pub struct JobManager {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for JobManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobManager").finish_non_exhaustive()
    }
}

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.` and `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// The one transition function: checks the table, then emits JOB_STATUS_CHANGE.
pub(crate) fn transition(events: &EventSink, job: &mut JobRec, to: JobStatus) {
    if !transition_allowed(job.status, to) {
        // A bug in the manager, never the user's doing: report it and carry on rather than
        // take the daemon down.
        tracing::error!(
            target: "blockjobd",
            "job '{}': transition {} -> {} is not in the table",
            job.id,
            job.status,
            to
        );
        debug_assert!(false, "illegal job transition {} -> {}", job.status, to);
    }
    tracing::debug!(target: "job_state_transition", id = %job.id, from = %job.status, to = %to);
    job.status = to;
    events(JobEvent::StatusChange {
        id: job.id.clone(),
        status: to,
    });
}

impl JobManager {
    /// A manager sending its events to `events`.
    pub fn new(events: EventSink) -> JobManager {
        JobManager::with_cancel_bound(events, DEFAULT_CANCEL_BOUND)
    }

    /// A manager whose force-cancelled jobs are abandoned after `cancel_bound`.
    pub fn with_cancel_bound(events: EventSink, cancel_bound: Duration) -> JobManager {
        JobManager {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                events,
                cancel_bound,
                stir: Notify::new(),
            }),
        }
    }

    pub(crate) async fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().await
    }

    /// A new transaction for jobs created together (`completion-mode=grouped`).
    pub async fn new_txn(&self) -> TxnId {
        let mut st = self.lock().await;
        st.next_txn += 1;
        TxnId(st.next_txn)
    }

    /// Creates a job (status `created`); it does nothing until [`start`](Self::start).
    pub async fn create(
        &self,
        driver: Arc<dyn JobDriver>,
        opts: JobOptions,
    ) -> Result<(), JobError> {
        let mut st = self.lock().await;
        if !id_wellformed(&opts.id) {
            return Err(refused(format!("Invalid job ID '{}'", opts.id)));
        }
        if st.get(&opts.id).is_some() {
            return Err(refused(format!("Job ID '{}' already in use", opts.id)));
        }
        let txn = match opts.txn {
            Some(t) => t,
            None => {
                st.next_txn += 1;
                TxnId(st.next_txn)
            }
        };
        let (force_cancel, _) = watch::channel(false);
        let mut rate = RateLimit::new();
        rate.set_speed(opts.speed);
        let shared = Arc::new(Shared {
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            pause_requested: AtomicBool::new(true),
            cancelled: AtomicBool::new(false),
            cancel_requested: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            io_wait: AtomicBool::new(false),
            wake: Notify::new(),
            force_cancel,
            rate: StdMutex::new(Rate {
                limit: rate,
                speed: opts.speed,
                not_before: None,
            }),
            last_error_event: StdMutex::new(None),
            polls: AtomicU64::new(0),
            kick_mark: AtomicU64::new(0),
            returned: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            error_stopped: AtomicBool::new(false),
        });
        let mut rec = JobRec {
            id: opts.id,
            driver,
            block: opts.block,
            status: JobStatus::Undefined,
            txn,
            in_txn: true,
            auto_finalize: opts.auto_finalize,
            auto_dismiss: opts.auto_dismiss,
            started: false,
            user_paused: false,
            pause_count: 1,
            parked: false,
            resume_to: None,
            cancelled: false,
            force_cancel: false,
            run_done: false,
            error: None,
            io_status: IoStatus::Ok,
            shared,
        };
        transition(&self.inner.events, &mut rec, JobStatus::Created);
        st.jobs.push(rec);
        Ok(())
    }

    /// Starts a created job: `running`, and its `run` begins.
    pub async fn start(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        let job = &mut st.jobs[i];
        if job.started || job.status != JobStatus::Created {
            return Ok(());
        }
        job.started = true;
        job.pause_count -= 1;
        job.set_pause_requested();
        // QEMU runs a new job's coroutine up to its first wait inside the command.
        job.shared.kick_mark.store(1, Ordering::SeqCst);
        transition(&self.inner.events, job, JobStatus::Running);
        let ctx = JobContext {
            manager: self.clone(),
            id: job.id.clone(),
            shared: job.shared.clone(),
        };
        let driver = job.driver.clone();
        let shared = job.shared.clone();
        let mgr = self.clone();
        let id = job.id.clone();
        let bound = self.inner.cancel_bound;
        let span = tracing::debug_span!(target: "job", "job", id = %job.id, r#type = job.driver.job_type());
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = supervise(driver, ctx, &shared, bound).await;
                if let Err(e) = &result {
                    tracing::debug!(target: "job", "failed: {e}");
                }
                mgr.run_finished(&id, result).await;
                shared.finished.store(true, Ordering::SeqCst);
                mgr.inner.stir.notify_waiters();
            },
            span,
        ));
        Ok(())
    }

    /// Every job, newest first.
    pub async fn query(&self) -> Vec<JobInfo> {
        let st = self.lock().await;
        st.jobs.iter().rev().map(JobRec::info).collect()
    }

    /// One job.
    pub async fn info(&self, id: &str) -> Result<JobInfo, JobError> {
        let st = self.lock().await;
        st.get(id).map(JobRec::info).ok_or(JobError::NotFound)
    }

    /// The job's driver (for type-specific commands such as block-job-change).
    pub async fn driver(&self, id: &str) -> Result<Arc<dyn JobDriver>, JobError> {
        let st = self.lock().await;
        st.get(id)
            .map(|j| j.driver.clone())
            .ok_or(JobError::NotFound)
    }

    /// Waits (at most `bound`) until every job woken since it last waited has run up to its
    /// next wait, and every job whose `run` returned has been through what follows (its
    /// transaction's finalization included). The control plane calls this before it replies,
    /// so the events of a job a command woke come before the reply, as in QEMU, where the
    /// command enters the job's coroutine itself. A job busy with I/O is not waited for.
    pub async fn quiesce(&self, bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let stirred = self.inner.stir.notified();
            tokio::pin!(stirred);
            stirred.as_mut().enable();
            {
                let st = self.lock().await;
                let busy = !st.deferred.is_empty()
                    || !st.finalizing.is_empty()
                    || st.jobs.iter().any(|j| j.started && j.shared.unsettled());
                if !busy {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, stirred).await.is_err() {
                return;
            }
        }
    }

    /// Refuses `verb` if the job's state does not allow it.
    pub async fn check_verb(&self, id: &str, verb: JobVerb) -> Result<(), JobError> {
        let st = self.lock().await;
        let job = st.get(id).ok_or(JobError::NotFound)?;
        check(job, verb)
    }
}
