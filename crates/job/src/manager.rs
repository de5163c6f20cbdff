//! The job manager: every job's state, the verbs, transactions, and the events they cause.
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
//! [`transition`] function, so events come out in the order the transitions happen. The
//! driver callbacks of finalization (prepare, commit, abort, clean) run under that lock: they
//! must not call back into the manager.
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

use async_trait::async_trait;
use tokio::sync::{watch, Mutex, MutexGuard, Notify};

use crate::rate::RateLimit;
use crate::status::{transition_allowed, verb_allowed, verb_refused, JobStatus, JobVerb};

/// Repeated `BLOCK_JOB_ERROR` events of one job (same operation and action) closer together
/// than this are dropped.
pub const ERROR_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// Default time a force-cancelled job gets to return before it is abandoned.
pub const DEFAULT_CANCEL_BOUND: Duration = Duration::from_secs(5);

/// What a job does. `run` is the job; the rest are the hooks of finalization.
#[async_trait]
pub trait JobDriver: Send + Sync + 'static {
    /// QEMU's JobType name: `create`, `backup`, `mirror`, …
    fn job_type(&self) -> &'static str;

    /// Does the work; calls `ctx.pause_point()` between chunks and returns early when
    /// `ctx.is_cancelled()`. An error fails the job with that message.
    async fn run(&self, ctx: JobContext) -> Result<(), String>;

    /// A cancel was requested; returns whether it must be treated as forced. Jobs without a
    /// soft cancel (all but a ready mirror) return true.
    fn cancel(&self, _force: bool) -> bool {
        true
    }

    /// Whether `job-complete` applies to this job (mirror, active commit).
    fn can_complete(&self) -> bool {
        false
    }

    /// `job-complete`.
    fn complete(&self) -> Result<(), String> {
        Err("job cannot be completed".into())
    }

    /// Before commit or abort, for every job of the transaction; an error aborts them all.
    async fn prepare(&self) -> Result<(), String> {
        Ok(())
    }

    /// The job (and its whole transaction) succeeded.
    async fn commit(&self) {}

    /// The job failed, was cancelled, or another job of its transaction did.
    async fn abort(&self) {}

    /// After commit or abort.
    async fn clean(&self) {}
}

/// The I/O direction of a job error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoOperation {
    /// Reading the source.
    Read,
    /// Writing the target.
    Write,
}

/// What the job does about an error (QEMU's BlockErrorAction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorAction {
    /// Carries on (and retries).
    Ignore,
    /// Fails the job.
    Report,
    /// Pauses the job until resumed.
    Stop,
}

/// QEMU's BlockDeviceIoStatus of a block job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    /// No error.
    Ok,
    /// Stopped on an error.
    Failed,
    /// Stopped on ENOSPC.
    NoSpace,
}

impl IoStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::NoSpace => "nospace",
        }
    }
}

/// A job as the queries and events show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    /// Job id (also the `device` of block-job events).
    pub id: String,
    /// JobType name.
    pub job_type: &'static str,
    /// A block job: BLOCK_JOB_* events, listed by `query-block-jobs`.
    pub block: bool,
    /// Current status.
    pub status: JobStatus,
    /// Progress done.
    pub current: u64,
    /// Progress total (an estimate; grows as work is found).
    pub total: u64,
    /// Speed limit, bytes/s, 0 = none.
    pub speed: u64,
    /// Why the job failed (or "Operation canceled").
    pub error: Option<String>,
    /// Finalize without waiting for job-finalize.
    pub auto_finalize: bool,
    /// Dismiss without waiting for job-dismiss.
    pub auto_dismiss: bool,
    /// Paused by the user or by an error action.
    pub paused: bool,
    /// Actually running (not stopped at a pause point, not sleeping, not done).
    pub busy: bool,
    /// Error status of a block job.
    pub io_status: IoStatus,
}

