//! Conformance: every driver, under random reads, writes, write-zeroes, discards and flushes,
//! many of them in flight at once, behaves like an in-memory disk.
//!
//! A case is a list of batches; the requests of one batch run concurrently. The model keeps,
//! for each byte, its value or "unknown" (after a discard, whose result a driver may choose).
//! While a batch runs, a read may see, for each byte, the value before the batch or the value
//! of any request of the batch touching that byte; after the batch, a byte touched by several
//! requests holds one of their values, which a verification read learns. At the end of a case
//! the image is closed, `qemu-img check`ed (qcow2), reopened and compared with the model.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use block::{BlockNode, Child, ChildRole, IoVec, WriteFlags, ZeroFlags};
use bytes::Bytes;
use common::*;
use drivers::file::{Aio, FileDriver, FileOptions};
use drivers::null::NullDriver;
use drivers::qcow2::{CreateOptions, Preallocation};
use drivers::raw::RawDriver;
use drivers::{open_image, OpenOptions};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Size of every disk under test.
const SIZE: u64 = 4 << 20;
/// Where the raw window starts inside its file, and the guard bytes around it.
const RAW_OFFSET: u64 = 4608;
const GUARD: u8 = 0xee;
/// Content of the backing file of the qcow2 overlay subjects.
const BACKING_SEED: u8 = 0x5a;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
});

/// The byte a write with `seed` puts at disk offset `pos`: position-dependent, so data that
/// lands at the wrong offset is caught.
fn pattern(seed: u8, pos: u64) -> u8 {
    let x = pos ^ (pos >> 9) ^ (pos >> 17);
    (x as u8).wrapping_mul(31).wrapping_add(seed) | 1
}

#[derive(Clone, Debug)]
enum Op {
    Read {
        off: u64,
        len: u64,
    },
    Write {
        off: u64,
        len: u64,
        seed: u8,
        parts: u8,
        fua: bool,
    },
    Zeroes {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
}

impl Op {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { off, len, .. } | Op::Zeroes { off, len, .. } | Op::Discard { off, len } => {
                Some((off, off + len))
            }
            Op::Read { .. } | Op::Flush => None,
        }
    }

    /// What the request leaves at `pos` (inside its range): a value, or `None` for unknown.
    fn effect(&self, pos: u64, null: bool) -> Option<u8> {
        if null {
            return Some(0);
        }
        match *self {
            Op::Write { seed, .. } => Some(pattern(seed, pos)),
            Op::Zeroes { .. } => Some(0),
            _ => None,
        }
    }
}

/// Offsets biased towards sector, page and cluster boundaries, where drivers split requests.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..SIZE,
        (0..SIZE / 512).prop_map(|s| s * 512),
        (0..SIZE / 4096).prop_map(|p| p * 4096),
        (0..SIZE / 65536, -3i64..3).prop_map(|(c, d)| (c * 65536).saturating_add_signed(d)),
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        1u64..600,
        (1u64..64).prop_map(|s| s * 512),
        Just(65536u64),
        1u64..(300 << 10),
        (1u64..4).prop_map(|m| m << 20),
    ]
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (offset(), length()).prop_map(|(off, len)| {
        let off = off.min(SIZE - 1);
        (off, len.min(SIZE - off).max(1))
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => range().prop_map(|(off, len)| Op::Read { off, len }),
        5 => (range(), any::<u8>(), 1u8..4, any::<bool>())
            .prop_map(|((off, len), seed, parts, fua)| Op::Write { off, len, seed, parts, fua }),
        2 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zeroes { off, len, unmap }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
    ]
}

fn batches() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..12), 1..8)
}

/// Byte-wise model of a disk.
struct Model {
    bytes: Vec<Option<u8>>,
    null: bool,
}

