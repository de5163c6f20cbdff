//! Persistent dirty bitmaps: qcow2's bitmaps extension (docs/interop/qcow2.txt).
//!
//! ```text
//!  header extension 0x23852875 ─▶ bitmap directory: one entry per bitmap
//!     (nb, directory size/offset)       table offset/size, flags (in-use, auto), granularity,
//!                                       name ─▶ bitmap table: one u64 per data cluster
//!                                                 0: all zero │ 1: all ones │ offset of the
//!                                                 cluster holding cluster_size * 8 bits
//! ```
//!
//! Opening read-write marks every stored bitmap in use (a crash leaves them so, and they load
//! as inconsistent next time). Closing writes each persistent bitmap anew (tables and data in
//! new clusters), then the directory, then switches the header to it, and only then frees the
//! old clusters: a crash at any point leaves either the old directory or the new one.

use std::collections::HashSet;

use bitmap::{DirtyBitmap, HBitmap};
use block::{BlockError, InfoValue, IoVec, Result, WriteFlags};

use super::header::{autoclear, be32, be64, RawExtension, EXT_BITMAPS};
use super::Qcow2Driver;

const IN_USE: u32 = 1 << 0;
const AUTO: u32 = 1 << 1;
const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = IN_USE | AUTO | EXTRA_DATA_COMPATIBLE;
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const ENTRY_ALL_ONES: u64 = 1;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// QEMU's limits.
const MAX_BITMAPS: usize = 65535;
const MAX_NAME: usize = 1023;
const MAX_DIRECTORY: u64 = 64 << 20;

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirEntry {
    table_offset: u64,
    table_size: u32,
    flags: u32,
    granularity_bits: u8,
    name: String,
    extra: Vec<u8>,
}

impl DirEntry {
    /// The entry as `format-specific` info shows it: flags, name, granularity. `open_rw`: the
    /// image is open for writing, so the copy on disk is marked in use.
    pub(crate) fn info(&self, open_rw: bool) -> InfoValue {
        let mut flags = Vec::new();
        if open_rw || self.flags & IN_USE != 0 {
            flags.push(InfoValue::Str("in-use".into()));
        }
        if self.flags & AUTO != 0 {
            flags.push(InfoValue::Str("auto".into()));
        }
        InfoValue::Object(vec![
            ("flags", InfoValue::List(flags)),
            ("name", InfoValue::Str(self.name.clone())),
            (
                "granularity",
                InfoValue::Int(1i64 << self.granularity_bits.min(62)),
            ),
        ])
    }
}

fn corrupt(msg: impl Into<String>) -> BlockError {
    BlockError::corrupt(msg)
}

/// The extension's payload: (count, directory size, directory offset).
fn parse_ext(data: &[u8]) -> Result<(u32, u64, u64)> {
    if data.len() < 24 {
        return Err(corrupt("qcow2 bitmaps extension is too short"));
    }
    Ok((be32(data, 0), be64(data, 8), be64(data, 16)))
}

fn ext_payload(nb: usize, size: u64, offset: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&(nb as u32).to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v
}

fn parse_directory(buf: &[u8], nb: u32) -> Result<Vec<DirEntry>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..nb {
        if at + 24 > buf.len() {
            return Err(corrupt("qcow2 bitmap directory is truncated"));
        }
        let name_size = u16::from_be_bytes([buf[at + 18], buf[at + 19]]) as usize;
        let extra_size = be32(buf, at + 20) as usize;
        let entry_len = (24 + extra_size + name_size).div_ceil(8) * 8;
        if at + 24 + extra_size + name_size > buf.len() {
            return Err(corrupt(
                "qcow2 bitmap directory entry overruns the directory",
            ));
        }
        let e = DirEntry {
            table_offset: be64(buf, at),
            table_size: be32(buf, at + 8),
            flags: be32(buf, at + 12),
            granularity_bits: buf[at + 17],
            extra: buf[at + 24..at + 24 + extra_size].to_vec(),
            name: String::from_utf8_lossy(
                &buf[at + 24 + extra_size..at + 24 + extra_size + name_size],
            )
            .into_owned(),
        };
        if buf[at + 16] != TYPE_DIRTY_TRACKING {
            return Err(corrupt(format!("bitmap '{}' has an unknown type", e.name)));
        }
        if !(9..=31).contains(&e.granularity_bits) {
            return Err(corrupt(format!(
                "bitmap '{}' has an invalid granularity",
                e.name
            )));
        }
        if e.flags & !KNOWN_FLAGS != 0 {
            return Err(BlockError::unsupported(format!(
                "bitmap '{}' has unknown flags",
                e.name
            )));
        }
        if extra_size > 0 && e.flags & EXTRA_DATA_COMPATIBLE == 0 {
            return Err(BlockError::unsupported(format!(
                "bitmap '{}' has extra data that is not understood",
                e.name
            )));
        }
        if name_size == 0 || name_size > MAX_NAME {
            return Err(corrupt("qcow2 bitmap name is empty or too long"));
        }
        out.push(e);
        at += entry_len;
    }
    Ok(out)
}