/// What the manager reports; the daemon turns these into QMP events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// JOB_STATUS_CHANGE.
    StatusChange {
        /// Job id.
        id: String,
        /// New status.
        status: JobStatus,
    },
    /// BLOCK_JOB_READY.
    Ready(JobInfo),
    /// BLOCK_JOB_PENDING (only for jobs that wait for job-finalize).
    Pending(JobInfo),
    /// BLOCK_JOB_COMPLETED; `error` set on failure.
    Completed(JobInfo),
    /// BLOCK_JOB_CANCELLED.
    Cancelled(JobInfo),
    /// BLOCK_JOB_ERROR.
    Error {
        /// Job id.
        id: String,
        /// Direction.
        operation: IoOperation,
        /// What happens next.
        action: ErrorAction,
    },
}

/// Where events go: called under the manager's lock, in order.
pub type EventSink = Arc<dyn Fn(JobEvent) + Send + Sync>;

/// Options of a new job.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// Job id.
    pub id: String,
    /// Block job (events and query-block-jobs).
    pub block: bool,
    /// Finalize without job-finalize.
    pub auto_finalize: bool,
    /// Dismiss without job-dismiss.
    pub auto_dismiss: bool,
    /// Initial speed limit.
    pub speed: u64,
    /// The transaction to join; `None`: a transaction of its own.
    pub txn: Option<TxnId>,
}

impl JobOptions {
    /// Defaults: not a block job, auto-finalize and auto-dismiss on, no limit, own txn.
    pub fn new(id: impl Into<String>) -> JobOptions {
        JobOptions {
            id: id.into(),
            block: false,
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
            txn: None,
        }
    }
}

/// A group of jobs that succeed or fail together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxnId(u64);

/// Refusal of a verb or of a new job.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// No job has that id.
    #[error("Job not found")]
    NotFound,
    /// Anything else, with QEMU's message.
    #[error("{0}")]
    Refused(String),
}

fn refused(msg: impl Into<String>) -> JobError {
    JobError::Refused(msg.into())
}

/// Data shared between the manager and the running job without the lock.
#[derive(Debug)]
struct Shared {
    current: AtomicU64,
    total: AtomicU64,
    /// Some pause is requested: the job checks at its next pause point.
    pause_requested: AtomicBool,
    /// Force-cancelled.
    cancelled: AtomicBool,
    /// Any cancel requested (soft or forced).
    cancel_requested: AtomicBool,
    /// Stopped at a pause point or sleeping.
    idle: AtomicBool,
    wake: Notify,
    force_cancel: watch::Sender<bool>,
    rate: StdMutex<Rate>,
    last_error_event: StdMutex<Option<(IoOperation, ErrorAction, Instant)>>,
}

#[derive(Debug)]
struct Rate {
    limit: RateLimit,
    speed: u64,
    not_before: Option<Instant>,
}

