//! I/O limits: QEMU's `throttle-group` objects and the `throttle` filter driver.
//!
//! A group holds leaky buckets (bytes and requests per second, for reads, writes or both,
//! each with an optional burst rate and length) shared by every `throttle` node that names
//! it. A request waits until none of the buckets it counts against is over its size, then
//! counts its bytes (and one request, or its size in `iops-size` units), as QEMU's throttling
//! does: a bucket of rate `r` holds `r / 10` without a burst rate, `max * max-length` with
//! one. Reads and writes wait in their own first-come queues, so a slow write never holds a
//! read back unless a total limit says so. Limits can change while requests wait.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use block::{BlockDriver, BlockStatus, Child, Facts, IoVec, Result, WriteFlags, ZeroFlags};
use bytes::BytesMut;

/// The six limits QEMU has, in its order: bytes and requests, total, read, write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `bps-total`.
    BpsTotal,
    /// `bps-read`.
    BpsRead,
    /// `bps-write`.
    BpsWrite,
    /// `iops-total`.
    IopsTotal,
    /// `iops-read`.
    IopsRead,
    /// `iops-write`.
    IopsWrite,
}

impl Kind {
    /// Every kind, in QEMU's order.
    pub const ALL: [Kind; 6] = [
        Kind::BpsTotal,
        Kind::BpsRead,
        Kind::BpsWrite,
        Kind::IopsTotal,
        Kind::IopsRead,
        Kind::IopsWrite,
    ];

    /// QEMU's name of the limit (`bps-total`, …).
    pub fn name(self) -> &'static str {
        match self {
            Kind::BpsTotal => "bps-total",
            Kind::BpsRead => "bps-read",
            Kind::BpsWrite => "bps-write",
            Kind::IopsTotal => "iops-total",
            Kind::IopsRead => "iops-read",
            Kind::IopsWrite => "iops-write",
        }
    }

    fn counts(self, write: bool) -> bool {
        match self {
            Kind::BpsTotal | Kind::IopsTotal => true,
            Kind::BpsRead | Kind::IopsRead => !write,
            Kind::BpsWrite | Kind::IopsWrite => write,
        }
    }

    fn bytes(self) -> bool {
        matches!(self, Kind::BpsTotal | Kind::BpsRead | Kind::BpsWrite)
    }
}

/// One limit: a rate, and an optional burst rate held for `max_length` seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Units per second (0: no limit).
    pub avg: u64,
    /// Burst units per second (0: none).
    pub max: u64,
    /// Seconds a burst may last (QEMU's default 1).
    pub max_length: u64,
}

/// A group's limits (QEMU's ThrottleLimits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Per kind, in [`Kind::ALL`]'s order.
    pub limits: [Limit; 6],
    /// Bytes one request counts as (0: every request counts one).
    pub iops_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            limits: [Limit {
                avg: 0,
                max: 0,
                max_length: 1,
            }; 6],
            iops_size: 0,
        }
    }
}

/// The largest rate QEMU accepts.
pub const MAX_RATE: u64 = 1_000_000_000_000_000;

impl Limits {
    /// The limit of `kind`.
    pub fn get(&self, kind: Kind) -> Limit {
        self.limits[kind as usize]
    }

    /// Sets the limit of `kind`.
    pub fn set(&mut self, kind: Kind, limit: Limit) {
        self.limits[kind as usize] = limit;
    }

