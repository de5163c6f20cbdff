//! `copy-before-write`: a filter whose writes first make the old data of their range safe in
//! a target, so the target (with what the source still holds) is the source as it was when the
//! filter went in.
//!
//! ```text
//!   parents (guest export, job) ──▶ copy-before-write ──file──▶ source
//!                                          │
//!                                          └──target──▶ target (backup image, fleecing image)
//! ```
//!
//! A write, write-zeroes or discard asks the node's [`BlockCopy`] to protect the clusters it
//! touches, then goes to `file`. Reads, flushes and block status go to `file` unchanged. What
//! a backup's guest waits for is the read of the old data only (see `block_copy`,
//! [`CbwOptions::write_behind`]): the write to the target happens behind it, unless the target's
//! readers see the source (fleecing into an image backed by the source). There, and for filters
//! of `blockdev-add`, the guest waits for the target too, as in QEMU.
//!
//! When protecting fails (or takes longer than `cbw-timeout`): with `break-guest-write` the
//! guest's write fails and the source is untouched; with `break-snapshot` the write goes on and
//! the snapshot is broken for good: every later snapshot read fails with EACCES.
//!
//! The node carries QEMU's three unnamed, disabled bitmaps: the copy bitmap (what is left to
//! copy), `done` (ranges protected for a guest write: their point-in-time data is no longer in
//! the source) and `access` (ranges a snapshot reader may still read; a snapshot discard
//! clears them).

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bitmap::DirtyBitmap;
use block::{BitmapHandle, BlockDriver, BlockError, BlockNode, BlockStatus, Child, ChildRole};
use block::{Facts, IoVec, Result, WriteFlags, ZeroFlags};
use block_copy::{BlockCopy, Options as CopyOptions, DEFAULT_CLUSTER_SIZE};
use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

/// What a failed copy does (QEMU's `on-cbw-error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnCbwError {
    /// The guest write fails; the snapshot stays whole.
    #[default]
    BreakGuestWrite,
    /// The guest write goes on; the snapshot is broken (its reads fail from then on).
    BreakSnapshot,
}

/// Options of a copy-before-write node.
#[derive(Clone, Debug, Default)]
pub struct CbwOptions {
    /// What a failed or timed-out copy does.
    pub on_cbw_error: OnCbwError,
    /// How long a guest write may wait for its copy (`cbw-timeout`, seconds; 0 = no limit).
    pub timeout: Option<Duration>,
    /// Smallest copy cluster (`min-cluster-size`, 0 = none); a power of two.
    pub min_cluster_size: u64,
    /// Copy only what is dirty in this bitmap (read once, at open); `None`: everything.
    pub bitmap: Option<DirtyBitmap>,
    /// Write the target compressed (backup `compress`).
    pub compress: bool,
    /// Largest chunk a copy task moves (backup `x-perf.max-chunk`, 0 = default).
    pub max_chunk: u64,
    /// Discard what was copied from the source (backup `discard-source`; the `file` edge
    /// then has the policy `CopySourceDiscard`).
    pub discard_source: bool,
    /// The background copy goes through `copy_file_range` where it can (backup
    /// `x-perf.use-copy-range`).
    pub use_copy_range: bool,
    /// A guest write waits for the read of the old data only; the target write happens behind
    /// it, and a failed one is retried and reported to the job (a backup's filter). Otherwise
    /// (a filter of `blockdev-add`) the guest waits for the target too, as in QEMU, so a failed
    /// target write fails the guest write or breaks the snapshot as `on-cbw-error` says.
    pub write_behind: bool,
}

/// The copy cluster for `target`: at least 64 KiB and `min_cluster_size`, and at least the
/// target's own cluster (a smaller copy would leave partial clusters of a COW target).
pub fn cluster_size(target: &BlockNode, min_cluster_size: u64) -> Result<u64> {
    if min_cluster_size > i64::MAX as u64 {
        return Err(BlockError::invalid(format!(
            "min-cluster-size too large: {min_cluster_size} > {}",
            i64::MAX
        )));
    }
    if min_cluster_size != 0 && !min_cluster_size.is_power_of_two() {
        return Err(BlockError::invalid(
            "min-cluster-size needs to be a power of 2",
        ));
    }
    let min = min_cluster_size.max(DEFAULT_CLUSTER_SIZE);
    Ok(target
        .facts()
        .cluster_size
        .map_or(min, |c| min.max(u64::from(c))))
}

