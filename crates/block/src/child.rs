//! Child edges: what a parent (a driver or a backend) holds to reach a node.
//!
//! Requests through a [`Child`] enter the gate of the node the edge points to and re-check the
//! edge afterwards: a request queued at a drained node while the graph re-points the edge goes
//! to the new node, never to the old one. That is what makes inserting a filter atomic. Each
//! edge also states what its parent needs of the node ([`crate::perm`]).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::{Bytes, BytesMut};

use crate::buf::IoVec;
use crate::drain::InFlight;
use crate::driver::{BlockStatus, WriteFlags, ZeroFlags};
use crate::error::Result;
use crate::node::{lock, BlockNode};
use crate::perm::{self, EdgePerm, Parent, PermPolicy};

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
    /// Another child holding data, neither the filtered one nor a backing file
    /// (copy-before-write's `target`).
    Data,
}

impl ChildRole {
    /// QEMU's name for the role.
    pub fn name(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
            ChildRole::Filtered => "filtered",
            ChildRole::Root => "root",
            ChildRole::Data => "data",
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
            ChildRole::Data => PermPolicy::CopyTarget,
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

/// A directed edge from a parent (driver or backend) to a node.
pub struct Child {
    pub(crate) role: ChildRole,
    pub(crate) name: &'static str,
    pub(crate) policy: PermPolicy,
    pub(crate) parent: OnceLock<Parent>,
    /// What the parent needs of the node and lets others do (see [`crate::perm`]).
    pub(crate) perm: Mutex<EdgePerm>,
    /// A frozen edge cannot be re-pointed (a job relies on it).
    pub(crate) frozen: AtomicBool,
    pub(crate) node: RwLock<Arc<BlockNode>>,
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

impl Child {
    /// A new edge of `role` to `node`, registered as one of its parents, needing nothing and
    /// sharing everything until a [`perm::refresh`] from its parent says otherwise.
    /// The parent is named when its node is made ([`BlockNode::new`]).
    pub fn new(role: ChildRole, node: Arc<BlockNode>) -> Arc<Child> {
        Self::unchecked(role, role.name(), role.default_policy(), None, node)
    }

    /// A new edge described by `spec`, registered as a parent of `node`, needing nothing yet:
    /// its needs are set by the next [`perm::refresh`] over its parent (a filter being
    /// inserted).
    pub fn detached(spec: EdgeSpec, node: Arc<BlockNode>) -> Arc<Child> {
        Self::unchecked(spec.role, spec.name, spec.policy, Some(spec.parent), node)
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
        self.parent.get().cloned().unwrap_or_else(Parent::unnamed)
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

    /// Announces `event` to the node below (see [`BlockDriver::debug_event`]).
    pub fn debug_event(&self, event: crate::DebugEvent) {
        self.node().driver.debug_event(event);
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
    pub(crate) async fn enter(&self) -> (Arc<BlockNode>, InFlight) {
        loop {
            let node = self.node();
            let in_flight = node.gate.enter().await;
            if Arc::ptr_eq(&node, &self.node()) {
                return (node, in_flight);
            }
        }
    }

    /// Copies `len` bytes at `offset` through this edge to `dst_offset` through `dst` without
    /// passing them through memory (`copy_file_range`), when both edges lead to files through
    /// drivers that store bytes unchanged (raw) and the range is aligned for both. Returns the
    /// bytes copied (fewer when the kernel stops early: go on from there), or `None` when the
    /// pair cannot copy so (copy through memory then).
    pub async fn copy_range_to(
        &self,
        offset: u64,
        dst: &Child,
        dst_offset: u64,
        len: u64,
    ) -> Result<Option<u64>> {
        let (node, _in) = self.enter().await;
        let (dnode, _din) = dst.enter().await;
        node.copy_range_entered(offset, &dnode, dst_offset, len)
            .await
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
