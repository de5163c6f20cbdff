//! The io_uring engine: reads, writes, flushes and fallocate go to the kernel from the calling
//! thread, with no hand-off to a worker, and their completions are reaped by a task on the
//! runtime that owns the ring (the ring's descriptor is polled by tokio's reactor), so a
//! request costs one system call to submit and one wake-up when it completes.
//!
//! ```text
//!  async driver ──push SQE + io_uring_enter──▶ kernel ──CQE──▶ ring fd readable
//!        ▲                                                         │
//!        └─── slot: result + buffers handed back ◀── reaper task ◀─┘  (or the caller itself,
//!                                                                   when the CQE is already there)
//! ```
//!
//! Every operation's buffers and descriptor live in its slot, owned by the ring, until its
//! completion has been reaped: a caller that drops its future marks the slot abandoned and the
//! reaper frees it when the kernel is done with the memory. The ring is not freed while
//! anything is in flight (its drop waits), so the kernel never writes into freed memory.
//! What io_uring has no operation for here (`lseek`, `copy_file_range`, `ftruncate`) goes to
//! the thread pool.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;

use block::IoVec;

use super::{
    needs_bounce, write_bounce, AlignedBuf, CacheHint, IoEngine, Lane, Seek, SharedFd,
    ThreadPoolEngine,
};

/// Entries in the submission queue. Submissions are pushed and entered one at a time, so the
/// queue itself never holds more than a few; the kernel keeps completions beyond the completion
/// queue's size (IORING_FEAT_NODROP) rather than lose them.
const ENTRIES: u32 = 256;

/// `user_data` of the no-op that wakes the reaper when the engine is dropped.
const WAKE: u64 = u64::MAX;

/// An [`IoEngine`] over one io_uring instance (see the module docs).
pub struct UringEngine {
    ring: Arc<Ring>,
    pool: Arc<ThreadPoolEngine>,
}

impl fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringEngine")
            .field("in_flight", &self.ring.ops().in_flight)
            .finish()
    }
}

struct Ring {
    uring: IoUring,
    /// One pusher at a time on the submission queue.
    sq: Mutex<()>,
    /// The completion queue is read only under this lock, which also guards the slots.
    ops: Mutex<Ops>,
    /// The engine is gone: the reaper stops once nothing is in flight.
    closed: AtomicBool,
}

#[derive(Default)]
struct Ops {
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
}

#[derive(Default)]
enum Slot {
    #[default]
    Free,
    InFlight {
        keep: Keep,
        waker: Option<Waker>,
        abandoned: bool,
    },
    Done {
        keep: Keep,
        res: i32,
    },
}

/// What an operation's submission entry points at, held until its completion is reaped.
struct Keep {
    _fd: SharedFd,
    bufs: Bufs,
}

enum Bufs {
    None,
    Read(BytesMut),
    Bounce(AlignedBuf),
    Write { data: IoVec, _iovs: IoVecs },
}

/// The `iovec` array of a vectored write.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the iovecs point into the `IoVec` (reference-counted, immutable `Bytes`) kept beside
// them in the same `Bufs::Write`; nothing reads or writes through them but the kernel.
unsafe impl Send for IoVecs {}

impl Ring {
    fn ops(&self) -> MutexGuard<'_, Ops> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves every completion the kernel has posted into its slot; returns the wakers to call
    /// once the lock is released.
    fn reap(&self, ops: &mut Ops) -> Vec<Waker> {
        let mut wake = Vec::new();
        // SAFETY: the completion queue is only read under the `ops` lock, which the caller
        // holds, so there is one consumer at a time.
        let cq = unsafe { self.uring.completion_shared() };
        for cqe in cq {
            let Ok(i) = usize::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(slot) = ops.slots.get_mut(i) else {
                continue; // the wake-up no-op
            };
            match std::mem::take(slot) {
                Slot::InFlight {
                    abandoned: true, ..
                } => {
                    ops.free.push(i);
                    ops.in_flight -= 1;
                }
                Slot::InFlight { keep, waker, .. } => {
                    *slot = Slot::Done {
                        keep,
                        res: cqe.result(),
                    };
                    ops.in_flight -= 1;
                    wake.extend(waker);
                }
                other => *slot = other,
            }
        }
        wake
    }

