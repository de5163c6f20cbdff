//! `snapshot-access`: the read-only point-in-time view of a copy-before-write node (pull
//! fleecing: export it over NBD and let the backup client read it).
//!
//! Reads return what the copy-before-write node's source held when the filter went in.
//! Writes fail (`Operation not supported`). A discard tells the copy-before-write node that
//! the reader is done with a range: it is no longer protected, the target drops it, and later
//! reads of it fail (EACCES). As in QEMU, discards reach it only when the node was opened with
//! `discard: unmap`; otherwise they are dropped silently by the request path.

use std::sync::Arc;

use async_trait::async_trait;
use block::{BlockDriver, BlockError, BlockStatus, Child, IoVec, Result, WriteFlags, ZeroFlags};
use bytes::BytesMut;

use crate::cbw::CopyBeforeWrite;

/// The snapshot-access driver over a copy-before-write node.
#[derive(Debug)]
pub struct SnapshotAccess {
    file: Arc<Child>,
    cbw: Option<Arc<CopyBeforeWrite>>,
}

impl SnapshotAccess {
    /// A view over `file`; `cbw` is its copy-before-write driver (`None` when `file` is not a
    /// copy-before-write node: every read then fails, as in QEMU).
    pub fn new(file: Arc<Child>, cbw: Option<Arc<CopyBeforeWrite>>) -> Arc<SnapshotAccess> {
        Arc::new(SnapshotAccess { file, cbw })
    }

    fn cbw(&self) -> Result<&CopyBeforeWrite> {
        self.cbw
            .as_deref()
            .ok_or_else(|| BlockError::unsupported("Operation not supported"))
    }
}

fn not_supported() -> BlockError {
    BlockError::unsupported("Operation not supported")
}

#[async_trait]
impl BlockDriver for SnapshotAccess {
    fn driver_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn len(&self) -> u64 {
        self.file.node().len()
    }

    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.file.clone()]
    }

    fn writable(&self) -> bool {
        // Only discards change anything, and they change the copy-before-write node's state,
        // not data: the node is writable so that they reach it.
        true
    }

    async fn read(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        let data = self.cbw()?.snapshot_read(offset, buf.len() as u64).await?;
        buf.copy_from_slice(&data);
        Ok(buf)
    }

    async fn write(&self, _: u64, _: IoVec, _: WriteFlags) -> Result<()> {
        Err(not_supported())
    }

    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<()> {
        Err(not_supported())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match &self.cbw {
            Some(cbw) => cbw.snapshot_discard(offset, len).await,
            None => Ok(()),
        }
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// The snapshot's data and zeroes, every range allocated in this node, as QEMU's block
    /// layer marks whatever a (non-filter) driver reports as data or zero: a client's
    /// `qemu:allocation-depth` shows the whole snapshot as local, whatever the source's
    /// chain holds.
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut st = self.cbw()?.snapshot_block_status(offset, len).await?;
        st.allocated |= st.data || st.zero;
        Ok(st)
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
