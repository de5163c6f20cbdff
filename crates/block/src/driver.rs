//! The driver contract: what every protocol, format and filter driver provides.
//!
//! Drivers expose raw operations and facts; bounds checks, alignment (read-modify-write),
//! splitting by `max_transfer`, serialisation, in-flight tracking and before-write hooks live
//! once, in the request path of [`crate::node::BlockNode`]. A driver may therefore assume every
//! request it receives is inside `[0, len())`, aligned to `facts().request_alignment` and no
//! longer than `facts().max_transfer`.
//!
//! Optional features are capability traits reached through `as_*` accessors returning `None`
//! by default (compressed writes, copy offload).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;

use crate::buf::IoVec;
use crate::error::Result;
use crate::node::{Child, ChildRole};
use crate::perm::EdgePerm;

/// Facts a driver states about itself; the request path obeys them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    /// Offsets and lengths of reads and writes must be multiples of this (1 = any byte).
    pub request_alignment: u32,
    /// Memory alignment the driver needs for buffers (O_DIRECT); the engine bounces otherwise.
    pub memory_alignment: u32,
    /// Largest request the driver accepts in one call; the request path splits larger ones.
    pub max_transfer: u32,
    /// The format's allocation unit, when it has one (qcow2 cluster size).
    pub cluster_size: Option<u32>,
    /// Writes past the end extend the node (a protocol node under a format); reads past the
    /// end return zeroes.
    pub growable: bool,
    /// Writes, write-zeroes, discards and flushes may update on-disk metadata (a format like
    /// qcow2): once started they run to completion, whoever stops waiting for them.
    pub updates_metadata: bool,
}

impl Default for Facts {
    fn default() -> Self {
        Self {
            request_alignment: 1,
            memory_alignment: 1,
            max_transfer: 32 << 20,
            cluster_size: None,
            growable: false,
            updates_metadata: false,
        }
    }
}

/// Options of a write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is on stable storage when the write completes.
    pub fua: bool,
    /// Store the data compressed (backup `compress=true`, `copy -c`): only on nodes whose
    /// driver writes compressed clusters, in whole clusters from a cluster boundary (the last
    /// one may end at the end of the node). Goes through gates, hooks and bitmaps like any
    /// write.
    pub compressed: bool,
}

impl WriteFlags {
    /// Plain write with force unit access.
    pub fn fua() -> Self {
        Self {
            fua: true,
            ..Self::default()
        }
    }

    /// Compressed write.
    pub fn compressed() -> Self {
        Self {
            compressed: true,
            ..Self::default()
        }
    }
}

/// Options of a write-zeroes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched, unmapped) as long as it reads back as zero.
    pub may_unmap: bool,
    /// Fail with `Unsupported` rather than write explicit zeroes when there is no fast way.
    pub no_fallback: bool,
    /// Force unit access.
    pub fua: bool,
}

/// What a range of a node holds, as answered by block status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// How many bytes from the queried offset share this status (> 0).
    pub len: u64,
    /// This layer defines the content (false: it comes from the backing chain, or reads as zero
    /// when there is none).
    pub allocated: bool,
    /// The layer stores data bytes for the range.
    pub data: bool,
    /// The range is known to read as zero.
    pub zero: bool,
    /// The data is stored compressed.
    pub compressed: bool,
    /// Where the bytes live in the node's `file` child, when they live there contiguously.
    pub host_offset: Option<u64>,
    /// Data whose zeroes only the `file` child knows (QEMU's BDRV_BLOCK_RECURSE): a map asks
    /// the file whether the host range is a hole. qcow2 sets it only for images with
    /// preallocated metadata, as QEMU does; elsewhere a data cluster is data.
    pub recurse: bool,
}

impl BlockStatus {
    /// Plain data, allocated here, mapped at `host_offset`.
    pub fn data(len: u64, host_offset: Option<u64>) -> Self {
        Self {
            len,
            allocated: true,
            data: true,
            zero: false,
            compressed: false,
            host_offset,
            recurse: false,
        }
    }

    /// Allocated here and reading as zero.
    pub fn zero(len: u64, host_offset: Option<u64>) -> Self {
        Self {
            len,
            allocated: true,
            data: false,
            zero: true,
            compressed: false,
            host_offset,
            recurse: false,
        }
    }

    /// Not allocated in this layer.
    pub fn unallocated(len: u64) -> Self {
        Self {
            len,
            allocated: false,
            data: false,
            zero: false,
            compressed: false,
            host_offset: None,
            recurse: false,
        }
    }
}

