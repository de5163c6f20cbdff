//! Crash safety: a child process writing to a qcow2 image is killed with SIGKILL at random
//! moments. Afterwards `qemu-img check` finds no corruption (leaked clusters at most) and every
//! write the child acknowledged with a flush is in the image.
//!
//! The child is this test binary re-run with `CRASH_CHILD` set (the ignored `crash_child`
//! test). It writes numbered generations of concurrent requests, derived from the generation
//! number alone, flushes after each and prints `flushed N`. The parent replays the same
//! generations into a model. After a kill, generation N+1 may be partly written: its bytes may
//! hold anything it or earlier generations wrote; every other byte must match the model.
//!
//! A SIGKILL lands between two metadata writes only rarely, so a second test makes the crash
//! deterministic: a file driver that stops writing after its N-th write (everything later is
//! lost, as when the process dies there) is placed under the qcow2 driver, for every N of a
//! workload. Each resulting image must pass the same checks.
//!
//! `CRASH_ROUNDS` (default 6) sets the number of kills per image shape and `CRASH_SEED` the
//! random kill delays; `bench/crash-loop.sh` runs many rounds.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use block::{BlockDriver, BlockNode, BlockStatus, Child, ChildRole, Facts, IoVec};
use block::{WriteFlags, ZeroFlags};
use bytes::BytesMut;
use common::*;
use drivers::file::{FileDriver, FileOptions};
use drivers::qcow2::{CreateOptions, Qcow2Driver};

const SIZE: u64 = 64 << 20;

/// splitmix64: small, seedable, the same in parent and child.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern(seed: u8, pos: u64) -> u8 {
    let x = pos ^ (pos >> 9) ^ (pos >> 17);
    (x as u8).wrapping_mul(31).wrapping_add(seed) | 1
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zeroes { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
}

impl Op {
    fn range(self) -> (u64, u64) {
        match self {
            Op::Write { off, len, .. } | Op::Zeroes { off, len } | Op::Discard { off, len } => {
                (off, off + len)
            }
        }
    }
}

/// The requests of generation `gen` on a disk of `size` bytes, run concurrently.
fn generation(gen: u64, size: u64) -> Vec<Op> {
    let mut rng = Rng(gen.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut ops = Vec::new();
    let n = 1 + rng.below(12);
    for i in 0..n {
        let mut off = rng.below(size / 512) * 512;
        if rng.below(3) == 0 {
            off += rng.below(512);
        }
        let off = off.min(size - 1);
        let len = (1 + rng.below(256 << 10)).min(size - off);
        let kind = rng.below(16);
        ops.push(match kind {
            0..=1 => Op::Zeroes { off, len },
            2 => Op::Discard { off, len },
            _ => Op::Write {
                off,
                len,
                seed: (gen.wrapping_mul(7) + i) as u8,
            },
        });
    }
    ops
}

async fn run(node: &Arc<BlockNode>, op: Op) -> block::Result<()> {
    match op {
        Op::Write { off, len, seed } => {
            let data: Vec<u8> = (off..off + len).map(|p| pattern(seed, p)).collect();
            node.write(off, IoVec::from(data), WriteFlags::default())
                .await
        }
        Op::Zeroes { off, len } => {
            let flags = ZeroFlags {
                may_unmap: true,
                ..ZeroFlags::default()
            };
            node.write_zeroes(off, len, flags).await
        }
        Op::Discard { off, len } => node.discard(off, len).await,
    }
}

/// Runs the requests of generation `gen` concurrently; returns the last error, if any.
async fn run_generation(node: &Arc<BlockNode>, gen: u64, size: u64) -> Option<block::BlockError> {
    let mut tasks = tokio::task::JoinSet::new();
    for op in generation(gen, size) {
        let node = node.clone();
        tasks.spawn(async move { run(&node, op).await });
    }
    let mut failed = None;
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res.expect("join") {
            failed = Some(e);
        }
    }
    failed
}

