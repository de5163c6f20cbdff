//! The backup job (`blockdev-backup`, `drive-backup`).
//!
//! ```text
//!   before:   export ──▶ source                after:  export ──▶ copy-before-write ──file──▶ source
//!                                                                      │   ▲ job (root edge)
//!                                                                      └──target──▶ target ◀── job
//! ```
//!
//! **The point in time.** [`Backup::prepare`] inserts the copy-before-write filter above the
//! source: every parent of the source (an NBD export, an overlay) is re-pointed at the filter
//! in one drained section, and the filter's copy bitmap is complete before the section ends.
//! No write can reach the source between the instant the section began and the filter's
//! arrival (the section waits for writes in flight and holds new ones at the gate; a write
//! let in after re-checks its edge and goes to the filter). Once the filter has a parent (the
//! job), nothing else may write the source directly: its permissions unshare writing. So the
//! point in time is the drained section of the command, or of the whole `transaction`.
//!
//! **The copy.** The job's `run` copies what the copy bitmap still holds, up to
//! `max-workers` chunks at once (with a speed limit, only as many as the speed needs),
//! charging its speed limit; guest writes copy their clusters
//! first through the filter (never rate-limited). sync=top first clears the clusters the
//! source's top layer does not allocate; sync=none copies nothing itself and runs until
//! cancelled; sync=bitmap (and incremental) starts from the user's bitmap.
//!
//! **Drained sections** over the source or the target pause the job before it claims more
//! work: it waits at that point until the section ends, and nothing shows in its status or
//! events (QEMU flaps `paused`/`running` for each drain).
//!
//! **The bitmap** (sync=bitmap or a bitmap with full/top) is frozen with a successor for the
//! job's life; at the end it is abdicated (the successor's writes replace it) when the job
//! succeeded or the mode is `always`, and reclaimed (merged back) otherwise; `never` always
//! reclaims; a failed `always` job also keeps the clusters it did not copy.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use block::graph::{self, Inserted};
use block::{BlockNode, Child, ChildRole, EdgePerm, EdgeSpec, Parent, PermPolicy};
use block_copy::{BlockCopy, Progress};
use filters::{CbwOptions, CopyBeforeWrite};
use job::{ErrorAction, IoOperation, JobContext, JobDriver};

/// QEMU's MirrorSyncMode, as backup uses it (`incremental` is `Bitmap` with on-success).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Everything.
    Full,
    /// What the top layer allocates.
    Top,
    /// Nothing by itself: only what guest writes copy (fleecing into an overlay).
    None,
    /// What the bitmap says.
    Bitmap,
}

/// QEMU's BitmapSyncMode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapMode {
    /// Cleared of what was copied when the job succeeds.
    OnSuccess,
    /// Left as it was.
    Never,
    /// Cleared of what was copied, whatever the outcome.
    Always,
}

/// QEMU's BlockdevOnError.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Report and retry.
    Ignore,
    /// Pause the job until resumed.
    Stop,
    /// Stop on ENOSPC, report otherwise.
    Enospc,
    /// The device's setting (report: qsd has no devices).
    Auto,
}

impl OnError {
    fn action(self, nospace: bool) -> ErrorAction {
        match self {
            OnError::Report | OnError::Auto => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc if nospace => ErrorAction::Stop,
            OnError::Enospc => ErrorAction::Report,
        }
    }
}

/// A checked backup request.
#[derive(Clone, Debug)]
pub struct BackupSpec {
    /// Job id (for the job's edges in messages).
    pub job_id: String,
    /// The node backed up.
    pub source: Arc<BlockNode>,
    /// Where the copy goes.
    pub target: Arc<BlockNode>,
    /// What is copied.
    pub sync: SyncMode,
    /// A bitmap of the source and what becomes of it.
    pub bitmap: Option<(String, BitmapMode)>,
    /// On a source read error.
    pub on_source_error: OnError,
    /// On a target write error.
    pub on_target_error: OnError,
    /// Name of the copy-before-write node.
    pub filter_node_name: String,
    /// Write the target compressed.
    pub compress: bool,
    /// Chunks copied at once by the background copy.
    pub max_workers: usize,
    /// Largest chunk (0 = default).
    pub max_chunk: u64,
    /// Smallest copy cluster (0 = none).
    pub min_cluster_size: u64,
    /// Copy in the kernel where both ends are files (`x-perf.use-copy-range`).
    pub use_copy_range: bool,
    /// Discard from the source what was copied (push fleecing from a snapshot-access node).
    pub discard_source: bool,
    /// What a failed copy of a guest write does (QEMU 10.1's `on-cbw-error`).
    pub on_cbw_error: filters::OnCbwError,
    /// The most the guest's requests through the filter should take on average while the
    /// background copy runs (ours, `x-perf.guest-latency-budget`): above it the copy keeps
    /// fewer chunks in flight. `None`: no budget.
    pub guest_latency_budget: Option<Duration>,
}