/// A value in [`ImageInfo::specific`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoValue {
    /// A string.
    Str(String),
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A list.
    List(Vec<InfoValue>),
    /// An object, its members in order.
    Object(Vec<(&'static str, InfoValue)>),
}

/// Format-specific facts shown by `info` (the `format-specific` object of `qemu-img info`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format name (`qcow2`, `raw`, `file`, …).
    pub format: &'static str,
    /// The backing file name as recorded in the image.
    pub backing_file: Option<String>,
    /// The backing format as recorded in the image.
    pub backing_format: Option<String>,
    /// The format's `dirty-flag`.
    pub dirty: bool,
    /// `format-specific.data` members, in display order.
    pub specific: Vec<(&'static str, InfoValue)>,
}

/// The contract of a block driver. See the module docs for what the request path guarantees.
#[async_trait]
#[allow(clippy::len_without_is_empty)]
pub trait BlockDriver: Send + Sync + fmt::Debug {
    /// The driver name as QEMU spells it (`file`, `raw`, `qcow2`, `null-co`).
    fn driver_name(&self) -> &'static str;

    /// Length of the node in bytes.
    fn len(&self) -> u64;

    /// Bytes the node's storage takes on the host (a file's allocated blocks), when known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }

    /// Facts the request path obeys.
    fn facts(&self) -> Facts {
        Facts::default()
    }

    /// Child edges with their roles (file, backing).
    fn children(&self) -> Vec<Arc<Child>> {
        Vec::new()
    }

    /// Whether the node was opened for writing.
    fn writable(&self) -> bool;

    /// The node's parents will need and share `_of_node` (see [`crate::perm`]): take what that
    /// requires outside the graph (the file driver's image locks) or refuse. Followed by
    /// [`commit_perm`](Self::commit_perm) with the same value, or by
    /// [`abort_perm`](Self::abort_perm).
    fn prepare_perm(&self, _of_node: EdgePerm) -> Result<()> {
        Ok(())
    }

    /// Makes a prepared change final (releases what is no longer needed).
    fn commit_perm(&self, _of_node: EdgePerm) {}

    /// Undoes a prepared change.
    fn abort_perm(&self) {}

    /// Reads `buf.len()` bytes at `offset` into `buf` and hands it back.
    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut>;

    /// Writes `data` at `offset`.
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()>;

    /// Makes `[offset, offset+len)` read as zero.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;

    /// Hints that `[offset, offset+len)` is no longer needed. Contents afterwards are unspecified
    /// (drivers that deallocate make them read as zero or as the backing file).
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// What `[offset, offset+len)` holds, from `offset` on; the answer may cover less than `len`.
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;

    /// Flushes and releases what the driver holds (marks images clean). Called once, last.
    async fn close(&self) -> Result<()> {
        self.flush().await
    }

    /// Facts for `info`.
    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            format: self.driver_name(),
            ..ImageInfo::default()
        }
    }

    /// Whether the format stores persistent dirty bitmaps (qcow2).
    fn stores_bitmaps(&self) -> bool {
        false
    }

    /// The persistent bitmaps stored in the image (at open).
    async fn load_bitmaps(&self) -> Result<Vec<bitmap::DirtyBitmap>> {
        Ok(Vec::new())
    }

    /// Removes persistent bitmap `name` from the image (block-dirty-bitmap-remove).
    async fn remove_stored_bitmap(&self, _name: &str) -> Result<()> {
        Ok(())
    }

    /// Stores `bitmaps` as the image's persistent bitmaps, replacing those stored (at close).
    async fn store_bitmaps(&self, _bitmaps: &[bitmap::DirtyBitmap]) -> Result<()> {
        Ok(())
    }

    /// The compressed-write capability, when the format has one.
    fn as_compressed_writer(&self) -> Option<&dyn CompressedWrite> {
        None
    }

    /// A format that can have a backing file (QEMU's `supports_backing`): what it does not
    /// allocate, with no backing file below, reads as zeroes. Elsewhere an unallocated range
    /// (an NBD hole without the zero flag, a snapshot's range nobody allocated) is not known
    /// to read as zeroes.
    fn supports_backing(&self) -> bool {
        false
    }

    /// Copy offload (`use-copy-range`): the child that stores this node's bytes unchanged
    /// and where `offset` is in it (a raw format), so a copy can go on below. `None` for
    /// drivers that change bytes on the way (or are a leaf).
    fn copy_through(&self, _offset: u64) -> Option<(Arc<Child>, u64)> {
        None
    }

    /// Copy offload at the leaves: copies `len` bytes at `offset` of this node to `dst_offset`
    /// of `dst` without passing them through memory, and returns how many it copied (fewer
    /// when the kernel stops early). `Ok(None)` when the pair cannot do it (not two files).
    async fn copy_range_to(
        &self,
        _offset: u64,
        _dst: &dyn BlockDriver,
        _dst_offset: u64,
        _len: u64,
    ) -> Result<Option<u64>> {
        Ok(None)
    }

    /// The driver as `Any`, for [`copy_range_to`](Self::copy_range_to) to recognise its own kind.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// A format driver above announces what it is about to do with this node (QEMU's
    /// `bdrv_debug_event`). Only `blkdebug` acts on it; every other driver passes it to its
    /// primary child (the filtered one, else `file`), so it reaches a blkdebug node below.
    fn debug_event(&self, event: DebugEvent) {
        let children = self.children();
        let primary = children
            .iter()
            .find(|c| c.role() == ChildRole::Filtered)
            .or_else(|| children.iter().find(|c| c.role() == ChildRole::File));
        if let Some(child) = primary {
            child.debug_event(event);
        }
    }
}

