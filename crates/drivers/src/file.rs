//! The `file` protocol driver: a host file or block device.
//!
//! Block status comes from `SEEK_DATA`/`SEEK_HOLE`; write-zeroes punches holes (`may_unmap`)
//! or uses `FALLOC_FL_ZERO_RANGE`, falling back to explicit zeroes; discard punches holes.
//! With `cache.direct=on` the file is opened `O_DIRECT` and requests are aligned to 4 KiB
//! (the request path does read-modify-write for smaller ones; the engine bounces buffers).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::engine::{CacheHint, IoEngine, Lane, Seek, SharedFd, ThreadPoolEngine, UringEngine};
use async_trait::async_trait;
use block::{BlockDriver, BlockError, BlockStatus, EdgePerm, ErrorKind, Facts, ImageInfo};
use block::{IoVec, Perm, Result, WriteFlags, ZeroFlags};
use bytes::BytesMut;

/// Buffer alignment used for O_DIRECT, and the request alignment when probing finds none
/// smaller: safe for 512e and 4Kn devices alike.
const DIRECT_ALIGN: u32 = 4096;

/// The smallest request size O_DIRECT accepts on `file` (512 … 4096), found by reading
/// offset 0 with each size from an aligned buffer, as QEMU's file driver probes it.
fn probe_direct_alignment(file: &std::fs::File) -> u32 {
    use std::os::unix::fs::FileExt;
    let mut space = vec![0u8; 2 * DIRECT_ALIGN as usize];
    let skip = space.as_ptr().align_offset(DIRECT_ALIGN as usize);
    let buf = &mut space[skip..skip + DIRECT_ALIGN as usize];
    for size in [512usize, 1024, 2048] {
        if file.read_at(&mut buf[..size], 0).is_ok() {
            return size as u32;
        }
    }
    DIRECT_ALIGN
}

/// The length of the file or block device behind `fd`.
fn fd_len(fd: i32) -> std::io::Result<u64> {
    // SAFETY: plain lseek on a descriptor the caller owns; SEEK_END answers the size of
    // regular files and block devices alike, and the engine uses positioned I/O only.
    let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
    u64::try_from(end).map_err(|_| std::io::Error::last_os_error())
}

/// How to open a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// Path of the file or device.
    pub filename: PathBuf,
    /// Open without write access.
    pub read_only: bool,
    /// `cache.direct`: bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// `cache.no-flush`: ignore flushes (QEMU's cache=unsafe); a host crash can lose data.
    pub no_flush: bool,
    /// `locking`: take QEMU's image locks for what the node's parents need and refuse what
    /// another process's locks forbid (see [`ImageLocks`]). `auto` and `on` are both true on
    /// Linux, which has OFD locks.
    pub locking: bool,
    /// `aio`: the engine asked for by name; `None` takes [`IoTuning::aio`] and falls back to
    /// the thread pool where io_uring cannot be used.
    pub aio: Option<Aio>,
    /// How host I/O is done.
    pub io: IoTuning,
}

/// Which engine does a file's I/O (QEMU's `aio` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aio {
    /// Blocking system calls on a pool of threads ([`ThreadPoolEngine`]; QEMU's default).
    Threads,
    /// io_uring ([`UringEngine`]): no thread hand-off on submission, one wake-up on completion.
    IoUring,
}

/// How the file driver does host I/O. Both on by default; the switches exist for comparison
/// runs (see the README's Performance section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoTuning {
    /// Buffered writes to a regular file go through one ordered lane ([`Lane`]); off leaves
    /// them to the kernel's inode lock.
    pub write_lane: bool,
    /// Buffered reads ask the page cache on the caller's thread first; off sends every read
    /// to a worker.
    pub cached_reads: bool,
    /// The engine of files whose `aio` is not given.
    pub aio: Aio,
}

impl Default for IoTuning {
    fn default() -> Self {
        Self {
            write_lane: true,
            cached_reads: true,
            aio: Aio::IoUring,
        }
    }
}

