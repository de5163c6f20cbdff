//! The `raw` format driver: the bytes of its `file` child, optionally a window of them
//! (`offset`, `size`).

use std::sync::Arc;

use async_trait::async_trait;
use block::{BlockDriver, BlockError, BlockStatus, Child, Facts, IoVec, Result};
use block::{DebugEvent, WriteFlags, ZeroFlags};
use bytes::BytesMut;

/// A raw image over a `file` child.
#[derive(Debug)]
pub struct RawDriver {
    file: Arc<Child>,
    offset: u64,
    size: Option<u64>,
    writable: bool,
}

impl RawDriver {
    /// A raw view of `file` from `offset`, `size` bytes long (default: to the end).
    pub fn new(file: Arc<Child>, offset: u64, size: Option<u64>, writable: bool) -> Result<Self> {
        let file_len = file.node().len();
        if offset > file_len {
            return Err(BlockError::invalid(format!(
                "The sum of offset ({offset}) and size (0) has to be smaller or equal to the actual size of the containing file ({file_len})"
            )));
        }
        if let Some(size) = size {
            if offset.saturating_add(size) > file_len {
                return Err(BlockError::invalid(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the actual size of the containing file ({file_len})"
                )));
            }
        }
        Ok(Self {
            file,
            offset,
            size,
            writable,
        })
    }
}

#[async_trait]
impl BlockDriver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn len(&self) -> u64 {
        self.size
            .unwrap_or_else(|| self.file.node().len().saturating_sub(self.offset))
    }

    fn facts(&self) -> Facts {
        let f = self.file.node().facts();
        Facts {
            growable: false,
            ..f
        }
    }

    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.file.clone()]
    }

    fn copy_through(&self, offset: u64) -> Option<(Arc<Child>, u64)> {
        Some((self.file.clone(), self.offset + offset))
    }

    fn writable(&self) -> bool {
        self.writable
    }

    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.file.debug_event(DebugEvent::ReadAio);
        self.file.read_into(self.offset + offset, buf).await
    }

    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        self.file.debug_event(DebugEvent::WriteAio);
        self.file.write(self.offset + offset, data, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.file
            .write_zeroes(self.offset + offset, len, flags)
            .await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.file.discard(self.offset + offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        // QEMU's block layer announces a flush of a writable node to its file.
        if self.writable {
            self.file.debug_event(DebugEvent::FlushToOs);
            self.file.debug_event(DebugEvent::FlushToDisk);
        }
        self.file.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        // The file answers for this node, as QEMU's raw format hands block status down: what
        // the file holds as data or zeroes is allocated; an NBD hole without the zero flag is
        // not, and is not known to read as zeroes.
        let mut st = self.file.block_status(self.offset + offset, len).await?;
        if !st.data && !st.zero && block::map::unallocated_reads_zero(&self.file.node()) {
            st.zero = true;
        }
        st.allocated = st.data || st.zero;
        st.host_offset = Some(self.offset + offset);
        Ok(st)
    }
}
