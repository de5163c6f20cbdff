//! The I/O engine: disk system calls issued off the async runtime.
//!
//! ```text
//!  async driver ──submit(job owning fd + buffers)──▶ channel ──▶ worker threads ──▶ preadv/pwritev…
//!        ▲                                                              │
//!        └──────────────── oneshot (buffers handed back) ◀─────────────┘
//! ```
//!
//! Every job owns its file descriptor (`Arc<OwnedFd>`) and its buffers until the system call
//! returns, so a caller that drops its future leaves nothing dangling: the worker finishes, the
//! reply is discarded, the buffers are freed. [`IoEngine`] has two implementations: the
//! [`ThreadPoolEngine`] drawn above (QEMU's `aio=threads`) and the [`UringEngine`] (io_uring,
//! the default; see its module), measured against each other in the README's Performance
//! section.
//!
//! One shortcut ([`IoEngine::read_at_cached_first`]): a buffered read of up to 1 MiB first asks
//! the page cache on the caller's thread (`preadv2` with `RWF_NOWAIT`, which does not wait for
//! the disk). A hit costs one copy and no thread hand-off, which cuts a cached 4 KiB read's
//! latency by a third over NBD; a miss falls through to a worker for the rest. A file whose
//! reads keep missing stops asking (see [`CacheHint`]).

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use block::IoVec;

/// A shared, owned file descriptor: jobs hold a clone until their system call returns.
pub type SharedFd = Arc<OwnedFd>;

/// Where `seek_data_hole` looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    /// `SEEK_DATA`: the next offset holding data.
    Data,
    /// `SEEK_HOLE`: the next offset in a hole (the end of the file counts as a hole).
    Hole,
}

/// Disk system calls as async operations. `align` > 1 asks for memory aligned to it (O_DIRECT);
/// the engine bounces through an aligned buffer when the caller's is not.
#[async_trait]
pub trait IoEngine: Send + Sync + fmt::Debug {
    /// Fills all of `buf` from `offset`; bytes past the end of the file read as zero.
    async fn read_at(
        &self,
        fd: &SharedFd,
        offset: u64,
        buf: BytesMut,
        align: usize,
    ) -> io::Result<BytesMut>;
    /// Like [`IoEngine::read_at`], but a buffered read (`align` 1) of up to 1 MiB takes what the
    /// page cache holds on the caller's thread first, while `hint` says this file's reads hit.
    async fn read_at_cached_first(
        &self,
        hint: &CacheHint,
        fd: &SharedFd,
        offset: u64,
        buf: BytesMut,
        align: usize,
    ) -> io::Result<BytesMut>;
    /// Writes all of `data` at `offset`.
    async fn write_at(
        &self,
        fd: &SharedFd,
        offset: u64,
        data: IoVec,
        align: usize,
    ) -> io::Result<()>;
    /// Writes all of `data` at `offset` after every write queued on `lane` before it, one at a
    /// time and in order (see [`Lane`]).
    async fn write_at_in_order(
        &self,
        lane: &Arc<Lane>,
        fd: &SharedFd,
        offset: u64,
        data: IoVec,
        align: usize,
    ) -> io::Result<()>;
    /// `fallocate(2)` with `mode`.
    async fn fallocate(&self, fd: &SharedFd, mode: i32, offset: u64, len: u64) -> io::Result<()>;
    /// `fdatasync(2)`.
    async fn fdatasync(&self, fd: &SharedFd) -> io::Result<()>;
    /// `lseek(2)` with SEEK_DATA / SEEK_HOLE; `None` when there is no such offset (ENXIO).
    async fn seek_data_hole(
        &self,
        fd: &SharedFd,
        offset: u64,
        what: Seek,
    ) -> io::Result<Option<u64>>;
    /// `copy_file_range(2)` of up to `len` bytes; returns how many were copied.
    async fn copy_range(
        &self,
        src: &SharedFd,
        src_off: u64,
        dst: &SharedFd,
        dst_off: u64,
        len: u64,
    ) -> io::Result<u64>;
    /// `ftruncate(2)`.
    async fn truncate(&self, fd: &SharedFd, len: u64) -> io::Result<()>;
}

