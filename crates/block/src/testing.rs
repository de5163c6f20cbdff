//! Drivers for tests (the `test-utils` feature, and this crate's own tests): an in-memory
//! disk that counts what reaches it, and a pass-through filter that counts what passes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::BytesMut;

use crate::buf::IoVec;
use crate::driver::{BlockDriver, BlockStatus, WriteFlags, ZeroFlags};
use crate::error::Result;
use crate::node::Child;

/// A fixed-size disk in memory, zeroed, counting the writes that reach it. Each write yields
/// once first, so that requests really are in flight together.
#[derive(Debug)]
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    writable: bool,
    writes: AtomicU64,
}

impl MemDisk {
    /// A writable disk of `len` zero bytes.
    pub fn new(len: u64) -> Arc<Self> {
        Self::with_writable(len, true)
    }

    /// A disk of `len` zero bytes, opened read-write or not.
    pub fn with_writable(len: u64, writable: bool) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; len as usize]),
            writable,
            writes: AtomicU64::new(0),
        })
    }

    /// Writes that reached the disk.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl BlockDriver for MemDisk {
    fn driver_name(&self) -> &'static str {
        "mem"
    }
    fn len(&self) -> u64 {
        self.data().len() as u64
    }
    fn writable(&self) -> bool {
        self.writable
    }
    async fn read(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        let n = buf.len();
        buf.copy_from_slice(&self.data()[offset as usize..offset as usize + n]);
        Ok(buf)
    }
    async fn write(&self, offset: u64, data: IoVec, _: WriteFlags) -> Result<()> {
        tokio::task::yield_now().await;
        let b = data.to_bytes();
        self.data()[offset as usize..offset as usize + b.len()].copy_from_slice(&b);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _: ZeroFlags) -> Result<()> {
        self.data()[offset as usize..(offset + len) as usize].fill(0);
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

/// A filter over one child that passes everything through and counts the writes.
#[derive(Debug)]
pub struct PassThrough {
    child: Arc<Child>,
    writable: bool,
    writes: AtomicU64,
}

impl PassThrough {
    /// A writable filter over `child`.
    pub fn new(child: Arc<Child>) -> Arc<Self> {
        Self::with_writable(child, true)
    }

    /// A filter over `child`, opened read-write or not.
    pub fn with_writable(child: Arc<Child>, writable: bool) -> Arc<Self> {
        Arc::new(Self {
            child,
            writable,
            writes: AtomicU64::new(0),
        })
    }

    /// Writes that passed.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl BlockDriver for PassThrough {
    fn driver_name(&self) -> &'static str {
        "pass-through"
    }
    fn len(&self) -> u64 {
        self.child.node().len()
    }
    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.child.clone()]
    }
    fn writable(&self) -> bool {
        self.writable
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.child.read_into(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.child.write(offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.child.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.child.discard(offset, len).await
    }
    async fn flush(&self) -> Result<()> {
        self.child.flush().await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.child.block_status(offset, len).await
    }
}
