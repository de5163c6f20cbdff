//! The qcow2 data path: reads, writes with copy-on-write, zeroes, discard, block status.
//!
//! Every operation takes a range lock on the guest clusters it touches: shared for reads and
//! in-place writes, exclusive while a cluster's mapping changes (allocation, zeroing, discard,
//! compressed write). A cluster's host location therefore cannot be freed or moved while data
//! is in flight to or from it. The metadata mutex is held only to look up and update tables.

use block::range_lock::LockMode;
use block::{BlockError, BlockStatus, DebugEvent, IoVec, Result, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};

use super::compress;
use super::entry::{compressed_entry, Mapping, COPIED, ZERO};
use super::meta::Meta;
use super::Qcow2Driver;

/// Where the bytes of a read segment come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Host(u64),
    Zero,
    Backing,
    Compressed {
        host: u64,
        size: u64,
        cluster_start: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    guest: u64,
    len: u64,
    src: Source,
}

/// How a cluster of a write is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    host: u64,
    /// The cluster gets a new mapping: write it whole (copy-on-write pads), then update L2.
    fresh: bool,
    /// The host cluster is known to read as zero (newly taken from past the file's end), so a
    /// pad that would be zero need not be written.
    blank: bool,
}

impl Qcow2Driver {
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.cs();
        (offset / cs, (offset + len).div_ceil(cs))
    }

    async fn lock_clusters(
        &self,
        c0: u64,
        c1: u64,
        mode: LockMode,
    ) -> block::range_lock::RangeGuard {
        self.locks
            .lock(c0 * self.cs(), (c1 - c0) * self.cs(), mode)
            .await
    }

    // ---- reads ---------------------------------------------------------------------------

    pub(super) async fn read_range(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(buf);
        }
        let (c0, c1) = self.span(offset, len);
        let _shared = self.lock_clusters(c0, c1, LockMode::Shared).await;
        let segments = {
            let mut meta = self.meta.lock().await;
            self.plan_read(&mut meta, offset, len).await?
        };
        let mut rest = buf;
        let mut out = BytesMut::new();
        for seg in segments {
            let tail = rest.split_off(seg.len as usize);
            out.unsplit(self.fill(seg, rest).await?);
            rest = tail;
        }
        Ok(out)
    }

    async fn plan_read(&self, meta: &mut Meta, offset: u64, len: u64) -> Result<Vec<Segment>> {
        let cs = self.cs();
        let end = offset + len;
        let mut out: Vec<Segment> = Vec::new();
        let mut at = offset;
        while at < end {
            let gc = at / cs;
            let n = ((gc + 1) * cs).min(end) - at;
            let in_cluster = at - gc * cs;
            let src = match meta.mapping(gc).await? {
                Mapping::Normal { host, .. } => Source::Host(host + in_cluster),
                Mapping::Zero { .. } => Source::Zero,
                Mapping::Unallocated if self.backing.is_some() => Source::Backing,
                Mapping::Unallocated => Source::Zero,
                Mapping::Compressed { host, size } => Source::Compressed {
                    host,
                    size,
                    cluster_start: gc * cs,
                },
            };
            let merged = match (out.last_mut(), src) {
                (Some(last), Source::Host(h)) => match last.src {
                    Source::Host(lh) if lh + last.len == h => Some(last),
                    _ => None,
                },
                (Some(last), Source::Zero) if last.src == Source::Zero => Some(last),
                (Some(last), Source::Backing) if last.src == Source::Backing => Some(last),
                _ => None,
            };
            match merged {
                Some(last) => last.len += n,
                None => out.push(Segment {
                    guest: at,
                    len: n,
                    src,
                }),
            }
            at += n;
        }
        Ok(out)
    }

    async fn fill(&self, seg: Segment, mut piece: BytesMut) -> Result<BytesMut> {
        match seg.src {
            Source::Host(h) => {
                self.file.debug_event(DebugEvent::ReadAio);
                self.file.read_into(h, piece).await
            }
            Source::Zero => {
                piece.fill(0);
                Ok(piece)
            }
            Source::Backing => self.read_backing(seg.guest, piece).await,
            Source::Compressed {
                host,
                size,
                cluster_start,
            } => {
                let cluster = self.decompress_cluster(host, size).await?;
                let skip = (seg.guest - cluster_start) as usize;
                let n = piece.len();
                piece.copy_from_slice(&cluster[skip..skip + n]);
                Ok(piece)
            }
        }
    }

    /// Reads the backing file at guest offset `guest`; past its end (or without one) zeroes.
    async fn read_backing(&self, guest: u64, mut piece: BytesMut) -> Result<BytesMut> {
        let Some(backing) = &self.backing else {
            piece.fill(0);
            return Ok(piece);
        };
        let blen = backing.node().len();
        if guest >= blen {
            piece.fill(0);
            return Ok(piece);
        }
        let n = (blen - guest).min(piece.len() as u64) as usize;
        let mut tail = piece.split_off(n);
        let mut head = backing.read_into(guest, piece).await?;
        tail.fill(0);
        head.unsplit(tail);
        Ok(head)
    }

    async fn decompress_cluster(&self, host: u64, size: u64) -> Result<Vec<u8>> {
        let raw = self.file.read(host, size as usize).await?;
        let mut out = vec![0u8; self.cs() as usize];
        compress::decompress(self.compression, &raw, &mut out)?;
        Ok(out)
    }

    /// The current content of `[from, to)` inside guest cluster `gc` mapped by `old`.
    /// Whether a cluster mapped as `old` reads as zero without looking at data.
    fn reads_zero(&self, old: Mapping) -> bool {
        match old {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing.is_none(),
            Mapping::Normal { .. } | Mapping::Compressed { .. } => false,
        }
    }

    async fn old_content(&self, gc: u64, old: Mapping, from: u64, to: u64) -> Result<Bytes> {
        let n = (to - from) as usize;
        let in_cluster = from - gc * self.cs();
        match old {
            Mapping::Zero { .. } => Ok(self.zero_cluster.slice(..n)),
            Mapping::Unallocated => {
                Ok(self.read_backing(from, BytesMut::zeroed(n)).await?.freeze())
            }
            Mapping::Normal { host, .. } => self.file.read(host + in_cluster, n).await,
            Mapping::Compressed { host, size } => {
                let c = self.decompress_cluster(host, size).await?;
                Ok(Bytes::copy_from_slice(
                    &c[in_cluster as usize..in_cluster as usize + n],
                ))
            }
        }
    }

    // ---- writes --------------------------------------------------------------------------

    pub(super) async fn write_range(&self, offset: u64, data: IoVec) -> Result<()> {
        let len = data.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let (c0, c1) = self.span(offset, len);
        {
            let _shared = self.lock_clusters(c0, c1, LockMode::Shared).await;
            let in_place = {
                let mut meta = self.meta.lock().await;
                self.in_place_hosts(&mut meta, c0, c1).await?
            };
            if let Some(hosts) = in_place {
                let targets: Vec<Target> = hosts
                    .into_iter()
                    .map(|host| Target {
                        host,
                        fresh: false,
                        blank: false,
                    })
                    .collect();
                return self.write_targets(offset, &data, c0, &targets, &[]).await;
            }
        }
        let _excl = self.lock_clusters(c0, c1, LockMode::Exclusive).await;
        let (old, targets) = {
            let mut meta = self.meta.lock().await;
            self.allocate_targets(&mut meta, c0, c1).await?
        };
        self.write_targets(offset, &data, c0, &targets, &old)
            .await?;
        let mut meta = self.meta.lock().await;
        self.link_fresh(&mut meta, c0, &targets, &old).await
    }

    /// Host offsets of clusters `[c0, c1)` when all of them can be written in place.
    async fn in_place_hosts(&self, meta: &mut Meta, c0: u64, c1: u64) -> Result<Option<Vec<u64>>> {
        let mut hosts = Vec::with_capacity((c1 - c0) as usize);
        for gc in c0..c1 {
            match meta.mapping(gc).await? {
                Mapping::Normal { host, copied: true } => hosts.push(host),
                _ => return Ok(None),
            }
        }
        Ok(Some(hosts))
    }

    /// Decides where each cluster goes, allocating runs of new clusters contiguously.
    async fn allocate_targets(
        &self,
        meta: &mut Meta,
        c0: u64,
        c1: u64,
    ) -> Result<(Vec<Mapping>, Vec<Target>)> {
        let cs = self.cs();
        let mut old = Vec::with_capacity((c1 - c0) as usize);
        let mut targets: Vec<Option<Target>> = Vec::with_capacity(old.capacity());
        for gc in c0..c1 {
            let m = meta.mapping(gc).await?;
            old.push(m);
            targets.push(match m {
                Mapping::Normal { host, copied: true } => Some(Target {
                    host,
                    fresh: false,
                    blank: false,
                }),
                Mapping::Zero {
                    host: Some(host),
                    copied: true,
                } => Some(Target {
                    host,
                    fresh: true,
                    blank: false,
                }),
                _ => None,
            });
        }
        let mut i = 0;
        while i < targets.len() {
            if targets[i].is_some() {
                i += 1;
                continue;
            }
            let run = targets[i..].iter().take_while(|t| t.is_none()).count();
            // The table first, then the data, as QEMU allocates them.
            let covered = meta.prepare_l2(c0 + i as u64).await?;
            let run = run.min(usize::try_from(covered).unwrap_or(usize::MAX));
            let blank_from = meta.blank_from();
            self.file.debug_event(DebugEvent::ClusterAlloc);
            let (host, got) = meta.alloc_some_clusters(run as u64).await?;
            for k in 0..got as usize {
                targets[i + k] = Some(Target {
                    host: host + k as u64 * cs,
                    fresh: true,
                    blank: host >= blank_from,
                });
            }
            i += got as usize;
        }
        let targets = targets
            .into_iter()
            .map(|t| t.ok_or_else(|| BlockError::corrupt("unplanned cluster")))
            .collect::<Result<_>>()?;
        Ok((old, targets))
    }

    /// Writes the data (and copy-on-write pads of fresh edge clusters) to the targets.
    async fn write_targets(
        &self,
        offset: u64,
        data: &IoVec,
        c0: u64,
        targets: &[Target],
        old: &[Mapping],
    ) -> Result<()> {
        let cs = self.cs();
        let end = offset + data.len() as u64;
        let last = c0 + targets.len() as u64 - 1;
        let mut i = 0;
        while i < targets.len() {
            // A run: consecutive clusters, contiguous on the host, all fresh or all in place.
            let mut j = i + 1;
            while j < targets.len()
                && targets[j].fresh == targets[i].fresh
                && targets[j].blank == targets[i].blank
                && targets[j].host == targets[j - 1].host + cs
            {
                j += 1;
            }
            let (g0, g1) = (c0 + i as u64, c0 + j as u64);
            let from = offset.max(g0 * cs);
            let to = end.min(g1 * cs);
            let mut vec = IoVec::new();
            let mut host = targets[i].host + (from - g0 * cs);
            let skip_pad = |t: &Target, m: Mapping| t.blank && self.reads_zero(m);
            let head_pad = g0 == c0 && offset > g0 * cs;
            let tail_pad = g1 - 1 == last && end < g1 * cs;
            if targets[i].fresh
                && (head_pad || tail_pad)
                && skip_pad(&targets[i], old[i])
                && skip_pad(&targets[j - 1], old[j - 1])
            {
                // The pads read as zero already; like QEMU, zero the new clusters on the host
                // first (allocated, not written) so the image's size and allocation are its.
                let fast = ZeroFlags {
                    no_fallback: true,
                    ..ZeroFlags::default()
                };
                let span = (g1 - g0) * cs;
                match self.file.write_zeroes(targets[i].host, span, fast).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == block::ErrorKind::Unsupported => {}
                    Err(e) => return Err(e),
                }
            }
            if targets[i].fresh && !skip_pad(&targets[i], old[i]) {
                host = targets[i].host;
                if g0 == c0 && offset > g0 * cs {
                    vec.push(self.old_content(g0, old[i], g0 * cs, offset).await?);
                }
            }
            for part in data
                .slice((from - offset) as usize, (to - from) as usize)
                .parts()
            {
                vec.push(part.clone());
            }
            if targets[j - 1].fresh
                && !skip_pad(&targets[j - 1], old[j - 1])
                && g1 - 1 == last
                && end < g1 * cs
            {
                vec.push(self.old_content(last, old[j - 1], end, g1 * cs).await?);
            }
            self.file.debug_event(DebugEvent::WriteAio);
            self.file.write(host, vec, WriteFlags::default()).await?;
            i = j;
        }
        Ok(())
    }

    /// Points the L2 entries of fresh clusters at their new hosts and frees what they replaced.
    async fn link_fresh(
        &self,
        meta: &mut Meta,
        c0: u64,
        targets: &[Target],
        old: &[Mapping],
    ) -> Result<()> {
        let cs = self.cs();
        let mut tables = Vec::new();
        let mut to_free = Vec::new();
        for (k, t) in targets.iter().enumerate() {
            if !t.fresh {
                continue;
            }
            let table = meta.set_l2_entry(c0 + k as u64, t.host | COPIED).await?;
            if !tables.contains(&table) {
                tables.push(table);
            }
            if let Some((h, n)) = old[k].host_range(cs) {
                if h != t.host {
                    to_free.push((h, n));
                }
            }
        }
        self.release(meta, &tables, to_free).await
    }

    /// Writes `tables` through, then drops the references in `to_free` (ordering rule).
    async fn release(
        &self,
        meta: &mut Meta,
        tables: &[u64],
        to_free: Vec<(u64, u64)>,
    ) -> Result<()> {
        if to_free.is_empty() {
            return Ok(());
        }
        meta.write_through_l2(tables).await?;
        meta.references_dropped();
        for (h, n) in to_free {
            meta.free_range(h, n).await?;
        }
        Ok(())
    }

    pub(super) async fn write_compressed_cluster(&self, offset: u64, data: Bytes) -> Result<()> {
        let cs = self.cs();
        let whole = data.len() as u64 == cs || offset + data.len() as u64 == self.size;
        if offset % cs != 0 || !whole || data.len() as u64 > cs {
            return Err(BlockError::invalid(format!(
                "compressed writes must cover one whole cluster ({cs} bytes at a multiple of it)"
            )));
        }
        let mut cluster = vec![0u8; cs as usize];
        cluster[..data.len()].copy_from_slice(&data);
        let Some(packed) = compress::compress(self.compression, &cluster)? else {
            return self.write_range(offset, IoVec::from(data)).await;
        };
        let gc = offset / cs;
        let _excl = self.lock_clusters(gc, gc + 1, LockMode::Exclusive).await;
        let (old, host) = {
            let mut meta = self.meta.lock().await;
            let old = meta.mapping(gc).await?;
            if old.host_range(cs).is_some() {
                // As in QEMU: compressed data only goes to clusters that hold nothing yet
                // (a backup with compress=true into a used image fails here).
                return Err(BlockError::io(
                    format!("compressed write to allocated cluster at offset {offset}"),
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            self.file.debug_event(DebugEvent::ClusterAllocBytes);
            (old, meta.alloc_bytes(packed.len() as u64).await?)
        };
        let size = packed.len() as u64;
        self.file
            .write(host, IoVec::from(packed), WriteFlags::default())
            .await?;
        let mut meta = self.meta.lock().await;
        let table = meta
            .set_l2_entry(gc, compressed_entry(host, size, self.cluster_bits))
            .await?;
        let to_free = old.host_range(cs).into_iter().collect();
        self.release(&mut meta, &[table], to_free).await
    }

    // ---- zeroes and discard --------------------------------------------------------------

    pub(super) async fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let cs = self.cs();
        let end = offset + len;
        let a = offset.div_ceil(cs) * cs;
        let b = (end / cs * cs).max(a);
        let full_end = if end == self.size {
            end.div_ceil(cs) * cs
        } else {
            b
        };
        if a >= full_end {
            return self.zero_part(offset, len, flags).await;
        }
        if offset < a {
            self.zero_part(offset, a - offset, flags).await?;
        }
        if self.version < 3 && !(self.backing.is_none() && flags.may_unmap) {
            if flags.no_fallback {
                return Err(BlockError::unsupported(
                    "qcow2 v2 images have no zero clusters",
                ));
            }
            self.write_explicit_zeroes(a, full_end.min(end) - a).await?;
        } else {
            self.zero_clusters(a / cs, full_end / cs, flags.may_unmap, false)
                .await?;
        }
        if full_end < end {
            self.zero_part(full_end, end - full_end, flags).await?;
        }
        Ok(())
    }

    /// Zeroes that cover clusters only in part: each such cluster becomes a zero cluster if
    /// it reads as zero already (v3), else its zeroes are written.
    async fn zero_part(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let cs = self.cs();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let c = at / cs;
            let piece_end = ((c + 1) * cs).min(end);
            let widened =
                self.version >= 3 && self.zero_cluster_if_zero(c, flags.may_unmap).await?;
            if !widened {
                self.write_explicit_zeroes(at, piece_end - at).await?;
            }
            at = piece_end;
        }
        Ok(())
    }

    async fn write_explicit_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 4 << 20;
        let zeroes = Bytes::from(vec![0u8; CHUNK.min(len) as usize]);
        let mut at = offset;
        while at < offset + len {
            let n = CHUNK.min(offset + len - at);
            self.write_range(at, IoVec::from(zeroes.slice(..n as usize)))
                .await?;
            at += n;
        }
        Ok(())
    }

    pub(super) async fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        let cs = self.cs();
        let end = offset + len;
        let a = offset.div_ceil(cs);
        let b = if end == self.size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if a >= b {
            return Ok(());
        }
        self.zero_clusters(a, b, true, true).await
    }

    /// Makes clusters `[c0, c1)` read as zero, as QEMU does, keeping the allocation when
    /// `may_unmap` is false (v2 can only deallocate). Write-zeroes (`discard` false) marks
    /// every cluster a zero cluster on v3, unallocated ones too, so they show as present, as
    /// QEMU's do (`qemu-img map`); a discard leaves clusters nothing would show through
    /// unallocated (no backing file), and marks the rest zero.
    async fn zero_clusters(&self, c0: u64, c1: u64, may_unmap: bool, discard: bool) -> Result<()> {
        let _excl = self.lock_clusters(c0, c1, LockMode::Exclusive).await;
        let mut meta = self.meta.lock().await;
        self.zero_clusters_locked(&mut meta, c0, c1, may_unmap, discard)
            .await
    }

    /// A write-zeroes of part of cluster `c`: when the whole cluster already reads as zero
    /// (unallocated without a backing file, or a zero cluster), it becomes a zero cluster, as
    /// QEMU widens such a request; otherwise `false` and the caller writes the zeroes.
    async fn zero_cluster_if_zero(&self, c: u64, may_unmap: bool) -> Result<bool> {
        let _excl = self.lock_clusters(c, c + 1, LockMode::Exclusive).await;
        let mut meta = self.meta.lock().await;
        let no_backing = self.backing.is_none();
        let reads_zero = if meta.l2_missing(c) {
            no_backing
        } else {
            let raw = meta.l2_entry(c).await?;
            match meta.decode(raw)? {
                Mapping::Unallocated => no_backing,
                Mapping::Zero { .. } => true,
                _ => false,
            }
        };
        if reads_zero {
            self.zero_clusters_locked(&mut meta, c, c + 1, may_unmap, false)
                .await?;
        }
        Ok(reads_zero)
    }

    async fn zero_clusters_locked(
        &self,
        meta: &mut Meta,
        c0: u64,
        c1: u64,
        may_unmap: bool,
        discard: bool,
    ) -> Result<()> {
        let cs = self.cs();
        let l2_span = cs / 8;
        let has_backing = self.backing.is_some();
        let zero_flag = if self.version >= 3 { ZERO } else { 0 };
        let (mut tables, mut to_free) = (Vec::new(), Vec::new());
        let mut gc = c0;
        while gc < c1 {
            if discard && !has_backing && meta.l2_missing(gc) {
                gc = (gc / l2_span + 1) * l2_span;
                continue;
            }
            let raw = meta.l2_entry(gc).await?;
            let old = meta.decode(raw)?;
            let new = match old {
                Mapping::Normal { host, copied: true } if !may_unmap => host | COPIED | ZERO,
                Mapping::Zero {
                    host: Some(h),
                    copied: true,
                } if !may_unmap => h | COPIED | ZERO,
                Mapping::Unallocated | Mapping::Zero { host: None, .. }
                    if discard && !has_backing =>
                {
                    raw
                }
                _ => zero_flag,
            };
            if new != raw {
                let t = meta.set_l2_entry(gc, new).await?;
                if !tables.contains(&t) {
                    tables.push(t);
                }
                if new & super::entry::OFFSET_MASK == 0 {
                    to_free.extend(old.host_range(cs));
                }
            }
            gc += 1;
        }
        self.release(meta, &tables, to_free).await
    }

    // ---- block status --------------------------------------------------------------------

    pub(super) async fn status_at(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let prealloc = *self
            .metadata_prealloc
            .get_or_try_init(|| self.detect_metadata_prealloc())
            .await?;
        let mut st = self.status_of_layer(offset, len).await?;
        st.recurse = prealloc && st.data && st.host_offset.is_some();
        Ok(st)
    }

    /// QEMU's guess that an image has preallocated metadata: clearly more clusters are in use
    /// (refcount > 0) than the file has allocated on the host — at least a ninth more, and two.
    async fn detect_metadata_prealloc(&self) -> Result<bool> {
        let file = self.file.node();
        let Some(allocated) = file.allocated_bytes() else {
            return Ok(false);
        };
        let cs = self.cs();
        let real = allocated / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let end = file.len().div_ceil(cs);
        let mut meta = self.meta.lock().await;
        let mut used = 0;
        let mut c = 0;
        while c < end && used < threshold {
            if meta.refcount(c).await? > 0 {
                used += 1;
            }
            c += 1;
        }
        Ok(used >= threshold)
    }

    async fn status_of_layer(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let cs = self.cs();
        let l2_span = cs / 8;
        let gc = offset / cs;
        let table_end = ((gc / l2_span + 1) * l2_span * cs).min(offset + len);
        let mut meta = self.meta.lock().await;
        if meta.l2_missing(gc) {
            return Ok(BlockStatus::unallocated(table_end - offset));
        }
        let first = meta.mapping(gc).await?;
        let in_cluster = offset - gc * cs;
        let mut end = ((gc + 1) * cs).min(table_end);
        while end < table_end {
            let next = meta.mapping(end / cs).await?;
            let same = match (first, next) {
                (Mapping::Normal { host: a, .. }, Mapping::Normal { host: b, .. }) => {
                    b == a + (end - gc * cs)
                }
                (Mapping::Zero { host: None, .. }, Mapping::Zero { host: None, .. }) => true,
                (Mapping::Zero { host: Some(a), .. }, Mapping::Zero { host: Some(b), .. }) => {
                    b == a + (end - gc * cs)
                }
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            end = ((end / cs + 1) * cs).min(table_end);
        }
        let n = end - offset;
        Ok(match first {
            Mapping::Normal { host, .. } => BlockStatus::data(n, Some(host + in_cluster)),
            Mapping::Zero { host, .. } => BlockStatus::zero(n, host.map(|h| h + in_cluster)),
            Mapping::Unallocated => BlockStatus::unallocated(n),
            Mapping::Compressed { .. } => BlockStatus {
                compressed: true,
                ..BlockStatus::data(n, None)
            },
        })
    }
}
