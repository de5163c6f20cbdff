//! The `null-co` and `null-aio` drivers (the same here): a disk of a given size that stores nothing (for tests and benchmarks).
//!
//! Unlike QEMU's default (`read-zeroes=off` leaves buffers untouched), reads always return
//! zeroes: handing out uninitialised memory is never what a user wants.

use async_trait::async_trait;
use block::{BlockDriver, BlockStatus, IoVec, Result, WriteFlags, ZeroFlags};
use bytes::BytesMut;

/// QEMU's default size for null-co: 1 GiB.
pub const DEFAULT_NULL_SIZE: u64 = 1 << 30;

/// A null disk.
#[derive(Debug)]
pub struct NullDriver {
    size: u64,
    writable: bool,
    name: &'static str,
    latency: std::time::Duration,
}

impl NullDriver {
    /// A null disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            writable: true,
            name: "null-co",
            latency: std::time::Duration::ZERO,
        }
    }

    /// The same disk taking `latency` to answer each read, write and flush (QEMU's
    /// `latency-ns`): a slow disk for tests.
    pub fn latency(mut self, latency: std::time::Duration) -> Self {
        self.latency = latency;
        self
    }

    async fn wait(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    /// The same disk under QEMU's other name for it, `null-aio`.
    pub fn aio(mut self) -> Self {
        self.name = "null-aio";
        self
    }

    /// The same disk, refusing writes when `read_only`.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.writable = !read_only;
        self
    }
}

#[async_trait]
impl BlockDriver for NullDriver {
    fn driver_name(&self) -> &'static str {
        self.name
    }
    fn len(&self) -> u64 {
        self.size
    }
    fn writable(&self) -> bool {
        self.writable
    }
    async fn read(&self, _offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        self.wait().await;
        buf.fill(0);
        Ok(buf)
    }
    async fn write(&self, _: u64, _: IoVec, _: WriteFlags) -> Result<()> {
        self.wait().await;
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<()> {
        // QEMU's null driver has no write-zeroes of its own: they are writes, and as slow.
        self.wait().await;
        Ok(())
    }
    async fn discard(&self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        self.wait().await;
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::zero(len, Some(offset)))
    }
}
