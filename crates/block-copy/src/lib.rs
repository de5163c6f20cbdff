//! The copy engine of backup and copy-before-write: copies ranges of a source node to a target
//! node, cluster by cluster, exactly once each, whoever asks first.
//!
//! ```text
//!   copy bitmap (what is left to copy, one bit per cluster, owned by a node as an unnamed
//!   │            disabled bitmap, as QEMU shows it)
//!   ▼
//!   claim ─▶ task: Reading ─▶ Held(old data in memory) ─▶ written to the target ─▶ gone
//!                     │                 │                        │ (failure)
//!                     │ (failure)       │                        ▼
//!                     ▼                 │          re-dirtied, or Stranded when a guest
//!                re-dirtied             │          write already relied on the held data
//!                                       ▼
//!                   a guest write waiting on the range may go on here
//! ```
//!
//! Two kinds of callers claim clusters: the guest's write path ([`BlockCopy::protect`], from
//! the copy-before-write filter) and the background copy of a job ([`BlockCopy::copy_next`]).
//! A claimed range belongs to one task; anyone else who needs it waits for that task instead
//! of copying again.
//!
//! **What a guest write waits for.** QEMU holds a guest write until the old data of every
//! cluster it touches has been read *and written to the target*. Here it waits until the old
//! data of the *grains* it touches (4 KiB in a 64 KiB cluster; [`Options::grain`]) has been read
//! into memory (the task is *held*). A cluster the write touches only in part leaves the copy
//! bitmap as QEMU's would (and counts as copied once its first grains land), but the rest of
//! it stays in the source until the background copy or another guest write takes it: the
//! guest reads 4 KiB of old data where QEMU reads and writes 64 KiB. The write to the target
//! happens behind it, in the task's own tokio
//! task, so a dropped request never strands a claimed range. The held data is bounded by a
//! memory budget shared with the background copy: when it is full, a guest write waits for
//! room, which comes as target writes complete. Whoever needs the point-in-time content of a
//! held range (a snapshot read) takes it from memory. When the target's readers can see the
//! source (fleecing: the source is in the target's backing chain), a held range would read as
//! the new data through the target, so such a copy is `write_through` and guests wait for
//! the target write as in QEMU.
//!
//! **Failures.** A failed read re-dirties its clusters and fails whoever waited for them
//! (the guest write, under `break-guest-write`). A failed target write re-dirties its
//! clusters if no guest write relied on the held data yet; otherwise the data is kept
//! (*stranded*) and retried until it lands, and the error is reported to the job
//! ([`BlockCopy::take_error`]), whose `on-target-error` decides. The point in time is never lost while the copy
//! lives.
//!
//! Zero ranges (found by block status through the whole chain) are written as zeroes and never
//! read; with `skip_unallocated` (sync=top), ranges the source's top layer does not allocate
//! are skipped.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bitmap::DirtyBitmap;
use block::map;
use block::{BitmapHandle, BlockError, BlockNode, Child, ChildRole, IoVec, Result};
use block::{WriteFlags, ZeroFlags};
use bytes::Bytes;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

mod pool;
use pool::BufPool;

/// QEMU's default copy cluster (`BLOCK_COPY_CLUSTER_SIZE_DEFAULT`).
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;
/// Largest buffered read or write of one task (`BLOCK_COPY_MAX_BUFFER`).
pub const MAX_BUFFER: u64 = 1 << 20;
/// Default number of background copy workers (`BLOCK_COPY_MAX_WORKERS`).
pub const DEFAULT_MAX_WORKERS: usize = 64;
/// Default memory budget for data being copied (`BLOCK_COPY_MAX_MEM`).
pub const DEFAULT_MEMORY: u64 = 128 << 20;

/// The budget is counted in units of this many bytes.
const MEMORY_UNIT: u64 = 4096;

/// Smallest grain a guest write protects.
pub const MIN_GRAIN: u64 = 4096;

/// At most this many clusters are copied grain by grain at once; past it, guest writes
/// protect whole clusters (the bookkeeping of a partly copied cluster is a few dozen bytes).
const MAX_PARTIAL: usize = 1 << 16;

/// Guest writes protect grains only while at most this many guest writes are in flight (see
/// [`BlockCopy::guest_request`]). A light guest gets the shortest wait; a guest that keeps the
/// disk busy gets QEMU's whole clusters (the rest of a partial one included), which cost fewer
/// I/Os when it writes near its earlier writes.
const GRAIN_MAX_GUESTS: usize = 4;

/// How a [`BlockCopy`] copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Copy granularity (a power of two, at least 512).
    pub cluster_size: u64,
    /// Largest range one task copies; 0: [`MAX_BUFFER`]. Rounded to clusters.
    pub max_chunk: u64,
    /// Write the target compressed (whole clusters).
    pub compress: bool,
    /// Bytes of data in memory at once, held for the target or being read.
    pub memory: u64,
    /// Guests wait for the target write (the target's readers see the source).
    pub write_through: bool,
    /// Discard each range from the source once it is in the target (backup
    /// `discard-source`, push fleecing from a snapshot-access node).
    pub discard_source: bool,
    /// What a guest write protects inside a cluster nobody copied yet: 0 for the default
    /// (`cluster / 64`, at least [`MIN_GRAIN`]); the cluster size or more for whole clusters,
    /// as QEMU. Compressed, write-through and discard-source copies use whole clusters.
    pub grain: u64,
    /// Copy in the kernel where both ends are files (`copy_file_range`; backup
    /// `x-perf.use-copy-range`): the background copy's data ranges do not pass through
    /// memory. The first failure turns it off for good and the copy goes on through memory.
    /// Copies a guest write waits for always read into memory (to let the guest go first).
    pub use_copy_range: bool,
}

impl Options {
    /// Defaults with `cluster_size`.
    pub fn new(cluster_size: u64) -> Options {
        Options {
            cluster_size,
            max_chunk: 0,
            compress: false,
            memory: DEFAULT_MEMORY,
            write_through: false,
            discard_source: false,
            grain: 0,
            use_copy_range: false,
        }
    }
}