mod uring;
pub use uring::UringEngine;

/// Requests either engine has been given, process-wide: the daemon gives memory back to the
/// system once this stops moving (see `daemon::server`).
static ACTIVITY: AtomicU64 = AtomicU64::new(0);

/// How many requests the engines have been given so far.
pub fn activity() -> u64 {
    ACTIVITY.load(Ordering::Relaxed)
}

fn count_request() {
    ACTIVITY.fetch_add(1, Ordering::Relaxed);
}

type Job = Box<dyn FnOnce() + Send>;

/// A first-come-first-served queue of system calls that must not overlap, such as buffered
/// writes to one file: the kernel serialises those on the inode lock anyway, but unfairly (a
/// thread that just released the lock can take it again ahead of sleeping waiters, and a writer
/// throttled for dirty pages sleeps holding it), which gives a few requests a long tail. One
/// worker at a time drains a lane, handing each job straight to the next without a round trip
/// through the runtime.
#[derive(Default)]
pub struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    jobs: VecDeque<Job>,
    /// A worker is draining the lane.
    draining: bool,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drain(&self) {
        loop {
            let job = {
                let mut st = self.lock();
                match st.jobs.pop_front() {
                    Some(job) => job,
                    None => {
                        st.draining = false;
                        return;
                    }
                }
            };
            job();
        }
    }
}

impl fmt::Debug for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("Lane")
            .field("queued", &st.jobs.len())
            .field("draining", &st.draining)
            .finish()
    }
}

/// A pool of worker threads running blocking system calls. Threads are started on demand, up to
/// a maximum (QEMU's thread pool has the same shape: 64 threads at most). Idle workers sleep on
/// a condition variable: no spinning, which matters on small hosts where the runtime and the
/// workers share two cores.
pub struct ThreadPoolEngine {
    queue: Arc<Queue>,
    max_threads: usize,
}

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// Background jobs ([`block::io_class`]): a worker takes one only when `jobs` is empty.
    background: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    /// Workers started so far.
    started: usize,
    /// The engine is gone: workers exit once the queue is empty.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn worker(&self) {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front().or_else(|| st.background.pop_front()) {
                drop(st);
                job();
                st = self.lock();
            } else if st.closed {
                st.started -= 1;
                return;
            } else {
                st.idle += 1;
                st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
                st.idle -= 1;
            }
        }
    }
}

impl fmt::Debug for ThreadPoolEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadPoolEngine")
            .field("started", &self.queue.lock().started)
            .field("max_threads", &self.max_threads)
            .finish()
    }
}

impl Drop for ThreadPoolEngine {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

impl ThreadPoolEngine {
    /// A pool that starts at most `max_threads` workers.
    pub fn new(max_threads: usize) -> Self {
        Self {
            queue: Arc::default(),
            max_threads: max_threads.max(1),
        }
    }

    /// The process-wide engine: at most 64 workers, as QEMU's thread pool.
    pub fn global() -> Arc<ThreadPoolEngine> {
        static GLOBAL: OnceLock<Arc<ThreadPoolEngine>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Arc::new(ThreadPoolEngine::new(64)))
            .clone()
    }