/// Whether `inner` is in `outer`'s backing chain (through filters), `outer` included.
fn chain_contains(outer: &Arc<BlockNode>, inner: &Arc<BlockNode>) -> bool {
    let mut n = outer.clone();
    loop {
        if Arc::ptr_eq(&n, inner) {
            return true;
        }
        match n
            .child(ChildRole::Backing)
            .or_else(|| n.child(ChildRole::Filtered))
        {
            Some(c) => n = c.node(),
            None => return false,
        }
    }
}

#[derive(Debug)]
struct Attached {
    bcs: Arc<BlockCopy>,
    done: BitmapHandle,
    access: BitmapHandle,
}

#[derive(Debug, Default)]
struct SnapState {
    /// The first failure under break-snapshot: the snapshot is broken.
    error: Option<String>,
    /// Snapshot reads from the source in flight: guest writes over them wait.
    frozen: Vec<(u64, u64, u64)>,
    next_id: u64,
}

/// The copy-before-write driver; see the module docs.
#[derive(Debug)]
pub struct CopyBeforeWrite {
    file: Arc<Child>,
    target: Arc<Child>,
    on_error: OnCbwError,
    timeout: Option<Duration>,
    attached: OnceLock<Attached>,
    snap: Mutex<SnapState>,
    snap_changed: Notify,
    /// What the guest's requests through the filter have been taking (see
    /// [`CopyBeforeWrite::take_guest_latency`]).
    latency: LatencyMeter,
}

/// Sums of request times since the last look.
#[derive(Debug, Default)]
struct LatencyMeter {
    total_us: std::sync::atomic::AtomicU64,
    count: std::sync::atomic::AtomicU64,
}

impl LatencyMeter {
    fn record(&self, since: std::time::Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.total_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn take(&self) -> Option<Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        let count = self.count.swap(0, Relaxed);
        let total = self.total_us.swap(0, Relaxed);
        (count > 0).then(|| Duration::from_micros(total / count))
    }
}

fn eacces(what: &str) -> BlockError {
    BlockError::io(
        what.to_owned(),
        std::io::Error::from_raw_os_error(libc::EACCES),
    )
}

impl CopyBeforeWrite {
    /// The mean time the guest's reads and writes through the filter took since the last
    /// call (copy-before-write waits included); `None` when there were none.
    pub fn take_guest_latency(&self) -> Option<Duration> {
        self.latency.take()
    }

    /// Opens a copy-before-write node named `name` over `file` (the source) copying into
    /// `target`. The edges are attached already (their policies: copy source, copy target).
    pub fn open(
        name: impl Into<String>,
        file: Arc<Child>,
        target: Arc<Child>,
        opts: CbwOptions,
    ) -> Result<(Arc<BlockNode>, Arc<CopyBeforeWrite>)> {
        let cluster = cluster_size(&target.node(), opts.min_cluster_size)
            .map_err(|e| e.within("Cannot create block-copy-state"))?;
        let write_through = !opts.write_behind || chain_contains(&target.node(), &file.node());
        let driver = Arc::new(CopyBeforeWrite {
            file: file.clone(),
            target: target.clone(),
            on_error: opts.on_cbw_error,
            timeout: opts.timeout,
            attached: OnceLock::new(),
            snap: Mutex::new(SnapState::default()),
            snap_changed: Notify::new(),
            latency: LatencyMeter::default(),
        });
        let node = BlockNode::new(name, driver.clone());
        let mut copy = CopyOptions::new(cluster);
        copy.write_through = write_through;
        copy.compress = opts.compress;
        copy.max_chunk = opts.max_chunk;
        copy.discard_source = opts.discard_source;
        copy.use_copy_range = opts.use_copy_range;
        let bcs = BlockCopy::new(file, target, &node, copy)?;
        let len = bcs.len();
        bcs.with_bitmap(|b| match &opts.bitmap {
            Some(user) => {
                let _ = b.merge_from(user);
            }
            None => b.set_dirty(0, len),
        });
        let internal = |node: &Arc<BlockNode>| {
            node.add_internal_bitmap_with(cluster, false)
                .map_err(|e| BlockError::invalid(e.to_string()))
        };
        let done = internal(&node)?;
        let access = internal(&node)?;
        let copy_set = bcs.with_bitmap(|b| b.clone());
        access.with(|a| {
            if let Some(c) = &copy_set {
                let _ = a.merge_from(c);
            }
        });
        let _ = driver.attached.set(Attached { bcs, done, access });
        Ok((node, driver))
    }

