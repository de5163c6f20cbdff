//! Dirty bitmaps: which granules of a disk changed since the bitmap was created or cleared.
//!
//! A [`DirtyBitmap`] covers `disk_size` bytes in granules of `granularity` bytes (a power of two
//! from 512 B to 2 GiB); one bit per granule. A write marks every granule it touches.
//!
//! ```text
//!   recording ──create_successor──▶ frozen (busy, not recording)
//!                                      │ successor records the writes made meanwhile
//!                     ┌────────────────┴──────────────┐
//!                 abdicate                          reclaim
//!       (bitmap := successor: what            (bitmap := old bits | successor:
//!        was written during the job)           nothing is lost)
//! ```

use crate::hbitmap::HBitmap;
use crate::BitmapError;

/// Smallest granularity, in bytes.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity, in bytes (2 GiB, QEMU's bound).
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// A dirty bitmap of one disk.
#[derive(Clone, Debug)]
pub struct DirtyBitmap {
    /// Unique in the process: how owners of unnamed bitmaps find theirs.
    id: u64,
    /// Where the bitmap sits among its node's, oldest first: its id, or, once a job's
    /// successor took over, the successor's (QEMU's successor replaces the bitmap in its list).
    order: u64,
    name: Option<String>,
    granularity: u64,
    disk_size: u64,
    bits: HBitmap,
    recording: bool,
    busy: bool,
    persistent: bool,
    inconsistent: bool,
    readonly: bool,
    /// Records writes while this bitmap is frozen for a job.
    successor: Option<Box<DirtyBitmap>>,
}

/// Checks a granularity the way QEMU does.
pub fn check_granularity(granularity: u64) -> Result<(), BitmapError> {
    if !granularity.is_power_of_two() || granularity < MIN_GRANULARITY {
        return Err(BitmapError::Granularity);
    }
    if granularity > MAX_GRANULARITY {
        return Err(BitmapError::GranularityTooLarge);
    }
    Ok(())
}

impl DirtyBitmap {
    /// A recording bitmap with every granule clean.
    pub fn new(
        name: Option<String>,
        disk_size: u64,
        granularity: u64,
    ) -> Result<DirtyBitmap, BitmapError> {
        check_granularity(granularity)?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(DirtyBitmap {
            id,
            order: id,
            name,
            granularity,
            disk_size,
            bits: HBitmap::new(disk_size.div_ceil(granularity)),
            recording: true,
            busy: false,
            persistent: false,
            inconsistent: false,
            readonly: false,
            successor: None,
        })
    }

    /// A number no other bitmap of the process has (a clone shares it).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The bitmap's place among its node's bitmaps, oldest first (see [`abdicate`]).
    ///
    /// [`abdicate`]: DirtyBitmap::abdicate
    pub fn order(&self) -> u64 {
        self.order
    }

    /// The bitmap's name; internal bitmaps have none.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Size of the disk it covers, in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Whether writes mark it (QMP `recording`).
    pub fn recording(&self) -> bool {
        self.recording
    }

    /// In use by a job or an export: it may not be changed by the user.
    pub fn busy(&self) -> bool {
        self.busy || self.successor.is_some()
    }

    /// Stored in the image when it is closed.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Found marked in use in the image: its bits cannot be trusted.
    pub fn inconsistent(&self) -> bool {
        self.inconsistent
    }

    /// Loaded from an image opened read-only: its bits may not be changed by the user.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Marks it read-only (or not).
    pub fn set_readonly(&mut self, readonly: bool) {
        self.readonly = readonly;
    }

    /// Whether a successor records writes for it.
    pub fn has_successor(&self) -> bool {
        self.successor.is_some()
    }

    /// The successor, while one exists.
    pub fn successor(&self) -> Option<&DirtyBitmap> {
        self.successor.as_deref()
    }

    /// Starts or stops recording writes.
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    /// Marks it in use (an export) or no longer in use.
    pub fn set_busy(&mut self, busy: bool) {
        self.busy = busy;
    }

    /// Makes it persistent or not.
    pub fn set_persistent(&mut self, persistent: bool) {
        self.persistent = persistent;
    }

    /// Marks it inconsistent (loaded with the in-use flag set).
    pub fn set_inconsistent(&mut self, inconsistent: bool) {
        self.inconsistent = inconsistent;
    }

    /// The bits, one per granule.
    pub fn bits(&self) -> &HBitmap {
        &self.bits
    }