fn serialize_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in entries {
        let start = v.len();
        v.extend_from_slice(&e.table_offset.to_be_bytes());
        v.extend_from_slice(&e.table_size.to_be_bytes());
        v.extend_from_slice(&e.flags.to_be_bytes());
        v.push(TYPE_DIRTY_TRACKING);
        v.push(e.granularity_bits);
        v.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        v.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        v.extend_from_slice(&e.extra);
        v.extend_from_slice(e.name.as_bytes());
        let len = v.len() - start;
        v.resize(start + len.div_ceil(8) * 8, 0);
    }
    v
}

impl Qcow2Driver {
    /// Reads the bitmap directory when the header has a valid bitmaps extension.
    pub(crate) async fn read_bitmap_directory(&self) -> Result<Vec<DirEntry>> {
        let header = self.meta.lock().await.header.clone();
        let Some(ext) = header
            .other_extensions
            .iter()
            .find(|e| e.kind == EXT_BITMAPS)
        else {
            return Ok(Vec::new());
        };
        if header.autoclear & autoclear::BITMAPS == 0 {
            // Written by a program that did not keep the bitmaps up to date: not valid.
            return Ok(Vec::new());
        }
        let (nb, size, offset) = parse_ext(&ext.data)?;
        if nb as usize > MAX_BITMAPS || size > MAX_DIRECTORY || offset % self.cs() != 0 {
            return Err(corrupt("qcow2 bitmaps extension is invalid"));
        }
        if nb == 0 {
            return Ok(Vec::new());
        }
        if offset.saturating_add(size) > self.file.node().len() {
            return Err(corrupt(
                "qcow2 bitmap directory lies past the end of the file",
            ));
        }
        let buf = self.file.read(offset, size as usize).await?;
        parse_directory(&buf, nb)
    }

    /// At a writable open: reads the directory and marks every stored bitmap in use on disk
    /// (keeping the flags it had in memory), so that nothing written from now on can leave a
    /// bitmap that claims to be up to date when it is not, whether or not anyone loads them.
    pub(crate) async fn mark_bitmaps_in_use(&self) -> Result<()> {
        let dir = self.read_bitmap_directory().await?;
        if dir.is_empty() {
            return Ok(());
        }
        let mut in_use = dir.clone();
        for e in &mut in_use {
            e.flags |= IN_USE;
        }
        let (_, _, offset) = {
            let header = self.meta.lock().await.header.clone();
            let ext = header
                .other_extensions
                .iter()
                .find(|e| e.kind == EXT_BITMAPS)
                .map(|e| e.data.clone())
                .unwrap_or_default();
            parse_ext(&ext)?
        };
        self.file
            .write(
                offset,
                IoVec::from(serialize_directory(&in_use)),
                WriteFlags::default(),
            )
            .await?;
        self.file.flush().await?;
        *self.stored_bitmaps.lock().await = dir;
        Ok(())
    }