    /// QEMU's checks, with its messages.
    pub fn check(&self) -> std::result::Result<(), &'static str> {
        let l = |k| self.get(k);
        for (total, read, write) in [
            (Kind::BpsTotal, Kind::BpsRead, Kind::BpsWrite),
            (Kind::IopsTotal, Kind::IopsRead, Kind::IopsWrite),
        ] {
            let either = |k: Kind| l(k).avg != 0 || l(k).max != 0;
            if either(total) && (either(read) || either(write)) {
                return Err(
                    "bps/iops/max total values and read/write values cannot be used at the same time",
                );
            }
        }
        for k in Kind::ALL {
            let Limit {
                avg,
                max,
                max_length,
            } = l(k);
            if avg > MAX_RATE || max > MAX_RATE {
                return Err("bps/iops/max values must be within [0, 1000000000000000]");
            }
            if max_length == 0 {
                return Err("the burst length cannot be 0");
            }
            if max_length > 1 && max == 0 {
                return Err("burst length set without burst rate");
            }
            if max != 0 && avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values");
            }
            if max != 0 && max < avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops");
            }
        }
        let iops = [Kind::IopsTotal, Kind::IopsRead, Kind::IopsWrite];
        if self.iops_size != 0 && iops.iter().all(|&k| l(k).avg == 0) {
            return Err("iops size requires an iops value to be set");
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Level {
    level: f64,
    burst: f64,
}

#[derive(Debug)]
struct State {
    limits: Limits,
    levels: [Level; 6],
    leaked_at: Instant,
}

impl State {
    fn leak(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.leaked_at).as_secs_f64();
        self.leaked_at = now;
        for k in Kind::ALL {
            let limit = self.limits.get(k);
            let lv = &mut self.levels[k as usize];
            lv.level = (lv.level - limit.avg as f64 * secs).max(0.0);
            lv.burst = (lv.burst - limit.max as f64 * secs).max(0.0);
        }
    }

    /// How long a request must wait before it may go (zero: now).
    fn wait(&self, write: bool) -> Duration {
        let mut wait = 0.0f64;
        for k in Kind::ALL.into_iter().filter(|k| k.counts(write)) {
            let limit = self.limits.get(k);
            if limit.avg == 0 {
                continue;
            }
            let lv = self.levels[k as usize];
            let (size, burst_size) = match limit.max {
                0 => (limit.avg as f64 / 10.0, 0.0),
                max => ((max * limit.max_length) as f64, max as f64 / 10.0),
            };
            let secs = if lv.level > size {
                (lv.level - size) / limit.avg as f64
            } else if burst_size > 0.0 && lv.burst > burst_size {
                (lv.burst - burst_size) / limit.max as f64
            } else {
                0.0
            };
            wait = wait.max(secs);
        }
        Duration::from_secs_f64(wait)
    }

    fn account(&mut self, write: bool, bytes: u64) {
        let size = self.limits.iops_size;
        let units = if size != 0 && bytes > size {
            bytes as f64 / size as f64
        } else {
            1.0
        };
        for k in Kind::ALL.into_iter().filter(|k| k.counts(write)) {
            let n = if k.bytes() { bytes as f64 } else { units };
            let lv = &mut self.levels[k as usize];
            lv.level += n;
            lv.burst += n;
        }
    }
}

/// A `throttle-group` object.
#[derive(Debug)]
pub struct ThrottleGroup {
    state: Mutex<State>,
    /// Readers and writers wait their turn here (first come, first served).
    reads: tokio::sync::Mutex<()>,
    writes: tokio::sync::Mutex<()>,
    /// Limits changed: waiters look again.
    changed: tokio::sync::Notify,
    users: AtomicUsize,
}