/// The child: writes generations from `CRASH_START` on until it is killed.
#[test]
#[ignore = "run by the crash tests as their child process"]
fn crash_child() {
    let Ok(path) = std::env::var("CRASH_CHILD") else {
        return;
    };
    let start: u64 = std::env::var("CRASH_START")
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("CRASH_START");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let node = open_rw(Path::new(&path)).await;
        let mut out = std::io::stdout();
        for gen in start.. {
            if let Some(e) = run_generation(&node, gen, SIZE).await {
                panic!("request: {e}");
            }
            node.flush().await.expect("flush");
            writeln!(out, "flushed {gen}").expect("stdout");
            out.flush().expect("stdout");
        }
    });
}

/// What the parent knows about the image: each byte's value, or `None` while uncertain, and
/// where that knowledge came from (the generation that wrote it; 0 when it was read back).
struct Model {
    bytes: Vec<Option<u8>>,
    origin: Vec<u64>,
}

impl Model {
    fn zeroed(size: u64) -> Self {
        Model {
            bytes: vec![Some(0); size as usize],
            origin: vec![0; size as usize],
        }
    }

    fn apply(&mut self, gen: u64, size: u64) {
        let ops = generation(gen, size);
        for (i, op) in ops.iter().enumerate() {
            let (s, e) = op.range();
            let overlapped = |pos: u64| {
                ops.iter().enumerate().any(|(j, o)| {
                    let (os, oe) = o.range();
                    j != i && (os..oe).contains(&pos)
                })
            };
            for pos in s..e {
                // Concurrent requests of one generation on the same bytes: either may win.
                let value = match *op {
                    _ if overlapped(pos) => None,
                    Op::Write { seed, .. } => Some(pattern(seed, pos)),
                    Op::Zeroes { .. } => Some(0),
                    Op::Discard { .. } => None,
                };
                self.bytes[pos as usize] = value;
                self.origin[pos as usize] = gen;
            }
        }
    }

    /// Marks what generation `gen` may have partly written as uncertain.
    fn unsettle(&mut self, gen: u64, size: u64) {
        for op in generation(gen, size) {
            let (s, e) = op.range();
            self.bytes[s as usize..e as usize].fill(None);
            self.origin[s as usize..e as usize].fill(gen);
        }
    }
}

/// What a round did, for the report when a byte is lost.
struct Round<'a> {
    what: String,
    /// Generations the child may have run (the last one partly).
    gens: std::ops::RangeInclusive<u64>,
    path: &'a Path,
    cluster_size: u64,
}

/// A run of bytes that do not hold what the model expects.
struct Lost {
    start: usize,
    end: usize,
    /// The expected and found values of the first byte.
    want: u8,
    got: u8,
}

/// Everything known about lost bytes: where their expected values came from, what the round
/// ran near them, how the image maps them now.
fn lost_report(model: &Model, round: &Round<'_>, lost: &[Lost], size: u64) -> String {
    use std::fmt::Write as _;
    let mut r = String::new();
    let Some(first) = lost.first() else {
        return r;
    };
    let _ = writeln!(
        r,
        "byte {} lost after the crash ({}); {} runs of lost bytes",
        first.start,
        round.what,
        lost.len()
    );
    for l in lost.iter().take(8) {
        let origin = model.origin[l.start];
        let _ = writeln!(
            r,
            "- bytes [{}, {}) ({:#x} into its cluster): want {}, got {}",
            l.start,
            l.end,
            l.start as u64 % round.cluster_size,
            l.want,
            l.got
        );
        if origin == 0 {
            let _ = writeln!(r, "  its value was read back after an earlier crash");
            continue;
        }
        let _ = writeln!(r, "  its value was written by generation {origin}:");
        for op in generation(origin, size) {
            let (s, e) = op.range();
            let mark = if (s..e).contains(&(l.start as u64)) {
                "*"
            } else {
                " "
            };
            let _ = writeln!(r, "   {mark} {op:?}");
        }
    }
    let reach = round.cluster_size;
    let near = |(s, e): (u64, u64)| {
        lost.iter()
            .take(8)
            .any(|l| s < l.end as u64 + reach && l.start as u64 <= e + reach)
    };
    for gen in round.gens.clone() {
        let ops: Vec<Op> = generation(gen, size)
            .into_iter()
            .filter(|o| near(o.range()))
            .collect();
        if !ops.is_empty() {
            let _ = writeln!(r, "generation {gen} of this round, near them: {ops:?}");
        }
    }
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", s(round.path)])
        .output()
        .ok()
        .and_then(|out| serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).ok())
        .unwrap_or_default();
    let _ = writeln!(r, "qemu-img map near them:");
    for extent in map {
        let field = |k: &str| extent.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let (start, len) = (field("start"), field("length"));
        if near((start, start + len)) {
            let _ = writeln!(r, "  {extent}");
        }
    }
    r
}

