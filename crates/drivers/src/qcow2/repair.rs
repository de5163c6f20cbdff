//! Rebuilding refcounts of an image opened with the dirty bit set (lazy refcounts): every
//! reference is counted by walking the metadata, and new refcount structures are written past
//! the end of everything in use; the header then switches to them in one write.

use std::collections::HashMap;

use block::{BlockError, IoVec, Result, WriteFlags};

use super::entry::{Mapping, OFFSET_MASK};
use super::header::{be64, incompat};
use super::meta::{set_refcount, Meta};

struct Counter {
    cs: u64,
    refs: HashMap<u64, u64>,
}

impl Counter {
    fn add(&mut self, off: u64, len: u64) {
        for c in off / self.cs..=(off + len.max(1) - 1) / self.cs {
            *self.refs.entry(c).or_default() += 1;
        }
    }
}

async fn count_l1(
    meta: &Meta,
    counter: &mut Counter,
    l1_off: u64,
    l1_size: u64,
    file_len: u64,
) -> Result<()> {
    let cs = counter.cs;
    let file = meta.file_child();
    counter.add(l1_off, l1_size * 8);
    let l1 = file.read(l1_off, (l1_size * 8) as usize).await?;
    for i in 0..l1_size as usize {
        let l2_off = be64(&l1, i * 8) & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        if l2_off % cs != 0 || l2_off >= file_len {
            return Err(BlockError::corrupt(format!(
                "L2 table at {l2_off:#x} is invalid"
            )));
        }
        counter.add(l2_off, cs);
        let l2 = file.read(l2_off, cs as usize).await?;
        for j in 0..(cs / 8) as usize {
            let m = Mapping::decode(be64(&l2, j * 8), cs.trailing_zeros(), file_len)?;
            if let Some((h, n)) = m.host_range(cs) {
                counter.add(h, n);
            }
        }
    }
    Ok(())
}

/// Recounts every reference and writes fresh refcount structures. Clears the dirty bit.
pub(super) async fn rebuild_refcounts(meta: &mut Meta, file_len: u64) -> Result<()> {
    let h = meta.header.clone();
    let cs = h.cluster_size();
    let file = meta.file_child();
    let mut counter = Counter {
        cs,
        refs: HashMap::new(),
    };
    counter.add(0, cs);
    count_l1(
        meta,
        &mut counter,
        h.l1_table_offset,
        u64::from(h.l1_size),
        file_len,
    )
    .await?;
    if h.nb_snapshots > 0 {
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            let fixed = file.read(at, 40).await?;
            let l1_off = be64(&fixed, 0);
            let l1_size = u64::from(u32::from_be_bytes([
                fixed[8], fixed[9], fixed[10], fixed[11],
            ]));
            let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
            let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
            let extra = u64::from(u32::from_be_bytes([
                fixed[36], fixed[37], fixed[38], fixed[39],
            ]));
            count_l1(meta, &mut counter, l1_off, l1_size, file_len).await?;
            at += (40 + extra + id_len + name_len).div_ceil(8) * 8;
        }
        counter.add(h.snapshots_offset, at - h.snapshots_offset);
    }
    let order = h.refcount_order;
    let bits = h.refcount_bits();
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    if let Some((c, n)) = counter.refs.iter().find(|(_, &n)| n > max) {
        return Err(BlockError::corrupt(format!(
            "cluster {c} has {n} references, more than {bits}-bit refcounts hold"
        )));
    }
    let epb = cs * 8 / u64::from(bits);
    let used_end = counter
        .refs
        .keys()
        .max()
        .map_or(1, |c| c + 1)
        .max(file_len.div_ceil(cs));
    let (mut k, mut t) = (1u64, 1u64);
    loop {
        let end = used_end + k + t;
        let (nk, nt) = (end.div_ceil(epb), (end.div_ceil(epb) * 8).div_ceil(cs));
        if (nk, nt) == (k, t) {
            break;
        }
        (k, t) = (nk, nt);
    }
    for c in used_end..used_end + k + t {
        counter.add(c * cs, cs);
    }
    let mut blocks = vec![0u8; (k * cs) as usize];
    for (&c, &n) in &counter.refs {
        let b = (c / epb) as usize;
        set_refcount(
            &mut blocks[b * cs as usize..(b + 1) * cs as usize],
            (c % epb) as usize,
            order,
            n,
        );
    }
    let mut table = vec![0u8; (t * cs) as usize];
    for b in 0..k {
        table[(b * 8) as usize..(b * 8 + 8) as usize]
            .copy_from_slice(&((used_end + b) * cs).to_be_bytes());
    }
    let table_off = (used_end + k) * cs;
    let w = WriteFlags::default();
    file.write(used_end * cs, IoVec::from(blocks), w).await?;
    file.write(table_off, IoVec::from(table), w).await?;
    file.flush().await?;
    let mut header = h.clone();
    header.refcount_table_offset = table_off;
    header.refcount_table_clusters = t as u32;
    header.incompatible &= !incompat::DIRTY;
    file.write(0, IoVec::from(header.serialize()?), w).await?;
    file.flush().await?;
    *meta = Meta::load(header, file).await?;
    Ok(())
}
