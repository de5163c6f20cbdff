//! Block jobs over the job framework ([`job`]): they copy data between nodes of the block
//! graph and edit it.
//!
//! - [`backup`]: a point-in-time copy of a node taken while it is in use, through a
//!   copy-before-write filter inserted above it.

pub mod backup;

pub use backup::{Backup, BackupSpec, BitmapMode, OnError, SyncMode};
