//! Nodes: a driver plus the state of its request path (drain gate, range locks, hooks,
//! dirty bitmaps), and the public entry points of requests.
//!
//! ```text
//!   BlockBackend / parent driver
//!          │  Child edge (role: root, file, backing, filtered) — re-pointable (crate::child)
//!          ▼
//!   BlockNode ── request path (crate::request)
//!          ▼
//!   dyn BlockDriver (file, raw, qcow2, null-co, …)
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::{Bytes, BytesMut};

use bitmap::DirtyBitmap;

use crate::buf::IoVec;
use crate::drain::{DrainGate, Drained, InFlight};
use crate::driver::{BlockDriver, BlockStatus, Facts, WriteFlags, ZeroFlags};
use crate::error::{BlockError, ErrorKind, Result};
use crate::perm::{EdgePerm, Parent};
use crate::range_lock::RangeLocks;

pub use crate::child::{Child, ChildRole, EdgeSpec};
pub use crate::request::{BeforeWriteHook, WriteKind};

/// QEMU's `detect-zeroes` option of a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes go as they are.
    #[default]
    Off = 0,
    /// A write of zero bytes becomes a write-zeroes.
    On = 1,
    /// ... that may deallocate (the node must pass discards on, `discard=unmap`).
    Unmap = 2,
}

impl DetectZeroes {
    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// A node of the block graph: a driver plus the request path state.
pub struct BlockNode {
    pub(crate) name: String,
    pub(crate) driver: Arc<dyn BlockDriver>,
    pub(crate) facts: Facts,
    pub(crate) gate: DrainGate,
    pub(crate) locks: RangeLocks,
    pub(crate) hooks: RwLock<Vec<Arc<dyn BeforeWriteHook>>>,
    pub(crate) parents: Mutex<Vec<Weak<Child>>>,
    /// QEMU's `discard=ignore`: discards succeed without reaching the driver, and
    /// write-zeroes may not deallocate.
    pub(crate) discard_ignored: AtomicBool,
    /// QEMU's `detect-zeroes` ([`DetectZeroes`] as a number).
    pub(crate) detect_zeroes: std::sync::atomic::AtomicU8,
    /// The node's dirty bitmaps; every write, write-zeroes and discard that reaches the node
    /// marks the recording ones, whoever issues it.
    pub(crate) bitmaps: Mutex<Vec<DirtyBitmap>>,
}

/// An internal bitmap of a node, found by handle rather than by name; see
/// [`BlockNode::add_internal_bitmap`].
#[derive(Debug)]
pub struct BitmapHandle {
    node: Weak<BlockNode>,
    id: u64,
}

impl BitmapHandle {
    /// Runs `f` on the bitmap; `None` once its node is gone.
    pub fn with<T>(&self, f: impl FnOnce(&mut DirtyBitmap) -> T) -> Option<T> {
        let node = self.node.upgrade()?;
        let mut bitmaps = lock(&node.bitmaps);
        bitmaps.iter_mut().find(|b| b.id() == self.id).map(f)
    }
}

impl Drop for BitmapHandle {
    fn drop(&mut self) {
        if let Some(node) = self.node.upgrade() {
            lock(&node.bitmaps).retain(|b| b.id() != self.id);
        }
    }
}

impl fmt::Debug for BlockNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockNode")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .finish()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlockNode {
    /// A node named `name` over `driver`; the driver's child edges are now held by it.
    pub fn new(name: impl Into<String>, driver: Arc<dyn BlockDriver>) -> Arc<BlockNode> {
        let name = name.into();
        for child in driver.children() {
            let _ = child.parent.set(Parent::Node(name.clone()));
        }
        let mut facts = driver.facts();
        facts.request_alignment = facts.request_alignment.max(1);
        facts.max_transfer = match facts.max_transfer {
            0 => 32 << 20,
            n => n.max(facts.request_alignment),
        };
        Arc::new(BlockNode {
            name,
            driver,
            facts,
            gate: DrainGate::new(),
            locks: RangeLocks::new(),
            hooks: RwLock::new(Vec::new()),
            parents: Mutex::new(Vec::new()),
            discard_ignored: AtomicBool::new(false),
            detect_zeroes: std::sync::atomic::AtomicU8::new(DetectZeroes::Off as u8),
            bitmaps: Mutex::new(Vec::new()),
        })
    }

