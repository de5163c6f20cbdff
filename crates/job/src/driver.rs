//! What a job is to the manager: the [`JobDriver`] a job type implements, and the vocabulary
//! around it (options, info, events, errors).

use std::sync::Arc;

use async_trait::async_trait;

use crate::context::JobContext;
use crate::status::JobStatus;

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
pub struct TxnId(pub(crate) u64);

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

pub(crate) fn refused(msg: impl Into<String>) -> JobError {
    JobError::Refused(msg.into())
}
