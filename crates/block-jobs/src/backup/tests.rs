use super::*;
use block::testing::MemDisk;
use block::{BlockBackend, BlockDriver, IoVec, Perm, WriteFlags};
use job::{JobEvent, JobManager, JobOptions, JobStatus};
use std::sync::Mutex as StdMutex;

fn spec(source: &Arc<BlockNode>, target: &Arc<BlockNode>, sync: SyncMode) -> BackupSpec {
    BackupSpec {
        guest_latency_budget: None,
        job_id: "j".into(),
        source: source.clone(),
        target: target.clone(),
        sync,
        bitmap: None,
        on_source_error: OnError::Report,
        on_target_error: OnError::Report,
        filter_node_name: "cbw".into(),
        compress: false,
        max_workers: 4,
        max_chunk: 0,
        min_cluster_size: 0,
        use_copy_range: false,
        discard_source: false,
        on_cbw_error: filters::OnCbwError::BreakGuestWrite,
    }
}

fn manager() -> (JobManager, Arc<StdMutex<Vec<JobEvent>>>) {
    let events = Arc::new(StdMutex::new(Vec::new()));
    let e = events.clone();
    let mgr = JobManager::new(Arc::new(move |ev| e.lock().expect("events").push(ev)));
    (mgr, events)
}