/// What a driver announces to the node below it before a request (QEMU's blkdebug events);
/// `blkdebug` rules fire on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugEvent {
    /// About to read guest data (`read_aio`).
    ReadAio,
    /// About to write guest data (`write_aio`).
    WriteAio,
    /// A write reaches the node (`pwritev`; blkdebug announces it to itself, as QEMU's block
    /// layer does for the node a write reaches).
    Pwritev,
    /// A write of zeroes reaches the node (`pwritev_zero`).
    PwritevZero,
    /// A write through the node finished (`pwritev_done`).
    PwritevDone,
    /// A flush reaches the node (`flush_to_os`, then `flush_to_disk`).
    FlushToOs,
    /// See [`FlushToOs`](Self::FlushToOs).
    FlushToDisk,
    /// qcow2 reads an L2 table (`l2_load`).
    L2Load,
    /// qcow2 writes an L2 table (`l2_update`).
    L2Update,
    /// qcow2 writes an L1 entry (`l1_update`).
    L1Update,
    /// qcow2 allocates data clusters (`cluster_alloc`).
    ClusterAlloc,
    /// qcow2 allocates bytes for compressed data (`cluster_alloc_bytes`).
    ClusterAllocBytes,
    /// qcow2 writes part of a refcount block (`refblock_update_part`).
    RefblockUpdatePart,
    /// An event QEMU names that nothing here announces: a rule on it never fires.
    Unplaced,
}

impl DebugEvent {
    /// Every event name QEMU's schema has, in its order.
    pub const NAMES: &'static [&'static str] = &[
        "l1_update",
        "l1_grow_alloc_table",
        "l1_grow_write_table",
        "l1_grow_activate_table",
        "l2_load",
        "l2_update",
        "l2_update_compressed",
        "l2_alloc_cow_read",
        "l2_alloc_write",
        "read_aio",
        "read_backing_aio",
        "read_compressed",
        "write_aio",
        "write_compressed",
        "vmstate_load",
        "vmstate_save",
        "cow_read",
        "cow_write",
        "reftable_load",
        "reftable_grow",
        "reftable_update",
        "refblock_load",
        "refblock_update",
        "refblock_update_part",
        "refblock_alloc",
        "refblock_alloc_hookup",
        "refblock_alloc_write",
        "refblock_alloc_write_blocks",
        "refblock_alloc_write_table",
        "refblock_alloc_switch_table",
        "cluster_alloc",
        "cluster_alloc_bytes",
        "cluster_free",
        "flush_to_os",
        "flush_to_disk",
        "pwritev_rmw_head",
        "pwritev_rmw_after_head",
        "pwritev_rmw_tail",
        "pwritev_rmw_after_tail",
        "pwritev",
        "pwritev_zero",
        "pwritev_done",
        "empty_image_prepare",
        "l1_shrink_write_table",
        "l1_shrink_free_l2_clusters",
        "cor_write",
        "cluster_alloc_space",
        "none",
    ];

    /// The event QEMU calls `name` (one of [`NAMES`](Self::NAMES)).
    pub fn from_name(name: &str) -> DebugEvent {
        match name {
            "read_aio" => DebugEvent::ReadAio,
            "write_aio" => DebugEvent::WriteAio,
            "pwritev" => DebugEvent::Pwritev,
            "pwritev_zero" => DebugEvent::PwritevZero,
            "pwritev_done" => DebugEvent::PwritevDone,
            "flush_to_os" => DebugEvent::FlushToOs,
            "flush_to_disk" => DebugEvent::FlushToDisk,
            "l2_load" => DebugEvent::L2Load,
            "l2_update" => DebugEvent::L2Update,
            "l1_update" => DebugEvent::L1Update,
            "cluster_alloc" => DebugEvent::ClusterAlloc,
            "cluster_alloc_bytes" => DebugEvent::ClusterAllocBytes,
            "refblock_update_part" => DebugEvent::RefblockUpdatePart,
            _ => DebugEvent::Unplaced,
        }
    }
}

/// Capability: writing whole clusters compressed.
#[async_trait]
pub trait CompressedWrite: Send + Sync {
    /// Writes `data`, exactly one cluster (or the final partial cluster) at a cluster-aligned
    /// `offset`, compressed when that saves space.
    async fn write_compressed(&self, offset: u64, data: bytes::Bytes) -> Result<()>;
}
