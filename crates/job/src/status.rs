//! Job states and verbs, and the two tables that govern them, as data.
//!
//! ```text
//!  undefined ─▶ created ─▶ running ⇄ paused          (user pause at a pause point)
//!                 │          │  ▲
//!                 │          ▼  │
//!                 │        ready ⇄ standby            (jobs that converge: mirror)
//!                 │          │
//!                 ▼          ▼
//!               aborting ◀─ waiting ─▶ pending ─▶ concluded ─▶ null
//!                 └──────────────────────────────▲
//! ```

use std::fmt;

/// QEMU's JobStatus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Not yet created (only before the first transition).
    Undefined,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Stopped at a pause point by the user (or an error action).
    Paused,
    /// Converged: waiting to be completed (mirror).
    Ready,
    /// Paused while ready.
    Standby,
    /// Done, waiting for the other jobs of its transaction.
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Failed or cancelled, cleaning up.
    Aborting,
    /// Finished; waits to be dismissed.
    Concluded,
    /// Gone.
    Null,
}

/// Every status, in the order of the tables below.
pub const ALL_STATUSES: [JobStatus; 11] = [
    JobStatus::Undefined,
    JobStatus::Created,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Ready,
    JobStatus::Standby,
    JobStatus::Waiting,
    JobStatus::Pending,
    JobStatus::Aborting,
    JobStatus::Concluded,
    JobStatus::Null,
];

impl JobStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU's JobVerb: what a user may ask of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobVerb {
    /// job-cancel, block-job-cancel.
    Cancel,
    /// job-pause, block-job-pause.
    Pause,
    /// job-resume, block-job-resume.
    Resume,
    /// block-job-set-speed.
    SetSpeed,
    /// job-complete, block-job-complete.
    Complete,
    /// job-finalize, block-job-finalize.
    Finalize,
    /// job-dismiss, block-job-dismiss.
    Dismiss,
    /// block-job-change.
    Change,
}

/// Every verb, in the order of [`VERBS`].
pub const ALL_VERBS: [JobVerb; 8] = [
    JobVerb::Cancel,
    JobVerb::Pause,
    JobVerb::Resume,
    JobVerb::SetSpeed,
    JobVerb::Complete,
    JobVerb::Finalize,
    JobVerb::Dismiss,
    JobVerb::Change,
];

impl JobVerb {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }
}

const X: bool = true;
const O: bool = false;

/// Allowed transitions: `TRANSITIONS[from][to]`, columns in [`ALL_STATUSES`] order
/// (U C R P Y S W D X E N).
pub const TRANSITIONS: [[bool; 11]; 11] = [
    //U  C  R  P  Y  S  W  D  X  E  N
    [O, X, O, O, O, O, O, O, O, O, O], // undefined
    [O, O, X, O, O, O, O, O, X, O, X], // created
    [O, O, O, X, X, O, X, O, X, O, O], // running
    [O, O, X, O, O, O, O, O, O, O, O], // paused
    [O, O, O, O, O, X, X, O, X, O, O], // ready
    [O, O, O, O, X, O, O, O, O, O, O], // standby
    [O, O, O, O, O, O, O, X, X, O, O], // waiting
    [O, O, O, O, O, O, O, O, X, X, O], // pending
    [O, O, O, O, O, O, O, O, X, X, O], // aborting
    [O, O, O, O, O, O, O, O, O, O, X], // concluded
    [O, O, O, O, O, O, O, O, O, O, O], // null
];

/// Verbs allowed per state: `VERBS[verb][status]`, verbs in [`ALL_VERBS`] order.
pub const VERBS: [[bool; 11]; 8] = [
    //U  C  R  P  Y  S  W  D  X  E  N
    [O, X, X, X, X, X, X, X, O, O, O], // cancel
    [O, X, X, X, X, X, O, O, O, O, O], // pause
    [O, X, X, X, X, X, O, O, O, O, O], // resume
    [O, X, X, X, X, X, O, O, O, O, O], // set-speed
    [O, O, O, O, X, X, O, O, O, O, O], // complete
    [O, O, O, O, O, O, O, X, O, O, O], // finalize
    [O, O, O, O, O, O, O, O, O, X, O], // dismiss
    [O, X, X, X, X, X, O, O, O, O, O], // change
];

/// Whether a job may go from `from` to `to`.
pub fn transition_allowed(from: JobStatus, to: JobStatus) -> bool {
    TRANSITIONS[from.index()][to.index()]
}

/// Whether a job in `status` accepts `verb`.
pub fn verb_allowed(verb: JobVerb, status: JobStatus) -> bool {
    let row = ALL_VERBS.iter().position(|v| *v == verb).unwrap_or(0);
    VERBS[row][status.index()]
}

/// QEMU's refusal of a verb, verbatim.
pub fn verb_refused(id: &str, status: JobStatus, verb: JobVerb) -> String {
    format!(
        "Job '{id}' in state '{}' cannot accept command verb '{}'",
        status.as_str(),
        verb.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_index_their_table_rows() {
        for (i, s) in ALL_STATUSES.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
    }

    #[test]
    fn the_tables_match_the_contract() {
        use JobStatus::*;
        let allowed: Vec<(JobStatus, JobStatus)> = ALL_STATUSES
            .iter()
            .flat_map(|&a| ALL_STATUSES.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| transition_allowed(a, b))
            .collect();
        assert_eq!(
            allowed,
            vec![
                (Undefined, Created),
                (Created, Running),
                (Created, Aborting),
                (Created, Null),
                (Running, Paused),
                (Running, Ready),
                (Running, Waiting),
                (Running, Aborting),
                (Paused, Running),
                (Ready, Standby),
                (Ready, Waiting),
                (Ready, Aborting),
                (Standby, Ready),
                (Waiting, Pending),
                (Waiting, Aborting),
                (Pending, Aborting),
                (Pending, Concluded),
                (Aborting, Aborting),
                (Aborting, Concluded),
                (Concluded, Null),
            ]
        );
        assert!(verb_allowed(JobVerb::Complete, Standby));
        assert!(!verb_allowed(JobVerb::Complete, Running));
        assert!(verb_allowed(JobVerb::Cancel, Pending));
        assert!(!verb_allowed(JobVerb::Cancel, Aborting));
        assert_eq!(
            verb_refused("j", Concluded, JobVerb::Pause),
            "Job 'j' in state 'concluded' cannot accept command verb 'pause'"
        );
    }
}