    fn attached(&self) -> Result<&Attached> {
        self.attached
            .get()
            .ok_or_else(|| BlockError::invalid("copy-before-write node is not open"))
    }

    /// The node's copy engine.
    pub fn block_copy(&self) -> Option<Arc<BlockCopy>> {
        self.attached.get().map(|a| a.bcs.clone())
    }

    /// The source edge (`file`).
    pub fn file(&self) -> &Arc<Child> {
        &self.file
    }

    /// The target edge.
    pub fn target(&self) -> &Arc<Child> {
        &self.target
    }

    fn snap(&self) -> MutexGuard<'_, SnapState> {
        self.snap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the snapshot is broken (break-snapshot after a failed copy).
    pub fn snapshot_broken(&self) -> bool {
        self.snap().error.is_some()
    }

    /// Makes the old data of `[offset, offset+len)` safe before the write goes on.
    async fn before_write(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 || self.snapshot_broken() {
            return Ok(());
        }
        let a = self.attached()?;
        let protected = match self.timeout {
            Some(t) => match tokio::time::timeout(t, a.bcs.protect(offset, len)).await {
                Ok(r) => r,
                Err(_) => Err(BlockError::io(
                    "copy-before-write timed out",
                    std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
                )),
            },
            None => a.bcs.protect(offset, len).await,
        };
        let cluster = a.bcs.cluster_size();
        let start = offset - offset % cluster;
        let end = (offset + len).div_ceil(cluster) * cluster;
        {
            let mut snap = self.snap();
            match protected {
                Err(e) if self.on_error == OnCbwError::BreakGuestWrite => return Err(e),
                Err(e) => {
                    tracing::warn!(target: "blockjobd", "copy-before-write failed, the snapshot is broken: {e}");
                    snap.error.get_or_insert_with(|| e.to_string());
                }
                Ok(()) => {
                    a.done.with(|d| d.set_dirty(start, end - start));
                }
            }
        }
        // Snapshot reads of the old data still in the source finish before it changes.
        loop {
            let changed = self.snap_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let busy = self
                .snap()
                .frozen
                .iter()
                .any(|&(_, s, e)| s < end && start < e);
            if !busy {
                return Ok(());
            }
            changed.await;
        }
    }

    /// `[offset, end)` split by whether a guest write protected it (`done`: its old data is
    /// in the target or held, no longer in the source); EACCES once the snapshot is broken or
    /// part of the range was discarded from it.
    fn readable_runs(
        snap: &SnapState,
        a: &Attached,
        offset: u64,
        end: u64,
    ) -> Result<Vec<(u64, u64, bool)>> {
        if snap.error.is_some() {
            return Err(eacces("the snapshot is broken"));
        }
        let accessible = a
            .access
            .with(|b| b.next_clean(offset, end).is_none())
            .unwrap_or(false);
        if !accessible {
            return Err(eacces("the range was discarded from the snapshot"));
        }
        let runs = a
            .done
            .with(|d| done_runs(d, offset, end))
            .unwrap_or_else(|| vec![(offset, end, false)]);
        // In a cluster a guest write protected grain by grain, the grains it did not touch
        // are still in the source.
        let mut out = Vec::with_capacity(runs.len());
        for (s, e, done) in runs {
            if !done {
                out.push((s, e, false));
                continue;
            }
            let mut at = s;
            for (ks, ke) in a.bcs.in_source(s, e) {
                if at < ks {
                    out.push((at, ks, true));
                }
                out.push((ks, ke, false));
                at = ke;
            }
            if at < e {
                out.push((at, e, true));
            }
        }
        Ok(out)
    }