/// Kills the child after `delay`, returning the last generation it acknowledged.
fn run_child_until(path: &Path, start: u64, delay: Duration) -> Option<u64> {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args(["--ignored", "--exact", "crash_child", "--nocapture"])
        .args(["--test-threads", "1"])
        .env("CRASH_CHILD", path)
        .env("CRASH_START", start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let reader = std::thread::spawn(move || {
        let mut last = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("flushed ") {
                last = n.trim().parse::<u64>().ok();
            }
        }
        last
    });
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).ok();
            }
            panic!("child exited on its own ({status}):\n{err}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    reader.join().expect("reader thread")
}

/// `qemu-img check`: no corruption; leaks are what a crash may leave. Returns the leak count.
fn check_no_corruption(path: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(path)])
        .output()
        .expect("qemu-img runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("qemu-img check output ({e}):\n{text}"));
    let field = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert_eq!(field("corruptions"), 0, "corruptions:\n{text}");
    assert_eq!(field("check-errors"), 0, "check errors:\n{text}");
    field("leaks")
}

/// Compares the image with the model, then learns the uncertain bytes from it.
async fn verify(model: &mut Model, size: u64, round: &Round<'_>) {
    let node = open_ro(round.path).await;
    let chunk = (4 << 20).min(size as usize);
    let mut lost: Vec<Lost> = Vec::new();
    for off in (0..size).step_by(chunk) {
        let data = node.read(off, chunk).await.expect("read back");
        for (i, &got) in data.iter().enumerate() {
            let pos = off as usize + i;
            match model.bytes[pos] {
                Some(want) if want != got => match lost.last_mut() {
                    Some(l) if l.end == pos => l.end += 1,
                    _ => lost.push(Lost {
                        start: pos,
                        end: pos + 1,
                        want,
                        got,
                    }),
                },
                Some(_) => {}
                None => {
                    model.bytes[pos] = Some(got);
                    model.origin[pos] = 0;
                }
            }
        }
    }
    node.close().await.expect("close");
    assert!(
        lost.is_empty(),
        "{}",
        lost_report(model, round, &lost, size)
    );
}

fn crash_loop(opts: CreateOptions) {
    let rounds: u64 = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tmp();
    let path = p(&dir, "crash.qcow2");
    rt.block_on(create_qcow2(&path, &opts));
    let mut model = Model::zeroed(SIZE);
    let mut next = 1;
    let mut acknowledged = 0;
    for round in 0..rounds {
        // The child needs some 50-150 ms to start; kill it anywhere in the next ~400 ms.
        let delay = Duration::from_millis(60 + rng.below(400));
        let last = run_child_until(&path, next, delay);
        let done = last.map_or(next - 1, |l| l);
        for gen in next..=done {
            model.apply(gen, SIZE);
        }
        model.unsettle(done + 1, SIZE);
        acknowledged += done + 1 - next;
        let leaks = check_no_corruption(&path);
        eprintln!("round {round}: killed after {delay:?}, generation {done}, {leaks} leaks");
        let what = format!("round {round}, seed {seed}, killed after {delay:?}");
        let r = Round {
            what,
            gens: next..=done + 1,
            path: &path,
            cluster_size: opts.cluster_size,
        };
        rt.block_on(verify(&mut model, SIZE, &r));
        next = done + 2;
    }
    assert!(
        acknowledged > 0,
        "no generation was acknowledged in {rounds} rounds"
    );
}