    /// Loads the stored bitmaps, as they were when the image was opened. In-use ones come
    /// back inconsistent, without their bits.
    pub(crate) async fn load_stored_bitmaps(&self) -> Result<Vec<DirtyBitmap>> {
        let dir = if self.writable {
            self.stored_bitmaps.lock().await.clone()
        } else {
            self.read_bitmap_directory().await?
        };
        let mut out = Vec::new();
        let bits_per_cluster = self.cs() * 8;
        for e in &dir {
            let granularity = 1u64 << e.granularity_bits;
            let mut b = DirtyBitmap::new(Some(e.name.clone()), self.size, granularity)
                .map_err(|err| corrupt(format!("bitmap '{}': {err}", e.name)))?;
            b.set_persistent(true);
            b.set_readonly(!self.writable);
            b.set_recording(e.flags & AUTO != 0);
            if e.flags & IN_USE != 0 {
                b.set_inconsistent(true);
                b.set_recording(false);
                out.push(b);
                continue;
            }
            let nbits = b.bits().len();
            if u64::from(e.table_size) != nbits.div_ceil(bits_per_cluster) {
                return Err(corrupt(format!(
                    "bitmap '{}' has a table of the wrong size",
                    e.name
                )));
            }
            let table = self
                .file
                .read(e.table_offset, e.table_size as usize * 8)
                .await?;
            let mut bits = HBitmap::new(nbits);
            for (i, raw) in table.chunks_exact(8).enumerate() {
                let entry = be64(raw, 0);
                let first = i as u64 * bits_per_cluster;
                let off = entry & ENTRY_OFFSET_MASK;
                if off == 0 {
                    if entry & ENTRY_ALL_ONES != 0 {
                        bits.set_range(first, first + bits_per_cluster);
                    }
                    continue;
                }
                let data = self.file.read(off, self.cs() as usize).await?;
                bits.deserialize(first, &data);
            }
            b.restore(bits);
            out.push(b);
        }
        Ok(out)
    }

    /// Stores `bitmaps` (the node's persistent ones) as the image's bitmaps, replacing what
    /// was stored. Inconsistent bitmaps keep their stored entry (still in use).
    pub(crate) async fn store_bitmaps(&self, bitmaps: &[DirtyBitmap]) -> Result<()> {
        let cs = self.cs();
        let bits_per_cluster = cs * 8;
        let old = std::mem::take(&mut *self.stored_bitmaps.lock().await);
        if old.is_empty() && bitmaps.is_empty() {
            return Ok(());
        }
        let mut meta = self.meta.lock().await;
        let mut new_dir = Vec::new();
        let mut kept = HashSet::new();
        // Bitmaps already stored keep their place; new ones follow, newest first (QEMU's order).
        let stored_first = old
            .iter()
            .filter_map(|e| bitmaps.iter().find(|b| b.name() == Some(e.name.as_str())));
        let new_ones = bitmaps
            .iter()
            .rev()
            .filter(|b| !old.iter().any(|e| Some(e.name.as_str()) == b.name()));
        for b in stored_first.chain(new_ones) {
            let name = b.name().unwrap_or_default().to_owned();
            if b.inconsistent() {
                if let Some(e) = old.iter().find(|e| e.name == name) {
                    new_dir.push(e.clone());
                    kept.insert(name);
                }
                continue;
            }
            let bits = b.bits();
            let n = bits.len().div_ceil(bits_per_cluster);
            let mut table = Vec::with_capacity(n as usize * 8);
            for i in 0..n {
                let first = i * bits_per_cluster;
                let set = bits.count_range(first, first + bits_per_cluster);
                let span = bits_per_cluster.min(bits.len() - first);
                let entry = if set == 0 {
                    0
                } else if set == span && span == bits_per_cluster {
                    ENTRY_ALL_ONES
                } else {
                    let mut data = vec![0u8; cs as usize];
                    bits.serialize(first, &mut data);
                    let off = meta.alloc_clusters(1).await?;
                    self.file
                        .write(off, IoVec::from(data), WriteFlags::default())
                        .await?;
                    off
                };
                table.extend_from_slice(&entry.to_be_bytes());
            }
            let table_offset = meta
                .alloc_clusters((table.len() as u64).div_ceil(cs))
                .await?;
            self.file
                .write(table_offset, IoVec::from(table), WriteFlags::default())
                .await?;
            new_dir.push(DirEntry {
                table_offset,
                table_size: n as u32,
                flags: if b.recording() { AUTO } else { 0 },
                granularity_bits: b.granularity().trailing_zeros() as u8,
                name,
                extra: Vec::new(),
            });
        }
        // Stored bitmaps nobody loaded were not kept up to date: they stay, in use.
        for e in &old {
            if !kept.contains(&e.name) && !bitmaps.iter().any(|b| b.name() == Some(&e.name)) {
                let mut e = e.clone();
                e.flags |= IN_USE;
                kept.insert(e.name.clone());
                new_dir.push(e);
            }
        }
        let freed: Vec<DirEntry> = old
            .into_iter()
            .filter(|e| !kept.contains(&e.name))
            .collect();
        self.switch_directory(&mut meta, new_dir, &freed).await
    }