async fn wait_concluded(mgr: &JobManager, events: &StdMutex<Vec<JobEvent>>) {
    for _ in 0..2000 {
        let done = events.lock().expect("events").iter().any(|e| {
            matches!(
                e,
                JobEvent::StatusChange {
                    status: JobStatus::Null,
                    ..
                }
            )
        });
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("job did not end: {:?}", mgr.query().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_guest_writes_is_the_point_in_time_and_the_filter_goes_away() {
    let len = 4 << 20;
    let source = BlockNode::new("src", MemDisk::new(len));
    let target_disk = MemDisk::new(len);
    let target = BlockNode::new("tgt", target_disk.clone());
    let guest = BlockBackend::attach(
        source.clone(),
        Parent::unnamed(),
        EdgePerm::new(
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL & !Perm::RESIZE,
        ),
    )
    .expect("guest");
    let before: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
    guest
        .write(0, IoVec::from(before.clone()), WriteFlags::default())
        .await
        .expect("w");

    let backup = Backup::prepare(spec(&source, &target, SyncMode::Full))
        .await
        .expect("prepare");
    assert_eq!(
        guest.node().name(),
        "cbw",
        "the guest's edge now goes through the filter"
    );
    // Nothing else may write the source beside the filter now.
    let bypass = BlockBackend::attach(
        source.clone(),
        Parent::unnamed(),
        EdgePerm::new(Perm::WRITE, Perm::ALL),
    );
    let err = bypass.expect_err("a writer beside the filter");
    assert!(err.to_string().contains("unshared by node 'cbw'"), "{err}");

    let (mgr, events) = manager();
    mgr.create(
        backup.clone(),
        JobOptions {
            speed: 1 << 20,
            block: true,
            ..JobOptions::new("j")
        },
    )
    .await
    .expect("create");
    mgr.start("j").await.expect("start");
    for i in 0..64u64 {
        let off = (i * 65_536 * 7 + 1000) % (len - 8192);
        guest
            .write(off, IoVec::from(vec![0xee; 8192]), WriteFlags::default())
            .await
            .expect("guest write");
    }
    mgr.set_speed("j", 0).await.expect("speed");
    wait_concluded(&mgr, &events).await;
    let got = target_disk
        .read(0, bytes::BytesMut::zeroed(len as usize))
        .await
        .expect("read");
    assert!(
        got[..] == before[..],
        "target is the source at the point in time"
    );
    assert_eq!(guest.node().name(), "src", "the filter is gone");
    assert_eq!(source.parents().len(), 1, "only the guest's edge is left");
    assert!(target.parents().is_empty(), "nothing holds the target");
    assert!(source.bitmaps().is_empty());
}

#[tokio::test]
async fn refusals_change_nothing() {
    let source = BlockNode::new("src", MemDisk::new(1 << 20));
    let small = BlockNode::new("small", MemDisk::new(1 << 19));
    let err = Backup::prepare(spec(&source, &small, SyncMode::Full))
        .await
        .expect_err("sizes");
    assert_eq!(err, "Source and target image have different sizes");
    let target = BlockNode::new("tgt", MemDisk::new(1 << 20));
    let mut s = spec(&source, &target, SyncMode::Full);
    s.max_chunk = 4096;
    let err = Backup::prepare(s).await.expect_err("chunk");
    assert_eq!(
        err,
        "Required max-chunk (4096) is less than backup cluster size (65536)"
    );
    let mut s = spec(&source, &target, SyncMode::Full);
    s.min_cluster_size = 3 << 16;
    let err = Backup::prepare(s).await.expect_err("min cluster");
    assert_eq!(
        err,
        "Could not create node: Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
    );
    assert!(source.parents().is_empty() && target.parents().is_empty());
    assert!(source.bitmaps().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_source_pauses_the_job_without_events() {
    let len = 8 << 20;
    let source = BlockNode::new("src", MemDisk::new(len));
    let target = BlockNode::new("tgt", MemDisk::new(len));
    let backup = Backup::prepare(spec(&source, &target, SyncMode::Full))
        .await
        .expect("prepare");
    let (mgr, events) = manager();
    mgr.create(
        backup.clone(),
        JobOptions {
            speed: 2 << 20,
            block: true,
            ..JobOptions::new("j")
        },
    )
    .await
    .expect("create");
    mgr.start("j").await.expect("start");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let section = block::graph::drained(std::slice::from_ref(&source)).await;
    // Copies already past the source may still land in the target.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = mgr.info("j").await.expect("info").current;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let during = mgr.info("j").await.expect("info");
    assert_eq!(
        during.current, before,
        "no copy while the source is drained"
    );
    assert_eq!(during.status, JobStatus::Running, "nothing shows");
    drop(section);
    mgr.set_speed("j", 0).await.expect("speed");
    wait_concluded(&mgr, &events).await;
    let statuses: Vec<JobStatus> = events
        .lock()
        .expect("events")
        .iter()
        .filter_map(|e| match e {
            JobEvent::StatusChange { status, .. } => Some(*status),
            _ => None,
        })
        .collect();
    assert!(!statuses.contains(&JobStatus::Paused), "{statuses:?}");
}

#[test]
fn a_throttled_copy_keeps_only_the_chunks_its_speed_needs_in_flight() {
    let mut pace = Pace::default();
    let now = std::time::Instant::now();
    // Before any chunk finished: one, and the next.
    assert_eq!(pace.workers(64 << 20, 1 << 20, 64), 1);
    // 64 chunks a second that take 10 ms each: one in flight on average, plus one.
    pace.record(Duration::from_millis(10), 1 << 20, now, 64);
    assert_eq!(pace.workers(64 << 20, 1 << 20, 64), 2);
    // Slow chunks need more to hold the speed, up to max-workers.
    for _ in 0..50 {
        pace.record(Duration::from_millis(200), 1 << 20, now, 64);
    }
    assert_eq!(pace.workers(64 << 20, 1 << 20, 64), 14);
    assert_eq!(pace.workers(64 << 20, 1 << 20, 8), 8);
}

#[test]
fn a_throttled_copy_takes_chunks_sized_to_its_speed() {
    // Unlimited: the copy's own chunk.
    assert_eq!(Pace::chunk_limit(0), 0);
    // 256 chunks a second: 64 MiB/s in 256 KiB chunks, 1 GiB/s in 4 MiB (capped by the copy).
    assert_eq!(Pace::chunk_limit(64 << 20), 256 << 10);
    assert_eq!(Pace::chunk_limit(1 << 30), 4 << 20);
    // Never below 64 KiB: slower than 16 MiB/s, whole chunks, as QEMU.
    assert_eq!(Pace::chunk_limit(16 << 20), 64 << 10);
    assert_eq!(Pace::chunk_limit((16 << 20) - 1), 0);
    assert_eq!(Pace::chunk_limit(1), 0);
}

#[test]
fn an_unthrottled_copy_keeps_as_many_chunks_in_flight_as_make_it_faster() {
    // A disk whose throughput grows up to 16 chunks in flight and drops beyond.
    let disk = |n: usize| -> f64 {
        let n = n as f64;
        if n <= 16.0 {
            100.0 * n
        } else {
            1600.0 - 10.0 * (n - 16.0)
        }
    };
    let mut pace = Pace::default();
    let mut now = std::time::Instant::now();
    let mut seen = Vec::new();
    for _ in 0..40 {
        let workers = pace.workers(0, 1 << 20, 64);
        seen.push(workers);
        // One window at this many workers.
        now += ADAPT_WINDOW;
        let bytes = (disk(workers) * ADAPT_WINDOW.as_secs_f64()) as u64;
        pace.record(Duration::from_millis(10), bytes, now, 64);
    }
    assert_eq!(&seen[..5], &[4, 8, 16, 32, 16], "{seen:?}");
    // Settled on 16, it probes 32 now and then and comes back.
    assert!(seen[5..].iter().all(|&w| w == 16 || w == 32), "{seen:?}");
    assert!(
        seen[5..].iter().filter(|&&w| w == 16).count() > 30,
        "{seen:?}"
    );
    // Never above max-workers.
    let mut pace = Pace::default();
    for _ in 0..10 {
        now += ADAPT_WINDOW;
        let w = pace.workers(0, 1 << 20, 6);
        assert!(w <= 6);
        pace.record(Duration::from_millis(10), (disk(w) * 0.25) as u64, now, 6);
    }
    assert_eq!(pace.workers(0, 1 << 20, 6), 6);
}

#[test]
fn an_unthrottled_copy_holds_at_most_its_memory_in_flight() {
    // max-workers, but no more chunks than fit in 4 MiB.
    assert_eq!(Pace::max_workers(0, 256 << 10, 64), 16);
    assert_eq!(Pace::max_workers(0, 256 << 10, 8), 8);
    assert_eq!(Pace::max_workers(0, 1 << 20, 64), 4);
    assert_eq!(Pace::max_workers(0, 8 << 20, 64), 1);
    assert_eq!(Pace::max_workers(64 << 20, 256 << 10, 64), 64);
    assert_eq!(Pace::max_workers(0, 64 << 10, 1000), 64);
    assert_eq!(Pace::max_workers(0, 1 << 20, 0), 1);
    // Throttled copies: max-workers (their speed decides below it).
    assert_eq!(Pace::max_workers(64 << 20, 1 << 20, 64), 64);
}

#[test]
fn a_guest_latency_budget_caps_the_chunks_in_flight() {
    let mut pace = Pace::default();
    let budget = Duration::from_millis(2);
    assert_eq!(pace.workers(0, 1 << 20, 64), ADAPT_START);
    // The guest waits too long: halve, down to one.
    let slow = Some(Duration::from_millis(5));
    for expect in [32, 16, 8, 4, 2, 1] {
        pace.guest(slow, budget, 64, 1 << 20);
        assert_eq!(pace.cap, expect);
    }
    assert_eq!(pace.workers(0, 1 << 20, 64), 1);
    assert_eq!(
        pace.workers(64 << 20, 1 << 20, 64),
        1,
        "throttled copies too"
    );
    // One chunk in flight is still too much: smaller chunks, down to 64 KiB.
    for expect in [512 << 10, 256 << 10, 128 << 10, 64 << 10, 64 << 10] {
        pace.guest(slow, budget, 64, 1 << 20);
        assert_eq!((pace.cap, pace.chunk_cap), (1, expect));
    }
    // Within budget, or no guest I/O: the chunk grows back first, then one more in flight a
    // window.
    let fine = Some(Duration::from_millis(1));
    for expect in [128 << 10, 256 << 10, 512 << 10, 0] {
        pace.guest(fine, budget, 64, 1 << 20);
        assert_eq!((pace.cap, pace.chunk_cap), (1, expect));
    }
    pace.guest(fine, budget, 64, 1 << 20);
    pace.guest(None, budget, 64, 1 << 20);
    assert_eq!(pace.cap, 3);
    assert_eq!(pace.workers(0, 1 << 20, 64), 3);
}
