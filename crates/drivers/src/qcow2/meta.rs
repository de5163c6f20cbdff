//! qcow2 metadata: the L1 table, a write-back L2 cache, refcounts and the cluster allocator.
//!
//! All of it lives behind one async mutex in the driver; data I/O happens outside it.
//!
//! Ordering rules that keep the image consistent if the process dies at any point:
//! - a refcount increase is written before any L2 or L1 entry that uses the cluster
//!   (L2 write-back first writes dirty refcount blocks, then syncs, then the L2 tables);
//! - a new L2 table is written, with its refcount, before the L1 entry pointing to it;
//! - a refcount *decrease* is applied only after the L2 entry that dropped the reference is
//!   written (the caller writes the entry through, then frees); the next refcount write-back
//!   syncs first, so the drop is durable before the decrease;
//! - a new refcount block is written before the refcount table entry pointing to it, and a
//!   grown refcount table is complete before the header points to it.
//!
//! Data clusters are written before the L2 entry mapping them is updated in the cache.

use std::collections::HashMap;
use std::sync::Arc;

use block::{BlockError, Child, DebugEvent, ErrorKind, IoVec, Result, WriteFlags};

use super::entry::{Mapping, COPIED, OFFSET_MASK};
use super::header::Header;

/// Offset bits of refcount table entries.
const RT_OFFSET_MASK: u64 = !0x1ff;
/// Host offsets must fit in 56 bits.
const MAX_HOST_OFFSET: u64 = 1 << 56;

#[derive(Debug)]
struct Cached<T> {
    data: T,
    dirty: bool,
    used: u64,
    /// For a dirty L2 table: the refcount epoch when it was last changed. The refcounts its
    /// entries need are durable once that epoch is synced.
    epoch: u64,
}

impl<T> Cached<T> {
    fn clean(data: T, used: u64) -> Self {
        Self {
            data,
            dirty: false,
            used,
            epoch: 0,
        }
    }
}

/// The cached table at `off`, marked as used at `tick` (for LRU eviction).
fn touch<T>(cache: &mut HashMap<u64, Cached<T>>, off: u64, tick: u64) -> Result<&mut Cached<T>> {
    let entry = cache
        .get_mut(&off)
        .ok_or_else(|| BlockError::corrupt(format!("metadata cache lost the table at {off:#x}")))?;
    entry.used = tick;
    Ok(entry)
}

/// Metadata state of an open image. See the module docs for the ordering rules.
#[derive(Debug)]
pub(crate) struct Meta {
    pub header: Header,
    file: Arc<Child>,
    cluster_bits: u32,
    cs: u64,
    l1: Vec<u64>,
    l2: HashMap<u64, Cached<Vec<u64>>>,
    l2_capacity: usize,
    rt: Vec<u64>,
    rb: HashMap<u64, Cached<Vec<u8>>>,
    rb_capacity: usize,
    tick: u64,
    free_hint: u64,
    /// First cluster index past everything allocated (file end or later in-flight clusters).
    end_cluster: u64,
    /// Byte offset where the next compressed cluster may go (0: start a new host cluster).
    compressed_cursor: u64,
    /// A reference was dropped by a written-through L2 entry: sync before writing refcounts.
    sync_before_refcounts: bool,
    /// Refcount epochs: every refcount change counts one; all changes up to `written_epoch`
    /// are written to the file, up to `synced_epoch` also synced. An L2 table is written only
    /// once the epoch it was changed in is synced (refcounts before the entries that use
    /// them), which lets a flush sync refcounts without holding the metadata lock.
    rc_epoch: u64,
    written_epoch: u64,
    synced_epoch: u64,
    /// L1 entries changed in memory whose write has not completed (it failed): written again
    /// at the next flush. A new table is durable before its L1 entry changes, so they may go
    /// at any time.
    l1_dirty: std::collections::BTreeSet<usize>,
}

fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

fn to_be_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

/// Reads refcount `i` of a refcount block with `order` (bits = 1 << order).
pub(crate) fn get_refcount(block: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            u64::from((block[i / per_byte] >> shift) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes([
            block[4 * i],
            block[4 * i + 1],
            block[4 * i + 2],
            block[4 * i + 3],
        ])),
        _ => be_u64s(&block[8 * i..8 * i + 8])[0],
    }
}