/// What the job holds in the graph until it is cleaned up; dropping it lets go of every
/// edge (the filter's to the source and the target, the job's own).
struct Parts {
    cbw: Arc<CopyBeforeWrite>,
    bcs: Arc<BlockCopy>,
    inserted: Inserted,
    edges: Vec<Arc<Child>>,
}

/// How many chunks the background copy keeps in flight, at most `max-workers` (QEMU runs
/// exactly that many).
///
/// With a speed limit, only as many as the speed needs given how long a chunk has been
/// taking, plus one: a throttled copy then moves its chunks one after the other instead of
/// in bursts of a whole 100 ms slice at once, and the guest's writes do not queue behind a
/// burst.
///
/// Without one, as many as still make the copy faster: starting from
/// [`ADAPT_START`], the limit doubles while each doubling raises the throughput measured over
/// a window ([`ADAPT_WINDOW`]) by at least [`ADAPT_GAIN`], and falls back to the best one
/// when it does not; every [`ADAPT_REPROBE`] windows it tries doubling again, since the
/// disk's load changes. On this host 64 chunks in flight copied slower than 16 (bench/
/// backup_speed.py), while each holds a chunk's buffer: more workers than the disk can use
/// cost memory and queue the guest's requests behind ours.
#[derive(Debug)]
struct Pace {
    /// Moving average of a chunk's copy time, seconds (0 until one finished).
    chunk_secs: f64,
    /// The unthrottled limit now.
    limit: usize,
    /// The limit with the best throughput seen, and that throughput (bytes/s).
    best: (usize, f64),
    /// The current window: since when, and bytes copied in it.
    window: (std::time::Instant, u64),
    /// The limit was just raised: the window tells whether that helped.
    probing: bool,
    /// Windows since the limit settled.
    settled_for: u32,
    /// The cap a guest-latency budget puts on the workers (halved when the guest's requests
    /// took longer than the budget over a window, one more when they did not).
    cap: usize,
    /// When the guest's latency was last looked at.
    looked: std::time::Instant,
    /// Under a guest-latency budget that one chunk in flight still exceeds, the largest chunk
    /// (halved each such window, down to [`THROTTLED_CHUNK_MIN`]; 0: no cap).
    chunk_cap: u64,
}

/// See [`Pace`].
const ADAPT_START: usize = 4;
const ADAPT_WINDOW: Duration = Duration::from_millis(250);
const ADAPT_GAIN: f64 = 1.10;
const ADAPT_REPROBE: u32 = 16;

impl Default for Pace {
    fn default() -> Self {
        Pace {
            chunk_secs: 0.0,
            limit: ADAPT_START,
            best: (ADAPT_START, 0.0),
            window: (std::time::Instant::now(), 0),
            probing: true,
            settled_for: 0,
            cap: usize::MAX,
            looked: std::time::Instant::now(),
            chunk_cap: 0,
        }
    }
}

impl Pace {
    /// A chunk of `bytes` finished after `took`, at `now`.
    fn record(&mut self, took: Duration, bytes: u64, now: std::time::Instant, max_workers: usize) {
        let t = took.as_secs_f64();
        self.chunk_secs = if self.chunk_secs == 0.0 {
            t
        } else {
            0.8 * self.chunk_secs + 0.2 * t
        };
        self.window.1 += bytes;
        let elapsed = now.saturating_duration_since(self.window.0);
        if elapsed >= ADAPT_WINDOW {
            let rate = self.window.1 as f64 / elapsed.as_secs_f64();
            self.adapt(rate, max_workers.max(1));
            self.window = (now, 0);
        }
    }