/// A failed copy task: which side failed, and how.
#[derive(Clone, Debug)]
pub struct CopyError {
    /// Reading the source failed (else writing the target).
    pub read: bool,
    /// The failure.
    pub error: BlockError,
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// A copy task running on its own: its result is the bytes it moved, or why it failed.
pub type CopyTask = JoinHandle<std::result::Result<u64, CopyError>>;

/// Progress reported by a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Bytes now in the target (data or zeroes).
    Copied(u64),
    /// Bytes found not to need copying (unallocated in the top layer, sync=top).
    Skipped(u64),
}

/// Where progress goes.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// What one part of a task's range holds at the point in time.
#[derive(Clone, Debug)]
enum Content {
    Data(Bytes),
    Zero,
    Skip,
}

#[derive(Clone, Debug)]
struct Piece {
    offset: u64,
    len: u64,
    content: Content,
}

#[derive(Debug)]
enum Phase {
    Reading,
    Held(Arc<Vec<Piece>>),
    Stranded(Arc<Vec<Piece>>),
}

#[derive(Debug)]
struct Task {
    id: u64,
    start: u64,
    end: u64,
    phase: Phase,
    /// A guest write went on relying on the held data: it cannot be read again.
    guest_passed: bool,
    /// The grains it copies, when it copies grains of a cluster copied grain by grain (see
    /// [`Partial`]); 0 for whole clusters. Its range spans them; grains between that others
    /// took are read along (one read rather than one per run) and left out of its pieces.
    grains: u64,
}

impl Task {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }

    fn partial(&self) -> bool {
        self.grains != 0
    }
}

/// A cluster that guest writes took off the copy bitmap a few grains at a time: only the
/// grains they touch are read on the guest's path; the rest stays in the source until the
/// background copy (or another guest write) takes it. Masks have one bit per grain.
#[derive(Debug, Default)]
struct Partial {
    /// Grains claimed by a task or in the target.
    taken: u64,
    /// Grains in the target.
    stored: u64,
    /// Grains a guest write relied on: their point-in-time data is no longer in the source.
    guest: u64,
    /// The cluster was counted as copied (once, when its first grains landed, as QEMU counts
    /// a cluster copied for a guest write).
    reported: bool,
}

#[derive(Debug, Default)]
struct State {
    tasks: Vec<Task>,
    /// Clusters being copied grain by grain, by offset; their copy-bitmap bits are clear.
    partial: BTreeMap<u64, Partial>,
    next_id: u64,
    /// A failure nobody waited for, until the job takes it.
    error: Option<BlockError>,
}

impl State {
    /// A new task reading `[start, end)` (for `grains` of a partial cluster, or whole when 0);
    /// returns its id.
    fn new_task(&mut self, start: u64, end: u64, grains: u64) -> u64 {
        self.next_id += 1;
        self.tasks.push(Task {
            id: self.next_id,
            start,
            end,
            phase: Phase::Reading,
            guest_passed: false,
            grains,
        });
        self.next_id
    }
}

/// A copy from one node to another; see the module docs.
pub struct BlockCopy {
    source: Arc<Child>,
    target: Arc<Child>,
    cluster: u64,
    /// Grain of guest-path copies; equal to `cluster` when whole clusters are copied.
    grain: u64,
    len: u64,
    chunk: u64,
    compress: bool,
    write_through: bool,
    discard_source: bool,
    bitmap: BitmapHandle,
    state: Mutex<State>,
    changed: Notify,
    memory: Arc<Semaphore>,
    progress: Mutex<Option<ProgressFn>>,
    skip_unallocated: AtomicBool,
    closed: AtomicBool,
    /// Guest writes in flight (see [`BlockCopy::guest_request`]).
    guests: AtomicUsize,
    /// Background copies go through `copy_file_range` ([`Options::use_copy_range`]), until
    /// it fails once.
    copy_range: AtomicBool,
    /// The background copy's read buffers, used again.
    pool: BufPool,
}

/// A guest write in flight, counted while this lives.
#[derive(Debug)]
pub struct GuestRequest<'a>(&'a AtomicUsize);

impl Drop for GuestRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for BlockCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockCopy")
            .field("source", &self.source.node().name())
            .field("target", &self.target.node().name())
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

/// Runs of set bits of `mask` as `(first, end)` bit indices.
fn bit_runs(mut mask: u64) -> Vec<(u32, u32)> {
    let mut runs = Vec::new();
    let mut base = 0;
    while mask != 0 {
        let lo = mask.trailing_zeros();
        let shifted = mask >> lo;
        let n = shifted.trailing_ones();
        runs.push((base + lo, base + lo + n));
        if lo + n >= 64 {
            break;
        }
        mask = shifted >> n;
        base += lo + n;
    }
    runs
}

/// The node below `node`'s top layer (its backing file, looking through filters), for
/// "allocated in the top layer".
fn top_layer_base(node: &Arc<BlockNode>) -> Option<Arc<BlockNode>> {
    let mut n = node.clone();
    loop {
        if let Some(b) = n.child(ChildRole::Backing) {
            return Some(b.node());
        }
        n = n.child(ChildRole::Filtered)?.node();
    }
}

