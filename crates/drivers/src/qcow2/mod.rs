//! Our qcow2 driver, written from QEMU's docs/interop/qcow2.txt.
//!
//! ```text
//!  guest offset ──L1──▶ L2 table ──▶ entry: unallocated │ zero │ data@host │ compressed@host
//!                                                 │
//!  Meta (one async mutex): L1, L2 cache, refcount cache, allocator   (meta.rs)
//!  data path (io.rs): guest-cluster range locks, reads and writes outside the mutex
//! ```
//!
//! Versions 2 and 3, refcount widths 1–64 bits, cluster sizes 512 B–2 MiB, backing chains,
//! zero clusters, compressed clusters (zlib and zstd, read and written), internal snapshots
//! kept intact (shared clusters are copied on write), the lazy-refcounts dirty bit repaired on
//! open. Refused with a clear error: encryption, external data files, extended L2 entries,
//! unknown incompatible features; writing to images marked corrupt. Persistent dirty bitmaps are
//! loaded at open and stored at close (bitmaps.rs).

mod bitmaps;
mod compress;
pub mod create;
mod entry;
pub mod header;
mod io;
mod meta;
mod repair;

use std::sync::Arc;

use async_trait::async_trait;
use block::range_lock::RangeLocks;
use block::{BlockDriver, BlockError, BlockStatus, Child, Facts, ImageInfo, InfoValue, IoVec};
use block::{DebugEvent, Result, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};
use tokio::sync::Mutex;

pub use create::{create, CreateOptions, Preallocation};
pub use header::{CompressionType, Header};

use header::{autoclear, incompat};
use meta::Meta;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Driver {
    file: Arc<Child>,
    backing: Option<Arc<Child>>,
    meta: Mutex<Meta>,
    locks: RangeLocks,
    cluster_bits: u32,
    size: u64,
    version: u32,
    compression: CompressionType,
    writable: bool,
    header_snapshot: Header,
    zero_cluster: Bytes,
    /// The bitmap directory as stored (loaded with the bitmaps, replaced when they are stored).
    stored_bitmaps: Mutex<Vec<bitmaps::DirEntry>>,
    /// The image looks like it was created with preallocated metadata (decided at the first
    /// block status, as QEMU does): its data clusters may sit over holes, so a map asks the
    /// file whether they read as zero.
    metadata_prealloc: tokio::sync::OnceCell<bool>,
}

/// Reads and checks the header of the qcow2 image in `file`.
pub async fn read_header(file: &Child) -> Result<Header> {
    let file_len = file.node().len();
    let want = file_len.min(2 << 20) as usize;
    let buf = file.read(0, want).await?;
    Header::parse(&buf, file_len)
}