struct JobRec {
    id: String,
    driver: Arc<dyn JobDriver>,
    block: bool,
    status: JobStatus,
    txn: TxnId,
    in_txn: bool,
    auto_finalize: bool,
    auto_dismiss: bool,
    started: bool,
    user_paused: bool,
    /// User, error and internal pauses.
    pause_count: u32,
    /// The job is parked at a pause point.
    parked: bool,
    /// The status it had before a visible pause (running or ready).
    resume_to: Option<JobStatus>,
    cancelled: bool,
    force_cancel: bool,
    /// `run` has returned.
    run_done: bool,
    error: Option<String>,
    io_status: IoStatus,
    shared: Arc<Shared>,
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
    fn info(&self) -> JobInfo {
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
            busy: self.started && !self.run_done && !self.shared.idle.load(Ordering::Relaxed),
            io_status: self.io_status,
        }
    }

    fn set_pause_requested(&self) {
        self.shared
            .pause_requested
            .store(self.pause_count > 0, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct State {
    jobs: Vec<JobRec>,
    aborting_txns: Vec<TxnId>,
    next_txn: u64,
}

impl State {
    fn get(&self, id: &str) -> Option<&JobRec> {
        self.jobs.iter().find(|j| j.id == id)
    }

    fn idx(&self, id: &str) -> Result<usize, JobError> {
        self.jobs
            .iter()
            .position(|j| j.id == id)
            .ok_or(JobError::NotFound)
    }

    fn members(&self, txn: TxnId) -> Vec<usize> {
        (0..self.jobs.len())
            .filter(|&i| self.jobs[i].in_txn && self.jobs[i].txn == txn)
            .collect()
    }
}

fn lock_std<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    state: Mutex<State>,
    events: EventSink,
    cancel_bound: Duration,
}

/// Owns every job. Cheap to clone.
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
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
fn transition(events: &EventSink, job: &mut JobRec, to: JobStatus) {
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
            }),
        }
    }

    async fn lock(&self) -> MutexGuard<'_, State> {
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
            wake: Notify::new(),
            force_cancel,
            rate: StdMutex::new(Rate {
                limit: rate,
                speed: opts.speed,
                not_before: None,
            }),
            last_error_event: StdMutex::new(None),
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

    /// Refuses `verb` if the job's state does not allow it.
    pub async fn check_verb(&self, id: &str, verb: JobVerb) -> Result<(), JobError> {
        let st = self.lock().await;
        let job = st.get(id).ok_or(JobError::NotFound)?;
        check(job, verb)
    }

    /// Shutdown: force-cancels every job and waits (up to the cancel bound and a second) for
    /// them to end; concluded jobs are dismissed.
    pub async fn cancel_all(&self) {
        let ids: Vec<(String, JobStatus)> = {
            let st = self.lock().await;
            st.jobs.iter().map(|j| (j.id.clone(), j.status)).collect()
        };
        for (id, status) in ids {
            let _ = if status == JobStatus::Concluded {
                self.dismiss(&id).await
            } else {
                self.cancel(&id, true).await
            };
        }
        let deadline = Instant::now() + self.inner.cancel_bound + Duration::from_secs(1);
        while Instant::now() < deadline {
            let busy = {
                let st = self.lock().await;
                st.jobs.iter().any(|j| j.started && !j.run_done)
            };
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `job-pause`.
    pub async fn pause(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        let job = &mut st.jobs[i];
        check(job, JobVerb::Pause)?;
        if job.user_paused {
            return Err(refused("Job is already paused"));
        }
        job.user_paused = true;
        job.pause_count += 1;
        job.set_pause_requested();
        if job.parked {
            self.show_paused(job);
        }
        job.shared.wake.notify_one();
        Ok(())
    }

    /// `job-resume` (also clears a block job's error status).
    pub async fn resume(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        let job = &mut st.jobs[i];
        if !job.user_paused {
            return Err(refused("Can't resume a job that was not paused"));
        }
        check(job, JobVerb::Resume)?;
        job.user_paused = false;
        job.pause_count -= 1;
        job.io_status = IoStatus::Ok;
        self.unpause(job);
        Ok(())
    }

    /// Pauses a job without anything the user sees: it stops at its next pause point until
    /// [`resume_internal`](Self::resume_internal). Used around graph changes.
    pub async fn pause_internal(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        let job = &mut st.jobs[i];
        job.pause_count += 1;
        job.set_pause_requested();
        Ok(())
    }

    /// Ends a [`pause_internal`](Self::pause_internal).
    pub async fn resume_internal(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        let job = &mut st.jobs[i];
        job.pause_count = job.pause_count.saturating_sub(1);
        self.unpause(job);
        Ok(())
    }

    fn show_paused(&self, job: &mut JobRec) {
        if job.resume_to.is_none() && matches!(job.status, JobStatus::Running | JobStatus::Ready) {
            let back = job.status;
            let to = if back == JobStatus::Ready {
                JobStatus::Standby
            } else {
                JobStatus::Paused
            };
            job.resume_to = Some(back);
            transition(&self.inner.events, job, to);
        }
    }

    fn unpause(&self, job: &mut JobRec) {
        job.set_pause_requested();
        if !job.user_paused {
            if let Some(back) = job.resume_to.take() {
                transition(&self.inner.events, job, back);
            }
        }
        if job.pause_count == 0 {
            job.shared.wake.notify_one();
        }
    }

    /// `job-cancel` (`force`) or `block-job-cancel` (soft unless `force`).
    pub async fn cancel(&self, id: &str, force: bool) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        check(&st.jobs[i], JobVerb::Cancel)?;
        self.cancel_locked(&mut st, i, force).await;
        Ok(())
    }

    /// Refuses a soft cancel of a user-paused job, as block-job-cancel does.
    pub async fn user_paused(&self, id: &str) -> Result<bool, JobError> {
        let st = self.lock().await;
        st.get(id).map(|j| j.user_paused).ok_or(JobError::NotFound)
    }

    async fn cancel_locked(&self, st: &mut State, i: usize, force: bool) {
        cancel_async(&mut st.jobs[i], force);
        let job = &st.jobs[i];
        if !job.started {
            // Never ran: it completes now, as cancelled.
            let id = job.id.clone();
            self.completed_locked(st, &id, Ok(())).await;
        } else if job.run_done {
            if job.force_cancel {
                let txn = job.txn;
                self.txn_abort(st, txn).await;
            }
        } else {
            job.shared.wake.notify_one();
        }
    }

    /// `job-complete`.
    pub async fn complete(&self, id: &str) -> Result<(), JobError> {
        let st = self.lock().await;
        let job = st.get(id).ok_or(JobError::NotFound)?;
        check(job, JobVerb::Complete)?;
        if job.cancelled || !job.driver.can_complete() {
            return Err(refused(format!(
                "The active block job '{id}' cannot be completed"
            )));
        }
        job.driver.complete().map_err(JobError::Refused)?;
        job.shared.wake.notify_one();
        Ok(())
    }

    /// `job-finalize`: finalizes every job of the transaction.
    pub async fn finalize(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        check(&st.jobs[i], JobVerb::Finalize)?;
        let txn = st.jobs[i].txn;
        self.do_finalize(&mut st, txn).await;
        Ok(())
    }

    /// `job-dismiss`.
    pub async fn dismiss(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        check(&st.jobs[i], JobVerb::Dismiss)?;
        self.dismiss_locked(&mut st, i);
        Ok(())
    }

    /// `block-job-set-speed`.
    pub async fn set_speed(&self, id: &str, speed: i64) -> Result<(), JobError> {
        let st = self.lock().await;
        let job = st.get(id).ok_or(JobError::NotFound)?;
        check(job, JobVerb::SetSpeed)?;
        let speed = u64::try_from(speed)
            .map_err(|_| refused("Parameter 'speed' expects a non-negative value"))?;
        {
            let mut r = lock_std(&job.shared.rate);
            r.limit.set_speed(speed);
            r.speed = speed;
            r.not_before = None;
        }
        job.shared.wake.notify_one();
        Ok(())
    }

    fn dismiss_locked(&self, st: &mut State, i: usize) {
        transition(&self.inner.events, &mut st.jobs[i], JobStatus::Null);
        st.jobs.remove(i);
    }

    /// `run` returned (or was abandoned): QEMU's job_completed.
    async fn run_finished(&self, id: &str, result: Result<(), String>) {
        let mut st = self.lock().await;
        self.completed_locked(&mut st, id, result).await;
    }

    async fn completed_locked(&self, st: &mut State, id: &str, result: Result<(), String>) {
        let Ok(i) = st.idx(id) else { return };
        {
            let job = &mut st.jobs[i];
            job.run_done = true;
            job.parked = false;
            job.shared.idle.store(true, Ordering::Relaxed);
            if let Some(back) = job.resume_to.take() {
                transition(&self.inner.events, job, back);
            }
            if let Err(e) = result {
                job.error = Some(e);
            }
        }
        self.update_rc(&mut st.jobs[i]);
        let txn = st.jobs[i].txn;
        if st.jobs[i].error.is_none() {
            transition(&self.inner.events, &mut st.jobs[i], JobStatus::Waiting);
            let members = st.members(txn);
            if members.iter().any(|&m| !st.jobs[m].run_done) {
                return;
            }
            for &m in &members {
                let job = &mut st.jobs[m];
                transition(&self.inner.events, job, JobStatus::Pending);
                if !job.auto_finalize && job.block {
                    (self.inner.events)(JobEvent::Pending(job.info()));
                }
            }
            if members.iter().all(|&m| st.jobs[m].auto_finalize) {
                self.do_finalize(st, txn).await;
            }
        } else {
            self.txn_abort(st, txn).await;
        }
    }

    /// A cancelled job's missing error becomes "Operation canceled"; a failed job goes to
    /// `aborting`.
    fn update_rc(&self, job: &mut JobRec) {
        if job.error.is_none() && job.force_cancel {
            job.error = Some("Operation canceled".into());
        }
        if job.error.is_some() && job.status != JobStatus::Aborting {
            transition(&self.inner.events, job, JobStatus::Aborting);
        }
    }

    async fn txn_abort(&self, st: &mut State, txn: TxnId) {
        if !st.aborting_txns.contains(&txn) {
            st.aborting_txns.push(txn);
            // One job failed: no result matters, stop the others as fast as possible.
            for m in st.members(txn) {
                let job = &mut st.jobs[m];
                if job.error.is_none() {
                    cancel_async(job, true);
                    if !job.started {
                        job.run_done = true;
                    }
                    job.shared.wake.notify_one();
                }
            }
        }
        let members = st.members(txn);
        if members.iter().any(|&m| !st.jobs[m].run_done) {
            return; // the last one to finish finalizes them all
        }
        for id in members
            .iter()
            .map(|&m| st.jobs[m].id.clone())
            .collect::<Vec<_>>()
        {
            self.finalize_single(st, &id).await;
        }
        st.aborting_txns.retain(|t| *t != txn);
    }

    async fn do_finalize(&self, st: &mut State, txn: TxnId) {
        let members = st.members(txn);
        for &m in &members {
            if let Err(e) = st.jobs[m].driver.prepare().await {
                st.jobs[m].error = Some(e);
                self.update_rc(&mut st.jobs[m]);
                self.txn_abort(st, txn).await;
                return;
            }
        }
        for id in members
            .iter()
            .map(|&m| st.jobs[m].id.clone())
            .collect::<Vec<_>>()
        {
            self.finalize_single(st, &id).await;
        }
    }

    async fn finalize_single(&self, st: &mut State, id: &str) {
        let Ok(i) = st.idx(id) else { return };
        self.update_rc(&mut st.jobs[i]);
        let driver = st.jobs[i].driver.clone();
        if st.jobs[i].error.is_none() {
            driver.commit().await;
        } else {
            driver.abort().await;
        }
        driver.clean().await;
        let job = &mut st.jobs[i];
        if job.started && job.block {
            let info = job.info();
            (self.inner.events)(if job.force_cancel {
                JobEvent::Cancelled(info)
            } else {
                JobEvent::Completed(info)
            });
        }
        job.in_txn = false;
        transition(&self.inner.events, job, JobStatus::Concluded);
        if job.auto_dismiss || !job.started {
            self.dismiss_locked(st, i);
        }
    }
}