    /// Removes bitmap `name` from the image at once (QEMU does not wait for close either).
    pub(crate) async fn remove_stored(&self, name: &str) -> Result<()> {
        let mut new_dir = self.stored_bitmaps.lock().await.clone();
        let Some(i) = new_dir.iter().position(|e| e.name == name) else {
            return Ok(());
        };
        let gone = new_dir.remove(i);
        let mut meta = self.meta.lock().await;
        self.switch_directory(&mut meta, new_dir, &[gone]).await
    }

    /// Writes `new_dir` to new clusters, points the header at it, then frees the old
    /// directory and the tables and data of `freed`.
    async fn switch_directory(
        &self,
        meta: &mut super::meta::Meta,
        new_dir: Vec<DirEntry>,
        freed: &[DirEntry],
    ) -> Result<()> {
        let cs = self.cs();
        let dir_bytes = serialize_directory(&new_dir);
        let dir_offset = if dir_bytes.is_empty() {
            0
        } else {
            let off = meta
                .alloc_clusters((dir_bytes.len() as u64).div_ceil(cs))
                .await?;
            self.file
                .write(off, IoVec::from(dir_bytes.clone()), WriteFlags::default())
                .await?;
            off
        };
        meta.flush().await?;
        self.file.flush().await?;
        let old_dir = meta
            .header
            .other_extensions
            .iter()
            .find(|e| e.kind == EXT_BITMAPS)
            .and_then(|e| parse_ext(&e.data).ok());
        let mut header = meta.header.clone();
        header.other_extensions.retain(|e| e.kind != EXT_BITMAPS);
        if new_dir.is_empty() {
            header.autoclear &= !autoclear::BITMAPS;
        } else {
            header.other_extensions.push(RawExtension {
                kind: EXT_BITMAPS,
                data: ext_payload(new_dir.len(), dir_bytes.len() as u64, dir_offset),
            });
            header.autoclear |= autoclear::BITMAPS;
        }
        self.file
            .write(0, IoVec::from(header.serialize()?), WriteFlags::default())
            .await?;
        self.file.flush().await?;
        meta.header = header;
        // Only now is the old data unreferenced.
        for e in freed {
            let table = self
                .file
                .read(e.table_offset, e.table_size as usize * 8)
                .await?;
            for raw in table.chunks_exact(8) {
                let off = be64(raw, 0) & ENTRY_OFFSET_MASK;
                if off != 0 {
                    meta.free_range(off, cs).await?;
                }
            }
            meta.free_range(e.table_offset, u64::from(e.table_size) * 8)
                .await?;
        }
        if let Some((nb, size, offset)) = old_dir {
            if nb > 0 && size > 0 {
                meta.free_range(offset, size).await?;
            }
        }
        meta.flush().await?;
        self.file.flush().await?;
        *self.stored_bitmaps.lock().await = new_dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_round_trips() {
        let entries = vec![
            DirEntry {
                table_offset: 0x30000,
                table_size: 1,
                flags: AUTO,
                granularity_bits: 16,
                name: "b0".into(),
                extra: Vec::new(),
            },
            DirEntry {
                table_offset: 0x40000,
                table_size: 3,
                flags: IN_USE | EXTRA_DATA_COMPATIBLE,
                granularity_bits: 9,
                name: "a-longer-name".into(),
                extra: vec![1, 2, 3],
            },
        ];
        let bytes = serialize_directory(&entries);
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(parse_directory(&bytes, 2).expect("parse"), entries);
        assert!(parse_directory(&bytes[..20], 1).is_err());
    }
}