impl BlockCopy {
    /// A copy from `source` to `target` with a clean copy bitmap owned by `owner` (listed
    /// there as an unnamed, disabled bitmap). Set what to copy with
    /// [`with_bitmap`](Self::with_bitmap).
    pub fn new(
        source: Arc<Child>,
        target: Arc<Child>,
        owner: &Arc<BlockNode>,
        opts: Options,
    ) -> Result<Arc<BlockCopy>> {
        let cluster = opts.cluster_size;
        if cluster < 512 || !cluster.is_power_of_two() {
            return Err(BlockError::invalid(format!(
                "copy cluster size {cluster} is not a power of two of at least 512"
            )));
        }
        let len = source.node().len();
        let bitmap = owner
            .add_internal_bitmap_with(cluster, false)
            .map_err(|e| BlockError::invalid(e.to_string()))?;
        let chunk = match opts.max_chunk {
            0 => MAX_BUFFER,
            n => n.min(MAX_BUFFER),
        };
        // No larger than either end takes in one request, as QEMU's block-copy cuts its
        // tasks (a blkdebug `max-transfer` shows in the progress of a failed copy).
        let transfer = source
            .node()
            .facts()
            .max_transfer
            .min(target.node().facts().max_transfer);
        let chunk = chunk.min(u64::from(transfer));
        let chunk = if opts.compress {
            cluster
        } else {
            align_down(chunk, cluster).max(cluster)
        };
        let grain = match opts.grain {
            0 => (cluster / 64).max(MIN_GRAIN),
            g => g.max(cluster / 64).max(512).next_power_of_two(),
        };
        let whole = opts.compress || opts.write_through || opts.discard_source;
        let grain = if whole { cluster } else { grain.min(cluster) };
        let units = usize::try_from(opts.memory.max(chunk).div_ceil(MEMORY_UNIT))
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        Ok(Arc::new(BlockCopy {
            source,
            target,
            cluster,
            grain,
            len,
            chunk,
            compress: opts.compress,
            write_through: opts.write_through,
            discard_source: opts.discard_source,
            bitmap,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            memory: Arc::new(Semaphore::new(units)),
            progress: Mutex::new(None),
            skip_unallocated: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            guests: AtomicUsize::new(0),
            copy_range: AtomicBool::new(opts.use_copy_range && !opts.compress),
            pool: BufPool::default(),
        }))
    }

    /// The copy granularity.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Bytes of the source.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty source.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The largest range one task copies.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// The source edge.
    pub fn source(&self) -> &Arc<Child> {
        &self.source
    }

    /// The target edge.
    pub fn target(&self) -> &Arc<Child> {
        &self.target
    }

    /// Where progress goes from now on.
    pub fn set_progress(&self, f: ProgressFn) {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    fn report(&self, p: Progress) {
        let f = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = f {
            f(p);
        }
    }

    /// Skips ranges the source's top layer does not allocate (sync=top).
    pub fn set_skip_unallocated(&self, on: bool) {
        self.skip_unallocated.store(on, Ordering::Relaxed);
    }

    /// Runs `f` on the copy bitmap (dirty = still to copy). `None` once its owner is gone.
    /// Ranges claimed by tasks are already clean in it.
    pub fn with_bitmap<T>(&self, f: impl FnOnce(&mut DirtyBitmap) -> T) -> Option<T> {
        let _st = lock(&self.state);
        self.bitmap.with(f)
    }

    /// Counts a guest write in flight (through `protect` and on to the source) while the
    /// result lives: how many there are decides whether guest writes protect grains or whole
    /// clusters.
    pub fn guest_request(&self) -> GuestRequest<'_> {
        self.guests.fetch_add(1, Ordering::Relaxed);
        GuestRequest(&self.guests)
    }

    /// The grain of guest-path copies (the cluster size when whole clusters are copied).
    pub fn grain(&self) -> u64 {
        self.grain
    }

    /// Bytes still to copy, for progress: dirty in the bitmap, claimed and not yet in the
    /// target, or in a cluster copied grain by grain that was not counted yet.
    pub fn remaining(&self) -> u64 {
        let st = lock(&self.state);
        let dirty = self.bitmap.with(|b| b.dirty_bytes()).unwrap_or(0);
        let tasks: u64 = st
            .tasks
            .iter()
            .filter(|t| !t.partial())
            .map(|t| t.end - t.start)
            .sum();
        let partial: u64 = st
            .partial
            .iter()
            .filter(|(_, p)| !p.reported)
            .map(|(&c, _)| self.cluster_end(c) - c)
            .sum();
        dirty + tasks + partial
    }

    /// True when nothing is left to copy and no task is in flight or stranded.
    pub fn is_done(&self) -> bool {
        let st = lock(&self.state);
        let dirty = self.bitmap.with(|b| b.dirty_bytes()).unwrap_or(0);
        dirty == 0
            && st.tasks.is_empty()
            && st.partial.iter().all(|(&c, p)| p.taken == self.full(c))
    }

    /// What is not in the target yet, at cluster grain: the copy bitmap and the clusters
    /// copied grain by grain that are not whole in the target. `None` once the owner is gone.
    pub fn uncopied(&self) -> Option<DirtyBitmap> {
        let st = lock(&self.state);
        let mut b = self.bitmap.with(|b| b.clone())?;
        for (&c, p) in &st.partial {
            if p.stored != self.full(c) {
                b.set_dirty(c, self.cluster_end(c) - c);
            }
        }
        Some(b)
    }