    /// One window's throughput at the current limit (see [`Pace`]).
    fn adapt(&mut self, rate: f64, max: usize) {
        if self.probing {
            if rate >= self.best.1 * ADAPT_GAIN {
                self.best = (self.limit, rate);
                if self.limit < max {
                    self.limit = (self.limit * 2).min(max);
                    return;
                }
            } else {
                self.limit = self.best.0;
            }
            self.probing = false;
            self.settled_for = 0;
        } else {
            // What the settled limit gives now is the bar for the next probe.
            self.best = (self.limit, rate);
            self.settled_for += 1;
            if self.settled_for >= ADAPT_REPROBE && self.limit < max {
                self.limit = (self.limit * 2).min(max);
                self.probing = true;
            }
        }
    }

    /// The guest's mean latency over the last window against `budget` (see `cap` and
    /// `chunk_cap`): over it, halve the chunks in flight, and once there is one, halve the
    /// chunk; within it, grow the chunk back first, then add a chunk in flight.
    fn guest(
        &mut self,
        latency: Option<Duration>,
        budget: Duration,
        max_workers: usize,
        chunk: u64,
    ) {
        let current = self.cap.min(max_workers.max(1));
        match latency {
            Some(l) if l > budget => {
                if current > 1 {
                    self.cap = current / 2;
                } else {
                    let c = if self.chunk_cap == 0 {
                        chunk
                    } else {
                        self.chunk_cap
                    };
                    self.cap = 1;
                    self.chunk_cap = (c / 2).max(THROTTLED_CHUNK_MIN);
                }
            }
            _ if self.chunk_cap != 0 => {
                self.cap = current;
                self.chunk_cap *= 2;
                if self.chunk_cap >= chunk {
                    self.chunk_cap = 0;
                }
            }
            _ => self.cap = (current + 1).min(max_workers.max(1)),
        }
    }

    fn workers(&self, speed: u64, chunk: u64, max_workers: usize) -> usize {
        let max = max_workers.max(1).min(self.cap.max(1));
        if speed == 0 {
            return self.limit.clamp(1, max);
        }
        if chunk == 0 {
            return max;
        }
        // Chunks per second the speed allows, times how long each stays in flight.
        let needed = (speed as f64 / chunk as f64 * self.chunk_secs).ceil() as usize;
        (needed + 1).clamp(1, max)
    }

    /// The largest chunk the background copy takes at `speed` (0: no limit beyond the copy's
    /// own). A throttled copy needs no large chunks for its throughput, and a guest request
    /// that reaches the disk behind a copy's read or write waits for all of it: at 64 MiB/s,
    /// 256 KiB chunks instead of 1 MiB took the guest's p99 during the backup from 2.1 to
    /// 1.45 ms (bench/backup.sh, O_DIRECT). At most `THROTTLED_CHUNKS_PER_SEC` chunks a
    /// second, none smaller than `THROTTLED_CHUNK_MIN`. Below the speed where that minimum
    /// is reached (16 MiB/s) chunks stay whole, so that a job throttled to a crawl (tools
    /// and tests hold jobs that way) shows QEMU's progress: its first chunk, then nothing.
    fn chunk_limit(speed: u64) -> u64 {
        if speed < THROTTLED_CHUNKS_PER_SEC * THROTTLED_CHUNK_MIN {
            return 0;
        }
        speed / THROTTLED_CHUNKS_PER_SEC
    }

    /// `max-workers`, and for an unthrottled copy no more chunks of `chunk` than fit in
    /// [`UNTHROTTLED_MEMORY`] (one at least): 4 of QEMU's 1 MiB, 64 of 64 KiB.
    ///
    /// On this host's disk a copy moves as fast with 4 MiB in flight as with 16 (fio: 1 MiB
    /// at depth 1-2 each way reaches the ~950 MiB/s it reads and writes at once;
    /// bench/copy_ceiling.sh), and QEMU's 64 chunks of 1 MiB held 74 MiB in
    /// bench/backup_speed.py. Smaller chunks instead of fewer would cost CPU: 16 of 256 KiB
    /// took twice the daemon's CPU time of 4 of 1 MiB for the same copy.
    fn max_workers(speed: u64, chunk: u64, max_workers: usize) -> usize {
        if speed != 0 || chunk == 0 {
            return max_workers.max(1);
        }
        let fit = usize::try_from(UNTHROTTLED_MEMORY / chunk).unwrap_or(usize::MAX);
        max_workers.clamp(1, fit.max(1))
    }
}

/// See [`Pace::chunk_limit`].
const THROTTLED_CHUNKS_PER_SEC: u64 = 256;
/// See [`Pace::max_workers`].
const UNTHROTTLED_MEMORY: u64 = 4 << 20;
const THROTTLED_CHUNK_MIN: u64 = 64 << 10;