impl FileOptions {
    /// Read-write, cached.
    pub fn new(filename: impl Into<PathBuf>) -> Self {
        Self {
            filename: filename.into(),
            read_only: false,
            direct: false,
            no_flush: false,
            locking: true,
            aio: None,
            io: IoTuning::default(),
        }
    }
}

/// QEMU's image locks: shared OFD byte-range locks on the image file, one byte per permission
/// held (100 + bit) and one per permission not shared (200 + bit), so that QEMU, `qemu-img`,
/// `qemu-io` and blockjobd refuse each other's conflicting uses of an image. OFD locks belong
/// to the open file description, so two nodes on one file in one process conflict too, as
/// they do in QEMU.
#[derive(Debug, Default)]
struct ImageLocks {
    /// Bytes locked now, as permission sets.
    locked_perm: Perm,
    locked_unshared: Perm,
}

const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;

fn ofd_lock(fd: i32, cmd: i32, kind: i32, offset: i64) -> std::io::Result<libc::flock> {
    let mut fl = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: offset,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: fcntl on a descriptor we own with a valid, initialised flock.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// True when another open file description holds a lock on byte `offset`.
fn locked_elsewhere(fd: i32, offset: i64) -> std::io::Result<bool> {
    let fl = ofd_lock(fd, libc::F_OFD_GETLK, libc::F_WRLCK, offset)?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

fn lock_error(what: String, e: std::io::Error) -> BlockError {
    match e.raw_os_error() {
        // Someone else holds it: the common case, said without errno as QEMU says it.
        Some(libc::EAGAIN | libc::EACCES) => BlockError::new(ErrorKind::InvalidArgument, what),
        _ => BlockError::io(what, e),
    }
}

impl ImageLocks {
    /// Locks the bytes of `perm` and `unshared` not locked yet; with `unlock`, also unlocks
    /// those locked but not wanted.
    fn apply(&mut self, fd: i32, perm: Perm, unshared: Perm, unlock: bool) -> Result<()> {
        for (base, want, locked) in [
            (LOCK_PERM_BASE, perm, &mut self.locked_perm),
            (LOCK_SHARED_BASE, unshared, &mut self.locked_unshared),
        ] {
            for (i, p) in Perm::ALL.each() {
                let offset = base + i64::from(i);
                if want.contains(p) && !locked.contains(p) {
                    ofd_lock(fd, libc::F_OFD_SETLK, libc::F_RDLCK, offset)
                        .map_err(|e| lock_error(format!("Failed to lock byte {offset}"), e))?;
                    *locked |= p;
                } else if unlock && locked.contains(p) && !want.contains(p) {
                    ofd_lock(fd, libc::F_OFD_SETLK, libc::F_UNLCK, offset).map_err(|e| {
                        BlockError::io(format!("Failed to unlock byte {offset}"), e)
                    })?;
                    *locked &= !p;
                }
            }
        }
        Ok(())
    }

    /// Refuses `need` when another process (or another node) does not share a permission we
    /// need, or holds one we do not share.
    fn check(fd: i32, need: EdgePerm) -> Result<()> {
        let held = |base: i64, i: u8| {
            locked_elsewhere(fd, base + i64::from(i))
                .map_err(|e| BlockError::io("Failed to check lock", e))
        };
        for (i, p) in need.perm.each() {
            if held(LOCK_SHARED_BASE, i)? {
                let msg = format!("Failed to get \"{}\" lock", p.names());
                return Err(BlockError::new(ErrorKind::InvalidArgument, msg));
            }
        }
        for (i, p) in (!need.shared).each() {
            if held(LOCK_PERM_BASE, i)? {
                let msg = format!("Failed to get shared \"{}\" lock", p.names());
                return Err(BlockError::new(ErrorKind::InvalidArgument, msg));
            }
        }
        Ok(())
    }
}

/// An open host file.
#[derive(Debug)]
pub struct FileDriver {
    fd: SharedFd,
    engine: Arc<dyn IoEngine>,
    len: AtomicU64,
    options: FileOptions,
    seekable_holes: bool,
    /// Request alignment: 1, or what O_DIRECT needs.
    request_align: u32,
    /// Buffered writes to a regular file go through one lane, in order (see [`Lane`]): with 16
    /// writers in flight, the kernel's inode lock alone let a few wait over 6 ms while most
    /// passed in 0.4 ms (bench/nbd.sh, 4 KiB random writes). `None` for O_DIRECT and block
    /// devices, whose writes run in parallel in the kernel.
    write_lane: Option<Arc<Lane>>,
    /// Buffered reads ask the page cache on the caller's thread first (see
    /// [`IoEngine::read_at_cached_first`]); `None` for O_DIRECT.
    read_hint: Option<CacheHint>,
    /// The image locks, when `locking` is on.
    locks: Option<Mutex<ImageLocks>>,
    /// What the node's parents need now (committed).
    held: Mutex<EdgePerm>,
}

impl FileDriver {
    /// Opens an existing file.
    pub fn open(options: FileOptions) -> Result<FileDriver> {
        let name = options.filename.display().to_string();
        let mut oo = OpenOptions::new();
        oo.read(true).write(!options.read_only);
        if options.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo
            .open(&options.filename)
            .map_err(|e| BlockError::io(format!("Could not open '{name}'"), e))?;
        let meta = file
            .metadata()
            .map_err(|e| BlockError::io(format!("stat '{name}'"), e))?;
        if meta.is_dir() {
            return Err(BlockError::invalid(format!("'{name}' is a directory")));
        }
        let request_align = if options.direct {
            probe_direct_alignment(&file)
        } else {
            1
        };
        let fd = OwnedFd::from(file);
        let len =
            fd_len(fd.as_raw_fd()).map_err(|e| BlockError::io(format!("size of '{name}'"), e))?;
        let seekable_holes = meta.file_type().is_file();
        let write_lane =
            (options.io.write_lane && seekable_holes && !options.direct).then(Arc::default);
        let read_hint = (options.io.cached_reads && !options.direct).then(CacheHint::default);
        let engine: Arc<dyn IoEngine> = match options.aio.unwrap_or(options.io.aio) {
            Aio::Threads => ThreadPoolEngine::global(),
            Aio::IoUring => match UringEngine::new(ThreadPoolEngine::global()) {
                Ok(uring) => Arc::new(uring),
                Err(e) if options.aio.is_some() => {
                    let msg = "Unable to use io_uring: failed to init linux io_uring ring";
                    return Err(BlockError::io(msg, e));
                }
                Err(_) => ThreadPoolEngine::global(),
            },
        };
        Ok(FileDriver {
            fd: Arc::new(fd),
            engine,
            len: AtomicU64::new(len),
            seekable_holes,
            request_align,
            write_lane,
            read_hint,
            locks: options.locking.then(Mutex::default),
            held: Mutex::new(EdgePerm::FREE),
            options,
        })
    }

    /// Creates (or truncates) a regular file of `size` bytes, sparse.
    pub fn create(path: &Path, size: u64) -> Result<()> {
        let name = path.display().to_string();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| BlockError::io(format!("Could not create '{name}'"), e))?;
        f.set_len(size)
            .map_err(|e| BlockError::io(format!("Could not resize '{name}'"), e))
    }

    /// The length of the file as the kernel has it now.
    fn current_len(&self) -> std::io::Result<u64> {
        fd_len(self.fd.as_raw_fd())
    }

    /// The file name it was opened with.
    pub fn filename(&self) -> &Path {
        &self.options.filename
    }

    /// Sets the file length.
    pub async fn truncate(&self, len: u64) -> Result<()> {
        self.engine
            .truncate(&self.fd, len)
            .await
            .map_err(|e| BlockError::io(format!("truncating '{}'", self.name()), e))?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    /// Makes the file at least `len` bytes long, never shorter: a write past `len` that lands
    /// while this runs keeps its data (a plain `ftruncate` to a size read earlier would cut it
    /// off). Only the block holding the last byte is allocated; the rest stays a hole. Where
    /// `fallocate` is not supported, falls back to `ftruncate` when the file is still shorter.
    async fn grow_to(&self, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let grown = self.engine.fallocate(&self.fd, 0, len - 1, 1).await;
        match grown {
            Ok(()) => {
                self.len.fetch_max(len, Ordering::AcqRel);
                Ok(())
            }
            Err(e) if fallocate_unsupported(&e) => {
                if self.len() < len {
                    self.truncate(len).await?;
                }
                Ok(())
            }
            Err(e) => Err(BlockError::io(format!("extending '{}'", self.name()), e)),
        }
    }

    /// Copies `len` bytes to `dst` with `copy_file_range`, in the kernel. Returns bytes copied
    /// (less than `len` when the kernel stops early; the caller continues or falls back).
    pub async fn copy_file_range_to(
        &self,
        offset: u64,
        dst: &FileDriver,
        dst_offset: u64,
        len: u64,
    ) -> Result<u64> {
        let n = self
            .engine
            .copy_range(&self.fd, offset, &dst.fd, dst_offset, len)
            .await
            .map_err(|e| BlockError::io("copy_file_range", e))?;
        dst.len.fetch_max(dst_offset + n, Ordering::AcqRel);
        Ok(n)
    }

    fn name(&self) -> String {
        self.options.filename.display().to_string()
    }

    fn align(&self) -> usize {
        if self.options.direct {
            DIRECT_ALIGN as usize
        } else {
            1
        }
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = bytes::Bytes::from(vec![0u8; CHUNK.min(len) as usize]);
        let mut at = offset;
        while at < offset + len {
            let n = CHUNK.min(offset + len - at) as usize;
            self.write(at, IoVec::from(zeroes.slice(..n)), WriteFlags::default())
                .await?;
            at += n as u64;
        }
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        self.engine
            .fdatasync(&self.fd)
            .await
            .map_err(|e| BlockError::io(format!("flushing '{}'", self.name()), e))
    }
}

#[async_trait]
impl BlockDriver for FileDriver {
    fn driver_name(&self) -> &'static str {
        "file"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn copy_range_to(
        &self,
        offset: u64,
        dst: &dyn BlockDriver,
        dst_offset: u64,
        len: u64,
    ) -> Result<Option<u64>> {
        match dst.as_any().and_then(|d| d.downcast_ref::<FileDriver>()) {
            Some(dst) => self
                .copy_file_range_to(offset, dst, dst_offset, len)
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn allocated_bytes(&self) -> Option<u64> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat on a descriptor we own into a buffer of the right type; the buffer is
        // read only when the call succeeded and filled it.
        let done = unsafe { libc::fstat(self.fd.as_raw_fd(), st.as_mut_ptr()) };
        if done != 0 {
            return None;
        }
        // SAFETY: fstat returned 0, so it wrote the whole struct.
        let st = unsafe { st.assume_init() };
        u64::try_from(st.st_blocks).ok().map(|b| b * 512)
    }

    fn facts(&self) -> Facts {
        let memory = if self.options.direct { DIRECT_ALIGN } else { 1 };
        Facts {
            request_alignment: self.request_align,
            memory_alignment: memory,
            growable: true,
            ..Facts::default()
        }
    }

    fn writable(&self) -> bool {
        !self.options.read_only
    }

    fn prepare_perm(&self, need: EdgePerm) -> Result<()> {
        let Some(locks) = &self.locks else {
            return Ok(());
        };
        let fd = self.fd.as_raw_fd();
        let held = *self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = locks.lock().unwrap_or_else(|p| p.into_inner());
        if held.perm.contains(need.perm) && need.shared.contains(held.shared) {
            // Only loosening: nothing to take, nothing to check.
            return Ok(());
        }
        // Take the union of old and new first, so a refresh that fails later leaves the old
        // locks in place; commit drops what is no longer needed.
        let taken = st
            .apply(
                fd,
                held.perm | need.perm,
                !held.shared | !need.shared,
                false,
            )
            .and_then(|()| ImageLocks::check(fd, need));
        if taken.is_err() {
            let _ = st.apply(fd, held.perm, !held.shared, true);
        }
        taken
    }

    fn commit_perm(&self, need: EdgePerm) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !held.perm.intersects(Perm::WRITE | Perm::RESIZE) {
            // Nobody wrote through this node, so another process may have: a new user (a
            // format opened on it again) must see the file as it is now.
            if let Ok(len) = self.current_len() {
                self.len.store(len, Ordering::Release);
            }
        }
        if let Some(locks) = &self.locks {
            let mut st = locks.lock().unwrap_or_else(|p| p.into_inner());
            // Only unlocking is left to do, which does not fail but for a broken descriptor.
            let _ = st.apply(self.fd.as_raw_fd(), need.perm, !need.shared, true);
        }
        *held = need;
    }

    fn abort_perm(&self) {
        if let Some(locks) = &self.locks {
            let held = *self.held.lock().unwrap_or_else(|p| p.into_inner());
            let mut st = locks.lock().unwrap_or_else(|p| p.into_inner());
            let _ = st.apply(self.fd.as_raw_fd(), held.perm, !held.shared, true);
        }
    }

    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        // Background reads (a job's copy) are mostly cold: they neither ask the cache on the
        // runtime's thread nor count against the guest's hits.
        let hint = self
            .read_hint
            .as_ref()
            .filter(|_| !block::io_class::is_background());
        let read = match hint {
            Some(hint) => {
                self.engine
                    .read_at_cached_first(hint, &self.fd, offset, buf, self.align())
                    .await
            }
            None => {
                self.engine
                    .read_at(&self.fd, offset, buf, self.align())
                    .await
            }
        };
        read.map_err(|e| BlockError::io(format!("reading '{}' at {offset}", self.name()), e))
    }

    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        let end = offset + data.len() as u64;
        let written = match &self.write_lane {
            Some(lane) => {
                self.engine
                    .write_at_in_order(lane, &self.fd, offset, data, self.align())
                    .await
            }
            None => {
                self.engine
                    .write_at(&self.fd, offset, data, self.align())
                    .await
            }
        };
        written.map_err(|e| BlockError::io(format!("writing '{}' at {offset}", self.name()), e))?;
        self.len.fetch_max(end, Ordering::AcqRel);
        if flags.fua {
            self.sync().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let size = self.len();
        let end = offset + len;
        // Past the end of a regular file everything already reads as zero: extend only.
        let inside_end = end.min(size);
        if offset < inside_end {
            let mode = if flags.may_unmap {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            let r = self
                .engine
                .fallocate(&self.fd, mode, offset, inside_end - offset)
                .await;
            if let Err(e) = r {
                if !fallocate_unsupported(&e) {
                    return Err(BlockError::io(
                        format!("zeroing '{}' at {offset}", self.name()),
                        e,
                    ));
                }
                if flags.no_fallback {
                    return Err(BlockError::unsupported("no fast write-zeroes on this file"));
                }
                self.write_zero_buffers(offset, inside_end - offset).await?;
            }
        }
        if end > size && self.seekable_holes {
            // Zeroes past the end are allocated (as unwritten extents), as QEMU's
            // FALLOC_FL_ZERO_RANGE without KEEP_SIZE does, unless they may be left unmapped.
            let from = offset.max(size);
            let allocated = !flags.may_unmap
                && self
                    .engine
                    .fallocate(&self.fd, libc::FALLOC_FL_ZERO_RANGE, from, end - from)
                    .await
                    .is_ok();
            if allocated {
                self.len.fetch_max(end, Ordering::AcqRel);
            } else {
                self.grow_to(end).await?;
            }
        }
        if flags.fua {
            self.sync().await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let end = (offset + len).min(self.len());
        if offset >= end || !self.seekable_holes {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self
            .engine
            .fallocate(&self.fd, mode, offset, end - offset)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(BlockError::io(
                format!("discarding '{}' at {offset}", self.name()),
                e,
            )),
        }
    }

    async fn flush(&self) -> Result<()> {
        if self.options.read_only || self.options.no_flush {
            return Ok(());
        }
        self.sync().await
    }

    /// Flushes and lets go of the image locks at once: a node closed while something still
    /// holds it (a finished job's record) must not keep other processes off the image.
    async fn close(&self) -> Result<()> {
        let flushed = self.flush().await;
        if let Some(locks) = &self.locks {
            let mut st = locks.lock().unwrap_or_else(|p| p.into_inner());
            let _ = st.apply(self.fd.as_raw_fd(), Perm::NONE, Perm::NONE, true);
        }
        flushed
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        if !self.seekable_holes {
            return Ok(BlockStatus::data(len, Some(offset)));
        }
        let data = self
            .engine
            .seek_data_hole(&self.fd, offset, Seek::Data)
            .await;
        let status = match data {
            Ok(Some(d)) if d == offset => {
                let hole = self
                    .engine
                    .seek_data_hole(&self.fd, offset, Seek::Hole)
                    .await;
                let end = match hole {
                    Ok(Some(h)) if h > offset => h,
                    _ => offset + len,
                };
                BlockStatus::data((end - offset).min(len), Some(offset))
            }
            Ok(Some(d)) => BlockStatus::zero((d - offset).min(len), Some(offset)),
            Ok(None) => BlockStatus::zero(len, Some(offset)),
            Err(_) => BlockStatus::data(len, Some(offset)),
        };
        Ok(status)
    }

    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            format: "file",
            ..ImageInfo::default()
        }
    }
}

/// The file system (or the file) has no such `fallocate` mode.
fn fallocate_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A write-zeroes past the end extends the file; a write further out that landed after the
    /// driver last saw the file's size (another request in flight) must keep its data.
    #[tokio::test]
    async fn write_zeroes_past_the_end_never_shortens_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        FileDriver::create(&path, 4096).expect("create");
        let driver = FileDriver::open(FileOptions::new(&path)).expect("open");
        // The other request, as the kernel sees it: 4 KiB of data at 1 MiB.
        let other = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        other.write_all_at(&[0xab; 4096], 1 << 20).expect("write");
        let flags = ZeroFlags {
            may_unmap: true,
            ..ZeroFlags::default()
        };
        driver
            .write_zeroes(4096, 8192, flags)
            .await
            .expect("zeroes");
        let len = std::fs::metadata(&path).expect("stat").len();
        assert_eq!(len, (1 << 20) + 4096, "the file was cut short");
        let back = std::fs::read(&path).expect("read");
        assert!(back[(1 << 20)..].iter().all(|&b| b == 0xab));
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        // With nothing further out, it grows to the end of the zeroes.
        driver
            .write_zeroes(2 << 20, 4096, flags)
            .await
            .expect("zeroes");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            (2 << 20) + 4096
        );
        assert_eq!(driver.len(), (2 << 20) + 4096);
    }

    /// A job's cold background reads leave the guest's cached-read hint alone.
    #[tokio::test]
    async fn background_reads_do_not_count_in_the_cached_read_hint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).expect("create");
        file.write_all_at(&vec![0x5a; 1 << 20], 0).expect("write");
        file.sync_all().expect("sync");
        let driver = FileDriver::open(FileOptions {
            aio: Some(Aio::Threads),
            ..FileOptions::new(&path)
        })
        .expect("open");
        let misses = |d: &FileDriver| {
            d.read_hint
                .as_ref()
                .map(CacheHint::misses)
                .expect("buffered reads have a hint")
        };
        let cold = |d: &FileDriver| {
            // SAFETY: plain advice on a valid descriptor; no memory is involved.
            unsafe { libc::posix_fadvise(d.fd.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        };
        // Synced data dropped from the page cache: every read misses.
        for i in 0..CacheHint::MISS_RUN as u64 {
            cold(&driver);
            block::io_class::background(driver.read(i * 65536, BytesMut::zeroed(65536)))
                .await
                .expect("read");
        }
        assert_eq!(misses(&driver), 0, "background reads counted");
        // The kernel may keep a page the advice asked it to drop (a busy host): a read that
        // hits counts nothing, so try again until one misses.
        for _ in 0..20 {
            cold(&driver);
            driver.read(0, BytesMut::zeroed(65536)).await.expect("read");
            if misses(&driver) > 0 {
                break;
            }
        }
        assert_eq!(misses(&driver), 1, "a guest read counts");
    }
}
