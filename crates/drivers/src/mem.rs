//! An in-memory protocol driver: a growable byte vector standing in for a file.
//!
//! It lets format drivers run without touching the disk: fuzzing qcow2 metadata, and tests
//! that want an image as a value.

use std::sync::Mutex;

use async_trait::async_trait;
use block::{BlockDriver, BlockError, BlockStatus, ErrorKind, Facts, IoVec, Result};
use block::{WriteFlags, ZeroFlags};
use bytes::BytesMut;

/// Largest size a memory file grows to.
pub const MAX_MEM_LEN: u64 = 1 << 30;

/// Bytes in memory, growing on writes past the end like a file (up to [`MAX_MEM_LEN`]).
#[derive(Debug, Default)]
pub struct MemDriver {
    data: Mutex<Vec<u8>>,
}

impl MemDriver {
    /// A memory "file" holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data: Mutex::new(data),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes().clone()
    }

    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fill(&self, offset: u64, len: u64, mut put: impl FnMut(&mut [u8])) -> Result<()> {
        let end = offset.saturating_add(len);
        if end > MAX_MEM_LEN {
            return Err(BlockError::new(
                ErrorKind::NoSpace,
                format!("memory file cannot grow to {end} bytes"),
            ));
        }
        let end = end as usize;
        let mut v = self.bytes();
        if v.len() < end {
            v.resize(end, 0);
        }
        put(&mut v[offset as usize..end]);
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for MemDriver {
    fn driver_name(&self) -> &'static str {
        "file"
    }
    fn len(&self) -> u64 {
        self.bytes().len() as u64
    }
    fn facts(&self) -> Facts {
        Facts {
            growable: true,
            ..Facts::default()
        }
    }
    fn writable(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        let v = self.bytes();
        let start = (offset as usize).min(v.len());
        let n = buf.len().min(v.len() - start);
        buf[..n].copy_from_slice(&v[start..start + n]);
        buf[n..].fill(0);
        Ok(buf)
    }
    async fn write(&self, offset: u64, data: IoVec, _: WriteFlags) -> Result<()> {
        let bytes = data.to_bytes();
        self.fill(offset, bytes.len() as u64, |dst| {
            dst.copy_from_slice(&bytes)
        })
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _: ZeroFlags) -> Result<()> {
        self.fill(offset, len, |dst| dst.fill(0))
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let end = (offset + len).min(self.len());
        if offset < end {
            self.fill(offset, end - offset, |dst| dst.fill(0))?;
        }
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::data(len, Some(offset)))
    }
}