impl Qcow2Driver {
    /// Opens the image in `file`; `backing` is the already opened backing node, if any.
    pub async fn open(
        file: Arc<Child>,
        writable: bool,
        backing: Option<Arc<Child>>,
    ) -> Result<Self> {
        let mut header = read_header(&file).await?;
        let unknown = header.unknown_incompatible();
        if !unknown.is_empty() {
            return Err(BlockError::unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                unknown.join(", ")
            )));
        }
        if header.incompatible & incompat::DATA_FILE != 0 {
            return Err(BlockError::unsupported(
                "qcow2 images with an external data file are not supported",
            ));
        }
        if header.incompatible & incompat::EXTENDED_L2 != 0 {
            return Err(BlockError::unsupported(
                "qcow2 images with extended L2 entries are not supported",
            ));
        }
        if writable && header.incompatible & incompat::CORRUPT != 0 {
            return Err(BlockError::read_only(
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        let has_bitmaps =
            header.autoclear & autoclear::BITMAPS != 0 && header.has_extension(header::EXT_BITMAPS);
        let file_len = file.node().len();
        let mut meta = Meta::load(header.clone(), file.clone()).await?;
        if writable {
            if header.incompatible & incompat::DIRTY != 0 {
                repair::rebuild_refcounts(&mut meta, file_len).await?;
                header = meta.header.clone();
                header.incompatible &= !incompat::DIRTY;
            }
            // A writer must clear the autoclear bits it does not maintain (qcow2.txt); we
            // maintain the bitmaps extension.
            header.autoclear &= autoclear::BITMAPS;
            if !has_bitmaps {
                header.autoclear = 0;
            }
            if header != meta.header {
                let bytes = header.serialize()?;
                file.write(0, IoVec::from(bytes), WriteFlags::default())
                    .await?;
                file.flush().await?;
                meta.header = header.clone();
            }
        }
        let cluster_bits = header.cluster_bits;
        let driver = Qcow2Driver {
            file,
            backing,
            meta: Mutex::new(meta),
            locks: RangeLocks::new(),
            cluster_bits,
            size: header.size,
            version: header.version,
            compression: header.compression,
            writable,
            zero_cluster: Bytes::from(vec![0u8; 1 << cluster_bits]),
            header_snapshot: header,
            stored_bitmaps: Mutex::new(Vec::new()),
            metadata_prealloc: tokio::sync::OnceCell::new(),
        };
        if writable && has_bitmaps {
            driver.mark_bitmaps_in_use().await?;
        }
        Ok(driver)
    }

    /// The header as of opening.
    pub fn header(&self) -> &Header {
        &self.header_snapshot
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
}

#[async_trait]
impl BlockDriver for Qcow2Driver {
    fn supports_backing(&self) -> bool {
        true
    }

    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn len(&self) -> u64 {
        self.size
    }

    fn facts(&self) -> Facts {
        Facts {
            cluster_size: Some(self.cs() as u32),
            updates_metadata: self.writable,
            ..Facts::default()
        }
    }

    fn children(&self) -> Vec<Arc<Child>> {
        let mut c = vec![self.file.clone()];
        c.extend(self.backing.clone());
        c
    }

    fn writable(&self) -> bool {
        self.writable
    }

    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.read_range(offset, buf).await
    }

    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        self.write_range(offset, data).await?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.zero_range(offset, len, flags).await?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_range(offset, len).await
    }

    fn stores_bitmaps(&self) -> bool {
        true
    }

    async fn load_bitmaps(&self) -> Result<Vec<bitmap::DirtyBitmap>> {
        self.load_stored_bitmaps().await
    }

    async fn remove_stored_bitmap(&self, name: &str) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.remove_stored(name).await
    }

    async fn store_bitmaps(&self, bitmaps: &[bitmap::DirtyBitmap]) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        Qcow2Driver::store_bitmaps(self, bitmaps).await
    }

    /// Refcounts are synced before the L2 tables that need them are written, without holding
    /// the metadata lock across that sync: lookups and writes to allocated clusters go on
    /// meanwhile.
    async fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        // Announced to the file as QEMU's block layer does: cached metadata goes to the OS,
        // then to the disk.
        self.file.debug_event(DebugEvent::FlushToOs);
        let epoch = self.meta.lock().await.flush_refcounts().await?;
        self.file.debug_event(DebugEvent::FlushToDisk);
        self.file.flush().await?;
        self.meta.lock().await.flush_tables_synced(epoch).await?;
        self.file.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.status_at(offset, len).await
    }

    fn image_info(&self) -> ImageInfo {
        let h = &self.header_snapshot;
        let mut specific = vec![(
            "compat",
            InfoValue::Str(if h.version == 2 { "0.10" } else { "1.1" }.into()),
        )];
        if h.version == 3 {
            specific.push((
                "compression-type",
                InfoValue::Str(h.compression.name().into()),
            ));
            specific.push(("lazy-refcounts", InfoValue::Bool(h.compatible & 1 != 0)));
            // The bitmaps stored in the image, as its directory lists them (QEMU reads the
            // directory; bitmaps not stored yet are not there).
            if let Ok(dir) = self.stored_bitmaps.try_lock() {
                if !dir.is_empty() {
                    let list = dir.iter().map(|e| e.info(self.writable)).collect();
                    specific.push(("bitmaps", InfoValue::List(list)));
                }
            }
        }
        specific.push((
            "refcount-bits",
            InfoValue::Int(i64::from(h.refcount_bits())),
        ));
        if h.version == 3 {
            specific.push((
                "corrupt",
                InfoValue::Bool(h.incompatible & incompat::CORRUPT != 0),
            ));
            specific.push((
                "extended-l2",
                InfoValue::Bool(h.incompatible & incompat::EXTENDED_L2 != 0),
            ));
        }
        ImageInfo {
            format: "qcow2",
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            dirty: h.incompatible & incompat::DIRTY != 0,
            specific,
        }
    }

    fn as_compressed_writer(&self) -> Option<&dyn block::driver::CompressedWrite> {
        Some(self)
    }
}

#[async_trait]
impl block::driver::CompressedWrite for Qcow2Driver {
    async fn write_compressed(&self, offset: u64, data: Bytes) -> Result<()> {
        self.write_compressed_cluster(offset, data).await
    }
}
