//! The `blkdebug` filter: passes I/O to its `image` child and fails the requests its rules
//! match, for rehearsing error handling (jobs' `on-error`, exports' errnos).
//!
//! A rule names an event, `read_aio` (reads) or `write_aio` (writes, write-zeroes and
//! discards), an errno (default EIO), an optional sector (512-byte unit; the rule matches
//! requests overlapping it), and `once` (the rule is removed after it fired). Rules fire on
//! the I/O that reaches this node, whoever sends it. QEMU fires these events only when a
//! format driver above reads or writes data through blkdebug, so a blkdebug node at the top
//! of a graph injects nothing there; here it does. `immediately` is accepted: errors are
//! always returned at once.

use std::io;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use block::{BlockDriver, BlockError, BlockStatus, Child, Facts, IoVec, Result};
use block::{WriteFlags, ZeroFlags};
use bytes::BytesMut;

/// What a rule reacts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugEvent {
    /// A read request.
    ReadAio,
    /// A write, write-zeroes or discard request.
    WriteAio,
}

/// One `inject-error` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectError {
    /// The event that triggers the rule.
    pub event: DebugEvent,
    /// The errno the request fails with.
    pub errno: i32,
    /// Only requests overlapping this 512-byte sector (`None`: every request).
    pub sector: Option<u64>,
    /// Remove the rule after it fired once.
    pub once: bool,
}

/// The blkdebug filter.
#[derive(Debug)]
pub struct BlkdebugDriver {
    image: Arc<Child>,
    rules: Mutex<Vec<InjectError>>,
    writable: bool,
}

impl BlkdebugDriver {
    /// A blkdebug node over `image` with `rules`.
    pub fn new(image: Arc<Child>, rules: Vec<InjectError>, writable: bool) -> Self {
        Self {
            image,
            rules: Mutex::new(rules),
            writable,
        }
    }

    /// Fails the request when a rule matches it.
    fn check(&self, event: DebugEvent, offset: u64, len: u64) -> Result<()> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let hit = rules.iter().position(|r| {
            r.event == event
                && r.sector.is_none_or(|s| {
                    let start = s.saturating_mul(512);
                    start < offset.saturating_add(len.max(1)) && offset < start.saturating_add(512)
                })
        });
        let Some(i) = hit else {
            return Ok(());
        };
        let rule = rules[i].clone();
        if rule.once {
            rules.remove(i);
        }
        Err(BlockError::io(
            format!("blkdebug: injected error at offset {offset}"),
            io::Error::from_raw_os_error(rule.errno),
        ))
    }
}

#[async_trait]
impl BlockDriver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }
    fn len(&self) -> u64 {
        self.image.node().len()
    }
    fn facts(&self) -> Facts {
        // A filter: writes past the end grow the image when its file does (qcow2 over
        // blkdebug over file allocates at the end of the file).
        Facts {
            cluster_size: None,
            ..self.image.node().facts()
        }
    }
    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.image.clone()]
    }
    fn writable(&self) -> bool {
        self.writable
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.check(DebugEvent::ReadAio, offset, buf.len() as u64)?;
        self.image.read_into(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        self.check(DebugEvent::WriteAio, offset, data.len() as u64)?;
        self.image.write(offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(DebugEvent::WriteAio, offset, len)?;
        self.image.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(DebugEvent::WriteAio, offset, len)?;
        self.image.discard(offset, len).await
    }
    async fn flush(&self) -> Result<()> {
        self.image.flush().await
    }
    /// The image's own status, host offsets included (they are offsets in the image's file,
    /// which the map finds through this filter).
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.image.block_status(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDriver;
    use block::{BlockNode, ChildRole};

    fn node(rules: Vec<InjectError>) -> Arc<BlockNode> {
        let mem = BlockNode::new("mem", Arc::new(MemDriver::new(vec![0u8; 1 << 16])));
        let image = Child::new(ChildRole::Filtered, mem);
        BlockNode::new("bd", Arc::new(BlkdebugDriver::new(image, rules, true)))
    }

    #[tokio::test]
    async fn rules_fail_matching_requests() {
        let bd = node(vec![
            InjectError {
                event: DebugEvent::ReadAio,
                errno: libc::ENOSPC,
                sector: Some(8),
                once: true,
            },
            InjectError {
                event: DebugEvent::WriteAio,
                errno: libc::EIO,
                sector: None,
                once: false,
            },
        ]);
        bd.read(0, 512).await.expect("sector 0 is fine");
        let e = bd.read(4000, 200).await.expect_err("overlaps sector 8");
        assert_eq!(e.errno(), libc::ENOSPC);
        bd.read(4096, 512).await.expect("once: gone");
        for _ in 0..2 {
            let e = bd
                .write(0, IoVec::from(vec![1u8; 512]), WriteFlags::default())
                .await
                .expect_err("every write");
            assert_eq!(e.errno(), libc::EIO);
        }
        assert!(bd.write_zeroes(0, 512, ZeroFlags::default()).await.is_err());
        assert!(bd.discard(0, 512).await.is_err());
        bd.flush().await.expect("flush passes");
    }
}