    /// Queues `job`, waking an idle worker or starting one when every worker is busy.
    fn submit(&self, job: Job) -> io::Result<()> {
        count_request();
        let background = block::io_class::is_background();
        let mut st = self.queue.lock();
        if background {
            st.background.push_back(job);
        } else {
            st.jobs.push_back(job);
        }
        if st.idle > 0 {
            drop(st);
            self.queue.ready.notify_one();
            return Ok(());
        }
        if st.started >= self.max_threads {
            return Ok(()); // a busy worker takes it when done
        }
        st.started += 1;
        drop(st);
        let queue = self.queue.clone();
        let spawned = std::thread::Builder::new()
            .name("blockjob-io".into())
            .spawn(move || queue.worker());
        if let Err(e) = spawned {
            let mut st = self.queue.lock();
            st.started -= 1;
            if st.started == 0 {
                // Nobody will run the queued jobs: fail them (their reply channels drop).
                st.jobs.clear();
                st.background.clear();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Runs `f` on a worker and returns its result.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (job, wait) = with_reply(f);
        self.submit(job)?;
        wait_reply(wait).await
    }

    /// Fills `buf` from `offset` on a worker, but for its first `done` bytes, already in place
    /// (only buffered reads, which never bounce, come with some done).
    async fn read_from(
        &self,
        fd: &SharedFd,
        offset: u64,
        mut buf: BytesMut,
        align: usize,
        done: usize,
    ) -> io::Result<BytesMut> {
        debug_assert!(done == 0 || align <= 1);
        let fd = fd.clone();
        self.run(move || {
            if needs_bounce(buf.as_ptr(), align) {
                let mut bounce = AlignedBuf::new(buf.len(), align);
                pread_full(fd.as_raw_fd(), bounce.as_mut_slice(), offset)?;
                buf.copy_from_slice(bounce.as_mut_slice());
            } else {
                pread_full(fd.as_raw_fd(), &mut buf[done..], offset + done as u64)?;
            }
            Ok(buf)
        })
        .await
    }

    /// Runs `f` on `lane` after the jobs queued there before it and returns its result.
    async fn run_in_lane<T: Send + 'static>(
        &self,
        lane: &Arc<Lane>,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (job, wait) = with_reply(f);
        let start = {
            let mut st = lane.lock();
            st.jobs.push_back(job);
            !std::mem::replace(&mut st.draining, true)
        };
        if start {
            let drainer = lane.clone();
            if let Err(e) = self.submit(Box::new(move || drainer.drain())) {
                let mut st = lane.lock();
                st.draining = false;
                st.jobs.clear(); // their reply channels drop: "I/O worker vanished"
                return Err(e);
            }
        }
        wait_reply(wait).await
    }
}

#[async_trait]
impl IoEngine for ThreadPoolEngine {
    async fn read_at(
        &self,
        fd: &SharedFd,
        offset: u64,
        buf: BytesMut,
        align: usize,
    ) -> io::Result<BytesMut> {
        self.read_from(fd, offset, buf, align, 0).await
    }

    async fn read_at_cached_first(
        &self,
        hint: &CacheHint,
        fd: &SharedFd,
        offset: u64,
        mut buf: BytesMut,
        align: usize,
    ) -> io::Result<BytesMut> {
        let mut cached = 0;
        if align <= 1 && buf.len() <= INLINE_READ_MAX && hint.should_try() {
            cached = pread_cached(fd.as_raw_fd(), &mut buf, offset);
            hint.record(cached == buf.len());
            if cached == buf.len() {
                return Ok(buf);
            }
        }
        self.read_from(fd, offset, buf, align, cached).await
    }

    async fn write_at(
        &self,
        fd: &SharedFd,
        offset: u64,
        data: IoVec,
        align: usize,
    ) -> io::Result<()> {
        let fd = fd.clone();
        self.run(move || write_all(&fd, offset, &data, align)).await
    }

    async fn write_at_in_order(
        &self,
        lane: &Arc<Lane>,
        fd: &SharedFd,
        offset: u64,
        data: IoVec,
        align: usize,
    ) -> io::Result<()> {
        let fd = fd.clone();
        self.run_in_lane(lane, move || write_all(&fd, offset, &data, align))
            .await
    }