    /// The node's dirty bitmaps, locked. Hold the guard briefly: writes to the node wait for
    /// it to mark their range.
    pub fn bitmaps(&self) -> std::sync::MutexGuard<'_, Vec<DirtyBitmap>> {
        lock(&self.bitmaps)
    }

    /// Adds an internal (unnamed) bitmap that records every write to the node from now on,
    /// owned by the returned handle and removed when it is dropped (a block-copy's copy
    /// bitmap, a mirror's dirty bitmap). Queries show it as QEMU shows unnamed bitmaps.
    pub fn add_internal_bitmap(
        self: &Arc<Self>,
        granularity: u64,
    ) -> std::result::Result<BitmapHandle, bitmap::BitmapError> {
        self.add_internal_bitmap_with(granularity, true)
    }

    /// [`add_internal_bitmap`](Self::add_internal_bitmap), recording writes or not: a
    /// block-copy's bitmap of what is left to copy records nothing by itself.
    pub fn add_internal_bitmap_with(
        self: &Arc<Self>,
        granularity: u64,
        recording: bool,
    ) -> std::result::Result<BitmapHandle, bitmap::BitmapError> {
        let mut b = DirtyBitmap::new(None, self.len(), granularity)?;
        b.set_recording(recording);
        let id = b.id();
        lock(&self.bitmaps).push(b);
        Ok(BitmapHandle {
            node: Arc::downgrade(self),
            id,
        })
    }

    /// Runs `f` on the bitmap named `name`, if the node has one.
    pub fn with_bitmap<T>(&self, name: &str, f: impl FnOnce(&mut DirtyBitmap) -> T) -> Option<T> {
        lock(&self.bitmaps)
            .iter_mut()
            .find(|b| b.name() == Some(name))
            .map(f)
    }

    /// Sets QEMU's `discard` option: `ignore` (true) drops discards at this node and keeps
    /// write-zeroes from deallocating; `unmap` (false, the default here) passes them on.
    pub fn set_discard_ignored(&self, ignored: bool) {
        self.discard_ignored.store(ignored, Ordering::Relaxed);
    }

    /// True when discards are dropped at this node (`discard=ignore`).
    pub fn discard_ignored(&self) -> bool {
        self.discard_ignored.load(Ordering::Relaxed)
    }

    /// Sets QEMU's `detect-zeroes`: writes of zero bytes that reach this node become
    /// write-zeroes (allowed to deallocate with [`DetectZeroes::Unmap`]).
    pub fn set_detect_zeroes(&self, mode: DetectZeroes) {
        self.detect_zeroes.store(mode as u8, Ordering::Relaxed);
    }

    /// The node's `detect-zeroes`.
    pub fn detect_zeroes(&self) -> DetectZeroes {
        match self.detect_zeroes.load(Ordering::Relaxed) {
            1 => DetectZeroes::On,
            2 => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        }
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver's name as QEMU spells it (`file`, `qcow2`, …).
    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    /// Facts for `info`.
    pub fn image_info(&self) -> crate::driver::ImageInfo {
        self.driver.image_info()
    }

    /// Whether the image stores persistent dirty bitmaps (qcow2).
    pub fn stores_bitmaps(&self) -> bool {
        self.driver.stores_bitmaps()
    }

    /// Whether the node takes compressed writes ([`WriteFlags::compressed`]).
    pub fn supports_compressed(&self) -> bool {
        self.driver.as_compressed_writer().is_some() && self.facts.cluster_size.is_some()
    }

    /// The node's child edges (file, backing, filtered).
    pub fn children(&self) -> Vec<Arc<Child>> {
        self.driver.children()
    }

    /// Removes persistent bitmap `name` from the image at once.
    pub async fn remove_stored_bitmap(&self, name: &str) -> Result<()> {
        let _in = self.gate.enter().await;
        self.driver.remove_stored_bitmap(name).await
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.driver.len()
    }

    /// Bytes the node's storage takes on the host, when its driver knows.
    pub fn allocated_bytes(&self) -> Option<u64> {
        self.driver.allocated_bytes()
    }

    /// True for a zero-length node.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Facts of the driver, as the request path applies them.
    pub fn facts(&self) -> Facts {
        self.facts
    }

    /// Whether the node was opened read-write.
    pub fn writable(&self) -> bool {
        self.driver.writable()
    }

    pub(crate) fn driver_children(&self) -> Vec<Arc<Child>> {
        self.driver.children()
    }

    pub(crate) fn prepare_perm(&self, p: EdgePerm) -> Result<()> {
        self.driver.prepare_perm(p)
    }

    pub(crate) fn commit_perm(&self, p: EdgePerm) {
        self.driver.commit_perm(p)
    }

    pub(crate) fn abort_perm(&self) {
        self.driver.abort_perm()
    }

    /// The node's child in `role`, if any.
    pub fn child(&self, role: ChildRole) -> Option<Arc<Child>> {
        self.driver
            .children()
            .into_iter()
            .find(|c| c.role() == role)
    }

    /// The parent edges pointing at this node right now.
    pub fn parents(&self) -> Vec<Arc<Child>> {
        lock(&self.parents)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Requests in flight on this node.
    pub fn in_flight(&self) -> usize {
        self.gate.in_flight()
    }

    /// Returns once no drained section holds the node: a job calls this before it starts
    /// new work on the node, so a drained node pauses it without anything the user sees.
    pub async fn undrained(&self) {
        self.gate.undrained().await
    }

    /// True while a drained section holds the node.
    pub fn is_drained(&self) -> bool {
        self.gate.is_drained()
    }

    /// Begins a drained section on this node.
    pub async fn drain(&self) -> Drained {
        self.gate.drain().await
    }

    /// Adds a before-write hook.
    pub fn add_hook(&self, hook: Arc<dyn BeforeWriteHook>) {
        self.hooks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// Removes a hook added with [`add_hook`](Self::add_hook).
    pub fn remove_hook(&self, hook: &Arc<dyn BeforeWriteHook>) {
        self.hooks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|h| !Arc::ptr_eq(h, hook));
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let _in = self.gate.enter().await;
        self.read_entered(offset, len).await
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let _in = self.gate.enter().await;
        self.read_into_entered(offset, buf).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(
        self: &Arc<Self>,
        offset: u64,
        data: IoVec,
        flags: WriteFlags,
    ) -> Result<()> {
        let in_flight = self.gate.enter().await;
        self.modify(in_flight, move |n| async move {
            n.write_entered(offset, data, flags).await
        })
        .await
    }

    /// Makes `[offset, offset+len)` read as zero.
    pub async fn write_zeroes(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        let in_flight = self.gate.enter().await;
        self.modify(in_flight, move |n| async move {
            n.write_zeroes_entered(offset, len, flags).await
        })
        .await
    }

    /// Discards `[offset, offset+len)` (the aligned interior of it).
    pub async fn discard(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        let in_flight = self.gate.enter().await;
        self.modify(in_flight, move |n| async move {
            n.discard_entered(offset, len).await
        })
        .await
    }

    /// Flushes the node.
    pub async fn flush(self: &Arc<Self>) -> Result<()> {
        let in_flight = self.gate.enter().await;
        self.modify(in_flight, |n| async move { n.driver.flush().await })
            .await
    }

    /// Runs a request that may change the node. When the driver updates on-disk metadata
    /// ([`Facts::updates_metadata`]), the request runs to completion in a task of its own even
    /// if the caller stops waiting (a cancelled job drops its futures): no metadata update is
    /// ever left half done in memory. It stays in flight meanwhile, so drained sections wait
    /// for it, and it passes the gates its caller could pass.
    pub(crate) async fn modify<F>(
        self: &Arc<Self>,
        in_flight: InFlight,
        request: impl FnOnce(Arc<BlockNode>) -> F,
    ) -> Result<()>
    where
        F: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let work = request(self.clone());
        if !self.facts.updates_metadata {
            let r = work.await;
            drop(in_flight);
            return r;
        }
        let task = tokio::spawn(crate::drain::carry(async move {
            let _in_flight = in_flight;
            work.await
        }));
        match task.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(BlockError::new(
                ErrorKind::Io,
                format!("request on node '{}' did not finish: {e}", self.name),
            )),
        }
    }

    /// Block status of `[offset, offset+len)` from `offset` on.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let _in = self.gate.enter().await;
        self.block_status_entered(offset, len).await
    }

    /// Loads the persistent bitmaps stored in the image into the node's bitmaps.
    pub async fn load_persistent_bitmaps(&self) -> Result<()> {
        let stored = self.driver.load_bitmaps().await?;
        lock(&self.bitmaps).extend(stored);
        Ok(())
    }

    /// Stores the persistent bitmaps, then flushes and closes the driver; waits for requests
    /// in flight first.
    pub async fn close(&self) -> Result<()> {
        let _drained = self.gate.drain().await;
        let mut persistent: Vec<DirtyBitmap> = lock(&self.bitmaps)
            .iter()
            .filter(|b| b.persistent())
            .cloned()
            .collect();
        persistent.sort_by_key(DirtyBitmap::order);
        let stored = if self.driver.stores_bitmaps() {
            self.driver.store_bitmaps(&persistent).await
        } else {
            Ok(())
        };
        let closed = self.driver.close().await;
        stored.and(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::zeroed;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A memory driver with a 512-byte alignment, to exercise RMW.
    #[derive(Debug)]
    struct Mem {
        data: Mutex<Vec<u8>>,
        align: u32,
    }

    #[async_trait]
    impl BlockDriver for Mem {
        fn driver_name(&self) -> &'static str {
            "mem"
        }
        fn len(&self) -> u64 {
            lock(&self.data).len() as u64
        }
        fn facts(&self) -> Facts {
            Facts {
                request_alignment: self.align,
                max_transfer: 4096,
                ..Facts::default()
            }
        }
        fn writable(&self) -> bool {
            true
        }
        async fn read(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
            assert_eq!(offset % u64::from(self.align), 0);
            assert_eq!(buf.len() % self.align as usize, 0);
            assert!(buf.len() <= 4096);
            let d = lock(&self.data);
            let n = buf.len();
            buf.copy_from_slice(&d[offset as usize..offset as usize + n]);
            Ok(buf)
        }
        async fn write(&self, offset: u64, data: IoVec, _: WriteFlags) -> Result<()> {
            assert_eq!(offset % u64::from(self.align), 0);
            assert_eq!(data.len() % self.align as usize, 0);
            assert!(data.len() <= 4096);
            let b = data.to_bytes();
            lock(&self.data)[offset as usize..offset as usize + b.len()].copy_from_slice(&b);
            Ok(())
        }
        async fn write_zeroes(&self, offset: u64, len: u64, _: ZeroFlags) -> Result<()> {
            lock(&self.data)[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        async fn discard(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
        async fn block_status(&self, _: u64, len: u64) -> Result<BlockStatus> {
            Ok(BlockStatus::data(len, None))
        }
    }

    #[derive(Debug, Default)]
    struct Count(AtomicU64);

    #[async_trait]
    impl BeforeWriteHook for Count {
        async fn before_write(&self, _: u64, len: u64, _: WriteKind) -> Result<()> {
            self.0.fetch_add(len, Ordering::Relaxed);
            Ok(())
        }
    }

    fn mem(len: usize) -> Arc<BlockNode> {
        BlockNode::new(
            "m",
            Arc::new(Mem {
                data: Mutex::new(vec![0; len]),
                align: 512,
            }),
        )
    }

    #[tokio::test]
    async fn unaligned_io_is_read_modify_write() {
        let node = mem(16384);
        node.write(100, IoVec::from(vec![7u8; 9000]), WriteFlags::default())
            .await
            .expect("w");
        let all = node.read(0, 16384).await.expect("r");
        assert!(all[..100].iter().all(|&b| b == 0));
        assert!(all[100..9100].iter().all(|&b| b == 7));
        assert!(all[9100..].iter().all(|&b| b == 0));
        node.write_zeroes(101, 1000, ZeroFlags::default())
            .await
            .expect("z");
        let part = node.read(99, 1003).await.expect("r");
        assert_eq!(part[0], 0);
        assert_eq!(part[1], 7);
        assert!(part[2..1002].iter().all(|&b| b == 0));
        assert_eq!(part[1002], 7);
    }

    #[tokio::test]
    async fn bounds_and_hooks() {
        let node = mem(4096);
        let hook = Arc::new(Count::default());
        node.add_hook(hook.clone());
        let err = node.read(4000, 100).await.expect_err("past the end");
        assert_eq!(err.kind(), ErrorKind::OutOfBounds);
        assert!(node.read_into(u64::MAX, zeroed(2)).await.is_err());
        node.write(0, IoVec::from(vec![1u8; 10]), WriteFlags::default())
            .await
            .expect("w");
        node.write_zeroes(0, 512, ZeroFlags::default())
            .await
            .expect("z");
        assert_eq!(hook.0.load(Ordering::Relaxed), 522);
        let h: Arc<dyn BeforeWriteHook> = hook.clone();
        node.remove_hook(&h);
        node.write(0, IoVec::from(vec![1u8; 10]), WriteFlags::default())
            .await
            .expect("w");
        assert_eq!(hook.0.load(Ordering::Relaxed), 522);
    }

    #[tokio::test]
    async fn child_edge_follows_repoint() {
        let a = mem(4096);
        let b = mem(4096);
        let edge = Child::new(ChildRole::Root, a.clone());
        assert_eq!(a.parents().len(), 1);
        edge.write(0, IoVec::from(vec![5u8; 512]), WriteFlags::default())
            .await
            .expect("w");
        {
            let _d = a.drain().await;
            edge.repoint(&b);
        }
        assert_eq!(a.parents().len(), 0);
        assert_eq!(b.parents().len(), 1);
        assert_eq!(edge.read(0, 1).await.expect("r")[0], 0, "reads now reach b");
    }

    #[tokio::test]
    async fn internal_bitmaps_are_owned_by_handle() {
        let node = mem(1 << 20);
        let named = DirtyBitmap::new(Some("n".into()), 1 << 20, 65536).expect("bitmap");
        node.bitmaps().push(named);
        let handle = node.add_internal_bitmap(65536).expect("internal");
        node.write(0, IoVec::from(vec![1u8; 512]), WriteFlags::default())
            .await
            .expect("w");
        assert_eq!(handle.with(|b| b.dirty_bytes()), Some(65536));
        assert!(
            node.bitmaps().iter().any(|b| b.name().is_none()),
            "listed with the node's bitmaps, unnamed"
        );
        drop(handle);
        assert_eq!(node.bitmaps().len(), 1, "gone with its handle");
        assert!(node.with_bitmap("n", |b| b.dirty_bytes()) == Some(65536));
    }

    #[tokio::test]
    async fn writes_zeroes_and_discards_mark_recording_bitmaps() {
        let node = mem(1 << 20);
        node.bitmaps()
            .push(DirtyBitmap::new(Some("on".into()), 1 << 20, 65536).expect("bitmap"));
        let mut off = DirtyBitmap::new(Some("off".into()), 1 << 20, 65536).expect("bitmap");
        off.set_recording(false);
        node.bitmaps().push(off);
        let edge = Child::new(ChildRole::Root, node.clone());
        edge.write(100, IoVec::from(vec![1u8; 10]), WriteFlags::default())
            .await
            .expect("w");
        edge.write_zeroes(200_000, 4096, ZeroFlags::default())
            .await
            .expect("z");
        edge.discard(65536 * 5, 512).await.expect("d");
        // Refused requests mark nothing.
        assert!(edge
            .write(1 << 20, IoVec::from(vec![1u8; 512]), WriteFlags::default())
            .await
            .is_err());
        let bitmaps = node.bitmaps();
        let on = &bitmaps[0];
        assert_eq!(on.dirty_bytes(), 3 * 65536);
        assert!(on.is_dirty(0) && on.is_dirty(196_608) && on.is_dirty(5 * 65536));
        assert_eq!(
            bitmaps[1].dirty_bytes(),
            0,
            "a disabled bitmap records nothing"
        );
    }
}
