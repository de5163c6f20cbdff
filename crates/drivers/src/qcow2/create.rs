//! Creating qcow2 images: header, refcount table, refcount blocks and L1 table in one go,
//! laid out as QEMU does (header, refcount table, refcount blocks, L1), then optional
//! metadata preallocation through the normal allocator.

use std::sync::Arc;

use block::{BlockError, Child, IoVec, Result, WriteFlags};

use super::entry::COPIED;
use super::header::{compat, incompat, CompressionType, Header, V3_HEADER_LEN_WITH_COMPRESSION};
use super::meta::set_refcount;
use super::Qcow2Driver;

/// `preallocation` of `blockdev-create` / `qemu-img create`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Allocate nothing.
    #[default]
    Off,
    /// Allocate every L2 table and data cluster (the file stays sparse).
    Metadata,
}

/// Options of a new qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512).
    pub size: u64,
    /// 2 or 3.
    pub version: u32,
    /// Power of two, 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Power of two, 1 to 64 (v2: 16 only).
    pub refcount_bits: u32,
    /// Backing file name, as recorded in the header.
    pub backing_file: Option<String>,
    /// Backing format, as recorded in the header.
    pub backing_format: Option<String>,
    /// Metadata preallocation.
    pub preallocation: Preallocation,
    /// Compression of compressed clusters (zstd needs v3).
    pub compression: CompressionType,
    /// The lazy-refcounts compatible bit.
    pub lazy_refcounts: bool,
}

impl CreateOptions {
    /// QEMU's defaults: v3, 64 KiB clusters, 16-bit refcounts, zlib.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
            compression: CompressionType::Zlib,
            lazy_refcounts: false,
        }
    }

    fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(BlockError::invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(BlockError::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version != 2 && self.version != 3 {
            return Err(BlockError::invalid(format!(
                "Invalid compatibility level: {}",
                self.version
            )));
        }
        if self.version == 2 && self.refcount_bits != 16 {
            return Err(BlockError::invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"));
        }
        if self.version == 2 && self.compression != CompressionType::Zlib {
            return Err(BlockError::invalid("Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
        }
        if self.version == 2 && self.lazy_refcounts {
            return Err(BlockError::invalid("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(BlockError::invalid(
                "Backing format cannot be used without backing file",
            ));
        }
        if self.size > (1u64 << 62) {
            return Err(BlockError::invalid(format!(
                "image size {} is too big",
                self.size
            )));
        }
        Ok(())
    }
}

/// Writes a new, empty qcow2 image into `file` (which should be empty).
pub async fn create(file: &Arc<Child>, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let size = opts.size.div_ceil(512) * 512;
    let refcount_order = opts.refcount_bits.trailing_zeros();
    let epb = cs * 8 / u64::from(opts.refcount_bits);
    let l1_entries = Header::l1_entries_for(size, cluster_bits);
    // An empty image has no L1 table at all, as in QEMU.
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let (mut t, mut k) = (1u64, 1u64);
    loop {
        let n = 1 + t + k + l1_clusters;
        let (nk, nt) = (n.div_ceil(epb), (n.div_ceil(epb) * 8).div_ceil(cs));
        if (nk, nt) == (k, t) {
            break;
        }
        (k, t) = (nk, nt);
    }
    let total = 1 + t + k + l1_clusters;
    let mut header = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: if l1_entries == 0 { 0 } else { (1 + t + k) * cs },
        refcount_table_offset: cs,
        refcount_table_clusters: t as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: if opts.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: 0,
        refcount_order,
        header_length: if opts.version == 3 {
            V3_HEADER_LEN_WITH_COMPRESSION
        } else {
            72
        },
        compression: opts.compression,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        feature_names: Vec::new(),
        other_extensions: Vec::new(),
    };
    if opts.compression == CompressionType::Zstd {
        header.incompatible |= incompat::COMPRESSION;
    }
    if u64::from(header.l1_size) != l1_entries {
        return Err(BlockError::invalid(
            "image size is too big for this cluster size",
        ));
    }
    let mut meta = vec![0u8; ((t + k) * cs) as usize];
    for b in 0..k {
        let at = (b * 8) as usize;
        meta[at..at + 8].copy_from_slice(&((1 + t + b) * cs).to_be_bytes());
    }
    let blocks = &mut meta[(t * cs) as usize..];
    for c in 0..total {
        let block = &mut blocks[((c / epb) * cs) as usize..((c / epb + 1) * cs) as usize];
        set_refcount(block, (c % epb) as usize, refcount_order, 1);
    }
    let write = |off: u64, data: Vec<u8>| file.write(off, IoVec::from(data), WriteFlags::default());
    // The file as QEMU lays it out: the header's whole cluster, the refcount clusters, and only
    // the L1 table's own bytes (its cluster is counted in use, the file ends after the table),
    // so sizes and `actual-size` read as for an image qemu-img made.
    write(cs, meta).await?;
    if l1_entries > 0 {
        write((1 + t + k) * cs, vec![0u8; (l1_entries * 8) as usize]).await?;
    }
    file.flush().await?;
    // The header last: until it is written, the file is not a qcow2 image at all.
    let mut head = header.serialize()?;
    if head.len() < cs as usize {
        head.resize(cs as usize, 0);
    }
    write(0, head).await?;
    file.flush().await?;
    if opts.preallocation == Preallocation::Metadata {
        let drv = Qcow2Driver::open(file.clone(), true, None).await?;
        drv.preallocate_metadata().await?;
    }
    Ok(())
}

impl Qcow2Driver {
    /// Maps every guest cluster to a host cluster (sparse: nothing is written to them), table
    /// by table, and extends the file over them.
    pub async fn preallocate_metadata(&self) -> Result<()> {
        let cs = self.cs();
        let clusters = self.size.div_ceil(cs);
        let per_table = cs / 8;
        let mut meta = self.meta.lock().await;
        let mut end = 0;
        let mut gc = 0;
        while gc < clusters {
            let want = (per_table - gc % per_table).min(clusters - gc);
            let (host, n) = meta.alloc_some_clusters(want).await?;
            for i in 0..n {
                meta.set_l2_entry(gc + i, (host + i * cs) | COPIED).await?;
            }
            end = end.max(host + n * cs);
            gc += n;
        }
        meta.flush().await?;
        drop(meta);
        if end > self.file.node().len() {
            self.file
                .write_zeroes(
                    self.file.node().len(),
                    end - self.file.node().len(),
                    block::ZeroFlags::default(),
                )
                .await?;
        }
        self.file.flush().await
    }
}