    /// Reads `[offset, offset+len)` as it was when the filter went in (snapshot-access).
    /// Fails with EACCES once the snapshot is broken or the range was discarded.
    pub async fn snapshot_read(&self, offset: u64, len: u64) -> Result<Bytes> {
        let a = self.attached()?;
        let end = offset + len;
        let (runs, frozen) = {
            let mut snap = self.snap();
            let runs = Self::readable_runs(&snap, a, offset, end)?;
            snap.next_id += 1;
            let id = snap.next_id;
            snap.frozen.push((id, offset, end));
            (runs, id)
        };
        let result = async {
            let mut out = BytesMut::with_capacity(len as usize);
            for (s, e, done) in runs {
                if !done {
                    out.extend_from_slice(&self.file.read(s, (e - s) as usize).await?);
                    continue;
                }
                // What is held for a target write that has not landed yet, taken before the
                // target is read: a write that lands during the read leaves its data in
                // one or the other.
                let held = a.bcs.held(s, e - s);
                let mut part = BytesMut::from(&self.target.read(s, (e - s) as usize).await?[..]);
                for (at, bytes) in held {
                    let i = (at - s) as usize;
                    part[i..i + bytes.len()].copy_from_slice(&bytes);
                }
                out.extend_from_slice(&part);
            }
            Ok(out.freeze())
        }
        .await;
        self.snap().frozen.retain(|f| f.0 != frozen);
        self.snap_changed.notify_waiters();
        result
    }

    /// Block status of the point-in-time view.
    pub async fn snapshot_block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let a = self.attached()?;
        let runs = Self::readable_runs(&self.snap(), a, offset, offset + len)?;
        let (s, e, done) = runs[0];
        if done {
            // Copied: what the target holds there (zeroes stay zeroes, as QEMU reports them);
            // data still held in memory on its way there is data.
            let mut st = self.target.block_status(s, e - s).await?;
            if !st.data && !st.zero {
                return Ok(BlockStatus::data(st.len, None));
            }
            st.allocated = true;
            st.host_offset = None;
            return Ok(st);
        }
        let mut st = self.file.block_status(s, e - s).await?;
        st.host_offset = None;
        // What a format with no backing file does not allocate reads as zeroes; an NBD hole
        // without the zero flag does not (`block::map::unallocated_reads_zero`).
        if !st.allocated && !st.data && block::map::unallocated_reads_zero(&self.file.node()) {
            st.zero = true;
        }
        Ok(st)
    }

    /// The snapshot reader is done with `[offset, offset+len)` (whole clusters inside it):
    /// it is no longer kept, and reads of it fail from now on.
    pub async fn snapshot_discard(&self, offset: u64, len: u64) -> Result<()> {
        let a = self.attached()?;
        let cluster = a.bcs.cluster_size();
        let start = offset.div_ceil(cluster) * cluster;
        let end = (offset + len) / cluster * cluster;
        if start >= end {
            return Ok(());
        }
        {
            let _snap = self.snap();
            a.access.with(|b| b.reset_dirty(start, end - start));
        }
        a.bcs.forget(start, end);
        self.target.discard(start, end - start).await
    }

    /// Stops the copy engine (the job using the node ended, or the node closes).
    pub fn close_copy(&self) {
        if let Some(a) = self.attached.get() {
            a.bcs.close();
        }
    }
}

/// `[offset, end)` split into runs of equal "done" state.
fn done_runs(done: &DirtyBitmap, offset: u64, end: u64) -> Vec<(u64, u64, bool)> {
    let mut runs = Vec::new();
    let mut at = offset;
    while at < end {
        let is_done = done.is_dirty(at);
        let next = if is_done {
            done.next_clean(at, end).unwrap_or(end)
        } else {
            done.next_dirty_area(at, end, u64::MAX)
                .map_or(end, |(s, _)| s)
        };
        let next = next.max(at + 1).min(end);
        runs.push((at, next, is_done));
        at = next;
    }
    runs
}

