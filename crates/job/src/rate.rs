//! Speed limit in bytes per second, accounted in 100 ms slices.
//!
//! Work is charged after it is done: the first chunk never waits; once a slice's quota is
//! spent, the delay returned stretches the slice to cover what was dispatched, and the next
//! slice starts when it ends. Speed 0 means unlimited.

use std::time::{Duration, Instant};

/// The slice length QEMU uses for block jobs.
pub const SLICE: Duration = Duration::from_millis(100);

/// A speed limit.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// Bytes per slice; 0 = unlimited.
    quota: u64,
    slice: Duration,
    start: Instant,
    end: Instant,
    dispatched: u64,
}

impl RateLimit {
    /// Unlimited.
    pub fn new() -> RateLimit {
        let now = Instant::now();
        RateLimit {
            quota: 0,
            slice: SLICE,
            start: now,
            end: now,
            dispatched: 0,
        }
    }

    /// Sets the speed in bytes per second (0: unlimited).
    pub fn set_speed(&mut self, bytes_per_second: u64) {
        self.quota = if bytes_per_second == 0 {
            0
        } else {
            let per_slice = (bytes_per_second as f64 * self.slice.as_secs_f64()) as u64;
            per_slice.max(1)
        };
    }

    /// Charges `n` bytes just done at `now`; returns how long to wait before the next chunk.
    pub fn charge_at(&mut self, n: u64, now: Instant) -> Duration {
        if self.quota == 0 {
            return Duration::ZERO;
        }
        if self.end < now {
            self.start = now;
            self.end = now + self.slice;
            self.dispatched = 0;
        }
        self.dispatched += n;
        if self.dispatched < self.quota {
            return Duration::ZERO;
        }
        let slices = self.dispatched as f64 / self.quota as f64;
        self.end = self.start + self.slice.mul_f64(slices);
        self.end.saturating_duration_since(now)
    }

    /// [`charge_at`](Self::charge_at) now.
    pub fn charge(&mut self, n: u64) -> Duration {
        self.charge_at(n, Instant::now())
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimit::new();
        assert_eq!(r.charge(1 << 40), Duration::ZERO);
    }

    #[test]
    fn the_first_chunk_goes_at_once_then_the_average_holds() {
        let mut r = RateLimit::new();
        r.set_speed(1 << 20); // 1 MiB/s: 104857 bytes per 100 ms slice
        let t0 = Instant::now();
        // One 64 KiB chunk is under the quota.
        assert_eq!(r.charge_at(65536, t0), Duration::ZERO);
        // 1 MiB in 64 KiB chunks, each charged as soon as the previous delay ends.
        let mut now = t0;
        for _ in 0..15 {
            now += r.charge_at(65536, now);
        }
        let elapsed = now - t0;
        // 16 chunks = 1 MiB take about a second (the first slice is free of waiting).
        assert!(
            elapsed >= Duration::from_millis(850) && elapsed <= Duration::from_millis(1050),
            "{elapsed:?}"
        );
    }

    #[test]
    fn speed_one_lets_a_single_chunk_through() {
        let mut r = RateLimit::new();
        r.set_speed(1);
        let t0 = Instant::now();
        let wait = r.charge_at(65536, t0);
        assert!(
            wait > Duration::from_secs(3600),
            "the next chunk waits a long time"
        );
    }
}