    async fn fallocate(&self, fd: &SharedFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let fd = fd.clone();
        self.run(move || {
            // SAFETY: plain syscall on a descriptor we own; no memory is passed.
            let r = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) };
            cvt(r as isize).map(drop)
        })
        .await
    }

    async fn fdatasync(&self, fd: &SharedFd) -> io::Result<()> {
        let fd = fd.clone();
        self.run(move || {
            // SAFETY: plain syscall on a descriptor we own.
            let r = unsafe { libc::fdatasync(fd.as_raw_fd()) };
            cvt(r as isize).map(drop)
        })
        .await
    }

    async fn seek_data_hole(
        &self,
        fd: &SharedFd,
        offset: u64,
        what: Seek,
    ) -> io::Result<Option<u64>> {
        let fd = fd.clone();
        self.run(move || seek_data_hole(fd.as_raw_fd(), offset, what))
            .await
    }

    async fn copy_range(
        &self,
        src: &SharedFd,
        src_off: u64,
        dst: &SharedFd,
        dst_off: u64,
        len: u64,
    ) -> io::Result<u64> {
        let (src, dst) = (src.clone(), dst.clone());
        self.run(move || {
            let (mut off_in, mut off_out) = (src_off as i64, dst_off as i64);
            // SAFETY: the offsets are valid locals; the descriptors are owned by this job.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    len as usize,
                    0,
                )
            };
            cvt(n).map(|n| n as u64)
        })
        .await
    }

    async fn truncate(&self, fd: &SharedFd, len: u64) -> io::Result<()> {
        let fd = fd.clone();
        self.run(move || {
            // SAFETY: plain syscall on a descriptor we own.
            let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) };
            cvt(r as isize).map(drop)
        })
        .await
    }
}

/// `f` as a job that sends its result back, and where the result arrives.
fn with_reply<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> (Job, oneshot::Receiver<io::Result<T>>) {
    let (reply, wait) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = reply.send(f());
    });
    (job, wait)
}

/// The result of a job from [`with_reply`]; a job dropped unrun is an error.
async fn wait_reply<T>(wait: oneshot::Receiver<io::Result<T>>) -> io::Result<T> {
    wait.await
        .map_err(|_| io::Error::other("I/O worker vanished"))?
}