    /// The granules covering bytes `[offset, offset + len)`.
    fn granules(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.disk_size);
        if offset >= end {
            return (0, 0);
        }
        (offset / self.granularity, end.div_ceil(self.granularity))
    }

    /// A write to `[offset, offset + len)`: marks the granules if recording, and the
    /// successor's.
    pub fn record_write(&mut self, offset: u64, len: u64) {
        if self.recording && !self.inconsistent {
            self.set_dirty(offset, len);
        }
        if let Some(s) = &mut self.successor {
            s.record_write(offset, len);
        }
    }

    /// Marks the granules of `[offset, offset + len)` dirty, recording or not.
    pub fn set_dirty(&mut self, offset: u64, len: u64) {
        let (a, b) = self.granules(offset, len);
        self.bits.set_range(a, b);
    }

    /// Marks the granules of `[offset, offset + len)` clean. Callers pass granule-aligned
    /// ranges; a granule the range only partly covers is cleaned whole.
    pub fn reset_dirty(&mut self, offset: u64, len: u64) {
        let (a, b) = self.granules(offset, len);
        self.bits.reset_range(a, b);
    }

    /// Whether the granule holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        self.bits.get(offset / self.granularity)
    }

    /// Dirty bytes as QMP reports them: dirty granules times the granularity.
    pub fn dirty_bytes(&self) -> u64 {
        self.bits.count() * self.granularity
    }

    /// The first dirty extent in bytes `[offset, end)`, at most `max` bytes, clamped to the
    /// disk and to `[offset, end)`: `(start, length)`.
    pub fn next_dirty_area(&self, offset: u64, end: u64, max: u64) -> Option<(u64, u64)> {
        let end = end.min(self.disk_size);
        if offset >= end {
            return None;
        }
        let g = self.granularity;
        let (from, to) = (offset / g, end.div_ceil(g));
        let max_bits = max.div_ceil(g).max(1);
        let (start, n) = self.bits.next_set_run(from, to, max_bits)?;
        let a = (start * g).max(offset);
        let b = ((start + n) * g).min(end).min(a.saturating_add(max));
        Some((a, b - a))
    }

    /// The first clean byte offset in `[offset, end)`.
    pub fn next_clean(&self, offset: u64, end: u64) -> Option<u64> {
        let end = end.min(self.disk_size);
        if offset >= end {
            return None;
        }
        let g = self.granularity;
        let bit = self.bits.next_clear(offset / g, end.div_ceil(g))?;
        Some((bit * g).max(offset))
    }

    /// Clears every bit and returns the old bits, for [`restore`](Self::restore) if the
    /// clear must be undone (a transaction that fails later).
    pub fn clear(&mut self) -> HBitmap {
        let fresh = HBitmap::new(self.bits.len());
        std::mem::replace(&mut self.bits, fresh)
    }

    /// Puts back bits returned by [`clear`](Self::clear).
    pub fn restore(&mut self, bits: HBitmap) {
        debug_assert_eq!(bits.len(), self.bits.len());
        self.bits = bits;
    }

    /// Sets every granule that is dirty in `src`. Both must cover the same disk size; the
    /// granularities may differ. Returns the old bits for [`restore`](Self::restore).
    pub fn merge_from(&mut self, src: &DirtyBitmap) -> Result<HBitmap, BitmapError> {
        if src.disk_size != self.disk_size {
            return Err(BitmapError::Incompatible);
        }
        let old = self.bits.clone();
        if src.granularity == self.granularity {
            self.bits.merge(&src.bits);
        } else {
            let mut at = 0;
            while let Some((start, len)) = src.next_dirty_area(at, u64::MAX, u64::MAX) {
                self.set_dirty(start, len);
                at = start + len;
            }
        }
        Ok(old)
    }

    /// Freezes the bitmap for a job: a new anonymous successor records writes from now on
    /// (if this bitmap was recording) and this one keeps its bits unchanged.
    pub fn create_successor(&mut self) -> Result<(), BitmapError> {
        if self.busy() {
            return Err(BitmapError::Busy);
        }
        let mut successor = DirtyBitmap::new(None, self.disk_size, self.granularity)?;
        successor.recording = self.recording;
        self.recording = false;
        self.successor = Some(Box::new(successor));
        Ok(())
    }

    /// Ends the job successfully: the successor's bits (writes made during the job) replace
    /// this bitmap's, recording resumes as before, and the bitmap ranks as new as the
    /// successor ([`order`](DirtyBitmap::order)).
    pub fn abdicate(&mut self) -> Result<(), BitmapError> {
        let successor = self.successor.take().ok_or(BitmapError::NoSuccessor)?;
        self.bits = successor.bits;
        self.recording = successor.recording;
        // In QEMU the successor, made when the job started, takes the bitmap's name and
        // place in the list: the bitmap now ranks as new as that.
        self.order = successor.id;
        Ok(())
    }

    /// Ends the job without success: the successor's bits are merged back, so nothing written
    /// before or during the job is lost.
    pub fn reclaim(&mut self) -> Result<(), BitmapError> {
        let successor = self.successor.take().ok_or(BitmapError::NoSuccessor)?;
        self.bits.merge(&successor.bits);
        self.recording = successor.recording;
        Ok(())
    }

    /// Changes the disk size it covers (the disk was resized); new granules are clean.
    pub fn resize(&mut self, disk_size: u64) {
        let mut bits = HBitmap::new(disk_size.div_ceil(self.granularity));
        let mut at = 0;
        while let Some((start, n)) = self.bits.next_set_run(at, bits.len(), u64::MAX) {
            bits.set_range(start, start + n);
            at = start + n;
        }
        self.bits = bits;
        self.disk_size = disk_size;
        if let Some(s) = &mut self.successor {
            s.resize(disk_size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn successor_abdicate_and_reclaim_match_qemu_backup_outcomes() {
        // 16 MiB dirty before the job, 64 KiB written during it (the contract's table).
        let mut b = DirtyBitmap::new(Some("b0".into()), 64 * MIB, 64 * 1024).expect("new");
        b.record_write(0, 16 * MIB);
        b.create_successor().expect("successor");
        assert!(b.busy() && !b.recording());
        b.record_write(32 * MIB, 64 * 1024);
        assert_eq!(b.dirty_bytes(), 16 * MIB, "frozen bits do not change");
        let mut failed = b.clone();
        b.abdicate().expect("abdicate");
        assert_eq!(b.dirty_bytes(), 64 * 1024);
        assert!(b.recording() && !b.busy());
        failed.reclaim().expect("reclaim");
        assert_eq!(failed.dirty_bytes(), 16 * MIB + 64 * 1024);
    }

    #[test]
    fn a_disabled_bitmap_keeps_its_successor_disabled() {
        let mut b = DirtyBitmap::new(Some("b".into()), MIB, 4096).expect("new");
        b.set_recording(false);
        b.create_successor().expect("successor");
        b.record_write(0, 4096);
        b.abdicate().expect("abdicate");
        assert_eq!(b.dirty_bytes(), 0);
        assert!(!b.recording());
    }

    #[test]
    fn merge_across_granularities() {
        let mut fine = DirtyBitmap::new(None, MIB, 512).expect("new");
        fine.record_write(4096 + 512, 512);
        let mut coarse = DirtyBitmap::new(None, MIB, 65536).expect("new");
        coarse.merge_from(&fine).expect("merge");
        assert_eq!(coarse.dirty_bytes(), 65536);
        let mut back = DirtyBitmap::new(None, MIB, 512).expect("new");
        back.merge_from(&coarse).expect("merge");
        assert_eq!(back.dirty_bytes(), 65536);
        let other = DirtyBitmap::new(None, 2 * MIB, 512).expect("new");
        assert!(back.merge_from(&other).is_err());
    }

    #[test]
    fn dirty_areas_are_clamped_to_the_request_and_the_disk() {
        let mut b = DirtyBitmap::new(None, 100_000, 65536).expect("new");
        b.record_write(70_000, 1);
        assert_eq!(
            b.next_dirty_area(0, u64::MAX, u64::MAX),
            Some((65536, 100_000 - 65536))
        );
        assert_eq!(
            b.next_dirty_area(80_000, 90_000, 5000),
            Some((80_000, 5000))
        );
        assert_eq!(b.next_clean(65536, u64::MAX), None);
        assert_eq!(b.dirty_bytes(), 65536);
        // Regression found by the model test: an empty write at the end marked a granule.
        let mut e = DirtyBitmap::new(None, 65537, 65536).expect("new");
        e.record_write(65537, 0);
        e.record_write(70_000, 10);
        assert_eq!(e.dirty_bytes(), 0);
    }

    #[test]
    fn granularity_bounds() {
        assert!(check_granularity(512).is_ok());
        assert!(check_granularity(1 << 31).is_ok());
        assert!(matches!(
            check_granularity(256),
            Err(BitmapError::Granularity)
        ));
        assert!(matches!(
            check_granularity(3 << 10),
            Err(BitmapError::Granularity)
        ));
        assert!(matches!(
            check_granularity(1 << 32),
            Err(BitmapError::GranularityTooLarge)
        ));
    }
}
