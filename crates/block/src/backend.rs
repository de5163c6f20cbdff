//! The backend handle: what exports and jobs hold to do I/O on a node.
//!
//! A backend owns a `root` edge into the graph; when the graph re-points the edge (a filter is
//! inserted, a mirror pivots), the backend follows without its holder noticing.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::buf::IoVec;
use crate::driver::{BlockStatus, WriteFlags, ZeroFlags};
use crate::error::Result;
use crate::node::{BlockNode, Child, ChildRole, EdgeSpec};
use crate::perm::{EdgePerm, Parent};

/// A handle for I/O on whatever node the root edge points to.
#[derive(Clone, Debug)]
pub struct BlockBackend {
    root: Arc<Child>,
}

impl BlockBackend {
    /// A backend whose root edge points at `node`.
    pub fn new(node: Arc<BlockNode>) -> Self {
        Self {
            root: Child::new(ChildRole::Root, node),
        }
    }

    /// A backend for `user` ([`Parent::unnamed`] for an export, `backup job 'j0'` for a job)
    /// needing `need` of `node`; refused as [`Child::attach`] refuses.
    pub fn attach(node: Arc<BlockNode>, user: Parent, need: EdgePerm) -> Result<Self> {
        let spec = EdgeSpec::new(ChildRole::Root, user);
        Ok(Self {
            root: Child::attach(spec, node, need)?,
        })
    }

    /// Changes what the backend needs of its node; refused as [`Child::attach`] refuses.
    pub fn set_need(&self, need: EdgePerm) -> Result<()> {
        self.root.set_need(need)
    }

    /// The root edge.
    pub fn root(&self) -> &Arc<Child> {
        &self.root
    }

    /// The node the backend points to right now.
    pub fn node(&self) -> Arc<BlockNode> {
        self.root.node()
    }

    /// Length of the current node.
    pub fn len(&self) -> u64 {
        self.node().len()
    }

    /// True for a zero-length node.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.root.read(offset, len).await
    }

    /// Reads into `buf`.
    pub async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.root.read_into(offset, buf).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        self.root.write(offset, data, flags).await
    }

    /// Makes a range read as zero.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.root.write_zeroes(offset, len, flags).await
    }

    /// Discards a range.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.root.discard(offset, len).await
    }

    /// Flushes.
    pub async fn flush(&self) -> Result<()> {
        self.root.flush().await
    }

    /// Block status of the current node.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.root.block_status(offset, len).await
    }
}
