//! Jobs as QEMU's users know them, with no knowledge of blocks: the state machine and verb
//! tables ([`status`]), a speed limit ([`rate`]), and the [`JobManager`] that runs jobs as
//! async tasks, applies the verbs, groups jobs in transactions and reports [`JobEvent`]s.

mod context;
mod driver;
mod finalize;
pub mod manager;
pub mod rate;
pub mod status;
mod verbs;

pub use manager::{
    id_wellformed, ErrorAction, EventSink, IoOperation, IoStatus, JobContext, JobDriver, JobError,
    JobEvent, JobInfo, JobManager, JobOptions, TxnId,
};
pub use status::{JobStatus, JobVerb};