    /// Nothing in `[start, end)` (whole clusters) needs copying any more (a snapshot reader
    /// discarded it).
    pub fn forget(&self, start: u64, end: u64) {
        let mut st = lock(&self.state);
        self.bitmap.with(|b| b.reset_dirty(start, end - start));
        let keys: Vec<u64> = st.partial.range(start..end).map(|(&c, _)| c).collect();
        for c in keys {
            let ce = self.cluster_end(c);
            let busy = st.tasks.iter().any(|t| t.overlaps(c, ce));
            if busy {
                if let Some(p) = st.partial.get_mut(&c) {
                    p.taken = self.full(c);
                    p.stored = p.taken;
                    p.reported = true;
                }
            } else {
                st.partial.remove(&c);
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Ranges of `[offset, end)` inside clusters copied grain by grain whose point-in-time
    /// data is still in the source (no guest write relied on a copy of them yet), although a
    /// guest write to another grain marked the cluster as protected.
    pub fn in_source(&self, offset: u64, end: u64) -> Vec<(u64, u64)> {
        let st = lock(&self.state);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let from = align_down(offset, self.cluster);
        for (&c, p) in st.partial.range(from..end) {
            for (lo, hi) in bit_runs(self.full(c) & !p.guest) {
                let (s, e) = self.grain_range(c, lo, hi);
                let (s, e) = (s.max(offset), e.min(end));
                if s >= e {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => out.push((s, e)),
                }
            }
        }
        out
    }

    /// End of the cluster at `c` (the disk may end inside its last cluster).
    fn cluster_end(&self, c: u64) -> u64 {
        (c + self.cluster).min(self.len)
    }

    /// Mask of every grain of the cluster at `c`.
    fn full(&self, c: u64) -> u64 {
        let n = (self.cluster_end(c) - c).div_ceil(self.grain);
        if n >= 64 {
            u64::MAX
        } else {
            (1u64 << n) - 1
        }
    }

    /// Mask of the grains of the cluster at `c` that `[s, e)` touches.
    fn grain_mask(&self, c: u64, s: u64, e: u64) -> u64 {
        let (s, e) = (s.max(c), e.min(self.cluster_end(c)));
        if s >= e {
            return 0;
        }
        let lo = (s - c) / self.grain;
        let hi = (e - c).div_ceil(self.grain);
        let upto = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
        upto & !((1u64 << lo) - 1)
    }

    /// Bytes of grains `[lo, hi)` of the cluster at `c`.
    fn grain_range(&self, c: u64, lo: u32, hi: u32) -> (u64, u64) {
        (
            c + u64::from(lo) * self.grain,
            (c + u64::from(hi) * self.grain).min(self.cluster_end(c)),
        )
    }

    /// Claims the grains `want` of the partial cluster at `c` as one task, which reads them
    /// (and the grains between) in one request.
    fn claim_grains(&self, st: &mut State, c: u64, want: u64) -> Option<(u64, u64, u64)> {
        if want == 0 {
            return None;
        }
        let lo = want.trailing_zeros();
        let hi = 64 - want.leading_zeros();
        let (s, e) = self.grain_range(c, lo, hi);
        let id = st.new_task(s, e, want);
        if let Some(p) = st.partial.get_mut(&c) {
            p.taken |= want;
        }
        Some((id, s, e))
    }

    /// The parts of `pieces` (read for the task copying `grains` of the cluster at `c`) that
    /// fall in those grains.
    fn keep_grains(&self, c: u64, grains: u64, pieces: Vec<Piece>) -> Vec<Piece> {
        let runs: Vec<(u64, u64)> = bit_runs(grains)
            .into_iter()
            .map(|(lo, hi)| self.grain_range(c, lo, hi))
            .collect();
        if runs.len() == 1 {
            return pieces;
        }
        let mut out = Vec::new();
        for p in pieces {
            for &(s, e) in &runs {
                let (s, e) = (s.max(p.offset), e.min(p.offset + p.len));
                if s >= e {
                    continue;
                }
                let content = match &p.content {
                    Content::Data(d) => {
                        Content::Data(d.slice((s - p.offset) as usize..(e - p.offset) as usize))
                    }
                    Content::Zero => Content::Zero,
                    Content::Skip => Content::Skip,
                };
                out.push(Piece {
                    offset: s,
                    len: e - s,
                    content,
                });
            }
        }
        out
    }

    /// The dirty clusters a guest write over `[gs, ge)` touches only in part become partial
    /// (grain by grain), while there is room for their bookkeeping.
    fn split_edges(&self, st: &mut State, gs: u64, ge: u64) {
        if self.grain >= self.cluster {
            return;
        }
        let first = align_down(gs, self.cluster);
        let last = align_down(ge - 1, self.cluster);
        for c in [first, last] {
            if st.partial.len() >= MAX_PARTIAL || st.partial.contains_key(&c) {
                continue;
            }
            let covered = gs <= c && ge >= self.cluster_end(c);
            let dirty = self.bitmap.with(|b| b.is_dirty(c)).unwrap_or(false);
            if covered || !dirty {
                continue;
            }
            self.bitmap
                .with(|b| b.reset_dirty(c, self.cluster_end(c) - c));
            st.partial.insert(c, Partial::default());
        }
    }

    /// Claims the dirty clusters of `[start, end)` (cluster-aligned) as new tasks.
    fn claim(&self, st: &mut State, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let chunk = self.chunk;
        let areas = self
            .bitmap
            .with(|b| {
                let mut out = Vec::new();
                let mut at = start;
                while let Some((s, n)) = b.next_dirty_area(at, end, chunk) {
                    b.reset_dirty(s, n);
                    out.push((s, s + n));
                    at = s + n;
                }
                out
            })
            .unwrap_or_default();
        areas
            .into_iter()
            .map(|(s, e)| (st.new_task(s, e, 0), s, e))
            .collect()
    }

    /// Whether `t` copies any of `[gs, ge)` (grain-aligned): the grains between those of a
    /// partial task, which others took, are not its own.
    fn touches(&self, t: &Task, gs: u64, ge: u64) -> bool {
        t.overlaps(gs, ge)
            && (!t.partial()
                || t.grains & self.grain_mask(align_down(t.start, self.cluster), gs, ge) != 0)
    }

    /// Whether a guest write may rely on `t` for the old data of its range.
    fn usable(&self, t: &Task) -> bool {
        match t.phase {
            Phase::Reading => false,
            Phase::Held(_) | Phase::Stranded(_) => !self.write_through,
        }
    }

    /// The guest is about to change `[offset, offset+len)` of the source: returns once the
    /// point-in-time content of every grain it touches is safe (held in memory or in the
    /// target), copying what nobody copies yet. Clusters the write covers whole are copied
    /// whole; in a cluster it touches in part only the grains it touches are read, and the
    /// rest stays for the background copy. An error means it could not be made safe; what
    /// was not copied stays to be copied.
    pub async fn protect(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        let start = align_down(offset, self.cluster);
        let end = offset
            .saturating_add(len)
            .div_ceil(self.cluster)
            .saturating_mul(self.cluster)
            .min(self.len);
        if start >= end {
            return Ok(());
        }
        let gs = align_down(offset, self.grain);
        let ge = offset
            .saturating_add(len)
            .div_ceil(self.grain)
            .saturating_mul(self.grain)
            .min(self.len);
        let fine = self.guests.load(Ordering::Relaxed) <= GRAIN_MAX_GUESTS;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let mine = {
                let mut st = lock(&self.state);
                let waiting = st
                    .tasks
                    .iter()
                    .any(|t| self.touches(t, gs, ge) && !self.usable(t));
                let mine = if waiting {
                    Vec::new()
                } else {
                    if fine {
                        self.split_edges(&mut st, gs, ge);
                    }
                    let mut mine = self.claim(&mut st, start, end);
                    let partial: Vec<(u64, u64)> = st
                        .partial
                        .range(start..end)
                        .map(|(&c, p)| {
                            // A busy guest takes the rest of a partial cluster along.
                            let want = if fine {
                                self.grain_mask(c, gs, ge)
                            } else {
                                self.full(c)
                            };
                            (c, want & !p.taken)
                        })
                        .filter(|&(_, want)| want != 0)
                        .collect();
                    for (c, want) in partial {
                        mine.extend(self.claim_grains(&mut st, c, want));
                    }
                    mine
                };
                if !waiting && mine.is_empty() {
                    for t in st.tasks.iter_mut() {
                        if self.touches(t, gs, ge) {
                            t.guest_passed = true;
                        }
                    }
                    let cuts: Vec<(u64, u64)> = st
                        .partial
                        .range(start..end)
                        .map(|(&c, _)| (c, self.grain_mask(c, gs, ge)))
                        .collect();
                    for (c, m) in cuts {
                        if let Some(p) = st.partial.get_mut(&c) {
                            p.guest |= m;
                        }
                    }
                    return Ok(());
                }
                mine
            };
            if mine.is_empty() {
                changed.await;
                continue;
            }
            let mut held = Vec::with_capacity(mine.len());
            for (id, s, e) in mine {
                let (tx, rx) = oneshot::channel();
                drop(self.spawn(id, s, e, Some(tx), false));
                held.push(rx);
            }
            let mut first_err = None;
            for rx in held {
                let r = rx.await.unwrap_or_else(|_| {
                    Err(BlockError::new(
                        block::ErrorKind::Io,
                        "copy-before-write: the copy task ended without an answer",
                    ))
                });
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
        }
    }

    /// Claims the next dirty area at or after `from` (at most one chunk, and at most `limit`
    /// bytes rounded up to a cluster when `limit` is not 0) and copies it in a task of its
    /// own. Returns the start and end of the area and the task, whose result says whether the
    /// area reached the target; `None` when nothing is dirty from `from` on.
    pub fn copy_next(self: &Arc<Self>, from: u64, limit: u64) -> Option<(u64, u64, CopyTask)> {
        self.copy_next_within(from, limit, None)
            .map(|(s, e, task, _)| (s, e, task))
    }

    /// [`copy_next`](Self::copy_next), where block status just found `zero` reading as
    /// zeroes: a task claimed inside it writes zeroes at once, without asking again (a dirty
    /// range nobody has claimed still holds what the source held at the point in time).
    /// The flag says whether the task does.
    fn copy_next_within(
        self: &Arc<Self>,
        from: u64,
        limit: u64,
        zero: Option<(u64, u64)>,
    ) -> Option<(u64, u64, CopyTask, bool)> {
        let from = align_down(from, self.cluster);
        let (id, s, e) = {
            let mut st = lock(&self.state);
            let chunk = self.chunk_within(limit);
            let area = self
                .bitmap
                .with(|b| b.next_dirty_area(from, self.len, chunk))
                .flatten();
            let partial = st
                .partial
                .range(from..)
                .find(|(&c, p)| p.taken != self.full(c))
                .map(|(&c, p)| (c, self.full(c) & !p.taken));
            match (area, partial) {
                (Some((s, _)), Some((c, want))) if c < s => {
                    let (id, s, e) = self.claim_grains(&mut st, c, want)?;
                    return Some((s, e, self.spawn(id, s, e, None, false), false));
                }
                (None, Some((c, want))) => {
                    let (id, s, e) = self.claim_grains(&mut st, c, want)?;
                    return Some((s, e, self.spawn(id, s, e, None, false), false));
                }
                (Some((s, n)), _) => self.claim(&mut st, s, s + n).pop()?,
                (None, None) => return None,
            }
        };
        let zero = zero.is_some_and(|(zs, ze)| zs <= s && e <= ze);
        Some((s, e, self.spawn(id, s, e, None, zero), zero))
    }

    /// The most one background task takes: a chunk, or `limit` rounded up to a cluster when
    /// that is less (0: no limit).
    fn chunk_within(&self, limit: u64) -> u64 {
        match limit {
            0 => self.chunk,
            l => self.chunk.min(l.div_ceil(self.cluster) * self.cluster),
        }
    }

    /// [`copy_next`](Self::copy_next), with the area ending where the source's block status
    /// at its start ends, as QEMU's block-copy cuts its tasks: the first run of data, zeroes
    /// (or, skipping unallocated ranges, of what the top layer does not allocate) in whole
    /// clusters, or one cluster when the run is shorter. A fully allocated disk still goes in
    /// whole chunks; a throttled job's progress (a chunk, then the speed's wait) and the offset
    /// a cancel reports then match QEMU's, e.g. 64 KiB on a raw image that `qemu-img create`
    /// made, whose first 4 KiB are written.
    ///
    /// The flag says whether the task only writes zeroes (its area reads as zeroes): such a
    /// task holds no data, and writes at once, before any task that has to read.
    pub async fn copy_next_run(
        self: &Arc<Self>,
        from: u64,
        limit: u64,
    ) -> Option<(u64, u64, CopyTask, bool)> {
        let chunk = self.chunk_within(limit);
        let from = align_down(from, self.cluster);
        let next = self
            .bitmap
            .with(|b| b.next_dirty_area(from, self.len, chunk))
            .flatten();
        let (limit, zero) = match next {
            // A failed block status leaves the area whole; the task's own read reports it.
            Some((s, n)) => match self.first_run(s, n).await {
                Ok((run, zero)) if run < n => (run, zero.then_some((s, s + run))),
                Ok((_, zero)) => (limit, zero.then_some((s, s + n))),
                _ => (limit, None),
            },
            None => (limit, None),
        };
        self.copy_next_within(from, limit, zero)
    }

    /// The length of the block-status run at `at` within `want` (see
    /// [`copy_next_run`](Self::copy_next_run)).
    /// Whether the run reads as zeroes comes with it.
    async fn first_run(&self, at: u64, want: u64) -> Result<(u64, bool)> {
        let node = self.source.node();
        if self.skip_unallocated.load(Ordering::Relaxed) {
            let base = top_layer_base(&node);
            let (allocated, n) = map::allocated_above(&node, base.as_ref(), at, want).await?;
            if !allocated {
                return Ok((self.whole_clusters(at, n, at + want), false));
            }
        }
        let (content, n) = self.classify(&node, at, want).await?;
        Ok((n, matches!(content, Content::Zero)))
    }

    fn spawn(
        self: &Arc<Self>,
        id: u64,
        start: u64,
        end: u64,
        held: Option<oneshot::Sender<Result<()>>>,
        zero: bool,
    ) -> CopyTask {
        let this = self.clone();
        // Only a guest write waits for a task it claimed; the others are background I/O.
        let background = held.is_none();
        let task = async move { this.run_task(id, start, end, held, zero).await };
        tokio::spawn(block::drain::carry(async move {
            if background {
                block::io_class::background(task).await
            } else {
                task.await
            }
        }))
    }

    async fn run_task(
        self: Arc<Self>,
        id: u64,
        start: u64,
        end: u64,
        mut held: Option<oneshot::Sender<Result<()>>>,
        zero: bool,
    ) -> std::result::Result<u64, CopyError> {
        // Zeroes hold no buffer: a zero task takes nothing from the budget.
        let units = match zero {
            true => 0,
            false => u32::try_from((end - start).div_ceil(MEMORY_UNIT)).unwrap_or(u32::MAX),
        };
        let permit = match self.memory.clone().acquire_many_owned(units).await {
            Ok(p) => p,
            Err(_) => {
                let e = BlockError::new(block::ErrorKind::Io, "block copy closed");
                self.unclaim(id, true);
                if let Some(tx) = held.take() {
                    let _ = tx.send(Err(e.clone()));
                }
                return Err(CopyError {
                    read: true,
                    error: e,
                });
            }
        };
        // A guest write waits for this read: it reads at once, block status running beside
        // it rather than first (see `fetch`).
        let guest = held.is_some();
        let grains = lock(&self.state)
            .tasks
            .iter()
            .find(|t| t.id == id)
            .map_or(0, |t| t.grains);
        if !guest && !zero && self.copy_range.load(Ordering::Relaxed) {
            match self.offload(start, end, grains).await {
                Ok(true) => {
                    if self.discard_source {
                        let _ = self.source.discard(start, end.min(self.len) - start).await;
                    }
                    self.unclaim(id, false);
                    return Ok(end - start);
                }
                Ok(false) => {}
                Err(e) => {
                    self.unclaim(id, true);
                    return Err(e);
                }
            }
        }
        // As in QEMU, where every task's read yields: tasks started with this one that only
        // write zeroes reach the target before this one's data does.
        if !guest && !zero {
            tokio::task::yield_now().await;
        }
        let fetched = if zero {
            Ok(vec![Piece {
                offset: start,
                len: end - start,
                content: Content::Zero,
            }])
        } else {
            self.fetch(start, end, guest).await
        };
        let pieces = match fetched {
            Ok(p) if grains != 0 => {
                Arc::new(self.keep_grains(align_down(start, self.cluster), grains, p))
            }
            Ok(p) => Arc::new(p),
            Err(e) => {
                self.unclaim(id, true);
                if let Some(tx) = held.take() {
                    let _ = tx.send(Err(e.clone()));
                }
                return Err(CopyError {
                    read: true,
                    error: e,
                });
            }
        };
        // A guest write that claimed the range goes on as soon as it hears the data is held:
        // from then on the data cannot be read again, whatever the target does.
        let relied_on = held.is_some() && !self.write_through;
        let partial = self.set_phase(id, Phase::Held(pieces.clone()), relied_on);
        if relied_on {
            if let Some(tx) = held.take() {
                let _ = tx.send(Ok(()));
            }
        }
        match self.store(&pieces, !partial).await {
            Ok(()) => {
                if self.discard_source {
                    // What the source held is in the target now: let it go (a failure
                    // only keeps space in use).
                    let _ = self.source.discard(start, end.min(self.len) - start).await;
                }
                self.unclaim(id, false);
                if !guest {
                    self.recycle(pieces);
                }
                drop(permit);
                if let Some(tx) = held.take() {
                    let _ = tx.send(Ok(()));
                }
                Ok(end - start)
            }
            Err(e) => {
                if let Some(permit) = self.strand_or_redirty(id, permit, &e) {
                    let this = self.clone();
                    tokio::spawn(block::drain::carry(block::io_class::background(
                        async move {
                            this.retry(id, pieces, !partial, permit).await;
                        },
                    )));
                }
                if let Some(tx) = held.take() {
                    let _ = tx.send(Err(e.clone()));
                }
                Err(CopyError {
                    read: false,
                    error: e,
                })
            }
        }
    }

    /// Writes stranded data until it lands or the copy is closed, backing off between tries.
    async fn retry(
        &self,
        id: u64,
        pieces: Arc<Vec<Piece>>,
        count: bool,
        permit: OwnedSemaphorePermit,
    ) {
        let mut pause = std::time::Duration::from_millis(10);
        while !self.closed.load(Ordering::Acquire) {
            let closed = self.changed.notified();
            let _ = tokio::time::timeout(pause, closed).await;
            if self.closed.load(Ordering::Acquire) {
                break;
            }
            match self.store(&pieces, count).await {
                Ok(()) => {
                    self.unclaim(id, false);
                    break;
                }
                Err(e) => {
                    self.record_error(e);
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                }
            }
        }
        drop(permit);
    }

    fn record_error(&self, e: BlockError) {
        lock(&self.state).error.get_or_insert(e);
    }

    /// The first failure of a copy nobody waited for (a held range's target write), since
    /// the last call. The job reports it as a target error.
    pub fn take_error(&self) -> Option<BlockError> {
        lock(&self.state).error.take()
    }

    /// Stops: tasks waiting for memory fail, stranded data is no longer retried. The copy
    /// cannot be used afterwards (the job using it ended).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.memory.close();
        self.changed.notify_waiters();
    }

    /// Moves task `id` on; returns whether it copies grains of a partial cluster.
    fn set_phase(&self, id: u64, phase: Phase, guest_passed: bool) -> bool {
        let mut st = lock(&self.state);
        let mut partial = false;
        if let Some(t) = st.tasks.iter_mut().find(|t| t.id == id) {
            t.phase = phase;
            t.guest_passed |= guest_passed;
            partial = t.partial();
        }
        drop(st);
        self.changed.notify_waiters();
        partial
    }

    /// Ends task `id`: its range is copied, or (`redirty`) still to copy.
    fn unclaim(&self, id: u64, redirty: bool) {
        let mut st = lock(&self.state);
        let mut counted = None;
        if let Some(i) = st.tasks.iter().position(|t| t.id == id) {
            let t = st.tasks.swap_remove(i);
            counted = self.release(&mut st, &t, redirty);
        }
        drop(st);
        if let Some(n) = counted {
            self.report(Progress::Copied(n));
        }
        self.changed.notify_waiters();
    }

    /// Books a finished task: its range is in the target, or (`redirty`) still to copy.
    /// Returns the bytes to count as copied when this completes a grain-by-grain cluster's
    /// first landing (whole-cluster tasks count their pieces as they store them).
    fn release(&self, st: &mut State, t: &Task, redirty: bool) -> Option<u64> {
        if !t.partial() {
            if redirty {
                self.bitmap.with(|b| b.set_dirty(t.start, t.end - t.start));
            }
            return None;
        }
        let c = align_down(t.start, self.cluster);
        let m = t.grains;
        let full = self.full(c);
        let ce = self.cluster_end(c);
        let p = st.partial.get_mut(&c)?;
        if redirty {
            // A forgotten cluster (all stored already) is not copied again.
            if p.stored != full {
                p.taken &= !m;
            }
            return None;
        }
        p.stored |= m;
        let counted = (!p.reported).then_some(ce - c);
        p.reported = true;
        if p.stored == full {
            st.partial.remove(&c);
        }
        counted
    }

    /// A target write failed: the range is read again later, unless a guest write relied on
    /// the held data, which is then kept (stranded) and retried: its memory is handed back
    /// for that.
    fn strand_or_redirty(
        &self,
        id: u64,
        permit: OwnedSemaphorePermit,
        e: &BlockError,
    ) -> Option<OwnedSemaphorePermit> {
        let mut st = lock(&self.state);
        let mut keep = None;
        if let Some(i) = st.tasks.iter().position(|t| t.id == id) {
            if st.tasks[i].guest_passed {
                let t = &mut st.tasks[i];
                if let Phase::Held(p) = &t.phase {
                    t.phase = Phase::Stranded(p.clone());
                }
                st.error.get_or_insert_with(|| e.clone());
                keep = Some(permit);
            } else {
                let t = st.tasks.swap_remove(i);
                self.release(&mut st, &t, true);
            }
        }
        drop(st);
        self.changed.notify_waiters();
        keep
    }

    /// True when some held data could not be written yet (it is being retried).
    pub fn has_stranded(&self) -> bool {
        lock(&self.state)
            .tasks
            .iter()
            .any(|t| matches!(t.phase, Phase::Stranded(_)))
    }

    /// Waits until no task is reading or writing (stranded ones may remain).
    pub async fn settled(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let busy = lock(&self.state)
                .tasks
                .iter()
                .any(|t| !matches!(t.phase, Phase::Stranded(_)));
            if !busy {
                return;
            }
            changed.await;
        }
    }

    /// Reads what `[start, end)` of the source holds now, as pieces.
    /// `direct` (a guest waits): read the whole range at once, with block status asked beside
    /// the read rather than before it (unless unallocated ranges are to be skipped).
    async fn fetch(&self, start: u64, end: u64, direct: bool) -> Result<Vec<Piece>> {
        let node = self.source.node();
        let base = if self.skip_unallocated.load(Ordering::Relaxed) {
            Some(top_layer_base(&node))
        } else {
            None
        };
        if direct && base.is_none() {
            // The guest waits for this read; block status runs beside it (not before it), so
            // that zeroes still reach the target as zeroes, as QEMU's copy (which asks first)
            // writes them. A failed block status leaves the range as data.
            let (data, plan) = tokio::join!(
                self.source.read(start, (end - start) as usize),
                self.plan(start, end, None)
            );
            let data = data?;
            return Ok(match plan {
                Ok(pieces) if pieces.iter().any(|p| matches!(p.content, Content::Zero)) => pieces
                    .into_iter()
                    .map(|mut p| {
                        if let Content::Data(_) = p.content {
                            let at = (p.offset - start) as usize;
                            p.content = Content::Data(data.slice(at..at + p.len as usize));
                        }
                        p
                    })
                    .collect(),
                _ => vec![Piece {
                    offset: start,
                    len: end - start,
                    content: Content::Data(data),
                }],
            });
        }
        let mut pieces = self.plan(start, end, base).await?;
        for p in pieces.iter_mut() {
            if let Content::Data(_) = p.content {
                // The background copy's large reads go into buffers used again (see
                // `pool`); a guest's grains and small pieces are allocated as they come.
                let data = if !direct && p.len * 2 > end - start {
                    let buf = self.pool.take(p.len as usize);
                    self.source.read_into(p.offset, buf).await?.freeze()
                } else {
                    self.source.read(p.offset, p.len as usize).await?
                };
                p.content = Content::Data(data);
            }
        }
        Ok(pieces)
    }

    /// Hands the read buffers of a finished background task back to the pool.
    fn recycle(&self, pieces: Arc<Vec<Piece>>) {
        let Ok(pieces) = Arc::try_unwrap(pieces) else {
            return;
        };
        for p in pieces {
            if let Content::Data(d) = p.content {
                self.pool.give(d);
            }
        }
    }

    /// What `[start, end)` of the source holds, as pieces whose data is not read yet (empty):
    /// zero ranges, data ranges, and (with `base`) ranges not allocated above it, to skip.
    async fn plan(
        &self,
        start: u64,
        end: u64,
        base: Option<Option<Arc<BlockNode>>>,
    ) -> Result<Vec<Piece>> {
        let node = self.source.node();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut at = start;
        while at < end {
            let want = end - at;
            let (content, n) = if let Some(base) = &base {
                let (allocated, n) = map::allocated_above(&node, base.as_ref(), at, want).await?;
                if allocated {
                    self.classify(&node, at, want).await?
                } else {
                    (Content::Skip, self.whole_clusters(at, n, end))
                }
            } else {
                self.classify(&node, at, want).await?
            };
            match (pieces.last_mut(), &content) {
                (Some(last), Content::Data(_)) if matches!(last.content, Content::Data(_)) => {
                    last.len += n;
                }
                (Some(last), Content::Zero) if matches!(last.content, Content::Zero) => {
                    last.len += n;
                }
                (Some(last), Content::Skip) if matches!(last.content, Content::Skip) => {
                    last.len += n;
                }
                _ => pieces.push(Piece {
                    offset: at,
                    len: n,
                    content,
                }),
            }
            at += n;
        }
        Ok(pieces)
    }

    /// Copies `[start, end)` (the `grains` of a partial cluster when not 0) with the data ranges
    /// going through `copy_file_range`, for a task no guest waits for: the task stays in its
    /// reading phase meanwhile, so a guest write to the range waits for all of it, as in QEMU.
    /// `Ok(false)`: the pair cannot copy so (offload is now off), copy through memory instead.
    async fn offload(
        &self,
        start: u64,
        end: u64,
        grains: u64,
    ) -> std::result::Result<bool, CopyError> {
        let base = if self.skip_unallocated.load(Ordering::Relaxed) {
            Some(top_layer_base(&self.source.node()))
        } else {
            None
        };
        let read_err = |error| CopyError { read: true, error };
        let mut pieces = self.plan(start, end, base).await.map_err(read_err)?;
        if grains != 0 {
            pieces = self.keep_grains(align_down(start, self.cluster), grains, pieces);
        }
        for p in &pieces {
            if !matches!(p.content, Content::Data(_)) {
                self.store(std::slice::from_ref(p), false)
                    .await
                    .map_err(|error| CopyError { read: false, error })?;
                continue;
            }
            let mut at = p.offset;
            let end = p.offset + p.len;
            while at < end {
                match self
                    .source
                    .copy_range_to(at, &self.target, at, end - at)
                    .await
                {
                    Ok(Some(n)) if n > 0 => at += n,
                    // Not two files, not aligned, or the kernel refused: through memory from
                    // now on (what was copied is copied again, harmlessly).
                    _ => {
                        self.copy_range.store(false, Ordering::Relaxed);
                        return Ok(false);
                    }
                }
            }
        }
        // Counted once all is copied, so a fallback half way counts nothing twice (grains of
        // a partial cluster are counted by the cluster, in `release`).
        if grains == 0 {
            for p in &pieces {
                self.report(match p.content {
                    Content::Skip => Progress::Skipped(p.len),
                    _ => Progress::Copied(p.len),
                });
            }
        }
        Ok(true)
    }

    /// Zero or data for the range at `at`, and how many bytes: whole clusters, a cluster
    /// that is only partly zero being data.
    async fn classify(&self, node: &Arc<BlockNode>, at: u64, want: u64) -> Result<(Content, u64)> {
        let e = map::extent_at(node, at, want).await?;
        let end = at + want;
        let whole = align_down(e.length, self.cluster);
        if e.zero && (whole > 0 || at + e.length >= end) {
            return Ok((Content::Zero, self.whole_clusters(at, e.length, end)));
        }
        let n = if e.zero {
            self.cluster.min(want)
        } else {
            self.whole_clusters(at, e.length, end)
        };
        Ok((Content::Data(Bytes::new()), n))
    }

    /// `n` bytes from `at` rounded down to whole clusters (at least one), within `end`.
    fn whole_clusters(&self, at: u64, n: u64, end: u64) -> u64 {
        if at + n >= end {
            return end - at;
        }
        align_down(n, self.cluster).max(self.cluster).min(end - at)
    }

    /// Writes pieces to the target, counting them as progress when `count` (grains of a
    /// partial cluster are counted by the cluster, in [`release`](Self::release)).
    async fn store(&self, pieces: &[Piece], count: bool) -> Result<()> {
        for p in pieces {
            match &p.content {
                Content::Data(d) => {
                    let flags = if self.compress {
                        WriteFlags::compressed()
                    } else {
                        WriteFlags::default()
                    };
                    self.target
                        .write(p.offset, IoVec::from(d.clone()), flags)
                        .await?;
                    if count {
                        self.report(Progress::Copied(p.len));
                    }
                }
                Content::Zero => {
                    self.target
                        .write_zeroes(p.offset, p.len, ZeroFlags::default())
                        .await?;
                    if count {
                        self.report(Progress::Copied(p.len));
                    }
                }
                Content::Skip if count => self.report(Progress::Skipped(p.len)),
                Content::Skip => {}
            }
        }
        Ok(())
    }

    /// The point-in-time content of `[offset, offset+len)` that this copy holds in memory,
    /// as `(offset, bytes)` parts (zero ranges as zeroes); what it does not hold is either
    /// still in the source (dirty in the bitmap) or already in the target.
    pub fn held(&self, offset: u64, len: u64) -> Vec<(u64, Bytes)> {
        let end = offset.saturating_add(len);
        let st = lock(&self.state);
        let mut out = Vec::new();
        for t in st.tasks.iter().filter(|t| t.overlaps(offset, end)) {
            let pieces = match &t.phase {
                Phase::Held(p) | Phase::Stranded(p) => p,
                Phase::Reading => continue,
            };
            for p in pieces.iter() {
                let (s, e) = (p.offset.max(offset), (p.offset + p.len).min(end));
                if s >= e {
                    continue;
                }
                let bytes = match &p.content {
                    Content::Data(d) => d.slice((s - p.offset) as usize..(e - p.offset) as usize),
                    Content::Zero => Bytes::from(vec![0u8; (e - s) as usize]),
                    Content::Skip => continue,
                };
                out.push((s, bytes));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
