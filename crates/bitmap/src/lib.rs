//! Bitmaps, pure data: [`HBitmap`] (one bit per granule, with summary levels for fast searches
//! over terabyte disks) and [`DirtyBitmap`] (what changed on a disk, with the recording, busy,
//! persistent and inconsistent states and the successor used by backup jobs).
//!
//! No I/O and no locking here: the block layer owns the bitmaps of a node behind its own lock,
//! and the qcow2 driver stores persistent ones with [`HBitmap::serialize`].

mod dirty;
mod hbitmap;

pub use dirty::{check_granularity, DirtyBitmap, MAX_GRANULARITY, MIN_GRANULARITY};
pub use hbitmap::HBitmap;

/// What a bitmap operation can refuse. The texts are QEMU's where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// Not a power of two, or under 512.
    #[error("Granularity must be power of 2 and at least 512")]
    Granularity,
    /// Over 2 GiB.
    #[error("Granularity must be at most 2147483648")]
    GranularityTooLarge,
    /// Merge of bitmaps covering different disk sizes.
    #[error("Bitmaps are incompatible and can't be merged")]
    Incompatible,
    /// In use by a job or export.
    #[error("bitmap is in use")]
    Busy,
    /// Abdicate or reclaim without a successor.
    #[error("bitmap has no successor")]
    NoSuccessor,
}