    fn reap_and_wake(&self) {
        let wake = {
            let mut ops = self.ops();
            self.reap(&mut ops)
        };
        wake.into_iter().for_each(Waker::wake);
    }

    /// Pushes `entry` and enters the kernel, `keep` held in a slot until it completes.
    fn submit(self: &Arc<Self>, entry: squeue::Entry, keep: Keep) -> io::Result<Op> {
        super::count_request();
        let id = {
            let mut ops = self.ops();
            let slot = Slot::InFlight {
                keep,
                waker: None,
                abandoned: false,
            };
            let id = match ops.free.pop() {
                Some(i) => {
                    ops.slots[i] = slot;
                    i
                }
                None => {
                    ops.slots.push(slot);
                    ops.slots.len() - 1
                }
            };
            ops.in_flight += 1;
            id
        };
        let entry = entry.user_data(id as u64);
        if let Err((e, queued)) = self.push(&entry) {
            let mut ops = self.ops();
            if queued {
                // The kernel may still take the entry with a later enter: its buffers stay
                // until then, and the reaper frees the slot (or has finished it already).
                match &mut ops.slots[id] {
                    Slot::InFlight { abandoned, .. } => *abandoned = true,
                    Slot::Done { .. } => {
                        ops.slots[id] = Slot::Free;
                        ops.free.push(id);
                    }
                    Slot::Free => {}
                }
            } else {
                ops.slots[id] = Slot::Free;
                ops.free.push(id);
                ops.in_flight -= 1;
            }
            return Err(e);
        }
        Ok(Op {
            ring: self.clone(),
            id,
            done: false,
        })
    }

    /// Puts `entry` on the submission queue and submits it. Once pushed, the entry belongs to
    /// the kernel even if entering fails (EBUSY while completions overflow): the next enter
    /// takes it along, and the reaper enters again on every wake-up. On failure, says whether
    /// the entry is on the queue nonetheless.
    fn push(&self, entry: &squeue::Entry) -> Result<(), (io::Error, bool)> {
        let _one = self.sq.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the submission queue is only written under the `sq` lock, held here.
        let mut sq = unsafe { self.uring.submission_shared() };
        // SAFETY: every pointer in the entry refers to memory kept in its slot until the
        // completion is reaped (see `Keep`).
        while unsafe { sq.push(entry) }.is_err() {
            sq.sync();
            drop(sq);
            self.enter().map_err(|e| (e, false))?;
            // SAFETY: as above; the previous handle was dropped.
            sq = unsafe { self.uring.submission_shared() };
        }
        sq.sync();
        drop(sq);
        match self.enter() {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => Ok(()),
            Err(e) => Err((e, true)),
        }
    }

    fn enter(&self) -> io::Result<()> {
        loop {
            match self.uring.submit() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map(drop),
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers kept in the slots: wait for it.
        loop {
            let left = {
                let mut ops = self.ops();
                drop(self.reap(&mut ops));
                ops.in_flight
            };
            if left == 0 {
                return;
            }
            match self.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {}
                Err(_) => {
                    // The ring is broken and will not say when the kernel is done: leak the
                    // buffers rather than free memory it might still write.
                    let slots = std::mem::take(&mut self.ops().slots);
                    std::mem::forget(slots);
                    return;
                }
            }
        }
    }
}

/// One submitted operation: resolves to its result (a byte count or `-errno`) and its buffers.
struct Op {
    ring: Arc<Ring>,
    id: usize,
    done: bool,
}

impl Future for Op {
    type Output = io::Result<(i32, Keep)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let ring = self.ring.clone();
        let mut ops = ring.ops();
        // The completion may already be posted (a page-cache hit completes inside the submit):
        // take it here rather than wait for the reaper.
        let wake = ring.reap(&mut ops);
        let id = self.id;
        let out = match std::mem::take(&mut ops.slots[id]) {
            Slot::Done { keep, res } => {
                ops.free.push(id);
                self.done = true;
                Poll::Ready(Ok((res, keep)))
            }
            Slot::InFlight { keep, .. } => {
                ops.slots[id] = Slot::InFlight {
                    keep,
                    waker: Some(cx.waker().clone()),
                    abandoned: false,
                };
                Poll::Pending
            }
            // Only the future frees its slot; this would be a bookkeeping bug.
            Slot::Free => Poll::Ready(Err(io::Error::other("io_uring operation lost"))),
        };
        drop(ops);
        wake.into_iter().for_each(Waker::wake);
        out
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut ops = self.ring.ops();
        match &mut ops.slots[self.id] {
            Slot::InFlight {
                abandoned, waker, ..
            } => {
                *abandoned = true;
                *waker = None;
            }
            Slot::Done { .. } => {
                ops.slots[self.id] = Slot::Free;
                ops.free.push(self.id);
            }
            Slot::Free => {}
        }
    }
}

