//! Nodes, child edges, and the one request path every I/O goes through.
//!
//! ```text
//!   BlockBackend / parent driver
//!          │  Child edge (role: root, file, backing, filtered) — re-pointable
//!          ▼
//!   BlockNode ── request path: drain gate → bounds → read-only → before-write hooks
//!          │                   → alignment (RMW under an exclusive range lock) → max_transfer split
//!          ▼
//!   dyn BlockDriver (file, raw, qcow2, null-co, …)
//! ```
//!
//! Requests through a [`Child`] enter the gate of the node the edge points to and re-check the
//! edge afterwards: a request queued at a drained node while the graph re-points the edge goes
//! to the new node, never to the old one. That is what makes inserting a filter atomic.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use bitmap::DirtyBitmap;

use crate::buf::IoVec;
use crate::drain::{DrainGate, Drained, InFlight};
use crate::driver::{BlockDriver, BlockStatus, Facts, WriteFlags, ZeroFlags};
use crate::error::{BlockError, ErrorKind, Result};
use crate::perm::{self, EdgePerm, Parent, PermPolicy};
use crate::range_lock::{LockMode, RangeLocks};

/// The role of a child edge, as QEMU names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChildRole {
    /// The protocol layer under a format (`file`).
    File,
    /// The backing image of a format (`backing`).
    Backing,
    /// The one child of a filter node.
    Filtered,
    /// A backend's edge to its root node (exports, jobs).
    Root,
}

impl ChildRole {
    /// QEMU's name for the role.
    pub fn name(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
            ChildRole::Filtered => "filtered",
            ChildRole::Root => "root",
        }
    }

    /// How an edge of this role derives its needs when nothing else is said: a format's
    /// `file` holds metadata and data, a backing file is read-only, a filtered child passes
    /// needs through, and a root edge's needs are set by its holder.
    pub fn default_policy(self) -> PermPolicy {
        match self {
            ChildRole::File => PermPolicy::Image,
            ChildRole::Backing => PermPolicy::Cow,
            ChildRole::Filtered => PermPolicy::Filtered,
            ChildRole::Root => PermPolicy::Fixed,
        }
    }
}

/// What an edge is, for [`Child::attach`].
#[derive(Clone, Debug)]
pub struct EdgeSpec {
    /// Structural role (what the request path and the map follow).
    pub role: ChildRole,
    /// QEMU's name of the child (`file`, `image`, `backing`, `root`), shown in messages.
    pub name: &'static str,
    /// How its needs follow from the parent's.
    pub policy: PermPolicy,
    /// Who holds it.
    pub parent: Parent,
}

impl EdgeSpec {
    /// An edge of `role` with the role's name and default policy, held by `parent`.
    pub fn new(role: ChildRole, parent: Parent) -> Self {
        Self {
            role,
            name: role.name(),
            policy: role.default_policy(),
            parent,
        }
    }

    /// The same edge under QEMU's child name `name`.
    pub fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// The same edge with another policy.
    pub fn policy(mut self, policy: PermPolicy) -> Self {
        self.policy = policy;
        self
    }
}

/// What kind of modification a before-write hook is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// Data write.
    Write,
    /// Write-zeroes.
    Zeroes,
    /// Discard.
    Discard,
}

/// Called before any modification reaches the driver of a node, whoever issues it. Dirty
/// bitmaps and copy-before-write plug in here. An error fails the write.
#[async_trait]
pub trait BeforeWriteHook: Send + Sync + fmt::Debug {
    /// `[offset, offset+len)` of the node is about to change.
    async fn before_write(&self, offset: u64, len: u64, kind: WriteKind) -> Result<()>;
}

/// A directed edge from a parent (driver or backend) to a node.
pub struct Child {
    role: ChildRole,
    name: &'static str,
    policy: PermPolicy,
    parent: OnceLock<Parent>,
    /// What the parent needs of the node and lets others do (see [`crate::perm`]).
    perm: Mutex<EdgePerm>,
    /// A frozen edge cannot be re-pointed (a job relies on it).
    frozen: AtomicBool,
    node: RwLock<Arc<BlockNode>>,
}

