//! The one request path every I/O goes through, whoever issues it:
//!
//! ```text
//!   drain gate → bounds → read-only → before-write hooks → dirty bitmaps
//!     → alignment (read-modify-write under an exclusive range lock) → max_transfer split
//!     → dyn BlockDriver
//! ```
//!
//! Compressed writes take the same path up to the bitmaps, then go to the driver's compressed
//! writer cluster by cluster.

use std::fmt;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::buf::IoVec;
use crate::driver::{BlockStatus, WriteFlags, ZeroFlags};
use crate::error::{BlockError, ErrorKind, Result};
use crate::node::{lock, BlockNode, DetectZeroes};
use crate::range_lock::LockMode;

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

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl BlockNode {
    fn mark_dirty_after(&self, offset: u64, len: u64) -> MarkDirty<'_> {
        MarkDirty {
            node: self,
            offset,
            len,
        }
    }

    pub(crate) fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
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

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.driver.writable() {
            Ok(())
        } else {
            Err(BlockError::read_only(format!(
                "node '{}' is read-only",
                self.name
            )))
        }
    }

    pub(crate) async fn run_hooks(&self, offset: u64, len: u64, kind: WriteKind) -> Result<()> {
        let hooks = self.hooks.read().unwrap_or_else(|p| p.into_inner()).clone();
        for hook in hooks {
            hook.before_write(offset, len, kind).await?;
        }
        Ok(())
    }

    /// Copy offload of `[offset, offset+len)` of this node to `dst_offset` of `dst` (both
    /// entered): down through drivers that store bytes unchanged, to two leaves that copy
    /// without passing the bytes through memory. Every node of the destination's path runs its
    /// write hooks and marks its dirty bitmaps, as a write would. Returns the bytes copied
    /// (fewer when the kernel stops early), or `None` when this path cannot copy so.
    pub(crate) fn copy_range_entered<'a>(
        &'a self,
        offset: u64,
        dst: &'a BlockNode,
        dst_offset: u64,
        len: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<u64>>> + Send + 'a>> {
        Box::pin(async move {
            self.check_bounds(offset, len)?;
            dst.check_writable()?;
            dst.check_bounds(dst_offset, len)?;
            if len == 0 {
                return Ok(Some(0));
            }
            let align = u64::from(
                self.facts
                    .request_alignment
                    .max(dst.facts.request_alignment),
            );
            if offset % align != 0 || dst_offset % align != 0 || len % align != 0 {
                return Ok(None);
            }
            if let Some((child, at)) = self.driver.copy_through(offset) {
                let (node, _in) = child.enter().await;
                return node.copy_range_entered(at, dst, dst_offset, len).await;
            }
            dst.run_hooks(dst_offset, len, WriteKind::Write).await?;
            let _mark = dst.mark_dirty_after(dst_offset, len);
            let _shared = dst.locks.lock(dst_offset, len, LockMode::Shared).await;
            if let Some((child, at)) = dst.driver.copy_through(dst_offset) {
                let (node, _in) = child.enter().await;
                return self.copy_range_entered(offset, &node, at, len).await;
            }
            self.driver
                .copy_range_to(offset, dst.driver.as_ref(), dst_offset, len)
                .await
        })
    }

    pub(crate) async fn read_entered(&self, offset: u64, len: usize) -> Result<Bytes> {
        Ok(self
            .read_into_entered(offset, crate::buf::zeroed_for_io(len))
            .await?
            .freeze())
    }

    pub(crate) async fn read_into_entered(
        &self,
        offset: u64,
        mut buf: BytesMut,
    ) -> Result<BytesMut> {
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
            .read_chunks(start, crate::buf::zeroed_for_io((end - start) as usize))
            .await?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&padded[skip..skip + len as usize]);
        Ok(buf)
    }

    /// Reads an aligned range, split by `max_transfer`, into `buf`.
    pub(crate) async fn read_chunks(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
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

    pub(crate) async fn write_entered(
        &self,
        offset: u64,
        data: IoVec,
        flags: WriteFlags,
    ) -> Result<()> {
        let len = data.len() as u64;
        self.check_writable()?;
        self.check_bounds(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if flags.compressed {
            self.check_compressed(offset, len)?;
        }
        let detect = self.detect_zeroes();
        if detect != DetectZeroes::Off && !flags.compressed && data.is_zero() {
            // QEMU's detect-zeroes: the node sees a write-zeroes instead.
            let zero = ZeroFlags {
                may_unmap: detect == DetectZeroes::Unmap,
                fua: flags.fua,
                ..ZeroFlags::default()
            };
            return self.write_zeroes_entered(offset, len, zero).await;
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
    pub(crate) fn check_compressed(&self, offset: u64, len: u64) -> Result<()> {
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

    pub(crate) async fn write_compressed_clusters(&self, offset: u64, data: IoVec) -> Result<()> {
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

    pub(crate) async fn write_chunks(
        &self,
        offset: u64,
        data: IoVec,
        flags: WriteFlags,
    ) -> Result<()> {
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

    pub(crate) async fn write_zeroes_entered(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
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
    pub(crate) async fn write_explicit_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = IoVec::from(vec![0u8; len as usize]);
        Box::pin(self.write_entered_nohooks(offset, zeroes)).await
    }

    pub(crate) async fn write_entered_nohooks(&self, offset: u64, data: IoVec) -> Result<()> {
        let align = u64::from(self.facts.request_alignment);
        let len = data.len() as u64;
        let (start, end) = (align_down(offset, align), align_up(offset + len, align));
        let _excl = self
            .locks
            .lock(start, end - start, LockMode::Exclusive)
            .await;
        let mut padded = self
            .driver
            .read(start, crate::buf::zeroed_for_io((end - start) as usize))
            .await?;
        let skip = (offset - start) as usize;
        padded[skip..skip + len as usize].copy_from_slice(&data.to_bytes());
        self.driver
            .write(start, IoVec::from(padded.freeze()), WriteFlags::default())
            .await
    }

    pub(crate) async fn discard_entered(&self, offset: u64, len: u64) -> Result<()> {
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

    pub(crate) async fn block_status_entered(&self, offset: u64, len: u64) -> Result<BlockStatus> {
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
