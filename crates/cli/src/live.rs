//! `blockjob demo`: a live backup while a writer runs, on built-in defaults.
//!
//! In a temporary directory: a qcow2 disk with data, the daemon started in this process (the
//! same code as `blockjobd`, driven over its QMP socket), the disk exported over NBD, and a
//! writer changing it through the export, one 4 KiB write at a time, keeping a model of what
//! the disk holds after each write. While it writes: a full backup together with a new dirty
//! bitmap (one `transaction`, one point in time), then an incremental backup into a qcow2
//! backed by the full one. Each is verified against the model at its point in time: the
//! command's drained section falls between two writes, so the copy must equal the disk after
//! one of the writes the writer had completed or had in flight while the command ran.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::{BlockError, BlockNode, IoVec, Result, WriteFlags};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::image;

fn fail(msg: impl Into<String>) -> BlockError {
    BlockError::new(block::ErrorKind::Io, msg.into())
}

/// A minimal blocking QMP client (the demo's own control connection).
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(BlockError::io("connecting to the daemon", e)),
            }
        };
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| BlockError::io("qmp socket", e))?,
        );
        let mut q = Qmp {
            writer: stream,
            reader,
        };
        q.line()?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value> {
        let mut s = String::new();
        self.reader
            .read_line(&mut s)
            .map_err(|e| BlockError::io("reading QMP", e))?;
        serde_json::from_str(&s).map_err(|e| fail(format!("bad QMP message: {e}")))
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        let msg = json!({"execute": name, "arguments": args}).to_string() + "\n";
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| BlockError::io("writing QMP", e))?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(fail(format!("{name}: {}", e["desc"])));
            }
            return Ok(v["return"].clone());
        }
    }

    /// Waits for job `id` to finish, drawing its progress; returns its length (bytes copied).
    fn wait_job(&mut self, id: &str, tty: bool) -> Result<u64> {
        let mut last = (0, 0);
        loop {
            let jobs = self.cmd("query-block-jobs", json!({}))?;
            let job = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j["device"] == id).cloned());
            let Some(job) = job else {
                if tty {
                    println!();
                }
                return Ok(last.1);
            };
            let (done, len) = (
                job["offset"].as_u64().unwrap_or(0),
                job["len"].as_u64().unwrap_or(0),
            );
            last = (done, len);
            if let Some(e) = job.get("error") {
                return Err(fail(format!("backup {id} failed: {e}")));
            }
            if tty {
                let width = 40;
                let filled = (done * width).checked_div(len).unwrap_or(width).min(width);
                print!(
                    "\r  {id:5} [{}{}] {:>9} / {}",
                    "#".repeat(filled as usize),
                    " ".repeat((width - filled) as usize),
                    image::human(done),
                    image::human(len)
                );
                let _ = std::io::stdout().flush();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What the writer did: the disk after each completed write, by sequence number.
#[derive(Debug)]
struct Log {
    /// Writes in order: (offset, byte).
    writes: Vec<(u64, u8)>,
    /// Latency of each write, and whether a backup was running.
    latencies: Vec<(Duration, bool)>,
}

const WRITE: usize = 4096;

/// The writer: random 4 KiB writes through the NBD export, one at a time.
async fn writer(
    disk: Arc<BlockNode>,
    size: u64,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
) -> Result<()> {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let offset = (seed % (size / WRITE as u64)) * WRITE as u64;
        n += 1;
        let byte = (n % 251) as u8 + 1;
        let during = busy.load(Ordering::Relaxed);
        let t = Instant::now();
        disk.write(
            offset,
            IoVec::from(Bytes::from(vec![byte; WRITE])),
            WriteFlags::default(),
        )
        .await?;
        let took = t.elapsed();
        {
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            l.writes.push((offset, byte));
            l.latencies
                .push((took, during && busy.load(Ordering::Relaxed)));
        }
        // About 1,000 writes a second: a guest doing work, not a benchmark.
        tokio::time::sleep(Duration::from_micros(800)).await;
    }
    Ok(())
}

/// The disk's content after the first `k` writes of the log, starting from `base`.
fn model_after(base: &[u8], writes: &[(u64, u8)], k: usize) -> Vec<u8> {
    let mut m = base.to_vec();
    for &(off, b) in &writes[..k] {
        m[off as usize..off as usize + WRITE].fill(b);
    }
    m
}