impl fmt::Debug for Child {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Child")
            .field("role", &self.role)
            .field("name", &self.name)
            .field("node", &self.node().name())
            .field("perm", &self.perm())
            .finish()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let node = self
            .node
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        lock(&node.parents).retain(|w| w.strong_count() > 0);
        if self.perm() != EdgePerm::FREE {
            perm::release(&[node]);
        }
    }
}

/// A node of the block graph: a driver plus the request path state.
pub struct BlockNode {
    name: String,
    driver: Arc<dyn BlockDriver>,
    facts: Facts,
    gate: DrainGate,
    locks: RangeLocks,
    hooks: RwLock<Vec<Arc<dyn BeforeWriteHook>>>,
    parents: Mutex<Vec<Weak<Child>>>,
    /// QEMU's `discard=ignore`: discards succeed without reaching the driver, and
    /// write-zeroes may not deallocate.
    discard_ignored: AtomicBool,
    /// The node's dirty bitmaps; every write, write-zeroes and discard that reaches the node
    /// marks the recording ones, whoever issues it.
    bitmaps: Mutex<Vec<DirtyBitmap>>,
}

/// Marks the node's bitmaps when dropped: after the request, whether it succeeded, failed or
/// was abandoned half way (a failed write may have changed part of the range, as in QEMU).
struct MarkDirty<'a> {
    node: &'a BlockNode,
    offset: u64,
    len: u64,
}

