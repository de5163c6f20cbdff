//! In-flight tracking and drained sections.
//!
//! Every request through a node holds an [`InFlight`] guard. A [`Drained`] section stops new
//! requests at the door and waits until those in flight have finished; it ends when the guard
//! is dropped. Graph changes (inserting a filter, replacing a node) happen inside one.

use std::fmt;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Default)]
struct Inner {
    in_flight: AtomicUsize,
    quiesce: AtomicUsize,
    changed: Notify,
}

/// Counts requests in flight and gates new ones while drained. Cheap to clone.
#[derive(Clone, Default)]
pub struct DrainGate {
    inner: Arc<Inner>,
}

impl fmt::Debug for DrainGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainGate")
            .field("in_flight", &self.in_flight())
            .field("quiesce", &self.inner.quiesce.load(Ordering::Relaxed))
            .finish()
    }
}

/// A request in flight; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight {
    gate: DrainGate,
}

/// A drained section; dropping it lets requests in again.
#[must_use = "the section ends when the guard is dropped"]
#[derive(Debug)]
pub struct Drained {
    gate: DrainGate,
}

impl DrainGate {
    /// A gate with nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests in flight right now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Enters a request, waiting while the gate is drained.
    pub async fn enter(&self) -> InFlight {
        loop {
            let mut changed = pin!(self.inner.changed.notified());
            changed.as_mut().enable();
            if self.inner.quiesce.load(Ordering::Acquire) == 0 {
                self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
                if self.inner.quiesce.load(Ordering::Acquire) == 0 {
                    return InFlight { gate: self.clone() };
                }
                // A drain began between the check and the increment: step back out.
                drop(InFlight { gate: self.clone() });
                continue;
            }
            changed.await;
        }
    }

    /// Begins a drained section: new requests wait; returns once nothing is in flight.
    pub async fn drain(&self) -> Drained {
        self.inner.quiesce.fetch_add(1, Ordering::AcqRel);
        let drained = Drained { gate: self.clone() };
        loop {
            let mut changed = pin!(self.inner.changed.notified());
            changed.as_mut().enable();
            if self.in_flight() == 0 {
                return drained;
            }
            changed.await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.gate.inner.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gate.inner.changed.notify_waiters();
        }
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        self.gate.inner.quiesce.fetch_sub(1, Ordering::AcqRel);
        self.gate.inner.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn drain_waits_for_requests_and_blocks_new_ones() {
        let gate = DrainGate::new();
        let req = gate.enter().await;
        let g2 = gate.clone();
        let drainer = tokio::spawn(async move { g2.drain().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !drainer.is_finished(),
            "drain waits for the request in flight"
        );
        drop(req);
        let drained = drainer.await.expect("drain finished");
        let g3 = gate.clone();
        let newcomer = tokio::spawn(async move { g3.enter().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!newcomer.is_finished(), "new requests wait while drained");
        drop(drained);
        let r = tokio::time::timeout(Duration::from_secs(5), newcomer).await;
        assert!(r.is_ok());
    }
}
