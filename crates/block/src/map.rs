//! The allocation map of a node and its backing chain, as `qemu-img map` reports it.
//!
//! One primitive ([`BlockDriver::block_status`](crate::driver::BlockDriver::block_status)) per
//! layer; this module walks down the backing chain where a layer is unallocated, refines "data"
//! with what the `file` child knows (a data cluster over a hole reads as zero), and merges
//! neighbours with equal attributes.

use std::sync::Arc;

use crate::error::Result;
use crate::node::{BlockNode, ChildRole};

/// One extent of the map (`qemu-img map --output=json` fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer of the chain the content comes from (0 = the top node).
    pub depth: u32,
    /// Some layer defines the content.
    pub present: bool,
    /// Reads as zero.
    pub zero: bool,
    /// Stored as data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Where the bytes live in the layer's file, when known.
    pub offset: Option<u64>,
}

impl MapEntry {
    fn continues(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// The extent starting at `offset` (at most `len` bytes), resolved through the backing chain.
pub async fn extent_at(top: &Arc<BlockNode>, offset: u64, len: u64) -> Result<MapEntry> {
    let mut node = top.clone();
    let mut depth = 0;
    let mut len = len;
    loop {
        if offset >= node.len() {
            // Past the end of a shorter backing file: reads as zero, allocated nowhere.
            return Ok(entry(offset, len, depth, false, true, false, false, None));
        }
        let st = node.block_status(offset, len).await?;
        len = st.len;
        if st.allocated {
            let mut zero = st.zero;
            if st.data && !st.zero {
                if let (Some(host), Some(file)) = (st.host_offset, node.child(ChildRole::File)) {
                    let file = file.node();
                    if host < file.len() {
                        let fs = file.block_status(host, len).await?;
                        len = fs.len;
                        zero = fs.zero;
                    } else {
                        zero = true;
                    }
                }
            }
            return Ok(entry(
                offset,
                len,
                depth,
                true,
                zero,
                st.data,
                st.compressed,
                st.host_offset,
            ));
        }
        match node.child(ChildRole::Backing) {
            Some(backing) => {
                node = backing.node();
                depth += 1;
            }
            None => return Ok(entry(offset, len, depth, false, true, false, false, None)),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn entry(
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
) -> MapEntry {
    MapEntry {
        start,
        length,
        depth,
        present,
        zero,
        data,
        compressed,
        offset,
    }
}

/// The whole map of `[start, start+len)`, neighbours merged.
pub async fn map_range(top: &Arc<BlockNode>, start: u64, len: u64) -> Result<Vec<MapEntry>> {
    let end = start.saturating_add(len).min(top.len());
    let mut out: Vec<MapEntry> = Vec::new();
    let mut at = start;
    while at < end {
        let e = extent_at(top, at, end - at).await?;
        at += e.length;
        match out.last_mut() {
            Some(last) if last.continues(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
}