impl Drop for MarkDirty<'_> {
    fn drop(&mut self) {
        for b in lock(&self.node.bitmaps).iter_mut() {
            b.record_write(self.offset, self.len);
        }
    }
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Child {
    /// A new edge of `role` to `node`, registered as one of its parents, needing nothing and
    /// sharing everything until a [`perm::refresh`] from its parent says otherwise.
    /// The parent is named when its node is made ([`BlockNode::new`]).
    pub fn new(role: ChildRole, node: Arc<BlockNode>) -> Arc<Child> {
        Self::unchecked(role, role.name(), role.default_policy(), None, node)
    }

    fn unchecked(
        role: ChildRole,
        name: &'static str,
        policy: PermPolicy,
        parent: Option<Parent>,
        node: Arc<BlockNode>,
    ) -> Arc<Child> {
        let child = Arc::new(Child {
            role,
            name,
            policy,
            parent: parent.map(OnceLock::from).unwrap_or_default(),
            perm: Mutex::new(EdgePerm::FREE),
            frozen: AtomicBool::new(false),
            node: RwLock::new(node.clone()),
        });
        lock(&node.parents).push(Arc::downgrade(&child));
        child
    }

    /// Attaches a new edge to `node` needing `need`: refused, with nothing changed, when the
    /// node's other parents do not share what it needs, it does not share what they need, or
    /// the node (or one below it) cannot give it (read-only, image locked by another process).
    pub fn attach(spec: EdgeSpec, node: Arc<BlockNode>, need: EdgePerm) -> Result<Arc<Child>> {
        let child = Self::unchecked(
            spec.role,
            spec.name,
            spec.policy,
            Some(spec.parent),
            node.clone(),
        );
        perm::refresh_with(&[node], &[(&child, need)])?;
        Ok(child)
    }

    /// Changes what the edge needs, refused as [`attach`](Self::attach) refuses.
    pub fn set_need(self: &Arc<Self>, need: EdgePerm) -> Result<()> {
        perm::refresh_with(&[self.node()], &[(self, need)])
    }

    /// The role of the edge.
    pub fn role(&self) -> ChildRole {
        self.role
    }

    /// QEMU's name of the child (`file`, `image`, `backing`, `root`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How the edge's needs follow from its parent's.
    pub fn policy(&self) -> PermPolicy {
        self.policy
    }

    /// Who holds the edge.
    pub fn parent(&self) -> Parent {
        self.parent
            .get()
            .cloned()
            .unwrap_or_else(|| Parent::User("an unnamed block device".into()))
    }

    /// The parent node's name, when a node holds the edge.
    pub fn parent_node_name(&self) -> Option<String> {
        match self.parent.get() {
            Some(Parent::Node(n)) => Some(n.clone()),
            _ => None,
        }
    }

    /// What the edge needs and shares now.
    pub fn perm(&self) -> EdgePerm {
        *lock(&self.perm)
    }

    pub(crate) fn set_perm(&self, p: EdgePerm) {
        *lock(&self.perm) = p;
    }

    /// Freezes the edge: [`crate::graph`] edits refuse to re-point it until unfrozen.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Release);
    }

    /// Lets the edge be re-pointed again.
    pub fn unfreeze(&self) {
        self.frozen.store(false, Ordering::Release);
    }

    /// True while frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// The node the edge points to right now.
    pub fn node(&self) -> Arc<BlockNode> {
        self.node.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Points the edge at `new`. Callers hold a drained section on the old node.
    pub(crate) fn repoint(self: &Arc<Self>, new: &Arc<BlockNode>) {
        let old = {
            let mut slot = self.node.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *slot, new.clone())
        };
        lock(&old.parents).retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), &**self));
        lock(&new.parents).push(Arc::downgrade(self));
    }

    /// Enters the request gate of the current target, re-checking the edge after waiting.
    async fn enter(&self) -> (Arc<BlockNode>, InFlight) {
        loop {
            let node = self.node();
            let in_flight = node.gate.enter().await;
            if Arc::ptr_eq(&node, &self.node()) {
                return (node, in_flight);
            }
        }
    }

    /// Reads through the edge; see [`BlockNode::read`].
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let (node, _in) = self.enter().await;
        node.read_entered(offset, len).await
    }

    /// Reads into `buf` through the edge; see [`BlockNode::read_into`].
    pub async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let (node, _in) = self.enter().await;
        node.read_into_entered(offset, buf).await
    }

    /// Writes through the edge; see [`BlockNode::write`].
    pub async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        let (node, in_flight) = self.enter().await;
        node.modify(in_flight, move |n| async move {
            n.write_entered(offset, data, flags).await
        })
        .await
    }

    /// Write-zeroes through the edge.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let (node, in_flight) = self.enter().await;
        node.modify(in_flight, move |n| async move {
            n.write_zeroes_entered(offset, len, flags).await
        })
        .await
    }

    /// Discard through the edge.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let (node, in_flight) = self.enter().await;
        node.modify(in_flight, move |n| async move {
            n.discard_entered(offset, len).await
        })
        .await
    }

    /// Flush through the edge.
    pub async fn flush(&self) -> Result<()> {
        let (node, in_flight) = self.enter().await;
        node.modify(in_flight, |n| async move { n.driver.flush().await })
            .await
    }

    /// Block status through the edge.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let (node, _in) = self.enter().await;
        node.block_status_entered(offset, len).await
    }
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
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
        let b = DirtyBitmap::new(None, self.len(), granularity)?;
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

    fn mark_dirty_after(&self, offset: u64, len: u64) -> MarkDirty<'_> {
        MarkDirty {
            node: self,
            offset,
            len,
        }
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

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.len();
        match offset.checked_add(len) {
            Some(end) if end <= size || (self.facts.growable && end <= i64::MAX as u64) => Ok(()),
            _ => Err(BlockError::new(
                ErrorKind::OutOfBounds,
                format!(
                    "request at offset {offset} length {len} is past the end of node '{}' ({size} bytes)",
                    self.name
                ),
            )),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.driver.writable() {
            Ok(())
        } else {
            Err(BlockError::read_only(format!(
                "node '{}' is read-only",
                self.name
            )))
        }
    }

    async fn run_hooks(&self, offset: u64, len: u64, kind: WriteKind) -> Result<()> {
        let hooks = self.hooks.read().unwrap_or_else(|p| p.into_inner()).clone();
        for hook in hooks {
            hook.before_write(offset, len, kind).await?;
        }
        Ok(())
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
    async fn modify<F>(
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
        let persistent: Vec<DirtyBitmap> = lock(&self.bitmaps)
            .iter()
            .filter(|b| b.persistent())
            .cloned()
            .collect();
        let stored = if self.driver.stores_bitmaps() {
            self.driver.store_bitmaps(&persistent).await
        } else {
            Ok(())
        };
        let closed = self.driver.close().await;
        stored.and(closed)
    }

    async fn read_entered(&self, offset: u64, len: usize) -> Result<Bytes> {
        Ok(self
            .read_into_entered(offset, BytesMut::zeroed(len))
            .await?
            .freeze())
    }

    async fn read_into_entered(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        let len = buf.len() as u64;
        self.check_bounds(offset, len)?;
        if len == 0 {
            return Ok(buf);
        }
        let align = u64::from(self.facts.request_alignment);
        let (start, end) = (align_down(offset, align), align_up(offset + len, align));
        if start == offset && end == offset + len {
            return self.read_chunks(offset, buf).await;
        }
        let padded = self
            .read_chunks(start, BytesMut::zeroed((end - start) as usize))
            .await?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&padded[skip..skip + len as usize]);
        Ok(buf)
    }

    /// Reads an aligned range, split by `max_transfer`, into `buf`.
    async fn read_chunks(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        let max = self.facts.max_transfer as usize;
        if buf.len() <= max {
            return self.driver.read(offset, buf).await;
        }
        let mut done = BytesMut::new();
        let mut at = offset;
        while !buf.is_empty() {
            let rest = buf.split_off(buf.len().min(max));
            let chunk = self.driver.read(at, buf).await?;
            at += chunk.len() as u64;
            done.unsplit(chunk);
            buf = rest;
        }
        Ok(done)
    }

    async fn write_entered(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        let len = data.len() as u64;
        self.check_writable()?;
        self.check_bounds(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if flags.compressed {
            self.check_compressed(offset, len)?;
        }
        self.run_hooks(offset, len, WriteKind::Write).await?;
        let _mark = self.mark_dirty_after(offset, len);
        if flags.compressed {
            return self.write_compressed_clusters(offset, data).await;
        }
        let align = u64::from(self.facts.request_alignment);
        if align == 1 {
            return self.write_chunks(offset, data, flags).await;
        }
        let (start, end) = (align_down(offset, align), align_up(offset + len, align));
        if start == offset && end == offset + len {
            let _shared = self.locks.lock(start, end - start, LockMode::Shared).await;
            return self.write_chunks(offset, data, flags).await;
        }
        // Read-modify-write: no overlapping write may run between our read and our write.
        let _excl = self
            .locks
            .lock(start, end - start, LockMode::Exclusive)
            .await;
        let mut padded = IoVec::new();
        if start < offset {
            let head = self
                .driver
                .read(start, BytesMut::zeroed(align as usize))
                .await?
                .freeze();
            padded.push(head.slice(..(offset - start) as usize));
        }
        padded.push(data.to_bytes());
        if offset + len < end {
            let tail_start = end - align;
            let tail = self
                .driver
                .read(tail_start, BytesMut::zeroed(align as usize))
                .await?;
            padded.push(tail.freeze().slice((offset + len - tail_start) as usize..));
        }
        self.write_chunks(start, padded, flags).await
    }

    /// A compressed write must be whole clusters of a driver that compresses.
    fn check_compressed(&self, offset: u64, len: u64) -> Result<()> {
        let (Some(_), Some(cs)) = (
            self.driver.as_compressed_writer(),
            self.facts.cluster_size.map(u64::from),
        ) else {
            return Err(BlockError::unsupported(format!(
                "Compression is not supported for this drive {}",
                self.name
            )));
        };
        let end = offset + len;
        if offset % cs != 0 || (end % cs != 0 && end != self.len()) {
            return Err(BlockError::invalid(format!(
                "compressed write at offset {offset} length {len} of node '{}' is not in whole {cs}-byte clusters",
                self.name
            )));
        }
        Ok(())
    }

    async fn write_compressed_clusters(&self, offset: u64, data: IoVec) -> Result<()> {
        let (Some(writer), Some(cs)) = (
            self.driver.as_compressed_writer(),
            self.facts.cluster_size.map(|c| c as usize),
        ) else {
            return Err(BlockError::unsupported("no compressed writes"));
        };
        let data = data.to_bytes();
        let mut at = 0;
        while at < data.len() {
            let n = cs.min(data.len() - at);
            writer
                .write_compressed(offset + at as u64, data.slice(at..at + n))
                .await?;
            at += n;
        }
        Ok(())
    }

    async fn write_chunks(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        let max = self.facts.max_transfer as usize;
        if data.len() <= max {
            return self.driver.write(offset, data, flags).await;
        }
        let mut at = 0;
        while at < data.len() {
            let n = (data.len() - at).min(max);
            self.driver
                .write(offset + at as u64, data.slice(at, n), flags)
                .await?;
            at += n;
        }
        Ok(())
    }

    async fn write_zeroes_entered(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && !self.discard_ignored(),
            ..flags
        };
        self.check_writable()?;
        self.check_bounds(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.run_hooks(offset, len, WriteKind::Zeroes).await?;
        let _mark = self.mark_dirty_after(offset, len);
        let align = u64::from(self.facts.request_alignment);
        let (start, end) = (align_up(offset, align), align_down(offset + len, align));
        if start >= end {
            return self.write_explicit_zeroes(offset, len).await;
        }
        if offset < start {
            self.write_explicit_zeroes(offset, start - offset).await?;
        }
        {
            let _shared = if align > 1 {
                Some(self.locks.lock(start, end - start, LockMode::Shared).await)
            } else {
                None
            };
            self.driver.write_zeroes(start, end - start, flags).await?;
        }
        if end < offset + len {
            self.write_explicit_zeroes(end, offset + len - end).await?;
        }
        Ok(())
    }

    /// Unaligned edges of write-zeroes go through the normal (read-modify-)write path.
    async fn write_explicit_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = IoVec::from(vec![0u8; len as usize]);
        Box::pin(self.write_entered_nohooks(offset, zeroes)).await
    }

    async fn write_entered_nohooks(&self, offset: u64, data: IoVec) -> Result<()> {
        let align = u64::from(self.facts.request_alignment);
        let len = data.len() as u64;
        let (start, end) = (align_down(offset, align), align_up(offset + len, align));
        let _excl = self
            .locks
            .lock(start, end - start, LockMode::Exclusive)
            .await;
        let mut padded = self
            .driver
            .read(start, BytesMut::zeroed((end - start) as usize))
            .await?;
        let skip = (offset - start) as usize;
        padded[skip..skip + len as usize].copy_from_slice(&data.to_bytes());
        self.driver
            .write(start, IoVec::from(padded.freeze()), WriteFlags::default())
            .await
    }

    async fn discard_entered(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_bounds(offset, len)?;
        if self.discard_ignored() {
            return Ok(());
        }
        let _mark = self.mark_dirty_after(offset, len);
        let align = u64::from(self.facts.request_alignment);
        let (start, end) = (align_up(offset, align), align_down(offset + len, align));
        if start >= end {
            return Ok(());
        }
        self.run_hooks(start, end - start, WriteKind::Discard)
            .await?;
        let _excl = if align > 1 {
            Some(
                self.locks
                    .lock(start, end - start, LockMode::Exclusive)
                    .await,
            )
        } else {
            None
        };
        self.driver.discard(start, end - start).await
    }

    async fn block_status_entered(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.len();
        if offset >= size || len == 0 {
            return Err(BlockError::new(
                ErrorKind::OutOfBounds,
                format!(
                    "block status at offset {offset} of node '{}' ({size} bytes)",
                    self.name
                ),
            ));
        }
        let want = len.min(size - offset);
        let mut status = self.driver.block_status(offset, want).await?;
        if status.len == 0 {
            return Err(BlockError::corrupt(format!(
                "driver '{}' answered an empty block status at {offset}",
                self.driver.driver_name()
            )));
        }
        status.len = status.len.min(want);
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::zeroed;
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