#[async_trait]
impl BlockDriver for CopyBeforeWrite {
    fn driver_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn len(&self) -> u64 {
        self.file.node().len()
    }

    fn facts(&self) -> Facts {
        Facts::default()
    }

    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.file.clone(), self.target.clone()]
    }

    fn writable(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let began = std::time::Instant::now();
        let r = self.file.read_into(offset, buf).await;
        self.latency.record(began);
        r
    }

    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        let began = std::time::Instant::now();
        let _counted = self.attached.get().map(|a| a.bcs.guest_request());
        self.before_write(offset, data.len() as u64).await?;
        let r = self.file.write(offset, data, flags).await;
        self.latency.record(began);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _counted = self.attached.get().map(|a| a.bcs.guest_request());
        self.before_write(offset, len).await?;
        self.file.write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _counted = self.attached.get().map(|a| a.bcs.guest_request());
        self.before_write(offset, len).await?;
        self.file.discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.file.block_status(offset, len).await
    }

    async fn close(&self) -> Result<()> {
        self.close_copy();
        Ok(())
    }

    fn image_info(&self) -> block::ImageInfo {
        block::ImageInfo {
            format: "copy-before-write",
            ..block::ImageInfo::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::testing::MemDisk;
    use proptest::prelude::*;

    /// Guest writes through the filter race snapshot reads (pull fleecing): every snapshot
    /// read returns the source as it was when the filter went in, whichever grains of a
    /// cluster the guest protected and whatever the target holds or is still writing. With
    /// `write_behind` (a backup's filter) and without (a filter of blockdev-add).
    async fn run(write_behind: bool, len_clusters: u64, ops: Vec<(bool, u64, u64, u8, u64)>) {
        let cluster = 65536;
        let len = len_clusters * cluster;
        let source = BlockNode::new("src", MemDisk::new(len));
        let before: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        source
            .write(0, IoVec::from(before.clone()), WriteFlags::default())
            .await
            .expect("fill");
        let target = BlockNode::new("tgt", MemDisk::new(len));
        let opts = CbwOptions {
            write_behind,
            ..CbwOptions::default()
        };
        let file = Child::new(ChildRole::Filtered, source.clone());
        let target = Child::new(ChildRole::Root, target);
        let (node, cbw) = CopyBeforeWrite::open("cbw", file, target, opts).expect("open");
        // Behind a backup's filter, guest writes protect 4 KiB grains of 64 KiB clusters.
        let grain = if write_behind { 4096 } else { cluster };
        assert_eq!(cbw.block_copy().map(|b| b.grain()), Some(grain));
        let before = Arc::new(before);
        let mut set = tokio::task::JoinSet::new();
        for (read, off, n, byte, delay) in ops {
            let off = off % len;
            let n = n.min(len - off).max(1);
            let (node, cbw, before) = (node.clone(), cbw.clone(), before.clone());
            set.spawn(async move {
                tokio::time::sleep(std::time::Duration::from_micros(delay)).await;
                if read {
                    let got = cbw.snapshot_read(off, n).await.expect("snapshot read");
                    assert!(
                        got[..] == before[off as usize..(off + n) as usize],
                        "snapshot read {off}+{n} is not the point in time"
                    );
                } else {
                    node.write(
                        off,
                        IoVec::from(vec![byte; n as usize]),
                        WriteFlags::default(),
                    )
                    .await
                    .expect("guest write");
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("task");
        }
        let all = cbw.snapshot_read(0, len).await.expect("read all");
        assert!(all[..] == before[..], "the whole snapshot differs");
        cbw.close_copy();
    }

    proptest! {
        #[test]
        fn snapshot_reads_see_the_point_in_time_while_the_guest_writes(
            write_behind in any::<bool>(),
            len_clusters in 1u64..8,
            ops in prop::collection::vec(
                (any::<bool>(), 0u64..1 << 19, 1u64..100_000, any::<u8>(), 0u64..300),
                1..40,
            ),
        ) {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(run(write_behind, len_clusters, ops));
        }
    }
}