/// A backup job; see the module docs.
pub struct Backup {
    spec: BackupSpec,
    parts: tokio::sync::Mutex<Option<Parts>>,
    filter: Weak<BlockNode>,
    /// The filter's driver, for a snapshot-access node opened on the filter (push fleecing).
    cbw: Weak<CopyBeforeWrite>,
    on_clean: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Awaited in `clean` before `on_clean` (closing a target the command opened).
    on_clean_async: Mutex<Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
}

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup")
            .field("job", &self.spec.job_id)
            .field("source", &self.spec.source.name())
            .field("target", &self.spec.target.name())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// QEMU's text for a block error: strerror without Rust's "(os error N)".
fn text(e: &block::BlockError) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// The background copy's tasks in flight.
///
/// Unthrottled, QEMU starts `max-workers` tasks at once. Here tasks that read hold buffers, so
/// fewer of them go out (see [`Pace`]); tasks that only write zeroes hold nothing and go out up
/// to `max-workers`, before the reads of the tasks started with them complete, as in QEMU (a
/// target that fails every write after the first data write still takes the zeroes then).
#[derive(Default)]
struct InFlight {
    set: tokio::task::JoinSet<(TaskResult, Duration, u64, bool)>,
    /// Tasks in flight that read.
    reading: usize,
    /// Tasks started so far, in order: a failure is acted on once the tasks QEMU would have
    /// had in flight with it are done.
    started: u64,
    /// Where the last task started ends.
    last_end: u64,
}

type TaskResult = Result<Result<u64, block_copy::CopyError>, tokio::task::JoinError>;

/// How far a copy call goes on after a failure or a cancel (see [`Backup::copy_window`]).
struct Window {
    /// Until this many tasks have started.
    until: u64,
    /// The job's speed limit (throttled calls launch nothing more).
    speed: u64,
    /// Tasks that read, in flight at once.
    workers: usize,
    /// The most one task takes (0: a chunk).
    limit: u64,
}

impl InFlight {
    /// Whether another task may start: throttled, `workers` tasks of any kind; unthrottled,
    /// `workers` that read and `max_workers` in all.
    fn has_room(&self, speed: u64, workers: usize, max_workers: usize) -> bool {
        match speed {
            0 => self.reading < workers && self.set.len() < max_workers.max(workers),
            _ => self.set.len() < workers,
        }
    }

    fn spawn(&mut self, task: block_copy::CopyTask, end: u64, zero: bool) {
        self.started += 1;
        self.last_end = end;
        let seq = self.started;
        if !zero {
            self.reading += 1;
        }
        self.set.spawn(async move {
            let began = std::time::Instant::now();
            (task.await, began.elapsed(), seq, zero)
        });
    }

    /// The next task to end: its result, how long it took and its place in the order.
    async fn join_next(
        &mut self,
    ) -> Option<Result<(TaskResult, Duration, u64), tokio::task::JoinError>> {
        let r = self.set.join_next().await?;
        Some(r.map(|(result, took, seq, zero)| {
            if !zero {
                self.reading -= 1;
            }
            (result, took, seq)
        }))
    }
}

