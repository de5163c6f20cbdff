use super::*;
use async_trait::async_trait;
use block::testing::MemDisk;
use block::{BlockDriver, BlockStatus, ChildRole};
use bytes::BytesMut;
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A target that is slow, and fails some writes (every `fail_every`-th, 0 = never).
#[derive(Debug)]
struct Flaky {
    inner: Arc<MemDisk>,
    delay_us: u64,
    fail_every: u64,
    writes: AtomicU64,
}

#[async_trait]
impl BlockDriver for Flaky {
    fn driver_name(&self) -> &'static str {
        "flaky"
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn writable(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if self.delay_us > 0 {
            tokio::time::sleep(Duration::from_micros(self.delay_us * (n % 7))).await;
        }
        if self.fail_every > 0 && n % self.fail_every == 0 {
            return Err(BlockError::new(
                block::ErrorKind::Io,
                "injected write error",
            ));
        }
        self.inner.write(offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn block_status(&self, _: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::data(len, None))
    }
}

struct Setup {
    source: Arc<BlockNode>,
    target_disk: Arc<MemDisk>,
    bcs: Arc<BlockCopy>,
}

fn setup(len: u64, opts: Options, delay_us: u64, fail_every: u64) -> Setup {
    let source = BlockNode::new("src", MemDisk::new(len));
    let target_disk = MemDisk::new(len);
    let target = BlockNode::new(
        "tgt",
        Arc::new(Flaky {
            inner: target_disk.clone(),
            delay_us,
            fail_every,
            writes: AtomicU64::new(0),
        }),
    );
    let bcs = BlockCopy::new(
        Child::new(ChildRole::Filtered, source.clone()),
        Child::new(ChildRole::Root, target),
        &source,
        opts,
    )
    .expect("block copy");
    bcs.with_bitmap(|b| b.set_dirty(0, len));
    Setup {
        source,
        target_disk,
        bcs,
    }
}

/// Bytes the copy reports as copied, from now on.
fn count_copied(bcs: &BlockCopy) -> Arc<AtomicU64> {
    let copied = Arc::new(AtomicU64::new(0));
    let c = copied.clone();
    bcs.set_progress(Arc::new(move |p| {
        if let Progress::Copied(n) = p {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }));
    copied
}

async fn read_all(d: &Arc<MemDisk>) -> Vec<u8> {
    d.read(0, BytesMut::zeroed(d.len() as usize))
        .await
        .expect("read")
        .to_vec()
}

/// The background copy as a job runs it: up to `workers` tasks, retrying what fails.
async fn background(bcs: &Arc<BlockCopy>, workers: usize) {
    let mut set = tokio::task::JoinSet::new();
    let mut cursor = 0;
    loop {
        while set.len() < workers {
            match bcs.copy_next(cursor, 0) {
                Some((_, end, task)) => {
                    cursor = end;
                    set.spawn(task);
                }
                None if cursor > 0 => cursor = 0,
                None => break,
            }
        }
        if set.join_next().await.is_none() {
            bcs.settled().await;
            let _ = bcs.take_error();
            if bcs.is_done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[tokio::test]
async fn background_copy_copies_everything() {
    let len = 1 << 20;
    let s = setup(len, Options::new(65536), 0, 0);
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    s.source
        .write(0, IoVec::from(pattern.clone()), WriteFlags::default())
        .await
        .expect("w");
    let copied = count_copied(&s.bcs);
    background(&s.bcs, 4).await;
    assert_eq!(read_all(&s.target_disk).await, pattern);
    assert_eq!(copied.load(Ordering::Relaxed), len, "each byte once");
    assert!(s.bcs.is_done());
}

#[tokio::test]
async fn copy_bitmap_is_an_unnamed_disabled_bitmap_of_its_owner() {
    let s = setup(1 << 20, Options::new(65536), 0, 0);
    let bitmaps = s.source.bitmaps();
    assert_eq!(bitmaps.len(), 1);
    assert!(bitmaps[0].name().is_none() && !bitmaps[0].recording());
    assert_eq!(bitmaps[0].dirty_bytes(), 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_write_waits_for_the_read_only() {
    // The target takes 50 ms per write; the guest's write must not wait for it.
    let len = 1 << 20;
    let s = setup(len, Options::new(65536), 0, 0);
    let target_disk = MemDisk::new(len);
    #[derive(Debug)]
    struct Slow(Arc<MemDisk>);
    #[async_trait]
    impl BlockDriver for Slow {
        fn driver_name(&self) -> &'static str {
            "slow"
        }
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn writable(&self) -> bool {
            true
        }
        async fn read(&self, o: u64, b: BytesMut) -> Result<BytesMut> {
            self.0.read(o, b).await
        }
        async fn write(&self, o: u64, d: IoVec, f: WriteFlags) -> Result<()> {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.0.write(o, d, f).await
        }
        async fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> Result<()> {
            self.0.write_zeroes(o, l, f).await
        }
        async fn discard(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
        async fn block_status(&self, _: u64, len: u64) -> Result<BlockStatus> {
            Ok(BlockStatus::data(len, None))
        }
    }
    let target = BlockNode::new("slow", Arc::new(Slow(target_disk.clone())));
    let bcs = BlockCopy::new(
        Child::new(ChildRole::Filtered, s.source.clone()),
        Child::new(ChildRole::Root, target),
        &s.source,
        Options::new(65536),
    )
    .expect("bcs");
    bcs.with_bitmap(|b| b.set_dirty(0, len));
    s.source
        .write(0, IoVec::from(vec![7u8; 65536]), WriteFlags::default())
        .await
        .expect("w");
    let t = std::time::Instant::now();
    bcs.protect(0, 4096).await.expect("protect");
    assert!(
        t.elapsed() < Duration::from_millis(40),
        "waited {:?}",
        t.elapsed()
    );
    s.source
        .write(0, IoVec::from(vec![9u8; 4096]), WriteFlags::default())
        .await
        .expect("w");
    // The held old data is what the point in time says, before and after it lands.
    let held = bcs.held(0, 4096);
    assert_eq!(held.len(), 1);
    assert!(held[0].1.iter().all(|&b| b == 7));
    bcs.settled().await;
    // Only the grain the write touched was copied on its path.
    assert!(read_all(&target_disk).await[..4096].iter().all(|&b| b == 7));
}

#[tokio::test]
async fn a_guest_write_copies_only_the_grains_it_touches() {
    let len = 1 << 20;
    let s = setup(len, Options::new(65536), 0, 0);
    assert_eq!(s.bcs.grain(), 4096);
    let before: Vec<u8> = (0..len).map(|i| (i % 249 + 1) as u8).collect();
    s.source
        .write(0, IoVec::from(before.clone()), WriteFlags::default())
        .await
        .expect("w");
    let copied = count_copied(&s.bcs);
    let guest = |off: u64, n: usize| {
        let (bcs, source) = (s.bcs.clone(), s.source.clone());
        async move {
            bcs.protect(off, n as u64).await.expect("protect");
            source
                .write(off, IoVec::from(vec![0xee; n]), WriteFlags::default())
                .await
                .expect("guest write");
        }
    };
    guest(3 * 4096 + 100, 10).await;
    s.bcs.settled().await;
    // The cluster left the copy bitmap and counts as copied once, as in QEMU ...
    assert_eq!(s.bcs.with_bitmap(|b| b.dirty_bytes()), Some(len - 65536));
    assert_eq!(copied.load(Ordering::Relaxed), 65536);
    assert_eq!(s.bcs.remaining(), len - 65536);
    assert!(!s.bcs.is_done());
    // ... but only its grain 3 reached the target.
    let t = read_all(&s.target_disk).await;
    assert_eq!(&t[3 * 4096..4 * 4096], &before[3 * 4096..4 * 4096]);
    assert!(t[..3 * 4096].iter().all(|&b| b == 0));
    assert!(t[4 * 4096..65536].iter().all(|&b| b == 0));
    guest(5 * 4096, 2 * 4096).await;
    s.bcs.settled().await;
    assert_eq!(copied.load(Ordering::Relaxed), 65536);
    // The grains no guest write touched are still in the source.
    assert_eq!(
        s.bcs.in_source(0, 65536),
        vec![(0, 3 * 4096), (4 * 4096, 5 * 4096), (7 * 4096, 65536)]
    );
    let mut uncopied = s.bcs.uncopied().expect("bitmap");
    assert_eq!(uncopied.dirty_bytes(), len);
    uncopied.clear();
    // The rest of the cluster goes in one task (one read), leaving out the grains that the
    // guest has changed in the source since they were copied.
    let (start, end, task) = s.bcs.copy_next(0, 0).expect("the partial cluster");
    assert_eq!((start, end), (0, 65536));
    task.await.expect("join").expect("copy");
    assert!(s.bcs.in_source(0, 65536).is_empty());
    assert_eq!(&read_all(&s.target_disk).await[..65536], &before[..65536]);
    background(&s.bcs, 4).await;
    assert!(s.bcs.is_done());
    assert_eq!(copied.load(Ordering::Relaxed), len);
    assert!(read_all(&s.target_disk).await == before);
    assert!(s.bcs.in_source(0, len).is_empty());
}

#[tokio::test]
async fn whole_clusters_when_the_grain_is_the_cluster() {
    let len = 1 << 20;
    let mut opts = Options::new(65536);
    opts.grain = 65536;
    let s = setup(len, opts, 0, 0);
    assert_eq!(s.bcs.grain(), 65536);
    s.bcs.protect(100, 10).await.expect("protect");
    s.bcs.settled().await;
    assert_eq!(s.target_disk.writes(), 1);
    assert!(s.bcs.in_source(0, len).is_empty());
}

#[tokio::test]
async fn write_through_waits_for_the_target() {
    let len = 1 << 20;
    let mut opts = Options::new(65536);
    opts.write_through = true;
    let s = setup(len, opts, 200, 0);
    s.source
        .write(0, IoVec::from(vec![3u8; 65536]), WriteFlags::default())
        .await
        .expect("w");
    s.bcs.protect(100, 10).await.expect("protect");
    assert!(s.bcs.held(0, 65536).is_empty(), "nothing held: written");
    assert!(read_all(&s.target_disk).await[..65536]
        .iter()
        .all(|&b| b == 3));
}

#[tokio::test]
async fn a_failed_target_write_after_a_guest_relied_on_it_is_kept_and_retried() {
    let len = 256 << 10;
    // Every write of the target fails.
    let s2 = setup(len, Options::new(65536), 0, 1);
    s2.source
        .write(
            0,
            IoVec::from(vec![5u8; len as usize]),
            WriteFlags::default(),
        )
        .await
        .expect("w");
    s2.bcs
        .protect(0, 1)
        .await
        .expect("held before the target fails");
    s2.source
        .write(0, IoVec::from(vec![6u8; 65536]), WriteFlags::default())
        .await
        .expect("guest write");
    s2.bcs.settled().await;
    assert!(s2.bcs.has_stranded(), "old data kept");
    assert_eq!(s2.bcs.held(0, 65536).len(), 1);
    assert!(s2.bcs.take_error().is_some(), "reported to the job");
    // fail_every = 1 fails everything: the retries fail too, and the data stays.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(s2.bcs.has_stranded());
    assert!(s2.bcs.held(0, 65536)[0].1.iter().all(|&b| b == 5));
    s2.bcs.close();
}

#[derive(Clone, Debug)]
struct Scenario {
    len_clusters: u64,
    cluster_shift: u32,
    chunk_clusters: u64,
    memory_chunks: u64,
    workers: usize,
    grain_shift: u32,
    /// Guest writes count themselves in flight (many at once switch to whole clusters).
    counted: bool,
    write_through: bool,
    delay_us: u64,
    fail_every: u64,
    writes: Vec<(u64, u64, u8, u64)>,
    /// The job pauses (`true`: the copy's futures are dropped after that many microseconds,
    /// and it starts again a little later) or is cancelled (`false`: dropped for good).
    interrupt: Option<(u64, bool)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        4u64..48,
        9u32..17,
        1u64..5,
        1u64..6,
        (1usize..8, 0u32..5, any::<bool>()),
        any::<bool>(),
        0u64..200,
        prop_oneof![Just(0u64), 3u64..9],
        prop::collection::vec(
            (0u64..1 << 20, 1u64..200_000, any::<u8>(), 0u64..400),
            1..40,
        ),
        prop_oneof![2 => Just(None), 1 => (0u64..3000, any::<bool>()).prop_map(Some)],
    )
        .prop_map(
            |(
                len_clusters,
                cluster_shift,
                chunk_clusters,
                memory_chunks,
                (workers, grain_shift, counted),
                write_through,
                delay_us,
                fail_every,
                writes,
                interrupt,
            )| Scenario {
                len_clusters,
                cluster_shift,
                chunk_clusters,
                memory_chunks,
                workers,
                grain_shift,
                counted,
                write_through,
                delay_us,
                fail_every,
                writes,
                interrupt,
            },
        )
}

/// Guest writes race the background copy; the target ends equal to the source as it was when
/// the copy began, whatever the chunk size, memory budget, worker count, target speed,
/// target failures and pauses. After a cancel, what the copy counts as copied (in the target,
/// or held on its way there) is the point in time.
async fn run_scenario(sc: Scenario) {
    let cluster = 1u64 << sc.cluster_shift;
    let len = sc.len_clusters * cluster;
    let mut opts = Options::new(cluster);
    opts.max_chunk = sc.chunk_clusters * cluster;
    opts.memory = sc.memory_chunks * sc.chunk_clusters * cluster;
    opts.write_through = sc.write_through;
    opts.grain = cluster >> sc.grain_shift;
    let s = setup(len, opts, sc.delay_us, sc.fail_every);
    let before: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
    s.source
        .write(0, IoVec::from(before.clone()), WriteFlags::default())
        .await
        .expect("w");
    let mut guests = tokio::task::JoinSet::new();
    for (off, n, byte, delay) in sc.writes.clone() {
        let off = off % len;
        let n = n.min(len - off).max(1);
        let bcs = s.bcs.clone();
        let source = s.source.clone();
        let counted = sc.counted;
        guests.spawn(async move {
            tokio::time::sleep(Duration::from_micros(delay)).await;
            let _in_flight = counted.then(|| bcs.guest_request());
            // Under break-guest-write a failed copy fails the write: retry as a guest would.
            while bcs.protect(off, n).await.is_err() {
                tokio::task::yield_now().await;
            }
            source
                .write(
                    off,
                    IoVec::from(vec![byte; n as usize]),
                    WriteFlags::default(),
                )
                .await
                .expect("guest write");
        });
    }
    if let Some((cut_us, resume)) = sc.interrupt {
        // A pause or a cancel drops the copy's futures wherever they are.
        let copy = background(&s.bcs, sc.workers);
        let _ = tokio::time::timeout(Duration::from_micros(cut_us), copy).await;
        if !resume {
            while guests.join_next().await.is_some() {}
            s.bcs.settled().await;
            let uncopied = s.bcs.uncopied().expect("owner");
            let got = read_all(&s.target_disk).await;
            let cluster = s.bcs.cluster_size();
            for c in (0..len).step_by(cluster as usize) {
                let end = (c + cluster).min(len);
                if uncopied.is_dirty(c) {
                    continue;
                }
                let mut have = got[c as usize..end as usize].to_vec();
                for (at, bytes) in s.bcs.held(c, end - c) {
                    let from = (at - c) as usize;
                    have[from..from + bytes.len()].copy_from_slice(&bytes);
                }
                assert!(
                    have == before[c as usize..end as usize],
                    "cluster {c} counts as copied but is not the point in time"
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_micros(cut_us / 2)).await;
    }
    background(&s.bcs, sc.workers).await;
    while guests.join_next().await.is_some() {}
    background(&s.bcs, sc.workers).await;
    let got = read_all(&s.target_disk).await;
    assert!(got == before, "target differs from the point in time");
}

proptest! {
    #[test]
    fn target_equals_the_source_at_the_point_in_time(sc in scenario()) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run_scenario(sc));
    }
}

/// An in-memory disk that can copy to another of its kind without passing the bytes through
/// the caller (`copy_range_to`), counting what it offloaded, or refuse to.
#[derive(Debug)]
struct Offloading {
    inner: Arc<MemDisk>,
    offloaded: AtomicU64,
    refuse: bool,
}

#[async_trait]
impl BlockDriver for Offloading {
    fn driver_name(&self) -> &'static str {
        "offloading"
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn writable(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        self.inner.write(offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn block_status(&self, _: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::data(len, None))
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
        let Some(dst) = dst.as_any().and_then(|d| d.downcast_ref::<Offloading>()) else {
            return Ok(None);
        };
        if self.refuse || dst.refuse {
            return Ok(None);
        }
        // Like the kernel, copy at most 64 KiB per call.
        let n = len.min(65536);
        let data = self
            .inner
            .read(offset, BytesMut::zeroed(n as usize))
            .await?;
        dst.inner
            .write(
                dst_offset,
                IoVec::from(data.freeze()),
                WriteFlags::default(),
            )
            .await?;
        self.offloaded.fetch_add(n, Ordering::Relaxed);
        Ok(Some(n))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_copy_range_offloads_the_background_copy_and_falls_back_once_refused() {
    let len: u64 = 4 << 20;
    for refuse in [false, true] {
        let disk = |refuse| {
            Arc::new(Offloading {
                inner: MemDisk::new(len),
                offloaded: AtomicU64::new(0),
                refuse,
            })
        };
        let (src, tgt) = (disk(false), disk(refuse));
        let source = BlockNode::new("src", src.clone());
        let before: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        source
            .write(0, IoVec::from(before.clone()), WriteFlags::default())
            .await
            .expect("fill");
        let mut opts = Options::new(65536);
        opts.use_copy_range = true;
        let bcs = BlockCopy::new(
            Child::new(ChildRole::Filtered, source.clone()),
            Child::new(ChildRole::Root, BlockNode::new("tgt", tgt.clone())),
            &source,
            opts,
        )
        .expect("block copy");
        bcs.with_bitmap(|b| b.set_dirty(0, len));
        let copied = count_copied(&bcs);
        // A guest write's copy still goes through memory (the guest goes on once it is read).
        bcs.protect(100, 10).await.expect("protect");
        source
            .write(100, IoVec::from(vec![0xee; 10]), WriteFlags::default())
            .await
            .expect("guest write");
        bcs.settled().await;
        let guest_path = src.offloaded.load(Ordering::Relaxed);
        assert_eq!(guest_path, 0, "the guest's copy was offloaded");
        background(&bcs, 4).await;
        assert_eq!(copied.load(Ordering::Relaxed), len, "refuse={refuse}");
        assert!(read_all(&tgt.inner).await == before, "refuse={refuse}");
        let offloaded = src.offloaded.load(Ordering::Relaxed);
        if refuse {
            assert_eq!(offloaded, 0);
        } else {
            // The rest of the guest's cluster too, around its grain.
            assert_eq!(offloaded, len - bcs.grain(), "all but the guest's grain");
        }
    }
}

/// A source that notes, for each read, whether it ran as background I/O.
#[derive(Debug)]
struct Marking {
    inner: Arc<MemDisk>,
    reads: Mutex<Vec<(u64, bool)>>,
}

#[async_trait]
impl BlockDriver for Marking {
    fn driver_name(&self) -> &'static str {
        "marking"
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn writable(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let background = block::io_class::is_background();
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((offset, background));
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        self.inner.write(offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn block_status(&self, _: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::data(len, None))
    }
}

/// The background copy's reads are background I/O (the file driver keeps them out of the
/// guest's way); the read a guest write waits for is not.
#[tokio::test]
async fn only_the_background_copy_is_background_io() {
    let len = 1 << 20;
    let marking = Arc::new(Marking {
        inner: MemDisk::new(len),
        reads: Mutex::new(Vec::new()),
    });
    let source = BlockNode::new("src", marking.clone());
    let target = BlockNode::new("tgt", MemDisk::new(len));
    let bcs = BlockCopy::new(
        Child::new(ChildRole::Filtered, source.clone()),
        Child::new(ChildRole::Root, target),
        &source,
        Options::new(65536),
    )
    .expect("block copy");
    bcs.with_bitmap(|b| b.set_dirty(0, len));
    bcs.protect(0, 4096).await.expect("protect");
    background(&bcs, 4).await;
    let reads = marking
        .reads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert_eq!(
        reads.first(),
        Some(&(0, false)),
        "the guest's read: {reads:?}"
    );
    assert!(
        reads.len() > 1 && reads[1..].iter().all(|&(_, bg)| bg),
        "{reads:?}"
    );
}