impl Model {
    /// Checks `data`, read at `off` while the requests of `batch` ran concurrently.
    fn check_read(&self, off: u64, data: &[u8], batch: &[Op]) -> Result<(), String> {
        let end = off + data.len() as u64;
        let racing: Vec<&Op> = batch
            .iter()
            .filter(|o| o.range().is_some_and(|(s, e)| s < end && off < e))
            .collect();
        for (i, &got) in data.iter().enumerate() {
            let pos = off + i as u64;
            let before = self.bytes[pos as usize];
            if before == Some(got) {
                continue;
            }
            let mut allowed = vec![before];
            for other in &racing {
                if other.range().is_some_and(|(s, e)| (s..e).contains(&pos)) {
                    allowed.push(other.effect(pos, self.null));
                }
            }
            if !allowed.contains(&None) && !allowed.contains(&Some(got)) {
                return Err(format!(
                    "byte {pos}: read {got:#04x}, expected one of {allowed:x?}"
                ));
            }
        }
        Ok(())
    }
}

/// One kind of disk under test: how to create it, open it again, and what it starts with.
#[derive(Clone, Copy, Debug)]
enum Subject {
    /// `threads`: the thread-pool engine instead of the default (io_uring).
    File {
        direct: bool,
        threads: bool,
    },
    RawWindow,
    Null,
    Qcow2(Qcow2Shape),
}

#[derive(Clone, Copy, Debug)]
struct Qcow2Shape {
    version: u32,
    cluster_size: u32,
    refcount_bits: u32,
    backing: bool,
    prealloc: bool,
    lazy: bool,
    direct: bool,
}

impl Qcow2Shape {
    const DEFAULT: Qcow2Shape = Qcow2Shape {
        version: 3,
        cluster_size: 65536,
        refcount_bits: 16,
        backing: false,
        prealloc: false,
        lazy: false,
        direct: false,
    };
}

struct Disk {
    node: Arc<BlockNode>,
    path: PathBuf,
}

impl Subject {
    fn initial(self) -> Model {
        let bytes = match self {
            Subject::Qcow2(Qcow2Shape { backing: true, .. }) => {
                (0..SIZE).map(|p| Some(pattern(BACKING_SEED, p))).collect()
            }
            Subject::RawWindow => vec![Some(GUARD); SIZE as usize],
            _ => vec![Some(0); SIZE as usize],
        };
        Model {
            bytes,
            null: matches!(self, Subject::Null),
        }
    }

    async fn create(self, dir: &Path) -> Disk {
        let path = dir.join("disk");
        match self {
            Subject::File { .. } | Subject::Null => {
                FileDriver::create(&path, SIZE).expect("create");
            }
            Subject::RawWindow => {
                let len = SIZE + 2 * RAW_OFFSET;
                std::fs::write(&path, vec![GUARD; len as usize]).expect("write guard");
            }
            Subject::Qcow2(shape) => {
                let mut opts = CreateOptions::new(SIZE);
                opts.version = shape.version;
                opts.cluster_size = u64::from(shape.cluster_size);
                opts.refcount_bits = shape.refcount_bits;
                opts.lazy_refcounts = shape.lazy;
                if shape.prealloc {
                    opts.preallocation = Preallocation::Metadata;
                }
                if shape.backing {
                    let base = dir.join("base.raw");
                    let data: Vec<u8> = (0..SIZE).map(|p| pattern(BACKING_SEED, p)).collect();
                    std::fs::write(&base, data).expect("write base");
                    opts.backing_file = Some("base.raw".into());
                    opts.backing_format = Some("raw".into());
                }
                create_qcow2(&path, &opts).await;
            }
        }
        self.open(&path).await
    }

    async fn open(self, path: &Path) -> Disk {
        let file = |direct: bool, threads: bool| {
            let mut o = FileOptions::new(path);
            o.direct = direct;
            o.aio = threads.then_some(Aio::Threads);
            BlockNode::new("file", Arc::new(FileDriver::open(o).expect("open file")))
        };
        let node = match self {
            Subject::File { direct, threads } => file(direct, threads),
            Subject::Null => BlockNode::new("null", Arc::new(NullDriver::new(SIZE))),
            Subject::RawWindow => {
                let child = Child::new(ChildRole::File, file(false, false));
                let raw = RawDriver::new(child, RAW_OFFSET, Some(SIZE), true).expect("raw");
                BlockNode::new("raw", Arc::new(raw))
            }
            Subject::Qcow2(shape) => {
                let opts = OpenOptions {
                    direct: shape.direct,
                    ..OpenOptions::default()
                };
                open_image(path, None, &opts).await.expect("open qcow2")
            }
        };
        Disk {
            node,
            path: path.to_path_buf(),
        }
    }

