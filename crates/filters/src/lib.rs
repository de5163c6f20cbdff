//! Filter nodes: ordinary nodes over one filtered child, as QEMU has them.
//!
//! - [`cbw`]: `copy-before-write` — before a write reaches its source, the old data of the
//!   range is made safe in the target (through a [`block_copy::BlockCopy`]): the point in time
//!   of a backup or a fleecing export.
//! - [`snapshot_access`]: `snapshot-access` — the read-only point-in-time view of a
//!   copy-before-write node.

pub mod cbw;
pub mod snapshot_access;

pub use cbw::{CbwOptions, CopyBeforeWrite, OnCbwError};
pub use snapshot_access::SnapshotAccess;
