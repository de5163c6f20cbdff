//! In-flight tracking and drained sections.
//!
//! Every request through a node holds an [`InFlight`] guard. A [`Drained`] section stops new
//! requests at the door and waits until those in flight have finished; it ends when the guard
//! is dropped. Sections nest (a gate counts them). Graph changes (inserting a filter,
//! replacing a node) happen inside one. The drainer itself may do I/O inside its section:
//! futures run under [`Drained::run`] (or [`crate::graph::Section::run`]) pass the gates that
//! section holds, at every node they reach.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

tokio::task_local! {
    /// The gates whose drained sections the current task may pass (its own).
    static PASS: Vec<usize>;
}

/// `f`, to run where the current task's passes hold too (in a task spawned to finish it).
pub fn carry<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let pass = PASS.try_with(Clone::clone).ok();
    async move {
        match pass {
            Some(pass) => PASS.scope(pass, f).await,
            None => f.await,
        }
    }
}

/// Runs `f` allowed through `gates` (and whatever the caller was already allowed through).
pub(crate) async fn run_passing<F: Future>(gates: &[DrainGate], f: F) -> F::Output {
    let mut pass: Vec<usize> = PASS.try_with(Clone::clone).unwrap_or_default();
    pass.extend(gates.iter().map(DrainGate::id));
    PASS.scope(pass, f).await
}

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

    fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// True while a drained section holds the gate.
    pub fn is_drained(&self) -> bool {
        self.inner.quiesce.load(Ordering::Acquire) > 0
    }

    /// Enters a request, waiting while the gate is drained (unless the current task runs
    /// inside the section that drains it).
    pub async fn enter(&self) -> InFlight {
        if self.is_drained() && PASS.try_with(|p| p.contains(&self.id())).unwrap_or(false) {
            self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
            return InFlight { gate: self.clone() };
        }
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

    /// Returns once no drained section holds the gate (or the current task runs inside the
    /// one that does): where a job waits, quietly, instead of starting work a drainer does
    /// not want started.
    pub async fn undrained(&self) {
        loop {
            let mut changed = pin!(self.inner.changed.notified());
            changed.as_mut().enable();
            if !self.is_drained() || PASS.try_with(|p| p.contains(&self.id())).unwrap_or(false) {
                return;
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

impl Drained {
    /// Runs `f` inside the section: its requests pass this gate.
    pub async fn run<F: Future>(&self, f: F) -> F::Output {
        run_passing(std::slice::from_ref(&self.gate), f).await
    }

    pub(crate) fn gate(&self) -> &DrainGate {
        &self.gate
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

    #[tokio::test]
    async fn sections_nest_and_their_owner_passes() {
        let gate = DrainGate::new();
        let outer = gate.drain().await;
        let inner = gate.drain().await;
        // The drainer's own I/O passes, even nested futures of it.
        let passed = tokio::time::timeout(
            Duration::from_secs(5),
            inner.run(async { outer.run(gate.enter()).await }),
        )
        .await;
        assert!(passed.is_ok(), "the section's owner is let in");
        drop(passed);
        drop(inner);
        let g = gate.clone();
        let other = tokio::spawn(async move { g.enter().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!other.is_finished(), "still drained by the outer section");
        drop(outer);
        assert!(tokio::time::timeout(Duration::from_secs(5), other)
            .await
            .is_ok());
    }
}
