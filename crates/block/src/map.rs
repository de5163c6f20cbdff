//! The allocation map of a node and its backing chain, as `qemu-img map` reports it.
//!
//! One primitive ([`BlockDriver::block_status`](crate::driver::BlockDriver::block_status)) per
//! layer; this module walks down the backing chain where a layer is unallocated, refines "data"
//! with what the `file` child knows when the layer asks for it (`BlockStatus::recurse`: a
//! data cluster of preallocated metadata over a hole reads as zero), and merges neighbours with
//! equal attributes.

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
            if st.data && !st.zero && st.recurse {
                if let (Some(host), Some(file)) = (st.host_offset, storage_file(&node)) {
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
        // A filter answers for its child's own layer; what neither holds comes from below it,
        // one layer deeper, as QEMU counts allocation depth through filters.
        match node
            .child(ChildRole::Backing)
            .or_else(|| node.child(ChildRole::Filtered))
        {
            Some(below) => {
                node = below.node();
                depth += 1;
            }
            None => {
                let zero = node.driver.supports_backing();
                return Ok(entry(offset, len, depth, false, zero, false, false, None));
            }
        }
    }
}

/// Whether a range `node` leaves unallocated (neither data nor zero) reads as zeroes: QEMU's
/// rule, for a format that could have a backing file and has none. Filters answer for their
/// child. An NBD hole without the zero flag, or a raw node's over one, is not known to be zero.
pub fn unallocated_reads_zero(node: &Arc<BlockNode>) -> bool {
    let mut node = node.clone();
    while let Some(below) = node.child(ChildRole::Filtered) {
        node = below.node();
    }
    node.driver.supports_backing() && node.child(ChildRole::Backing).is_none()
}

/// The `file` child that holds `node`'s data, looking through filters (whose block status is
/// their child's, host offsets included).
fn storage_file(node: &Arc<BlockNode>) -> Option<Arc<crate::node::Child>> {
    let mut at = node.clone();
    loop {
        if let Some(file) = at.child(ChildRole::File) {
            return Some(file);
        }
        at = at.child(ChildRole::Filtered)?.node();
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

/// Whether `[offset, offset+len)` of `top` is allocated in some layer above `base` (`base`
/// itself excluded; `None`: the whole chain), looking through backing files and filters; and
/// for how many bytes from `offset` that answer holds. What sync=top copies, and what stream
/// and commit move.
pub async fn allocated_above(
    top: &Arc<BlockNode>,
    base: Option<&Arc<BlockNode>>,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let mut node = top.clone();
    let mut len = len;
    loop {
        if base.is_some_and(|b| Arc::ptr_eq(b, &node)) {
            return Ok((false, len));
        }
        // Past the end of a shorter layer nothing is allocated in it.
        if offset < node.len() {
            let st = node.block_status(offset, len).await?;
            len = st.len;
            if st.allocated {
                return Ok((true, len));
            }
        }
        match node
            .child(ChildRole::Backing)
            .or_else(|| node.child(ChildRole::Filtered))
        {
            Some(below) => node = below.node(),
            None => return Ok((false, len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::IoVec;
    use crate::driver::{BlockDriver, BlockStatus, WriteFlags, ZeroFlags};
    use crate::node::Child;
    use async_trait::async_trait;
    use bytes::BytesMut;

    /// A layer allocating `[start, end)` ranges, over an optional backing or filtered child.
    #[derive(Debug)]
    struct Layer {
        len: u64,
        allocated: Vec<(u64, u64)>,
        below: Option<Arc<Child>>,
    }

    #[async_trait]
    impl BlockDriver for Layer {
        fn driver_name(&self) -> &'static str {
            "layer"
        }
        fn len(&self) -> u64 {
            self.len
        }
        fn children(&self) -> Vec<Arc<Child>> {
            self.below.iter().cloned().collect()
        }
        fn writable(&self) -> bool {
            false
        }
        async fn read(&self, _: u64, buf: BytesMut) -> Result<BytesMut> {
            Ok(buf)
        }
        async fn write(&self, _: u64, _: IoVec, _: WriteFlags) -> Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<()> {
            Ok(())
        }
        async fn discard(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
        async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
            if let Some(below) = self
                .below
                .as_ref()
                .filter(|c| c.role() == ChildRole::Filtered)
            {
                return below.block_status(offset, len).await;
            }
            for &(s, e) in &self.allocated {
                if (s..e).contains(&offset) {
                    return Ok(BlockStatus::data(len.min(e - offset), None));
                }
            }
            let next = self
                .allocated
                .iter()
                .map(|&(s, _)| s)
                .filter(|&s| s > offset)
                .min()
                .unwrap_or(u64::MAX);
            Ok(BlockStatus::unallocated(len.min(next - offset)))
        }
    }

    fn layer(
        name: &str,
        len: u64,
        allocated: &[(u64, u64)],
        below: Option<(ChildRole, &Arc<BlockNode>)>,
    ) -> Arc<BlockNode> {
        let below = below.map(|(role, n)| Child::new(role, n.clone()));
        BlockNode::new(
            name,
            Arc::new(Layer {
                len,
                allocated: allocated.to_vec(),
                below,
            }),
        )
    }

    #[tokio::test]
    async fn allocation_above_a_base_looks_through_backing_files_and_filters() {
        const K: u64 = 1024;
        // base: [0, 64K); mid: [64K, 128K); top: [192K, 256K), 320K long over 256K below;
        // a filter above top.
        let base = layer("base", 256 * K, &[(0, 64 * K)], None);
        let mid = layer(
            "mid",
            256 * K,
            &[(64 * K, 128 * K)],
            Some((ChildRole::Backing, &base)),
        );
        let top = layer(
            "top",
            320 * K,
            &[(192 * K, 256 * K)],
            Some((ChildRole::Backing, &mid)),
        );
        let filter = layer("f", 320 * K, &[], Some((ChildRole::Filtered, &top)));
        type Case<'a> = (Option<&'a Arc<BlockNode>>, u64, (bool, u64));
        let cases: &[Case<'_>] = &[
            (None, 0, (true, 64 * K)),
            (Some(&base), 0, (false, 64 * K)),
            (Some(&base), 64 * K, (true, 64 * K)),
            (Some(&mid), 64 * K, (false, 128 * K)),
            (Some(&mid), 128 * K, (false, 64 * K)),
            (Some(&mid), 192 * K, (true, 64 * K)),
            (None, 128 * K, (false, 64 * K)),
            // Past the end of the shorter layers below: allocated nowhere.
            (None, 256 * K, (false, 64 * K)),
        ];
        for (i, (base, offset, want)) in cases.iter().enumerate() {
            let got = allocated_above(&filter, *base, *offset, 320 * K - offset)
                .await
                .expect("status");
            assert_eq!(got, *want, "case {i}");
        }
        // The map counts the filter as a layer, as QEMU's allocation depth does.
        let e = extent_at(&filter, 0, 320 * K).await.expect("extent");
        assert_eq!((e.depth, e.present, e.length), (3, true, 64 * K));
        let e = extent_at(&filter, 192 * K, 64 * K).await.expect("extent");
        assert_eq!((e.depth, e.present), (0, true));
    }
}