    /// Checks the disk's container after close: qcow2 metadata, raw guard bytes.
    fn check_container(self, path: &Path) -> Result<(), String> {
        match self {
            Subject::Qcow2(_) => {
                let (ok, text) = qemu("qemu-img", &["check", s(path)]);
                // Leaks are allowed only where a crash could cause them; a clean close has none.
                if !ok || !text.contains("No errors were found") || text.contains("leaked") {
                    return Err(format!("qemu-img check:\n{text}"));
                }
            }
            Subject::RawWindow => {
                let all = std::fs::read(path).map_err(|e| e.to_string())?;
                let (head, rest) = all.split_at(RAW_OFFSET as usize);
                let tail = &rest[SIZE as usize..];
                if head.iter().chain(tail).any(|&b| b != GUARD) {
                    return Err("bytes outside the raw window changed".into());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

async fn run_op(node: Arc<BlockNode>, op: Op) -> Result<Option<Bytes>, String> {
    let res = match op {
        Op::Read { off, len } => {
            return node
                .read(off, len as usize)
                .await
                .map(Some)
                .map_err(|e| e.to_string())
        }
        Op::Write {
            off,
            len,
            seed,
            parts,
            fua,
        } => {
            let data: Vec<u8> = (off..off + len).map(|p| pattern(seed, p)).collect();
            let data = Bytes::from(data);
            let mut iov = IoVec::new();
            let step = (len as usize).div_ceil(parts as usize);
            let mut at = 0;
            while at < data.len() {
                let end = (at + step).min(data.len());
                iov.push(data.slice(at..end));
                at = end;
            }
            node.write(
                off,
                iov,
                WriteFlags {
                    fua,
                    ..WriteFlags::default()
                },
            )
            .await
        }
        Op::Zeroes { off, len, unmap } => {
            let flags = ZeroFlags {
                may_unmap: unmap,
                ..ZeroFlags::default()
            };
            node.write_zeroes(off, len, flags).await
        }
        Op::Discard { off, len } => node.discard(off, len).await,
        Op::Flush => node.flush().await,
    };
    res.map(|()| None).map_err(|e| format!("{op:?}: {e}"))
}

/// Reads the whole disk and compares every known byte with the model.
async fn verify_all(node: &BlockNode, model: &Model, what: &str) -> Result<(), String> {
    let chunk = 1 << 20;
    for off in (0..SIZE).step_by(chunk) {
        let data = node
            .read(off, chunk)
            .await
            .map_err(|e| format!("{what}: read {off}: {e}"))?;
        model
            .check_read(off, &data, &[])
            .map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

async fn run_case(subject: Subject, batches: Vec<Vec<Op>>) -> Result<(), String> {
    let dir = tmp();
    let disk = subject.create(dir.path()).await;
    let node = disk.node.clone();
    let mut model = subject.initial();
    for batch in &batches {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, op) in batch.iter().enumerate() {
            let node = node.clone();
            let op = op.clone();
            tasks.spawn(async move { (i, run_op(node, op).await) });
        }
        while let Some(joined) = tasks.join_next().await {
            let (i, res) = joined.map_err(|e| e.to_string())?;
            if let Some(data) = res? {
                let Op::Read { off, .. } = batch[i] else {
                    unreachable!("only reads return data")
                };
                let others: Vec<Op> = batch
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, o)| o.clone())
                    .collect();
                model
                    .check_read(off, &data, &others)
                    .map_err(|e| format!("{:?}: {e}", batch[i]))?;
            }
        }
        apply_batch(&node, &mut model, batch).await?;
    }
    node.flush()
        .await
        .map_err(|e| format!("final flush: {e}"))?;
    verify_all(&node, &model, "before close").await?;
    node.close().await.map_err(|e| format!("close: {e}"))?;
    drop(node);
    drop(disk.node);
    subject.check_container(&disk.path)?;
    let again = subject.open(&disk.path).await;
    verify_all(&again.node, &model, "after reopen").await?;
    again
        .node
        .close()
        .await
        .map_err(|e| format!("close again: {e}"))
}

/// Folds a finished batch into the model. Bytes written by one request take its value; bytes
/// written by several take one of their values, which a read learns and checks.
async fn apply_batch(node: &BlockNode, model: &mut Model, batch: &[Op]) -> Result<(), String> {
    let writers: Vec<(u64, u64, &Op)> = batch
        .iter()
        .filter_map(|o| o.range().map(|(s, e)| (s, e, o)))
        .collect();
    // Cut the disk at every request boundary; each piece is covered by a fixed set of requests.
    let mut cuts: Vec<u64> = writers.iter().flat_map(|&(s, e, _)| [s, e]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut contested: Vec<(u64, u64, Vec<&Op>)> = Vec::new();
    for piece in cuts.windows(2) {
        let (s, e) = (piece[0], piece[1]);
        let covering: Vec<&Op> = writers
            .iter()
            .filter(|&&(ws, we, _)| ws <= s && e <= we)
            .map(|&(_, _, o)| o)
            .collect();
        match covering.as_slice() {
            [] => {}
            [only] => {
                for pos in s..e {
                    model.bytes[pos as usize] = only.effect(pos, model.null);
                }
            }
            _ => contested.push((s, e, covering)),
        }
    }
    for (s, e, covering) in contested {
        let data = node
            .read(s, (e - s) as usize)
            .await
            .map_err(|err| format!("verification read: {err}"))?;
        for pos in s..e {
            let got = data[(pos - s) as usize];
            let candidates: Vec<Option<u8>> =
                covering.iter().map(|o| o.effect(pos, model.null)).collect();
            model.bytes[pos as usize] = if candidates.contains(&None) {
                None
            } else if candidates.contains(&Some(got)) {
                Some(got)
            } else {
                return Err(format!(
                    "byte {pos} after concurrent writes: {got:#04x}, expected one of {candidates:x?}"
                ));
            };
        }
    }
    Ok(())
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    Config {
        cases,
        ..Config::default()
    }
}

fn conform(subject: Subject) {
    proptest!(config(), |(b in batches())| {
        let res = RT.block_on(run_case(subject, b));
        prop_assert!(res.is_ok(), "{subject:?}: {}", res.err().unwrap_or_default());
    });
}

#[test]
fn file_buffered() {
    conform(Subject::File {
        direct: false,
        threads: false,
    });
}

#[test]
fn file_direct() {
    conform(Subject::File {
        direct: true,
        threads: false,
    });
}

#[test]
fn file_buffered_thread_pool() {
    conform(Subject::File {
        direct: false,
        threads: true,
    });
}

#[test]
fn file_direct_thread_pool() {
    conform(Subject::File {
        direct: true,
        threads: true,
    });
}

#[test]
fn raw_window() {
    conform(Subject::RawWindow);
}

#[test]
fn null_co() {
    conform(Subject::Null);
}

#[test]
fn qcow2_v3_64k() {
    conform(Subject::Qcow2(Qcow2Shape::DEFAULT));
}

#[test]
fn qcow2_v2_64k() {
    conform(Subject::Qcow2(Qcow2Shape {
        version: 2,
        ..Qcow2Shape::DEFAULT
    }));
}

#[test]
fn qcow2_512b_clusters_1bit_refcounts() {
    conform(Subject::Qcow2(Qcow2Shape {
        cluster_size: 512,
        refcount_bits: 1,
        ..Qcow2Shape::DEFAULT
    }));
}

#[test]
fn qcow2_2m_clusters() {
    conform(Subject::Qcow2(Qcow2Shape {
        cluster_size: 2 << 20,
        ..Qcow2Shape::DEFAULT
    }));
}

#[test]
fn qcow2_over_backing() {
    conform(Subject::Qcow2(Qcow2Shape {
        cluster_size: 4096,
        backing: true,
        ..Qcow2Shape::DEFAULT
    }));
}

#[test]
fn qcow2_metadata_preallocated_lazy_refcounts() {
    conform(Subject::Qcow2(Qcow2Shape {
        prealloc: true,
        lazy: true,
        ..Qcow2Shape::DEFAULT
    }));
}

#[test]
fn qcow2_direct() {
    conform(Subject::Qcow2(Qcow2Shape {
        direct: true,
        ..Qcow2Shape::DEFAULT
    }));
}