impl ThrottleGroup {
    /// A group with `limits` (already checked).
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(ThrottleGroup {
            state: Mutex::new(State {
                limits,
                levels: [Level::default(); 6],
                leaked_at: Instant::now(),
            }),
            reads: tokio::sync::Mutex::new(()),
            writes: tokio::sync::Mutex::new(()),
            changed: tokio::sync::Notify::new(),
            users: AtomicUsize::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group's limits.
    pub fn limits(&self) -> Limits {
        self.state().limits.clone()
    }

    /// Replaces the limits (already checked); waiting requests go by the new ones.
    pub fn set_limits(&self, limits: Limits) {
        let mut st = self.state();
        st.leak(Instant::now());
        st.limits = limits;
        drop(st);
        self.changed.notify_waiters();
    }

    /// How many throttle nodes use the group.
    pub fn users(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// Waits until a request of `bytes` may go, and counts it.
    pub async fn admit(&self, write: bool, bytes: u64) {
        let queue = if write { &self.writes } else { &self.reads };
        let _turn = queue.lock().await;
        loop {
            let changed = self.changed.notified();
            let wait = {
                let mut st = self.state();
                st.leak(Instant::now());
                let wait = st.wait(write);
                if wait.is_zero() {
                    st.account(write, bytes);
                    return;
                }
                wait
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed => {}
            }
        }
    }
}

/// The `throttle` filter: requests through it wait for its group's limits.
#[derive(Debug)]
pub struct ThrottleDriver {
    file: Arc<Child>,
    group: Arc<ThrottleGroup>,
    writable: bool,
}

impl ThrottleDriver {
    /// A filter over `file` limited by `group`.
    pub fn new(file: Arc<Child>, group: Arc<ThrottleGroup>, writable: bool) -> Self {
        group.users.fetch_add(1, Ordering::Relaxed);
        ThrottleDriver {
            file,
            group,
            writable,
        }
    }
}

impl Drop for ThrottleDriver {
    fn drop(&mut self) {
        self.group.users.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl BlockDriver for ThrottleDriver {
    fn driver_name(&self) -> &'static str {
        "throttle"
    }
    fn len(&self) -> u64 {
        self.file.node().len()
    }
    fn facts(&self) -> Facts {
        Facts {
            cluster_size: None,
            ..self.file.node().facts()
        }
    }
    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.file.clone()]
    }
    fn writable(&self) -> bool {
        self.writable
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.group.admit(false, buf.len() as u64).await;
        self.file.read_into(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        self.group.admit(true, data.len() as u64).await;
        self.file.write(offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.group.admit(true, len).await;
        self.file.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.group.admit(true, len).await;
        self.file.discard(offset, len).await
    }
    async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.file.block_status(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(kind: Kind, avg: u64) -> Limits {
        let mut l = Limits::default();
        l.set(
            kind,
            Limit {
                avg,
                max: 0,
                max_length: 1,
            },
        );
        l
    }

    #[test]
    fn qemus_checks_and_messages() {
        let mut both = limits(Kind::BpsTotal, 10);
        both.set(
            Kind::BpsRead,
            Limit {
                avg: 1,
                max: 0,
                max_length: 1,
            },
        );
        assert_eq!(
            both.check(),
            Err("bps/iops/max total values and read/write values cannot be used at the same time")
        );
        let size = Limits {
            iops_size: 4096,
            ..Limits::default()
        };
        assert_eq!(
            size.check(),
            Err("iops size requires an iops value to be set")
        );
        let mut low = limits(Kind::IopsWrite, 100);
        low.set(
            Kind::IopsWrite,
            Limit {
                avg: 100,
                max: 50,
                max_length: 1,
            },
        );
        assert_eq!(
            low.check(),
            Err("bps_max/iops_max cannot be lower than bps/iops")
        );
        assert_eq!(limits(Kind::BpsWrite, 1 << 20).check(), Ok(()));
    }

    #[tokio::test]
    async fn requests_wait_for_the_rate() {
        let g = ThrottleGroup::new(limits(Kind::BpsWrite, 1 << 20));
        let t0 = Instant::now();
        // 256 KiB go at once; the bucket then holds more than its tenth of a second.
        g.admit(true, 256 << 10).await;
        assert!(t0.elapsed() < Duration::from_millis(50));
        // Reads are not limited by a write limit.
        g.admit(false, 1 << 20).await;
        assert!(t0.elapsed() < Duration::from_millis(50));
        // (256 KiB - 1/10 of 1 MiB) at 1 MiB/s: 150 ms.
        g.admit(true, 4096).await;
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(140) && waited <= Duration::from_millis(400),
            "{waited:?}"
        );
        // A request waiting for a long time goes as soon as the limit is lifted.
        g.admit(true, 1 << 30).await;
        let g2 = g.clone();
        let w = tokio::spawn(async move { g2.admit(true, 1).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!w.is_finished());
        g.set_limits(Limits::default());
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("admitted once the limit is lifted")
            .expect("task");
    }
}