/// The ring's descriptor, duplicated for tokio's reactor.
struct RingFd(OwnedFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl UringEngine {
    /// A ring whose completions are reaped on the current tokio runtime. Fails where there is
    /// no runtime (or it has no I/O driver) or the kernel refuses io_uring (old kernels,
    /// seccomp, `kernel.io_uring_disabled`); callers fall back to the thread pool.
    pub fn new(pool: Arc<ThreadPoolEngine>) -> io::Result<UringEngine> {
        let handle = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let uring = IoUring::new(ENTRIES)?;
        // SAFETY: the ring's descriptor is open for as long as `uring`; the duplicate is ours.
        let dup = unsafe { BorrowedFd::borrow_raw(uring.as_raw_fd()) }.try_clone_to_owned()?;
        let ring = Arc::new(Ring {
            uring,
            sq: Mutex::new(()),
            ops: Mutex::default(),
            closed: AtomicBool::new(false),
        });
        let watch = {
            let _enter = handle.enter();
            // SAFETY: `RingFd` owns the descriptor and hands out the same one until dropped.
            unsafe { AsyncFd::register_with_interest(RingFd(dup), tokio::io::Interest::READABLE) }?
        };
        handle.spawn(reaper(ring.clone(), watch));
        Ok(UringEngine { ring, pool })
    }

    async fn op(&self, entry: squeue::Entry, fd: &SharedFd, bufs: Bufs) -> io::Result<(i32, Bufs)> {
        let keep = Keep {
            _fd: fd.clone(),
            bufs,
        };
        let (res, keep) = self.ring.submit(entry, keep)?.await?;
        Ok((res, keep.bufs))
    }

    /// Reads into `buf` (pointer-aligned for O_DIRECT), all of it: a short read goes on from
    /// where it stopped, and the end of the file reads as zeroes.
    async fn read_full(&self, fd: &SharedFd, offset: u64, buf: Bufs) -> io::Result<Bufs> {
        let mut bufs = buf;
        let mut done = 0usize;
        loop {
            let (ptr, len) = match &mut bufs {
                Bufs::Read(b) => (b.as_mut_ptr(), b.len()),
                Bufs::Bounce(b) => {
                    let s = b.as_mut_slice();
                    (s.as_mut_ptr(), s.len())
                }
                _ => return Err(io::Error::other("read without a buffer")),
            };
            if done >= len {
                return Ok(bufs);
            }
            let rest = (len - done).min(u32::MAX as usize & !4095);
            // SAFETY: `done < len`, so the pointer stays inside the buffer kept in the slot.
            let at = unsafe { ptr.add(done) };
            let entry = opcode::Read::new(types::Fd(fd.as_raw_fd()), at, rest as u32)
                .offset(offset + done as u64)
                .build();
            let (res, back) = self.op(entry, fd, bufs).await?;
            bufs = back;
            match res {
                n if n > 0 => done += n as usize,
                0 => {
                    zero_from(&mut bufs, done);
                    return Ok(bufs);
                }
                e if -e == libc::EINTR || -e == libc::EAGAIN => {}
                e => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
    }

    async fn write_full(
        &self,
        fd: &SharedFd,
        offset: u64,
        data: IoVec,
        align: usize,
    ) -> io::Result<()> {
        let data = match write_bounce(&data, align) {
            Some(bounce) => {
                let mut v = IoVec::new();
                v.push(Bytes::from_owner(bounce));
                v
            }
            None => data,
        };
        let total = data.len();
        let mut done = 0usize;
        let mut data = data;
        while done < total {
            let iovs = IoVecs(iovecs_from(&data, done));
            let count = iovs.0.len().min(1024);
            let entry =
                opcode::Writev::new(types::Fd(fd.as_raw_fd()), iovs.0.as_ptr(), count as u32)
                    .offset(offset + done as u64)
                    .build();
            let (res, back) = self
                .op(entry, fd, Bufs::Write { data, _iovs: iovs })
                .await?;
            let Bufs::Write { data: d, .. } = back else {
                return Err(io::Error::other("write buffers lost"));
            };
            data = d;
            match res {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write wrote nothing",
                    ))
                }
                e if -e == libc::EINTR || -e == libc::EAGAIN => {}
                e => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
        Ok(())
    }

    /// An operation without buffers (fsync, fallocate), its `-errno` as an error.
    async fn simple(&self, fd: &SharedFd, entry: squeue::Entry) -> io::Result<()> {
        loop {
            let (res, _) = self.op(entry.clone(), fd, Bufs::None).await?;
            match res {
                r if r >= 0 => return Ok(()),
                e if -e == libc::EINTR || -e == libc::EAGAIN => {}
                e => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.ring.closed.store(true, Ordering::Release);
        // Wake the reaper so that it sees `closed`.
        let _ = self.ring.push(&opcode::Nop::new().build().user_data(WAKE));
    }
}

/// Reaps completions whenever the ring's descriptor turns readable, until the engine is gone
/// and nothing is in flight.
async fn reaper(ring: Arc<Ring>, watch: AsyncFd<RingFd>) {
    loop {
        let Ok(mut ready) = watch.readable().await else {
            return;
        };
        ready.clear_ready();
        ring.reap_and_wake();
        // Entries an EBUSY left on the queue go now.
        let _ = ring.enter();
        if ring.closed.load(Ordering::Acquire) && ring.ops().in_flight == 0 {
            return;
        }
    }
}

/// The iovecs of `data` from byte `from` on.
fn iovecs_from(data: &IoVec, mut from: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(data.parts().len());
    for part in data.parts() {
        if from >= part.len() {
            from -= part.len();
            continue;
        }
        let rest = &part[from..];
        from = 0;
        if !rest.is_empty() {
            out.push(libc::iovec {
                iov_base: rest.as_ptr() as *mut _,
                iov_len: rest.len(),
            });
        }
    }
    out
}

fn zero_from(bufs: &mut Bufs, from: usize) {
    match bufs {
        Bufs::Read(b) => b[from..].fill(0),
        Bufs::Bounce(b) => b.as_mut_slice()[from..].fill(0),
        _ => {}
    }
}

#[async_trait]
impl IoEngine for UringEngine {
    async fn read_at(
        &self,
        fd: &SharedFd,
        offset: u64,
        mut buf: BytesMut,
        align: usize,
    ) -> io::Result<BytesMut> {
        if needs_bounce(buf.as_ptr(), align) {
            let bounce = AlignedBuf::new(buf.len(), align);
            let back = self.read_full(fd, offset, Bufs::Bounce(bounce)).await?;
            if let Bufs::Bounce(mut b) = back {
                let n = buf.len();
                buf.copy_from_slice(&b.as_mut_slice()[..n]);
            }
            return Ok(buf);
        }
        match self.read_full(fd, offset, Bufs::Read(buf)).await? {
            Bufs::Read(b) => Ok(b),
            _ => Err(io::Error::other("read buffer lost")),
        }
    }

    async fn read_at_cached_first(
        &self,
        _hint: &CacheHint,
        fd: &SharedFd,
        offset: u64,
        buf: BytesMut,
        align: usize,
    ) -> io::Result<BytesMut> {
        // A read the page cache holds completes inside the submit, on this thread.
        self.read_at(fd, offset, buf, align).await
    }

    async fn write_at(
        &self,
        fd: &SharedFd,
        offset: u64,
        data: IoVec,
        align: usize,
    ) -> io::Result<()> {
        self.write_full(fd, offset, data, align).await
    }

    async fn write_at_in_order(
        &self,
        _lane: &Arc<Lane>,
        fd: &SharedFd,
        offset: u64,
        data: IoVec,
        align: usize,
    ) -> io::Result<()> {
        // Buffered writes that would block are handed to the kernel's workers, which already
        // run the writes to one file one at a time, in order.
        self.write_full(fd, offset, data, align).await
    }

    async fn fallocate(&self, fd: &SharedFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let entry = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        self.simple(fd, entry).await
    }

    async fn fdatasync(&self, fd: &SharedFd) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.simple(fd, entry).await
    }

    async fn seek_data_hole(
        &self,
        fd: &SharedFd,
        offset: u64,
        what: Seek,
    ) -> io::Result<Option<u64>> {
        // io_uring has no lseek. It answers from the file's extent tree, which the kernel has in
        // memory for a file being read and written, so it runs here, as QEMU runs it in its
        // coroutine: through the pool it cost two thread hand-offs per backup chunk (block
        // status before every copy).
        super::seek_data_hole(fd.as_raw_fd(), offset, what)
    }

    async fn copy_range(
        &self,
        src: &SharedFd,
        src_off: u64,
        dst: &SharedFd,
        dst_off: u64,
        len: u64,
    ) -> io::Result<u64> {
        self.pool.copy_range(src, src_off, dst, dst_off, len).await
    }

    async fn truncate(&self, fd: &SharedFd, len: u64) -> io::Result<()> {
        self.pool.truncate(fd, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fd, round_trip_with_bounce};
    use super::*;

    fn engine() -> UringEngine {
        UringEngine::new(Arc::new(ThreadPoolEngine::new(2))).expect("io_uring on this host")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_and_reads_round_trip_through_the_ring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = fd(&dir.path().join("f"));
        let engine = engine();
        round_trip_with_bounce(&engine, &fd).await;
        // More parts than one writev takes: the rest goes in further submissions.
        let mut v = IoVec::new();
        for i in 0..3000u32 {
            v.push(Bytes::from(vec![(i % 251) as u8; 7]));
        }
        engine
            .write_at(&fd, 100_000, v, 1)
            .await
            .expect("long write");
        let buf = engine
            .read_at(&fd, 100_000, BytesMut::zeroed(21_000), 1)
            .await
            .expect("read back");
        for (i, chunk) in buf.chunks(7).enumerate() {
            assert!(chunk.iter().all(|&b| b == (i % 251) as u8), "part {i}");
        }
        // Many at once, from several tasks.
        let engine = Arc::new(engine);
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (engine, fd) = (engine.clone(), fd.clone());
            tasks.push(tokio::spawn(async move {
                let mut v = IoVec::new();
                v.push(Bytes::from(vec![i as u8; 4096]));
                engine.write_at(&fd, 1 << 20 | i << 12, v, 1).await?;
                engine
                    .read_at(&fd, 1 << 20 | i << 12, BytesMut::zeroed(4096), 1)
                    .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let buf = t.await.expect("task").expect("io");
            assert!(buf.iter().all(|&b| b == i as u8), "block {i}");
        }
        engine.fdatasync(&fd).await.expect("fdatasync");
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        engine
            .fallocate(&fd, punch, 1 << 20, 8192)
            .await
            .expect("punch");
        let buf = engine
            .read_at(&fd, 1 << 20, BytesMut::zeroed(12288), 1)
            .await
            .expect("read punched");
        assert!(
            buf[..8192].iter().all(|&b| b == 0),
            "punched range reads zero"
        );
        assert!(
            buf[8192..].iter().all(|&b| b == 2),
            "the next block is kept"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_operations_keep_their_buffers_until_the_kernel_is_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = fd(&dir.path().join("f"));
        let engine = engine();
        let mut v = IoVec::new();
        v.push(Bytes::from(vec![9u8; 1 << 20]));
        engine.write_at(&fd, 0, v, 1).await.expect("write");
        for _ in 0..8 {
            let mut reads: Vec<_> = (0..32u64)
                .map(|i| Box::pin(engine.read_at(&fd, i << 15, BytesMut::zeroed(1 << 15), 1)))
                .collect();
            let waker = std::task::Waker::noop();
            for r in &mut reads {
                let _ = r.as_mut().poll(&mut Context::from_waker(waker));
            }
            drop(reads); // whatever is in flight is abandoned, not freed
        }
        let buf = engine
            .read_at(&fd, 4096, BytesMut::zeroed(4096), 1)
            .await
            .expect("read after the abandoned ones");
        assert!(buf.iter().all(|&b| b == 9));
        drop(engine); // waits for anything still in flight
    }
}