/// What a failed job reports: strerror of the errno, as QEMU's backup does.
fn strerror(e: &block::BlockError) -> String {
    let s = std::io::Error::from_raw_os_error(e.errno()).to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

impl Backup {
    /// Freezes the bitmap, inserts the copy-before-write filter above the source and sets
    /// what is to be copied: after this the point in time is fixed. Refused with QEMU's
    /// messages, with nothing changed.
    pub async fn prepare(spec: BackupSpec) -> Result<Arc<Backup>, String> {
        let source = spec.source.clone();
        if let Some((name, mode)) = &spec.bitmap {
            if *mode != BitmapMode::Never {
                let readonly = source.with_bitmap(name, |b| b.readonly()).unwrap_or(false);
                if readonly {
                    return Err(format!(
                        "Bitmap '{name}' is readonly and cannot be modified"
                    ));
                }
            }
            source
                .with_bitmap(name, |b| b.create_successor())
                .unwrap_or(Err(bitmap::BitmapError::Busy))
                .map_err(|_| {
                    format!("Bitmap '{name}' is currently in use by another operation and cannot be used")
                })?;
        }
        let undo_bitmap = |source: &BlockNode| {
            if let Some((name, _)) = &spec.bitmap {
                source.with_bitmap(name, |b| b.reclaim());
            }
        };
        if source.len() != spec.target.len() {
            undo_bitmap(&source);
            return Err("Source and target image have different sizes".into());
        }
        if spec.min_cluster_size > i64::MAX as u64 {
            undo_bitmap(&source);
            return Err(format!(
                "min-cluster-size too large: {} > {}",
                spec.min_cluster_size,
                i64::MAX
            ));
        }
        let made = Self::insert(&spec).await;
        let (inserted, cbw) = match made {
            Ok(x) => x,
            Err(e) => {
                undo_bitmap(&source);
                return Err(e);
            }
        };
        let Some(bcs) = cbw.block_copy() else {
            undo_bitmap(&source);
            return Err("Could not create node: copy-before-write is not open".into());
        };
        let fail = |e: String| async {
            let _ = graph::remove_filter(&inserted).await;
            cbw.close_copy();
            undo_bitmap(&source);
            e
        };
        if spec.max_chunk != 0 && spec.max_chunk < bcs.cluster_size() {
            let e = format!(
                "Required max-chunk ({}) is less than backup cluster size ({})",
                spec.max_chunk,
                bcs.cluster_size()
            );
            return Err(fail(e).await);
        }
        let user = Parent::Job {
            kind: "backup",
            id: spec.job_id.clone(),
        };
        let edge = |node: &Arc<BlockNode>, name: &'static str| {
            Child::attach(
                EdgeSpec::new(ChildRole::Root, user.clone()).named(name),
                node.clone(),
                EdgePerm::FREE,
            )
        };
        let main = match edge(&inserted.filter, crate::MAIN_NODE) {
            Ok(e) => e,
            Err(e) => return Err(fail(text(&e)).await),
        };
        let target_edge = match edge(&spec.target, "target") {
            Ok(e) => e,
            Err(e) => return Err(fail(text(&e)).await),
        };
        if spec.sync == SyncMode::Bitmap {
            if let Some((name, _)) = &spec.bitmap {
                let bits = source.with_bitmap(name, |b| b.clone());
                bcs.with_bitmap(|c| {
                    c.clear();
                    if let Some(b) = &bits {
                        let _ = c.merge_from(b);
                    }
                });
            }
        }
        Ok(Arc::new(Backup {
            spec,
            filter: Arc::downgrade(&inserted.filter),
            cbw: Arc::downgrade(&cbw),
            parts: tokio::sync::Mutex::new(Some(Parts {
                cbw,
                bcs,
                inserted,
                edges: vec![main, target_edge],
            })),
            on_clean: Mutex::new(None),
            on_clean_async: Mutex::new(None),
        }))
    }

    async fn insert(spec: &BackupSpec) -> Result<(Inserted, Arc<CopyBeforeWrite>), String> {
        let filter = spec.filter_node_name.clone();
        let file_spec = EdgeSpec::new(ChildRole::Filtered, Parent::Node(filter.clone()))
            .named("file")
            .policy(if spec.discard_source {
                PermPolicy::CopySourceDiscard
            } else {
                PermPolicy::CopySource
            });
        let mut made: Option<Arc<CopyBeforeWrite>> = None;
        let target = spec.target.clone();
        let opts = CbwOptions {
            min_cluster_size: spec.min_cluster_size,
            compress: spec.compress,
            max_chunk: spec.max_chunk,
            discard_source: spec.discard_source,
            on_cbw_error: spec.on_cbw_error,
            use_copy_range: spec.use_copy_range,
            write_behind: true,
            ..CbwOptions::default()
        };
        let inserted = graph::insert_filter_with(&spec.source, Some(file_spec), |file| {
            let target_spec = EdgeSpec::new(ChildRole::Data, Parent::Node(filter.clone()))
                .named("target")
                .policy(PermPolicy::CopyTarget);
            let need = PermPolicy::CopyTarget.child_perm(true, false, EdgePerm::FREE);
            let target = Child::attach(target_spec, target, need)
                .map_err(|e| e.within("Could not create node"))?;
            let (node, cbw) = CopyBeforeWrite::open(filter.clone(), file, target, opts)
                .map_err(|e| e.within("Could not create node"))?;
            // QEMU opens the job's filter without `discard=unmap`: guest discards stop there
            // while the backup runs, and write-zeroes do not deallocate.
            node.set_discard_ignored(true);
            made = Some(cbw);
            Ok(node)
        })
        .await;
        match (inserted, made) {
            (Ok(i), Some(cbw)) => Ok((i, cbw)),
            (Err(e), made) => {
                if let Some(cbw) = made {
                    cbw.close_copy();
                }
                let t = text(&e);
                Err(if t.starts_with("Could not create node") {
                    t
                } else {
                    format!("Could not replace node: {t}")
                })
            }
            (Ok(i), None) => {
                let _ = graph::remove_filter(&i).await;
                Err("Could not create node".into())
            }
        }
    }

    /// The copy-before-write node, until the job is cleaned up.
    pub fn filter(&self) -> Option<Arc<BlockNode>> {
        self.filter.upgrade()
    }

    /// The filter's copy-before-write driver, until the job is cleaned up.
    pub fn copy_before_write(&self) -> Option<Arc<CopyBeforeWrite>> {
        self.cbw.upgrade()
    }

    async fn bcs(&self) -> Result<Arc<BlockCopy>, String> {
        self.parts
            .lock()
            .await
            .as_ref()
            .map(|p| p.bcs.clone())
            .ok_or_else(|| "Operation canceled".to_owned())
    }

    /// Runs `f` once the job has removed its filter (the daemon drops the node's name).
    pub fn on_clean(&self, f: impl FnOnce() + Send + 'static) {
        *lock(&self.on_clean) = Some(Box::new(f));
    }

    /// Awaits `f` at the end of `clean`, before the `on_clean` hook.
    pub fn on_clean_async(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        *lock(&self.on_clean_async) = Some(Box::pin(f));
    }

    fn watch_progress(bcs: &Arc<BlockCopy>, ctx: &JobContext) {
        let ctx = ctx.clone();
        let weak: Weak<BlockCopy> = Arc::downgrade(bcs);
        bcs.set_progress(Arc::new(move |p| match p {
            Progress::Copied(n) => ctx.progress_update(n),
            Progress::Skipped(_) => {
                if let Some(b) = weak.upgrade() {
                    ctx.progress_set_remaining(b.remaining());
                }
            }
        }));
    }

    /// A failed copy: the error action decides. `Err` fails the job; `Ok(true)`: it was
    /// stopped (paused until resumed or cancelled).
    async fn on_error(
        &self,
        ctx: &JobContext,
        read: bool,
        e: &block::BlockError,
    ) -> Result<bool, String> {
        let nospace = e.kind() == block::ErrorKind::NoSpace;
        let (policy, op) = if read {
            (self.spec.on_source_error, IoOperation::Read)
        } else {
            (self.spec.on_target_error, IoOperation::Write)
        };
        let action = policy.action(nospace);
        tracing::debug!(target: "job", "copy failed ({action:?}): {e}");
        ctx.io_error(op, action, nospace).await;
        match action {
            ErrorAction::Report => Err(strerror(e)),
            ErrorAction::Ignore => Ok(false),
            ErrorAction::Stop => Ok(true),
        }
    }

    /// sync=top: clusters the top layer does not allocate are not copied.
    async fn skip_unallocated(&self, bcs: &BlockCopy, ctx: &JobContext) -> Result<(), String> {
        let source = self.spec.source.clone();
        let base = source.child(ChildRole::Backing).map(|c| c.node());
        let cluster = bcs.cluster_size();
        let len = bcs.len();
        bcs.set_skip_unallocated(true);
        let mut at = 0;
        while at < len {
            ctx.pause_point().await;
            if ctx.is_cancelled() {
                return Ok(());
            }
            let (allocated, n) = block::map::allocated_above(&source, base.as_ref(), at, len - at)
                .await
                .map_err(|e| strerror(&e))?;
            // A scan of cached metadata never waits: let guest requests on this I/O thread
            // in between (and a command that started the job reply first, as in QEMU, where
            // the scan's block status yields).
            tokio::task::yield_now().await;
            let end = if at + n >= len {
                len
            } else {
                (at + n).div_ceil(cluster) * cluster
            };
            if !allocated {
                // Whole clusters only: a partly allocated one is copied.
                let s = at.div_ceil(cluster) * cluster;
                let e = if end == len {
                    len
                } else {
                    (at + n) / cluster * cluster
                };
                if s < e {
                    bcs.with_bitmap(|b| b.reset_dirty(s, e - s));
                }
            }
            at = end.max(at + 1);
        }
        ctx.progress_set_remaining(bcs.remaining());
        Ok(())
    }

    async fn copy_all(&self, bcs: &Arc<BlockCopy>, ctx: &JobContext) -> Result<(), String> {
        let mut set = InFlight::default();
        let mut cursor = 0;
        let mut pace = Pace::default();
        let mut retrying = false;
        let cbw = self.parts.lock().await.as_ref().map(|p| p.cbw.clone());
        loop {
            let speed = ctx.speed();
            if let (Some(budget), Some(cbw)) = (self.spec.guest_latency_budget, &cbw) {
                let now = std::time::Instant::now();
                if now.saturating_duration_since(pace.looked) >= ADAPT_WINDOW {
                    pace.looked = now;
                    let latency = cbw.take_guest_latency();
                    pace.guest(latency, budget, self.spec.max_workers, bcs.chunk());
                }
            }
            let limit = match (Pace::chunk_limit(speed), pace.chunk_cap) {
                (0, c) | (c, 0) => c,
                (a, b) => a.min(b),
            };
            let chunk = match limit {
                0 => bcs.chunk(),
                l => bcs.chunk().min(l),
            };
            let max_workers = Pace::max_workers(speed, chunk, self.spec.max_workers);
            let workers = pace.workers(speed, chunk, max_workers);
            ctx.pause_point().await;
            if ctx.is_cancelled() && !retrying {
                self.cancelled_call(bcs, &mut set, speed, workers, limit)
                    .await;
                return Ok(());
            }
            if let Some(e) = bcs.take_error() {
                retrying |= self.on_error(ctx, false, &e).await?;
            }
            while set.has_room(speed, workers, self.spec.max_workers) {
                // A drained source or target pauses the job here, invisibly (QEMU pauses it
                // with paused/running events each time).
                self.spec.source.undrained().await;
                self.spec.target.undrained().await;
                ctx.rate_wait().await;
                if ctx.is_cancelled() && !retrying {
                    self.cancelled_call(bcs, &mut set, speed, workers, limit)
                        .await;
                    return Ok(());
                }
                match bcs.copy_next_run(cursor, limit).await {
                    Some((start, end, task, zero)) => {
                        ctx.rate_charge(end - start);
                        cursor = end;
                        set.spawn(task, end, zero);
                    }
                    None if cursor > 0 => cursor = 0,
                    None => break,
                }
            }
            // Resumed after an error stop, QEMU starts the copy again before it looks at a
            // cancel: one round of chunks goes out whatever happened meanwhile.
            retrying = false;
            match ctx.io_wait(set.join_next()).await {
                Some(Ok((Ok(Ok(bytes)), took, _))) => {
                    let now = std::time::Instant::now();
                    pace.record(took, bytes, now, max_workers);
                }
                Some(Ok((Ok(Err(e)), _, seq))) => {
                    // As QEMU's block-copy call: the chunks in flight finish (and count as
                    // progress) before the first error is acted on; later errors are dropped,
                    // their ranges stay dirty. Unthrottled, QEMU has `max-workers` tasks in
                    // flight where we keep fewer (memory): the tasks it would have started
                    // by then are copied too, so the progress the error reports is QEMU's
                    // (all but the failed chunk of a disk of up to `max-workers` chunks).
                    let window = Window {
                        until: seq + self.spec.max_workers.max(1) as u64 - 1,
                        speed,
                        workers,
                        limit,
                    };
                    cursor = self.copy_window(bcs, &mut set, &window, Some(ctx)).await;
                    while let Some(r) = set.join_next().await {
                        if let Ok((Ok(Ok(bytes)), took, _)) = r {
                            pace.record(took, bytes, std::time::Instant::now(), max_workers);
                        }
                    }
                    if ctx.is_cancelled() {
                        // QEMU ends a cancelled job after its copy call, whatever it met.
                        return Ok(());
                    }
                    retrying |= self.on_error(ctx, e.read, &e.error).await?;
                }
                Some(Ok((Err(_), _, _))) | Some(Err(_)) => {
                    return Err("the copy failed unexpectedly (internal error)".into())
                }
                None => {
                    bcs.settled().await;
                    if let Some(e) = bcs.take_error() {
                        retrying |= self.on_error(ctx, false, &e).await?;
                    }
                    if bcs.is_done() {
                        return Ok(());
                    }
                    // Stranded data is being retried, or a guest write claimed the rest.
                    ctx.sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Copies forward from where the last task started ends until `window.until` tasks have
    /// started (the tasks QEMU would have launched; unthrottled only), stopping early at a
    /// cancel when `ctx` is given. Returns where it stopped. Forward only: a failed range,
    /// dirty again, is the next call's.
    async fn copy_window(
        &self,
        bcs: &Arc<BlockCopy>,
        set: &mut InFlight,
        window: &Window,
        ctx: Option<&JobContext>,
    ) -> u64 {
        let mut at = set.last_end;
        if window.speed != 0 {
            return at;
        }
        while set.started < window.until && !ctx.is_some_and(|c| c.is_cancelled()) {
            if !set.has_room(window.speed, window.workers, self.spec.max_workers) {
                set.join_next().await;
                continue;
            }
            let Some((_, end, task, zero)) = bcs.copy_next_run(at, window.limit).await else {
                break;
            };
            if end <= at {
                break;
            }
            at = end;
            set.spawn(task, end, zero);
        }
        at
    }

    /// A cancelled copy call, as QEMU's: no new chunks, and the chunks it had launched finish
    /// and count. Unthrottled, QEMU has launched `max-workers` beyond those done, where we
    /// keep fewer in flight: those are copied too, so a cancel on a slow target reports QEMU's
    /// progress (all of a disk of up to `max-workers` chunks).
    async fn cancelled_call(
        &self,
        bcs: &Arc<BlockCopy>,
        set: &mut InFlight,
        speed: u64,
        workers: usize,
        limit: u64,
    ) {
        let done = set.started - set.set.len() as u64;
        let window = Window {
            until: done + self.spec.max_workers.max(1) as u64,
            speed,
            workers,
            limit,
        };
        self.copy_window(bcs, set, &window, None).await;
        while set.join_next().await.is_some() {}
    }

    /// The bitmap's outcome (QEMU's successor handling); `ok`: the job succeeded.
    async fn sync_bitmap(&self, ok: bool) {
        let Some((name, mode)) = &self.spec.bitmap else {
            return;
        };
        let sync = (ok || *mode == BitmapMode::Always) && *mode != BitmapMode::Never;
        let leftover = match (!ok && *mode == BitmapMode::Always, self.bcs().await) {
            (true, Ok(bcs)) => bcs.uncopied(),
            _ => None,
        };
        self.spec.source.with_bitmap(name, |b| {
            let _ = if sync { b.abdicate() } else { b.reclaim() };
            if let Some(l) = &leftover {
                let _ = b.merge_from(l);
            }
        });
    }
}

#[async_trait]
impl JobDriver for Backup {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        let bcs = self.bcs().await?;
        Self::watch_progress(&bcs, &ctx);
        ctx.progress_set_remaining(bcs.remaining());
        match self.spec.sync {
            SyncMode::None => loop {
                // Only guest writes copy; the job ends when cancelled.
                ctx.sleep(Duration::from_millis(100)).await;
                if ctx.is_cancelled() {
                    return Ok(());
                }
                if let Some(e) = bcs.take_error() {
                    self.on_error(&ctx, false, &e).await?;
                }
            },
            SyncMode::Top => {
                self.skip_unallocated(&bcs, &ctx).await?;
                bcs.set_skip_unallocated(false);
                self.copy_all(&bcs, &ctx).await
            }
            SyncMode::Full | SyncMode::Bitmap => self.copy_all(&bcs, &ctx).await,
        }
    }

    async fn commit(&self) {
        self.sync_bitmap(true).await;
    }

    async fn abort(&self) {
        self.sync_bitmap(false).await;
    }

    async fn clean(&self) {
        let Some(parts) = self.parts.lock().await.take() else {
            return;
        };
        parts.cbw.close_copy();
        // The job lets go of the filter first: without parents it no longer keeps others
        // from writing the source, so the edges it took over can go back.
        drop(parts.edges);
        if let Err(e) = graph::remove_filter(&parts.inserted).await {
            tracing::error!(target: "blockjobd", "backup '{}': removing the filter: {e}", self.spec.job_id);
        }
        drop(parts.bcs);
        drop(parts.cbw);
        drop(parts.inserted);
        let then = lock(&self.on_clean_async).take();
        if let Some(f) = then {
            f.await;
        }
        if let Some(f) = lock(&self.on_clean).take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests;