#[test]
fn killed_writer_leaves_a_consistent_image() {
    crash_loop(CreateOptions::new(SIZE));
}

#[test]
fn killed_writer_small_clusters_v2() {
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = 4096;
    opts.version = 2;
    crash_loop(opts);
}

#[test]
fn killed_writer_2m_clusters() {
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = 2 << 20;
    crash_loop(opts);
}

/// A file driver that performs its first `budget` writes (writes, zeroes, discards) and then
/// silently drops every later one, like a process killed right after that write. With
/// [`CrashAfter::power_loss`], the writes since the last completed flush are lost too, any
/// subset of them, as when the power fails: the disk keeps some unsynced writes, not others.
#[derive(Debug)]
struct CrashAfter {
    inner: FileDriver,
    budget: AtomicU64,
    crashed: AtomicBool,
    /// Writes since the last completed flush, in issue order, with what they overwrote.
    unflushed: std::sync::Mutex<Vec<Undo>>,
    /// The file length at the last completed flush.
    flushed_len: AtomicU64,
}

/// One unsynced write: the bytes before and after it.
#[derive(Debug)]
struct Undo {
    offset: u64,
    before: Vec<u8>,
    after: Vec<u8>,
}

impl CrashAfter {
    fn new(inner: FileDriver, budget: u64) -> Self {
        let len = inner.len();
        Self {
            inner,
            budget: AtomicU64::new(budget),
            crashed: AtomicBool::new(false),
            unflushed: std::sync::Mutex::new(Vec::new()),
            flushed_len: AtomicU64::new(len),
        }
    }

    /// Takes one unit of budget; false once the crash point is passed.
    fn survive(&self) -> bool {
        let ok = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok();
        if !ok {
            self.crashed.store(true, Ordering::SeqCst);
        }
        ok
    }

    fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Records a write of `after` at `offset` with what it overwrites (zeroes past the end).
    async fn record(&self, offset: u64, after: Vec<u8>) {
        let len = self.inner.len();
        let mut before = vec![0u8; after.len()];
        let have = len.saturating_sub(offset).min(after.len() as u64) as usize;
        if have > 0 {
            let got = self
                .inner
                .read(offset, BytesMut::zeroed(have))
                .await
                .expect("pre-image");
            before[..have].copy_from_slice(&got);
        }
        self.unflushed.lock().expect("undo log").push(Undo {
            offset,
            before,
            after,
        });
    }

    /// The power fails: the writes since the last completed flush are undone, and then a
    /// subset of them chosen by `seed` is done again, in issue order.
    async fn power_loss(&self, seed: u64) -> usize {
        let log = std::mem::take(&mut *self.unflushed.lock().expect("undo log"));
        for u in log.iter().rev() {
            self.inner
                .write(
                    u.offset,
                    IoVec::from(u.before.clone()),
                    WriteFlags::default(),
                )
                .await
                .expect("undo");
        }
        let flushed_len = self.flushed_len.load(Ordering::SeqCst);
        if self.inner.len() > flushed_len {
            self.inner.truncate(flushed_len).await.expect("truncate");
        }
        let mut rng = Rng(seed);
        let mut lost = 0;
        for u in &log {
            if rng.below(2) == 0 {
                lost += 1;
                continue;
            }
            self.inner
                .write(
                    u.offset,
                    IoVec::from(u.after.clone()),
                    WriteFlags::default(),
                )
                .await
                .expect("redo");
        }
        self.inner.flush().await.expect("flush");
        lost
    }
}