fn check(job: &JobRec, verb: JobVerb) -> Result<(), JobError> {
    if verb_allowed(verb, job.status) {
        Ok(())
    } else {
        Err(refused(verb_refused(&job.id, job.status, verb)))
    }
}

/// QEMU's job_cancel_async: records the cancel and lifts a user pause.
fn cancel_async(job: &mut JobRec, force: bool) {
    let force = job.driver.cancel(force);
    if job.user_paused {
        job.user_paused = false;
        job.pause_count -= 1;
        job.set_pause_requested();
    }
    if job.run_done && !force {
        return;
    }
    job.cancelled = true;
    job.force_cancel |= force;
    job.shared.cancel_requested.store(true, Ordering::SeqCst);
    if job.force_cancel {
        job.shared.cancelled.store(true, Ordering::SeqCst);
        job.shared.force_cancel.send_replace(true);
    }
    job.shared.wake.notify_one();
}

/// Runs the job's `run` as its own task; after a force cancel it gets `bound` to return, then
/// it is abandoned.
async fn supervise(
    driver: Arc<dyn JobDriver>,
    ctx: JobContext,
    shared: &Shared,
    bound: Duration,
) -> Result<(), String> {
    let mut run = tokio::spawn(async move { driver.run(ctx).await });
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
    manager: JobManager,
    id: String,
    shared: Arc<Shared>,
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
            self.pause_point().await;
        }
    }
}