/// Which prefix of the log the image equals, among `candidates`.
async fn matches(
    image_path: &Path,
    base: &[u8],
    writes: &[(u64, u8)],
    candidates: std::ops::RangeInclusive<usize>,
) -> Result<Option<usize>> {
    let node = image::open(image_path, Some("qcow2"), true, image::Cache::default()).await?;
    let got = node.read(0, base.len()).await?;
    for k in candidates {
        if got[..] == model_after(base, writes, k)[..] {
            return Ok(Some(k));
        }
    }
    Ok(None)
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p) as usize]
}

/// Runs the demo in `dir` (kept when `keep`).
pub async fn run(size: u64, keep: bool) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("blockjob-demo")
        .tempdir()
        .map_err(|e| BlockError::io("creating a temporary directory", e))?;
    let dir: PathBuf = tmp.path().to_owned();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    println!(
        "demo: a {} qcow2 disk in {}",
        image::human(size),
        dir.display()
    );
    let disk_path = dir.join("disk.qcow2");
    image::create(&disk_path, drivers::Format::Qcow2, size, None).await?;
    let base: Vec<u8> = (0..size)
        .map(|i| ((i >> 16) as u8) ^ (i as u8 & 0x0f))
        .collect();
    {
        let node = image::open(&disk_path, Some("qcow2"), false, image::Cache::default()).await?;
        let mut at = 0;
        while at < size {
            let n = (4u64 << 20).min(size - at) as usize;
            node.write(
                at,
                IoVec::from(Bytes::copy_from_slice(&base[at as usize..at as usize + n])),
                WriteFlags::default(),
            )
            .await?;
            at += n as u64;
        }
        node.close().await?;
    }
    image::create(&dir.join("full.qcow2"), drivers::Format::Qcow2, size, None).await?;
    let inc_opts = {
        let mut o = drivers::qcow2::CreateOptions::new(size);
        o.backing_file = Some("full.qcow2".into());
        o.backing_format = Some("qcow2".into());
        o
    };
    image::create(
        &dir.join("inc.qcow2"),
        drivers::Format::Qcow2,
        size,
        Some(inc_opts),
    )
    .await?;

    // The daemon, in this process, with qemu-storage-daemon's options.
    let qmp = dir.join("qmp.sock");
    let nbd = dir.join("nbd.sock");
    let args: Vec<String> = vec![
        "--chardev".into(),
        format!("socket,id=m,path={},server=on,wait=off", qmp.display()),
        "--monitor".into(),
        "chardev=m".into(),
        "--blockdev".into(),
        format!("driver=file,node-name=f0,filename={}", disk_path.display()),
        "--blockdev".into(),
        "driver=qcow2,node-name=disk,file=f0".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", nbd.display()),
        "--export".into(),
        "type=nbd,id=e,node-name=disk,writable=on".into(),
    ];
    let config = match daemon::cli::parse(args) {
        Ok(daemon::cli::Action::Run(c)) => c,
        Ok(_) => return Err(fail("demo: unexpected daemon options")),
        Err(e) => return Err(fail(format!("demo: daemon options: {e}"))),
    };
    let daemon = tokio::spawn(daemon::server::run(config, || {}));
    let qmp_path = qmp.clone();
    let mut q = tokio::task::spawn_blocking(move || Qmp::connect(&qmp_path))
        .await
        .map_err(|e| fail(e.to_string()))??;
    let client = drivers::nbd::NbdDriver::connect(
        nbd::ConnectTo::Unix(nbd.clone()),
        "disk",
        Duration::ZERO,
        false,
    )
    .await?;
    let export = BlockNode::new("nbd", Arc::new(client));

    let log = Arc::new(Mutex::new(Log {
        writes: Vec::new(),
        latencies: Vec::new(),
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let busy = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(
        export.clone(),
        size,
        log.clone(),
        stop.clone(),
        busy.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let count = |log: &Mutex<Log>| log.lock().unwrap_or_else(|p| p.into_inner()).writes.len();

    // The targets, added over QMP as a management tool would.
    let full_file = dir.join("full.qcow2").display().to_string();
    let inc_file = dir.join("inc.qcow2").display().to_string();
    q = tokio::task::spawn_blocking(move || -> Result<Qmp> {
        q.cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "full",
                   "file": {"driver": "file", "filename": full_file}}),
        )?;
        q.cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "inc", "backing": null,
                   "file": {"driver": "file", "filename": inc_file}}),
        )?;
        Ok(q)
    })
    .await
    .map_err(|e| fail(e.to_string()))??;
    println!("demo: full backup while the writer runs (with a new bitmap, in one transaction)");
    busy.store(true, Ordering::Relaxed);
    let before = count(&log);
    let t = Instant::now();
    q = tokio::task::spawn_blocking(move || -> Result<Qmp> {
        q.cmd(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "inc"}},
                {"type": "blockdev-backup", "data": {"job-id": "full", "device": "disk",
                 "target": "full", "sync": "full"}}
            ]}),
        )?;
        Ok(q)
    })
    .await
    .map_err(|e| fail(e.to_string()))??;
    let after = count(&log);
    let (mut q, full_len) = tokio::task::spawn_blocking(move || -> Result<(Qmp, u64)> {
        let n = q.wait_job("full", tty)?;
        Ok((q, n))
    })
    .await
    .map_err(|e| fail(e.to_string()))??;
    let full_time = t.elapsed();
    busy.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;

    println!("demo: incremental backup into a qcow2 backed by the full one");
    busy.store(true, Ordering::Relaxed);
    let before_inc = count(&log);
    q = tokio::task::spawn_blocking(move || -> Result<Qmp> {
        q.cmd(
            "blockdev-backup",
            json!({"job-id": "inc", "device": "disk", "target": "inc",
                   "sync": "incremental", "bitmap": "inc"}),
        )?;
        Ok(q)
    })
    .await
    .map_err(|e| fail(e.to_string()))??;
    let after_inc = count(&log);
    let (q, inc_len) = tokio::task::spawn_blocking(move || -> Result<(Qmp, u64)> {
        let n = q.wait_job("inc", tty)?;
        Ok((q, n))
    })
    .await
    .map_err(|e| fail(e.to_string()))??;
    busy.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    w.await.map_err(|e| fail(e.to_string()))??;
    drop(export);
    let mut q = q;
    let _ = tokio::task::spawn_blocking(move || q.cmd("quit", json!({}))).await;
    let _ = daemon.await;

    let l = Arc::try_unwrap(log)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .map_err(|_| fail("demo: the writer still holds its log"))?;
    // The point in time fell between the writes completed before the command was sent and
    // the write in flight when its reply came.
    let full_at = matches(
        &dir.join("full.qcow2"),
        &base,
        &l.writes,
        before..=(after + 1).min(l.writes.len()),
    )
    .await?;
    let inc_at = matches(
        &dir.join("inc.qcow2"),
        &base,
        &l.writes,
        before_inc..=(after_inc + 1).min(l.writes.len()),
    )
    .await?;
    let idle: Vec<Duration> = l.latencies.iter().filter(|x| !x.1).map(|x| x.0).collect();
    let during: Vec<Duration> = l.latencies.iter().filter(|x| x.1).map(|x| x.0).collect();
    println!(
        "demo: full backup: {} in {:.2}s ({:.0} MiB/s) while the writer made {} writes",
        image::human(full_len),
        full_time.as_secs_f64(),
        full_len as f64 / full_time.as_secs_f64().max(1e-9) / 1048576.0,
        l.writes.len()
    );
    println!(
        "demo: incremental backup copied {} (the clusters written since the full one)",
        image::human(inc_len)
    );
    println!(
        "demo: guest write latency p50/p99: idle {:?}/{:?}, during backups {:?}/{:?}",
        percentile(idle.clone(), 0.5),
        percentile(idle, 0.99),
        percentile(during.clone(), 0.5),
        percentile(during, 0.99)
    );
    let verdict = |name: &str, at: Option<usize>| match at {
        Some(k) => {
            println!(
                "demo: verified: {name} equals the disk after write #{k}, when the command ran"
            );
            Ok(())
        }
        None => Err(fail(format!(
            "demo: {name} is not the disk at its point in time"
        ))),
    };
    verdict("full.qcow2", full_at)?;
    verdict("inc.qcow2 (over full.qcow2)", inc_at)?;
    if keep {
        let kept = tmp.keep();
        println!("demo: files kept in {}", kept.display());
    }
    Ok(())
}