/// `lseek` for data or holes, synchronously. ENXIO (nothing further) becomes `None`.
pub fn seek_data_hole(fd: RawFd, offset: u64, what: Seek) -> io::Result<Option<u64>> {
    let whence = match what {
        Seek::Data => libc::SEEK_DATA,
        Seek::Hole => libc::SEEK_HOLE,
    };
    // SAFETY: plain syscall on a caller-owned descriptor.
    let r = unsafe { libc::lseek(fd, offset as i64, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// Writes all of `data` at `offset`, through an aligned bounce buffer when `align` asks for
/// alignment the caller's buffers lack.
fn write_all(fd: &SharedFd, offset: u64, data: &IoVec, align: usize) -> io::Result<()> {
    match write_bounce(data, align) {
        Some(bounce) => pwrite_full(fd.as_raw_fd(), &[bounce.as_slice()], offset),
        None => {
            let parts: Vec<&[u8]> = data.parts().iter().map(Bytes::as_ref).collect();
            pwrite_full(fd.as_raw_fd(), &parts, offset)
        }
    }
}

/// `data` copied into one aligned buffer when `align` asks for alignment (of address or
/// length) some part lacks; `None` when the parts can be written as they are.
fn write_bounce(data: &IoVec, align: usize) -> Option<AlignedBuf> {
    let misaligned = data
        .parts()
        .iter()
        .any(|p| needs_bounce(p.as_ptr(), align) || (align > 1 && p.len() % align != 0));
    if !misaligned {
        return None;
    }
    let mut bounce = AlignedBuf::new(data.len(), align);
    let mut at = 0;
    for part in data.parts() {
        bounce.as_mut_slice()[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    Some(bounce)
}

fn cvt(r: isize) -> io::Result<isize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn needs_bounce(ptr: *const u8, align: usize) -> bool {
    align > 1 && (ptr as usize) % align != 0
}

/// Reads up to this many bytes on the caller's thread when the page cache holds them all.
const INLINE_READ_MAX: usize = 1 << 20;

/// Whether a file's recent reads were found whole in the page cache. Reads ask the cache on the
/// caller's thread while they keep hitting; after [`CacheHint::MISS_RUN`] misses in a row only
/// one read in [`CacheHint::PROBE_EVERY`] asks, until one hits. A miss is not free: the kernel
/// starts its readahead on the asking thread, which is the runtime's, and asking on every read
/// of a cold image lengthened its 4 KiB random-read p99 by ~15%.
#[derive(Debug, Default)]
pub struct CacheHint {
    misses: AtomicU32,
    skipped: AtomicU32,
}

impl CacheHint {
    /// Misses in a row after which reads mostly stop asking the cache.
    pub const MISS_RUN: u32 = 4;
    /// While they have stopped, one read in this many still asks.
    pub const PROBE_EVERY: u32 = 32;

    fn should_try(&self) -> bool {
        self.misses.load(Ordering::Relaxed) < Self::MISS_RUN
            || self.skipped.fetch_add(1, Ordering::Relaxed) % Self::PROBE_EVERY
                == Self::PROBE_EVERY - 1
    }

    /// Misses in a row so far (at most [`CacheHint::MISS_RUN`]).
    pub fn misses(&self) -> u32 {
        self.misses.load(Ordering::Relaxed)
    }

    fn record(&self, hit: bool) {
        let misses = self.misses.load(Ordering::Relaxed);
        if hit {
            if misses != 0 {
                self.misses.store(0, Ordering::Relaxed);
            }
        } else if misses < Self::MISS_RUN {
            self.misses.store(misses + 1, Ordering::Relaxed);
        }
    }
}

/// Reads what the page cache already holds of `buf`'s range without waiting for the disk or a
/// lock (`preadv2` with `RWF_NOWAIT`) and returns how many bytes are in place; bytes past the
/// end of the file count as read, as zeros. Any error ends it early: the caller reads the rest
/// on a worker, which reports real errors.
fn pread_cached(fd: RawFd, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let at = offset + done as u64;
        // SAFETY: `iov` describes `rest`, a valid, exclusively borrowed buffer of its length.
        let n = unsafe { libc::preadv2(fd, &iov, 1, at as i64, libc::RWF_NOWAIT) };
        if n < 0 {
            return done;
        }
        if n == 0 {
            rest.fill(0);
            return buf.len();
        }
        done += n as usize;
    }
    done
}

fn pread_full(fd: RawFd, buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, exclusively borrowed buffer of `rest.len()` bytes.
        let n = retry_interrupted(|| unsafe {
            libc::pread(fd, rest.as_mut_ptr().cast(), rest.len(), offset as i64)
        })?;
        if n == 0 {
            rest.fill(0);
            break;
        }
        done += n;
        offset += n as u64;
    }
    Ok(())
}

/// Runs a system call returning a byte count, again while a signal interrupts it.
fn retry_interrupted(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn pwrite_full(fd: RawFd, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut _,
            iov_len: p.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let count = (iov.len() - first).min(IOV_MAX);
        // SAFETY: every iovec points into a buffer borrowed for the duration of this call.
        let n = retry_interrupted(|| unsafe {
            libc::pwritev(fd, iov[first..].as_ptr(), count as i32, offset as i64)
        })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        let mut n = n;
        offset += n as u64;
        while n > 0 && first < iov.len() {
            let len = iov[first].iov_len;
            if n >= len {
                n -= len;
                first += 1;
            } else {
                // SAFETY: advancing inside the same buffer by fewer bytes than its length.
                iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(n) }.cast();
                iov[first].iov_len = len - n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1).next_power_of_two())
            .unwrap_or_else(|_| Layout::new::<u8>());
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() initialised (zeroed) bytes, uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: as above, shared borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::fs::OpenOptions;

    pub(in crate::engine) fn fd(path: &std::path::Path) -> SharedFd {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path);
        Arc::new(OwnedFd::from(f.expect("open temp file")))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lane_runs_its_jobs_one_at_a_time_in_order_beside_other_jobs() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::Duration;
        let engine = Arc::new(ThreadPoolEngine::new(8));
        let lane = Arc::new(Lane::default());
        let active = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (open_gate, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let mut waits = Vec::new();
        for i in 0..24 {
            let (engine, lane) = (engine.clone(), lane.clone());
            let (active, order, gate) = (active.clone(), order.clone(), gate.clone());
            // The job is queued when the future is first polled: poll each one once, in order.
            let mut fut = Box::pin(async move {
                engine
                    .run_in_lane(&lane, move || {
                        let overlapping = active.fetch_add(1, Ordering::SeqCst);
                        if i == 0 {
                            // Held until a job outside the lane has run.
                            let gate = gate.lock().expect("gate");
                            gate.recv_timeout(Duration::from_secs(10))
                                .map_err(|_| io::Error::other("side job held up by the lane"))?;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                        active.fetch_sub(1, Ordering::SeqCst);
                        order.lock().expect("order").push(i);
                        Ok(overlapping)
                    })
                    .await
            });
            assert!(futures_poll_once(fut.as_mut()).is_none());
            waits.push(fut);
        }
        // A job outside the lane runs while the lane is busy.
        engine.run(|| Ok(())).await.expect("side job");
        open_gate.send(()).expect("gate");
        for w in waits {
            assert_eq!(w.await.expect("lane job"), 0, "lane jobs overlapped");
        }
        assert_eq!(*order.lock().expect("order"), (0..24).collect::<Vec<_>>());
        // Once drained, the lane takes new work (its drainer may still be finishing).
        let late = engine.run_in_lane(&lane, || Ok(7)).await.expect("late job");
        assert_eq!(late, 7);
    }

    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match f.poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn write_read_round_trip_with_bounce() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = fd(&dir.path().join("f"));
        round_trip_with_bounce(&ThreadPoolEngine::new(4), &fd).await;
        let data = ThreadPoolEngine::new(1)
            .seek_data_hole(&fd, 0, Seek::Data)
            .await
            .expect("seek");
        assert!(data.is_some());
    }

    /// A write that bounces for a 4 KiB alignment, read back across the end of the file.
    pub(in crate::engine) async fn round_trip_with_bounce(engine: &dyn IoEngine, fd: &SharedFd) {
        let mut v = IoVec::new();
        v.push(Bytes::from(vec![1u8; 3000]));
        v.push(Bytes::from(vec![2u8; 1096]));
        engine.write_at(fd, 4096, v, 4096).await.expect("write");
        let buf = engine
            .read_at(fd, 4000, BytesMut::zeroed(8192), 1)
            .await
            .expect("read");
        assert!(buf[..96].iter().all(|&b| b == 0));
        assert!(buf[96..3096].iter().all(|&b| b == 1));
        assert!(buf[3096..4192].iter().all(|&b| b == 2));
        assert!(
            buf[4192..].iter().all(|&b| b == 0),
            "past EOF reads as zero"
        );
    }

    #[tokio::test]
    async fn reads_from_the_cache_first_and_on_workers_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = fd(&dir.path().join("f"));
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        let engine = ThreadPoolEngine::new(2);
        // Page by page, so that the page cache holds small folios that can be dropped apart.
        for (i, page) in data.chunks(4096).enumerate() {
            let mut v = IoVec::new();
            v.push(Bytes::copy_from_slice(page));
            engine
                .write_at(&fd, i as u64 * 4096, v, 1)
                .await
                .expect("write");
        }
        engine.fdatasync(&fd).await.expect("sync");
        // Drop the cache of the last two pages where the kernel allows it, so that a read
        // finds only its start cached and a worker reads the rest.
        // SAFETY: plain advice on a valid descriptor; no memory is involved.
        unsafe { libc::posix_fadvise(fd.as_raw_fd(), 4096, 0, libc::POSIX_FADV_DONTNEED) };
        let mut want = data.clone();
        want.resize(5 * 4096, 0);
        let cached = pread_cached(fd.as_raw_fd(), &mut [0u8; 8192], 100);
        assert!(cached <= 8192);
        let hint = CacheHint::default();
        for (offset, len) in [(0, 4096), (100, 8192), (4096, 4096), (3 * 4096, 8192)] {
            let want = &want[offset..offset + len];
            // The cache first, before the worker's read brings the dropped pages back.
            let buf = engine
                .read_at_cached_first(&hint, &fd, offset as u64, BytesMut::zeroed(len), 1)
                .await
                .expect("read");
            assert_eq!(&buf[..], want, "cache first {offset}+{len}");
            let buf = engine
                .read_at(&fd, offset as u64, BytesMut::zeroed(len), 1)
                .await
                .expect("read");
            assert_eq!(&buf[..], want, "worker {offset}+{len}");
        }
        // A cached read wholly past the end of the file is all zeros, at once.
        let mut past = [7u8; 512];
        assert_eq!(pread_cached(fd.as_raw_fd(), &mut past, 1 << 20), 512);
        assert!(past.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_file_whose_reads_keep_missing_mostly_stops_asking_the_cache() {
        let hint = CacheHint::default();
        for _ in 0..CacheHint::MISS_RUN {
            assert!(hint.should_try());
            hint.record(false);
        }
        let asked = (0..10 * CacheHint::PROBE_EVERY)
            .filter(|_| hint.should_try())
            .count();
        assert_eq!(asked, 10);
        hint.record(true);
        assert!((0..100).all(|_| hint.should_try()), "a hit asks again");
    }

    /// Background jobs wait while guest jobs are queued: a guest request is never queued
    /// behind a job's copy.
    #[tokio::test]
    async fn guest_jobs_run_before_queued_background_jobs() {
        let engine = Arc::new(ThreadPoolEngine::new(1));
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let order = Arc::new(Mutex::new(Vec::new()));
        let busy = {
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .run(move || {
                        let _ = blocked.recv();
                        Ok(())
                    })
                    .await
            })
        };
        while engine.queue.lock().idle > 0 || engine.queue.lock().started == 0 {
            tokio::task::yield_now().await;
        }
        let job = |name: &'static str| {
            let engine = engine.clone();
            let order = order.clone();
            async move {
                engine
                    .run(move || {
                        order.lock().unwrap_or_else(|p| p.into_inner()).push(name);
                        Ok(())
                    })
                    .await
            }
        };
        let copy = tokio::spawn(block::io_class::background(job("background")));
        while engine.queue.lock().background.is_empty() {
            tokio::task::yield_now().await;
        }
        let guest = tokio::spawn(job("guest"));
        while engine.queue.lock().jobs.is_empty() {
            tokio::task::yield_now().await;
        }
        release.send(()).expect("release");
        for t in [busy, copy, guest] {
            t.await.expect("join").expect("job");
        }
        let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(order, ["guest", "background"]);
    }

    #[tokio::test]
    async fn dropped_future_is_harmless() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = fd(&dir.path().join("f"));
        let engine = Arc::new(ThreadPoolEngine::new(2));
        for _ in 0..64 {
            let fut = engine.read_at(&fd, 0, BytesMut::zeroed(1 << 20), 1);
            drop(fut);
            let e = engine.clone();
            let f = fd.clone();
            let h = tokio::spawn(async move { e.read_at(&f, 0, BytesMut::zeroed(65536), 1).await });
            h.abort();
        }
        engine.fdatasync(&fd).await.expect("engine still works");
    }
}