#[async_trait]
impl BlockDriver for CrashAfter {
    fn driver_name(&self) -> &'static str {
        "file"
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn facts(&self) -> Facts {
        self.inner.facts()
    }
    fn writable(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> block::Result<BytesMut> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> block::Result<()> {
        if !self.survive() {
            return Ok(());
        }
        self.record(offset, data.to_bytes().to_vec()).await;
        self.inner.write(offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> block::Result<()> {
        if !self.survive() {
            return Ok(());
        }
        self.record(offset, vec![0; len as usize]).await;
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> block::Result<()> {
        if !self.survive() {
            return Ok(());
        }
        self.record(offset, vec![0; len as usize]).await;
        self.inner.discard(offset, len).await
    }
    async fn flush(&self) -> block::Result<()> {
        self.inner.flush().await?;
        if !self.crashed() {
            let mut log = self.unflushed.lock().expect("undo log");
            log.clear();
            self.flushed_len.store(self.inner.len(), Ordering::SeqCst);
        }
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> block::Result<BlockStatus> {
        self.inner.block_status(offset, len).await
    }
}

/// Generations of the crash-point workload (small, so every crash point can be tried).
const POINT_GENERATIONS: u64 = 6;
const POINT_SIZE: u64 = 8 << 20;

/// Runs the workload on a fresh image whose file stops writing after `budget` writes; with
/// `power_loss`, a subset of the writes since the last flush is lost too. Returns the last
/// generation whose flush completed before the crash, and whether it crashed.
async fn run_until_crash_point(
    path: &Path,
    opts: &CreateOptions,
    budget: u64,
    power_loss: bool,
) -> (u64, bool) {
    create_qcow2(path, opts).await;
    let inner = FileDriver::open(FileOptions::new(path)).expect("open file");
    let file = Arc::new(CrashAfter::new(inner, budget));
    let file_node = BlockNode::new("file", file.clone());
    let qcow2 = Qcow2Driver::open(Child::new(ChildRole::File, file_node), true, None)
        .await
        .expect("open qcow2");
    let node = BlockNode::new("crash", Arc::new(qcow2));
    let mut flushed = 0;
    for gen in 1..=POINT_GENERATIONS {
        let failed = run_generation(&node, gen, POINT_SIZE).await;
        let flush = node.flush().await;
        if file.crashed() {
            // The process is dead from here on; what its driver thinks no longer matters.
            break;
        }
        assert!(
            failed.is_none(),
            "request failed before the crash: {failed:?}"
        );
        flush.expect("flush");
        flushed = gen;
    }
    let closed = node.close().await;
    assert!(file.crashed() || closed.is_ok(), "close: {closed:?}");
    if file.crashed() && power_loss {
        file.power_loss(budget).await;
    }
    (flushed, file.crashed())
}

/// Every crash point of a small workload leaves an image with no corruption that holds every
/// generation flushed before the crash, and that takes further writes correctly once reopened.
/// With `power_loss`, each crash also loses a subset of the writes since the last flush.
fn every_crash_point(opts: CreateOptions, power_loss: bool) {
    every_nth_crash_point(opts, power_loss, 1);
}

/// [`every_crash_point`], trying only every `stride`-th crash point.
fn every_nth_crash_point(opts: CreateOptions, power_loss: bool, stride: u64) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tmp();
    let path = p(&dir, "points.qcow2");
    let mut budget = 0;
    let mut tried = 0;
    loop {
        let (flushed, crashed) =
            rt.block_on(run_until_crash_point(&path, &opts, budget, power_loss));
        let mut model = Model::zeroed(POINT_SIZE);
        for gen in 1..=flushed {
            model.apply(gen, POINT_SIZE);
        }
        for gen in flushed + 1..=POINT_GENERATIONS {
            model.unsettle(gen, POINT_SIZE);
        }
        let leaks = check_no_corruption(&path);
        let r = Round {
            what: format!("crash after write {budget}"),
            gens: 1..=POINT_GENERATIONS,
            path: &path,
            cluster_size: opts.cluster_size,
        };
        rt.block_on(verify(&mut model, POINT_SIZE, &r));
        // The image lives on after the crash: reopened, written and flushed, it must still
        // hold everything known so far outside what the new generations wrote.
        let later = POINT_GENERATIONS + 1..=POINT_GENERATIONS + 2;
        rt.block_on(async {
            let node = open_rw(&path).await;
            for gen in later.clone() {
                if let Some(e) = run_generation(&node, gen, POINT_SIZE).await {
                    panic!("request after reopening: {e}");
                }
            }
            node.flush().await.expect("flush after reopening");
            node.close().await.expect("close after reopening");
        });
        for gen in later.clone() {
            model.apply(gen, POINT_SIZE);
        }
        check_no_corruption(&path);
        let r = Round {
            what: format!("written again after a crash after write {budget}"),
            gens: later,
            ..r
        };
        rt.block_on(verify(&mut model, POINT_SIZE, &r));
        tried += 1;
        if !crashed {
            eprintln!("{tried} crash points tried, the last with {leaks} leaks");
            break;
        }
        budget += stride;
    }
    assert!(tried > 20, "the workload made only {tried} writes");
}

#[test]
fn every_crash_point_is_consistent() {
    every_crash_point(CreateOptions::new(POINT_SIZE), false);
}

#[test]
fn every_crash_point_is_consistent_2m_clusters() {
    let mut opts = CreateOptions::new(POINT_SIZE);
    opts.cluster_size = 2 << 20;
    every_crash_point(opts, false);
}

#[test]
fn every_crash_point_is_consistent_small_clusters() {
    let mut opts = CreateOptions::new(POINT_SIZE);
    opts.cluster_size = 4096;
    opts.refcount_bits = 2;
    every_crash_point(opts, false);
}

/// A power failure keeps some unsynced writes and not others: every crash point, losing a
/// subset of the writes since the last flush, still leaves a consistent image.
#[test]
fn every_power_loss_point_is_consistent() {
    every_crash_point(CreateOptions::new(POINT_SIZE), true);
}

#[test]
fn every_power_loss_point_is_consistent_small_clusters() {
    let mut opts = CreateOptions::new(POINT_SIZE);
    opts.cluster_size = 4096;
    opts.refcount_bits = 2;
    every_crash_point(opts, true);
}

/// 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB, so the workload
/// keeps creating refcount blocks and growing the refcount table.
#[test]
fn every_power_loss_point_is_consistent_new_refcount_blocks() {
    let mut opts = CreateOptions::new(POINT_SIZE);
    opts.cluster_size = 512;
    opts.refcount_bits = 64;
    // Over 1,100 crash points: every 13th keeps this under half a minute.
    every_nth_crash_point(opts, true, 13);
}

/// A file driver that yields a pseudo-random number of times before each request, so that a
/// qcow2 request above it can be stopped at any of its await points.
#[derive(Debug)]
struct Yielding {
    inner: FileDriver,
    n: AtomicU64,
}

impl Yielding {
    async fn pause(&self) {
        let k = self.n.fetch_add(1, Ordering::Relaxed);
        for _ in 0..Rng(k).below(6) {
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait]
impl BlockDriver for Yielding {
    fn driver_name(&self) -> &'static str {
        "file"
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn facts(&self) -> Facts {
        self.inner.facts()
    }
    fn writable(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> block::Result<BytesMut> {
        self.pause().await;
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> block::Result<()> {
        self.pause().await;
        self.inner.write(offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> block::Result<()> {
        self.pause().await;
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> block::Result<()> {
        self.pause().await;
        self.inner.discard(offset, len).await
    }
    async fn flush(&self) -> block::Result<()> {
        self.pause().await;
        self.inner.flush().await
    }
    async fn block_status(&self, offset: u64, len: u64) -> block::Result<BlockStatus> {
        self.inner.block_status(offset, len).await
    }
}

/// Polls `f` at most `polls` times, then drops it (as a cancelled job's future is dropped).
/// True when it finished.
async fn within_polls<F: std::future::Future>(f: F, polls: u64) -> bool {
    let mut f = std::pin::pin!(f);
    let mut left = polls;
    std::future::poll_fn(|cx| {
        if left == 0 {
            return std::task::Poll::Ready(false);
        }
        left -= 1;
        match f.as_mut().poll(cx) {
            std::task::Poll::Ready(_) => std::task::Poll::Ready(true),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
    .await
}

/// Writes, write-zeroes and discards dropped at random await points (the file below yields at
/// random) leave an image with no corruption that holds every request that completed, now and
/// after it is reopened and written again.
fn dropped_requests(opts: CreateOptions, seed: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tmp();
    let path = p(&dir, "dropped.qcow2");
    let gens = 1..=8u64;
    let mut model = Model::zeroed(POINT_SIZE);
    let dropped = rt.block_on(async {
        create_qcow2(&path, &opts).await;
        let file = Yielding {
            inner: FileDriver::open(FileOptions::new(&path)).expect("open file"),
            n: AtomicU64::new(seed),
        };
        let file_node = BlockNode::new("file", Arc::new(file));
        let qcow2 = Qcow2Driver::open(Child::new(ChildRole::File, file_node), true, None)
            .await
            .expect("open qcow2");
        let node = BlockNode::new("qcow2", Arc::new(qcow2));
        let mut rng = Rng(seed);
        let mut dropped = Vec::new();
        for gen in gens.clone() {
            let mut tasks = tokio::task::JoinSet::new();
            for op in generation(gen, POINT_SIZE) {
                // Two requests in three get a limited number of polls: one, or up to 60 (a
                // request that ran to completion elsewhere needs two).
                let polls = match rng.below(3) {
                    0 => 1,
                    1 => 1 + rng.below(60),
                    _ => u64::MAX,
                };
                let node = node.clone();
                tasks.spawn(async move { (op, within_polls(run(&node, op), polls).await) });
            }
            while let Some(res) = tasks.join_next().await {
                let (op, finished) = res.expect("join");
                if !finished {
                    dropped.push((gen, op));
                }
            }
            // Whatever a dropped request still does is done before the next generation.
            drop(node.drain().await);
            node.flush().await.expect("flush");
        }
        node.close().await.expect("close");
        dropped
    });
    for gen in gens.clone() {
        model.apply(gen, POINT_SIZE);
    }
    for (gen, op) in &dropped {
        let (s, e) = op.range();
        model.bytes[s as usize..e as usize].fill(None);
        model.origin[s as usize..e as usize].fill(*gen);
    }
    assert!(!dropped.is_empty(), "no request was dropped");
    let leaks = check_no_corruption(&path);
    let r = Round {
        what: format!(
            "{} requests dropped (seed {seed}, {leaks} leaks)",
            dropped.len()
        ),
        gens: gens.clone(),
        path: &path,
        cluster_size: opts.cluster_size,
    };
    rt.block_on(verify(&mut model, POINT_SIZE, &r));
    let later = 9..=10u64;
    rt.block_on(async {
        let node = open_rw(&path).await;
        for gen in later.clone() {
            if let Some(e) = run_generation(&node, gen, POINT_SIZE).await {
                panic!("request after reopening: {e}");
            }
        }
        node.flush().await.expect("flush after reopening");
        node.close().await.expect("close after reopening");
    });
    for gen in later.clone() {
        model.apply(gen, POINT_SIZE);
    }
    check_no_corruption(&path);
    let r = Round {
        what: format!("written again after dropped requests (seed {seed})"),
        gens: later,
        ..r
    };
    rt.block_on(verify(&mut model, POINT_SIZE, &r));
}

#[test]
fn dropped_requests_leave_a_consistent_image() {
    for seed in 1..=6 {
        dropped_requests(CreateOptions::new(POINT_SIZE), seed);
        let mut small = CreateOptions::new(POINT_SIZE);
        small.cluster_size = 4096;
        small.refcount_bits = 2;
        dropped_requests(small, seed);
    }
}
