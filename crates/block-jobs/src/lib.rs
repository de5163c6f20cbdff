//! Block jobs over the job framework ([`job`]): they copy data between nodes of the block
//! graph and edit it.
//!
//! - [`backup`]: a point-in-time copy of a node taken while it is in use, through a
//!   copy-before-write filter inserted above it.

pub mod backup;

pub use backup::{Backup, BackupSpec, BitmapMode, OnError, SyncMode};

/// The name of a job's edge to the node it works on (QEMU's job BlockBackend, "main node");
/// the job's other edges are QEMU's op blockers.
pub const MAIN_NODE: &str = "main node";
