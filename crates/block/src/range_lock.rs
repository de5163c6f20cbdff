//! Range locks: shared or exclusive ownership of byte ranges, released by dropping the guard.
//!
//! Used to serialise read-modify-write against overlapping writes in the request path, and by
//! format drivers to keep a cluster's mapping stable while its data is in flight.
//!
//! Lock order: a task holds at most one range lock of a given `RangeLocks` at a time, and never
//! waits for a range lock while holding the `held` mutex (it is a std mutex: never held across
//! an await). Waiters are woken on every release and re-check for conflicts.

use std::fmt;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Whether other holders of an overlapping range are allowed at the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Overlapping shared holders coexist; an exclusive holder excludes them.
    Shared,
    /// No overlapping holder of any mode.
    Exclusive,
}

#[derive(Debug)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    mode: LockMode,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    held: Vec<Held>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    released: Notify,
}

/// A set of byte-range locks. Cheap to clone (shared state).
#[derive(Clone, Default)]
pub struct RangeLocks {
    inner: Arc<Inner>,
}

impl fmt::Debug for RangeLocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RangeLocks")
            .field("held", &self.state().held.len())
            .finish()
    }
}

/// Ownership of a locked range; dropping it releases the range and wakes waiters.
#[must_use = "the range is unlocked as soon as the guard is dropped"]
#[derive(Debug)]
pub struct RangeGuard {
    locks: RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// An empty lock set.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks `[start, start + len)` in `mode`, waiting for conflicting holders to release.
    /// An empty range never conflicts.
    pub async fn lock(&self, start: u64, len: u64, mode: LockMode) -> RangeGuard {
        loop {
            let mut released = pin!(self.inner.released.notified());
            released.as_mut().enable();
            if let Some(guard) = self.try_lock(start, len, mode) {
                return guard;
            }
            released.await;
        }
    }

    /// Locks the range if nothing conflicts right now.
    pub fn try_lock(&self, start: u64, len: u64, mode: LockMode) -> Option<RangeGuard> {
        let end = start.saturating_add(len);
        let mut state = self.state();
        let conflict = state.held.iter().any(|h| {
            h.start < end
                && start < h.end
                && (mode == LockMode::Exclusive || h.mode == LockMode::Exclusive)
        });
        if conflict {
            return None;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.held.push(Held {
            id,
            start,
            end,
            mode,
        });
        Some(RangeGuard {
            locks: self.clone(),
            id,
        })
    }

    /// How many ranges are held right now.
    pub fn held(&self) -> usize {
        self.state().held.len()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        {
            let mut state = self.locks.state();
            state.held.retain(|h| h.id != self.id);
        }
        self.locks.inner.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[tokio::test]
    async fn shared_coexist_exclusive_waits() {
        let locks = RangeLocks::new();
        let a = locks.lock(0, 100, LockMode::Shared).await;
        let _b = locks.lock(50, 100, LockMode::Shared).await;
        assert!(locks.try_lock(99, 1, LockMode::Exclusive).is_none());
        assert!(locks.try_lock(150, 10, LockMode::Exclusive).is_some());
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(0, 10, LockMode::Exclusive).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        let g = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(g.is_ok(), "waiter woke after release");
    }

    proptest! {
        /// Model: a list of held ranges; try_lock succeeds exactly when the model says no conflict.
        #[test]
        fn try_lock_matches_model(ops in proptest::collection::vec((0u64..64, 0u64..16, any::<bool>(), any::<bool>()), 1..60)) {
            let locks = RangeLocks::new();
            let mut guards: Vec<(u64, u64, LockMode, RangeGuard)> = Vec::new();
            for (start, len, exclusive, release) in ops {
                if release && !guards.is_empty() {
                    let i = (start as usize) % guards.len();
                    drop(guards.remove(i));
                    continue;
                }
                let mode = if exclusive { LockMode::Exclusive } else { LockMode::Shared };
                let conflict = guards.iter().any(|(s, l, m, _)| {
                    *s < start + len && start < s + l && (exclusive || *m == LockMode::Exclusive)
                });
                let got = locks.try_lock(start, len, mode);
                prop_assert_eq!(got.is_some(), !conflict);
                if let Some(g) = got { guards.push((start, len, mode, g)); }
            }
            prop_assert_eq!(locks.held(), guards.len());
        }
    }
}