/// Writes refcount `i` of a refcount block with `order`; `value` fits (checked by callers).
pub(crate) fn set_refcount(block: &mut [u8], i: usize, order: u32, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[i] = value as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

impl Meta {
    /// Loads the L1 and refcount tables of an image whose header was parsed.
    pub async fn load(header: Header, file: Arc<Child>) -> Result<Meta> {
        let cs = header.cluster_size();
        let file_len = file.node().len();
        let l1_bytes = header.l1_size as usize * 8;
        let l1 = be_u64s(&file.read(header.l1_table_offset, l1_bytes).await?);
        let rt_bytes = header.refcount_table_clusters as usize * cs as usize;
        let rt = be_u64s(&file.read(header.refcount_table_offset, rt_bytes).await?);
        let cluster_bits = header.cluster_bits;
        let meta_capacity = |covered_per_table: u64| -> usize {
            let want = header.size.div_ceil(covered_per_table).max(16);
            let max = ((32u64 << 20) / cs).max(16);
            want.min(max) as usize
        };
        let l2_capacity = meta_capacity(cs / 8 * cs);
        let rb_capacity = meta_capacity(cs * 8 / u64::from(header.refcount_bits()) * cs);
        let meta = Meta {
            header,
            file,
            cluster_bits,
            cs,
            l1,
            l2: HashMap::new(),
            l2_capacity,
            rt,
            rb: HashMap::new(),
            rb_capacity,
            tick: 0,
            free_hint: 0,
            end_cluster: file_len.div_ceil(cs),
            compressed_cursor: 0,
            sync_before_refcounts: false,
            rc_epoch: 0,
            written_epoch: 0,
            synced_epoch: 0,
            l1_dirty: std::collections::BTreeSet::new(),
        };
        meta.validate_tables(file_len)?;
        Ok(meta)
    }

    fn validate_tables(&self, file_len: u64) -> Result<()> {
        for (i, e) in self.l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off != 0 {
                self.check_meta_offset(off, file_len)
                    .map_err(|e| e.within(format!("L1 entry {i}")))?;
            }
        }
        for (i, e) in self.rt.iter().enumerate() {
            let off = e & RT_OFFSET_MASK;
            if off != 0 {
                self.check_meta_offset(off, file_len)
                    .map_err(|e| e.within(format!("refcount table entry {i}")))?;
            }
        }
        Ok(())
    }

    fn check_meta_offset(&self, off: u64, file_len: u64) -> Result<()> {
        if off % self.cs != 0 {
            return Err(BlockError::corrupt(format!(
                "table offset {off:#x} is not cluster aligned"
            )));
        }
        if off + self.cs > file_len.div_ceil(self.cs) * self.cs {
            return Err(BlockError::corrupt(format!(
                "table at {off:#x} is outside the file ({file_len} bytes)"
            )));
        }
        Ok(())
    }

    fn file_len(&self) -> u64 {
        self.file.node().len()
    }

    /// The `file` child the metadata lives in.
    pub fn file_child(&self) -> Arc<Child> {
        self.file.clone()
    }

    fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    fn rb_entries(&self) -> u64 {
        self.cs * 8 / u64::from(self.header.refcount_bits())
    }

    fn max_refcount(&self) -> u64 {
        match self.header.refcount_bits() {
            64 => u64::MAX,
            b => (1u64 << b) - 1,
        }
    }

    async fn write_bytes(&self, off: u64, data: Vec<u8>) -> Result<()> {
        self.file
            .write(off, IoVec::from(data), WriteFlags::default())
            .await
    }

    // ---- L2 ----------------------------------------------------------------------------

    async fn load_l2(&mut self, off: u64) -> Result<&mut Cached<Vec<u64>>> {
        self.tick += 1;
        if !self.l2.contains_key(&off) {
            self.check_meta_offset(off, self.file_len())?;
            self.make_room_l2().await?;
            self.file.debug_event(DebugEvent::L2Load);
            let raw = self.file.read(off, self.cs as usize).await?;
            self.l2.insert(off, Cached::clean(be_u64s(&raw), 0));
        }
        touch(&mut self.l2, off, self.tick)
    }

    async fn make_room_l2(&mut self) -> Result<()> {
        if self.l2.len() < self.l2_capacity {
            return Ok(());
        }
        let Some((&victim, _)) = self.l2.iter().min_by_key(|(_, t)| t.used) else {
            return Ok(());
        };
        if self.l2.get(&victim).is_some_and(|t| t.dirty) {
            self.write_back_l2(&[victim]).await?;
        }
        self.l2.remove(&victim);
        Ok(())
    }

    /// Writes the given dirty L2 tables, after the refcounts they depend on are durable. A
    /// table is clean only once its write completed: stopped or failed half way, it stays
    /// dirty and is written again.
    async fn write_back_l2(&mut self, tables: &[u64]) -> Result<()> {
        let needs = tables
            .iter()
            .filter_map(|o| self.l2.get(o))
            .filter(|t| t.dirty)
            .map(|t| t.epoch)
            .max();
        if needs.is_some_and(|e| e > self.synced_epoch) {
            self.flush_refblocks().await?;
            self.sync_refcounts().await?;
        }
        self.write_l2_tables(tables).await
    }

    /// Syncs the file: every refcount written so far is durable.
    async fn sync_refcounts(&mut self) -> Result<()> {
        let written = self.written_epoch;
        self.file.flush().await?;
        self.synced_epoch = self.synced_epoch.max(written);
        Ok(())
    }

    /// Writes the dirty tables among `tables` (their refcounts are durable).
    async fn write_l2_tables(&mut self, tables: &[u64]) -> Result<()> {
        for &off in tables {
            let Some(t) = self.l2.get(&off) else {
                continue;
            };
            if !t.dirty {
                continue;
            }
            let bytes = to_be_bytes(&t.data);
            self.file.debug_event(DebugEvent::L2Update);
            self.write_bytes(off, bytes).await?;
            if let Some(t) = self.l2.get_mut(&off) {
                t.dirty = false;
            }
        }
        Ok(())
    }

    /// The raw L2 entry of guest cluster `gc` (0 when no L2 table maps it).
    pub async fn l2_entry(&mut self, gc: u64) -> Result<u64> {
        let (i, j) = self.l2_index(gc);
        let Some(&l1e) = self.l1.get(i) else {
            return Ok(0);
        };
        let off = l1e & OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        Ok(self.load_l2(off).await?.data[j])
    }

    /// What guest cluster `gc` maps to.
    pub async fn mapping(&mut self, gc: u64) -> Result<Mapping> {
        let raw = self.l2_entry(gc).await?;
        self.decode(raw)
    }

    /// Decodes a raw L2 entry of this image.
    pub fn decode(&self, raw: u64) -> Result<Mapping> {
        Mapping::decode(raw, self.cluster_bits, self.file_len())
    }

    /// True when the L1 entry covering `gc` points to no table.
    pub fn l2_missing(&self, gc: u64) -> bool {
        let (i, _) = self.l2_index(gc);
        self.l1.get(i).is_none_or(|e| e & OFFSET_MASK == 0)
    }

    fn l2_index(&self, gc: u64) -> (usize, usize) {
        let n = self.l2_entries();
        ((gc / n) as usize, (gc % n) as usize)
    }

    /// Sets the L2 entry of `gc` in the cache (allocating or un-sharing its table first).
    /// Returns the table's offset.
    pub async fn set_l2_entry(&mut self, gc: u64, entry: u64) -> Result<u64> {
        let off = self.l2_for_write(gc).await?;
        let (_, j) = self.l2_index(gc);
        let epoch = self.rc_epoch;
        let t = self.load_l2(off).await?;
        t.data[j] = entry;
        t.dirty = true;
        t.epoch = t.epoch.max(epoch);
        Ok(off)
    }

    /// Makes sure `gc` has a writable L2 table before data clusters are allocated for it, as
    /// QEMU orders the two (so a new image's clusters sit where QEMU's would: the table, then
    /// the data). Returns how many clusters from `gc` on that table covers.
    pub async fn prepare_l2(&mut self, gc: u64) -> Result<u64> {
        self.l2_for_write(gc).await?;
        Ok(self.l2_entries() - gc % self.l2_entries())
    }

    /// Writes the given L2 tables now (refcounts first). Used before freeing clusters.
    pub async fn write_through_l2(&mut self, tables: &[u64]) -> Result<()> {
        self.write_back_l2(tables).await
    }

    /// The offset of a writable (refcount one) L2 table for `gc`, creating one if needed.
    async fn l2_for_write(&mut self, gc: u64) -> Result<u64> {
        let (i, _) = self.l2_index(gc);
        let l1e = *self.l1.get(i).ok_or_else(|| {
            BlockError::corrupt(format!("guest cluster {gc} is beyond the L1 table"))
        })?;
        let old = l1e & OFFSET_MASK;
        if old != 0 && l1e & COPIED != 0 {
            return Ok(old);
        }
        let content = if old == 0 {
            vec![0u64; self.l2_entries() as usize]
        } else {
            self.load_l2(old).await?.data.clone()
        };
        let new = self.alloc_clusters(1).await?;
        self.flush_refblocks().await?;
        // QEMU writes a new table at once, through its cache (whose write announces it).
        self.file.debug_event(DebugEvent::L2Update);
        self.write_bytes(new, to_be_bytes(&content)).await?;
        // The table and its refcount are durable before the L1 entry points to it.
        self.sync_refcounts().await?;
        self.make_room_l2().await?;
        self.l2.insert(new, Cached::clean(content, self.tick));
        self.l1[i] = new | COPIED;
        self.l1_dirty.insert(i);
        self.write_l1_entry(i).await?;
        if old != 0 {
            // The table was shared with a snapshot: the active L1 no longer uses it.
            self.sync_before_refcounts = true;
            self.update_refcount(old / self.cs, -1).await?;
        }
        Ok(new)
    }

    async fn write_l1_entry(&mut self, i: usize) -> Result<()> {
        let off = self.header.l1_table_offset + i as u64 * 8;
        self.file.debug_event(DebugEvent::L1Update);
        self.write_bytes(off, self.l1[i].to_be_bytes().to_vec())
            .await?;
        self.l1_dirty.remove(&i);
        Ok(())
    }

    // ---- refcounts -----------------------------------------------------------------------

    async fn load_rb(&mut self, off: u64) -> Result<&mut Cached<Vec<u8>>> {
        self.tick += 1;
        if !self.rb.contains_key(&off) {
            self.check_meta_offset(off, self.file_len())?;
            if self.rb.len() >= self.rb_capacity {
                self.flush_refblocks().await?;
                if let Some((&victim, _)) = self.rb.iter().min_by_key(|(_, b)| b.used) {
                    self.rb.remove(&victim);
                }
            }
            let raw = self.file.read(off, self.cs as usize).await?;
            self.rb.insert(off, Cached::clean(raw.to_vec(), 0));
        }
        touch(&mut self.rb, off, self.tick)
    }

    fn refblock_offset(&self, bi: u64) -> Option<u64> {
        self.rt
            .get(bi as usize)
            .map(|e| e & RT_OFFSET_MASK)
            .filter(|&o| o != 0)
    }

    /// Refcount of host cluster `cluster`.
    pub async fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let epb = self.rb_entries();
        let Some(off) = self.refblock_offset(cluster / epb) else {
            return Ok(0);
        };
        let order = self.header.refcount_order;
        let b = self.load_rb(off).await?;
        Ok(get_refcount(&b.data, (cluster % epb) as usize, order))
    }

    async fn store_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        let epb = self.rb_entries();
        let off = match self.refblock_offset(cluster / epb) {
            Some(off) => off,
            None if value == 0 => return Ok(()),
            None => self.create_refblock(cluster / epb).await?,
        };
        let order = self.header.refcount_order;
        let b = self.load_rb(off).await?;
        set_refcount(&mut b.data, (cluster % epb) as usize, order, value);
        b.dirty = true;
        self.rc_epoch += 1;
        if value > 0 {
            self.end_cluster = self.end_cluster.max(cluster + 1);
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of `cluster`.
    pub async fn update_refcount(&mut self, cluster: u64, delta: i64) -> Result<()> {
        let cur = self.refcount(cluster).await?;
        let new = i128::from(cur) + i128::from(delta);
        if new < 0 {
            return Err(BlockError::corrupt(format!(
                "refcount of cluster {cluster} would drop below zero"
            )));
        }
        if new as u128 > u128::from(self.max_refcount()) {
            return Err(BlockError::new(
                ErrorKind::NoSpace,
                format!(
                    "refcount of cluster {cluster} would overflow {} bits",
                    self.header.refcount_bits()
                ),
            ));
        }
        self.store_refcount(cluster, new as u64).await?;
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster);
            if self.compressed_cursor / self.cs == cluster {
                self.compressed_cursor = 0;
            }
        }
        Ok(())
    }

    /// Drops one reference to each host cluster of `[off, off+len)`.
    pub async fn free_range(&mut self, off: u64, len: u64) -> Result<()> {
        let (first, last) = (off / self.cs, (off + len.max(1) - 1) / self.cs);
        for c in first..=last {
            self.update_refcount(c, -1).await?;
        }
        Ok(())
    }

    /// Marks that an L2 entry dropping references was written: sync before refcounts.
    pub fn references_dropped(&mut self) {
        self.sync_before_refcounts = true;
    }

    /// Writes every dirty refcount block. Returns whether anything was written.
    async fn flush_refblocks(&mut self) -> Result<bool> {
        let dirty: Vec<u64> = self
            .rb
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&o, _)| o)
            .collect();
        let upto = self.rc_epoch;
        if dirty.is_empty() {
            self.written_epoch = upto;
            return Ok(false);
        }
        if self.sync_before_refcounts {
            self.file.flush().await?;
            self.sync_before_refcounts = false;
        }
        for off in dirty {
            let Some(b) = self.rb.get(&off) else {
                continue;
            };
            let data = b.data.clone();
            self.file.debug_event(DebugEvent::RefblockUpdatePart);
            self.write_bytes(off, data).await?;
            if let Some(b) = self.rb.get_mut(&off) {
                b.dirty = false;
            }
        }
        self.written_epoch = upto;
        Ok(true)
    }

    /// A refcount block for range `bi`, placed at the first cluster of the range it covers
    /// (free by definition: no block means every refcount in it is zero).
    async fn create_refblock(&mut self, bi: u64) -> Result<u64> {
        if bi as usize >= self.rt.len() {
            Box::pin(self.grow_refcount_table(bi)).await?;
            if let Some(off) = self.refblock_offset(bi) {
                return Ok(off);
            }
        }
        let off = bi * self.rb_entries() * self.cs;
        if off >= MAX_HOST_OFFSET {
            return Err(BlockError::new(
                ErrorKind::NoSpace,
                "image file would exceed 2^56 bytes",
            ));
        }
        self.check_range_unused(off, self.rb_entries() * self.cs)?;
        let mut data = vec![0u8; self.cs as usize];
        set_refcount(&mut data, 0, self.header.refcount_order, 1);
        self.write_bytes(off, data.clone()).await?;
        // The block is durable before the table entry that points to it.
        self.sync_refcounts().await?;
        self.rt[bi as usize] = off;
        let entry_off = self.header.refcount_table_offset + bi * 8;
        self.write_bytes(entry_off, off.to_be_bytes().to_vec())
            .await?;
        self.rb.insert(off, Cached::clean(data, self.tick));
        self.end_cluster = self.end_cluster.max(bi * self.rb_entries() + 1);
        Ok(off)
    }

    /// A range without a refcount block must hold none of the metadata we know of (header, L1
    /// table, refcount table). If it does, the refcount table is corrupt and writing a block
    /// there would destroy the image: refuse, as QEMU's overlap checks do.
    fn check_range_unused(&self, off: u64, len: u64) -> Result<()> {
        let cs = self.cs;
        let l1_len = (self.l1.len() as u64 * 8).div_ceil(cs).max(1) * cs;
        let rt_len = u64::from(self.header.refcount_table_clusters) * cs;
        let known = [
            ("the header", 0, cs),
            ("the L1 table", self.header.l1_table_offset, l1_len),
            (
                "the refcount table",
                self.header.refcount_table_offset,
                rt_len,
            ),
        ];
        for (what, start, n) in known {
            if start < off + len && off < start + n {
                return Err(BlockError::corrupt(format!(
                    "no refcount block covers {what} (refcount table entry {} is empty); \
                     repair the image with 'qemu-img check -r all'",
                    off / (self.rb_entries() * cs)
                )));
            }
        }
        Ok(())
    }

    /// Moves the refcount table to a bigger one that has an entry for block `min_bi`. The new
    /// table and the refcount blocks describing it go past everything allocated.
    async fn grow_refcount_table(&mut self, min_bi: u64) -> Result<()> {
        let (cs, epb) = (self.cs, self.rb_entries());
        let start = self.end_cluster;
        let (mut k, mut t) = (0u64, 0u64);
        let (first_bi, mut last_bi);
        loop {
            let meta_end = start + k + t;
            let fb = start / epb;
            last_bi = (meta_end.max(start + 1) - 1) / epb;
            let need_k = (fb..=last_bi)
                .filter(|&bi| self.refblock_offset(bi).is_none())
                .count() as u64;
            let entries = (min_bi + 1).max(last_bi + 1).max(self.rt.len() as u64);
            let need_t = (entries * 8).div_ceil(cs);
            if need_k == k && need_t == t {
                first_bi = fb;
                break;
            }
            (k, t) = (need_k, need_t);
        }
        if (start + k + t) * cs >= MAX_HOST_OFFSET {
            return Err(BlockError::new(
                ErrorKind::NoSpace,
                "image file would exceed 2^56 bytes",
            ));
        }
        let mut new_rt = self.rt.clone();
        new_rt.resize((t * cs / 8) as usize, 0);
        let order = self.header.refcount_order;
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for bi in first_bi..=last_bi {
            if self.refblock_offset(bi).is_none() {
                let off = (start + new_blocks.len() as u64) * cs;
                new_rt[bi as usize] = off;
                new_blocks.push((off, vec![0u8; cs as usize]));
            }
        }
        for c in start..start + k + t {
            let bi = c / epb;
            if let Some(b) = new_blocks
                .iter_mut()
                .find(|(off, _)| new_rt[bi as usize] == *off)
            {
                set_refcount(&mut b.1, (c % epb) as usize, order, 1);
            } else {
                self.store_refcount(c, 1).await?;
            }
        }
        for (off, data) in &new_blocks {
            self.write_bytes(*off, data.clone()).await?;
        }
        let table_off = (start + k) * cs;
        self.write_bytes(table_off, to_be_bytes(&new_rt)).await?;
        self.flush_refblocks().await?;
        self.sync_refcounts().await?;
        let mut hdr = Vec::with_capacity(12);
        hdr.extend_from_slice(&table_off.to_be_bytes());
        hdr.extend_from_slice(&(t as u32).to_be_bytes());
        self.write_bytes(48, hdr).await?;
        self.file.flush().await?;
        let (old_off, old_clusters) = (
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters),
        );
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = t as u32;
        self.rt = new_rt;
        for (off, data) in new_blocks {
            self.rb.insert(off, Cached::clean(data, self.tick));
        }
        self.end_cluster = self.end_cluster.max(start + k + t);
        self.free_range(old_off, old_clusters * cs).await
    }

    /// Host clusters from here on were never allocated since the image was opened and lie past
    /// the file's end at open: they read as zero until written.
    pub fn blank_from(&self) -> u64 {
        self.end_cluster * self.cs
    }

    /// Allocates `n` contiguous clusters with refcount one; returns the host offset.
    pub async fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        let (host, got) = self.alloc_run(n, true).await?;
        debug_assert_eq!(got, n);
        Ok(host)
    }

    /// Allocates between one and `n` contiguous clusters (the first free run, cut at `n`);
    /// returns the host offset and the count. Long runs are not always possible: refcount
    /// blocks sit at the start of the ranges they describe.
    pub async fn alloc_some_clusters(&mut self, n: u64) -> Result<(u64, u64)> {
        self.alloc_run(n, false).await
    }

    async fn alloc_run(&mut self, n: u64, exact: bool) -> Result<(u64, u64)> {
        let epb = self.rb_entries();
        loop {
            let (start, len, first_free) = self.find_free_run(n, exact).await?;
            let mut created = false;
            for bi in start / epb..=(start + len - 1) / epb {
                if self.refblock_offset(bi).is_none() {
                    self.create_refblock(bi).await?;
                    created = true;
                }
            }
            if created {
                continue;
            }
            for c in start..start + len {
                self.store_refcount(c, 1).await?;
            }
            // Everything the scan passed is in use, except a run too short for an exact
            // request: the next scan starts there, or after what was just taken.
            self.free_hint = if first_free < start {
                first_free
            } else {
                start + len
            };
            return Ok((start * self.cs, len));
        }
    }

    /// The first run of free clusters from the hint: exactly `n` long when `exact`, else as
    /// long as it goes up to `n`. Also returns the first free cluster the scan saw.
    async fn find_free_run(&mut self, n: u64, exact: bool) -> Result<(u64, u64, u64)> {
        let epb = self.rb_entries();
        let limit = MAX_HOST_OFFSET / self.cs;
        let (mut c, mut run_start, mut run) = (self.free_hint, self.free_hint, 0u64);
        let mut first_free = u64::MAX;
        while c < limit {
            let free_here = if self.refblock_offset(c / epb).is_none() {
                // A whole range without a block: all free.
                (c / epb + 1) * epb - c
            } else if self.refcount(c).await? == 0 {
                1
            } else {
                0
            };
            if free_here == 0 {
                if run > 0 && !exact {
                    return Ok((run_start, run, first_free));
                }
                run = 0;
                c += 1;
                continue;
            }
            if run == 0 {
                run_start = c;
                first_free = first_free.min(c);
            }
            run += free_here;
            if run >= n {
                return Ok((run_start, n, first_free));
            }
            c += free_here;
        }
        Err(BlockError::new(
            ErrorKind::NoSpace,
            "no free clusters below 2^56 bytes",
        ))
    }

    /// Allocates `size` bytes for compressed data, packing several into one host cluster.
    pub async fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        let cursor = self.compressed_cursor;
        if cursor != 0 {
            let c = cursor / self.cs;
            if cursor + size <= (c + 1) * self.cs && self.refcount(c).await? < self.max_refcount() {
                self.update_refcount(c, 1).await?;
                self.compressed_cursor = if (cursor + size) % self.cs == 0 {
                    0
                } else {
                    cursor + size
                };
                return Ok(cursor);
            }
        }
        let off = self.alloc_clusters(size.div_ceil(self.cs)).await?;
        self.compressed_cursor = if (off + size) % self.cs == 0 {
            0
        } else {
            off + size
        };
        Ok(off)
    }

    /// Writes back every dirty table (L1 entries, refcounts, sync, L2). The caller syncs the
    /// file after.
    pub async fn flush(&mut self) -> Result<()> {
        self.flush_refcounts().await?;
        let dirty = self.dirty_l2();
        self.write_back_l2(&dirty).await
    }

    /// The first half of a flush that does not hold the metadata lock across the sync: writes
    /// the pending L1 entries and every dirty refcount block, and returns the epoch to sync.
    pub async fn flush_refcounts(&mut self) -> Result<u64> {
        let pending: Vec<usize> = self.l1_dirty.iter().copied().collect();
        for i in pending {
            self.write_l1_entry(i).await?;
        }
        self.flush_refblocks().await?;
        Ok(self.written_epoch)
    }

    /// The second half: the file was synced after [`flush_refcounts`](Self::flush_refcounts)
    /// returned `epoch`; writes every dirty L2 table whose refcounts that sync made durable.
    /// Tables changed since may need later refcounts: they wait for the next flush (writes
    /// that completed before the flush began changed theirs before `epoch`).
    pub async fn flush_tables_synced(&mut self, epoch: u64) -> Result<()> {
        self.synced_epoch = self.synced_epoch.max(epoch);
        let synced = self.synced_epoch;
        let ready: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty && t.epoch <= synced)
            .map(|(&o, _)| o)
            .collect();
        self.write_l2_tables(&ready).await
    }

    fn dirty_l2(&self) -> Vec<u64> {
        self.l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&o, _)| o)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_packing_round_trips_every_order() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set_refcount(&mut block, i, order, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&block, i, order),
                    (i as u64 * 7 + 1) & max,
                    "order {order} i {i}"
                );
            }
        }
        // QEMU's layout: 1-bit refcounts, cluster 0 is the least significant bit of byte 0.
        let mut block = vec![0u8; 8];
        set_refcount(&mut block, 0, 0, 1);
        set_refcount(&mut block, 9, 0, 1);
        assert_eq!(block[0], 1);
        assert_eq!(block[1], 2);
    }
}
