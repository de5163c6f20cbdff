//! The end of a job: its `run` returned, so it waits for its transaction, then is finalized
//! (prepare, commit or abort, clean) with the rest of it, or aborted with it.
//!
//! Deciding happens under the manager's lock; the drivers' callbacks do not. A decision
//! queues its transaction (`State::deferred`) and marks it finalizing; every entry point that
//! can decide (a job's `run` returning, `job-finalize`, `job-cancel`) calls [`settle`]
//! after releasing the lock, which runs the queued finalizations: for each member in order,
//! its status is settled under the lock, its callbacks run unlocked, and its events and
//! `concluded` follow under the lock again — the same order of events as before.
//!
//! [`settle`]: JobManager::settle

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::driver::*;
use crate::manager::*;
use crate::status::JobStatus;
use crate::verbs::cancel_async;

impl JobManager {
    /// `run` returned (or was abandoned): QEMU's job_completed.
    pub(crate) async fn run_finished(&self, id: &str, result: Result<(), String>) {
        {
            let mut st = self.lock().await;
            self.completed_locked(&mut st, id, result).await;
        }
        self.settle().await;
    }

    pub(crate) async fn completed_locked(
        &self,
        st: &mut State,
        id: &str,
        result: Result<(), String>,
    ) {
        let Ok(i) = st.idx(id) else { return };
        {
            let job = &mut st.jobs[i];
            job.run_done = true;
            job.parked = false;
            job.shared.idle.store(true, Ordering::Relaxed);
            if let Some(back) = job.resume_to.take() {
                transition(&self.inner.events, job, back);
            }
            if let Err(e) = result {
                job.error = Some(e);
            }
        }
        self.update_rc(&mut st.jobs[i]);
        let txn = st.jobs[i].txn;
        if st.jobs[i].error.is_none() {
            transition(&self.inner.events, &mut st.jobs[i], JobStatus::Waiting);
            let members = st.members(txn);
            if members.iter().any(|&m| !st.jobs[m].run_done) {
                return;
            }
            for &m in &members {
                let job = &mut st.jobs[m];
                transition(&self.inner.events, job, JobStatus::Pending);
                if !job.auto_finalize && job.block {
                    (self.inner.events)(JobEvent::Pending(job.info()));
                }
            }
            if members.iter().all(|&m| st.jobs[m].auto_finalize) {
                self.do_finalize(st, txn).await;
            }
        } else {
            self.txn_abort(st, txn).await;
        }
    }

    /// A cancelled job's missing error becomes "Operation canceled"; a failed job goes to
    /// `aborting`.
    pub(crate) fn update_rc(&self, job: &mut JobRec) {
        if job.error.is_none() && job.force_cancel {
            job.error = Some("Operation canceled".into());
        }
        if job.error.is_some() && job.status != JobStatus::Aborting {
            transition(&self.inner.events, job, JobStatus::Aborting);
        }
    }

    pub(crate) async fn txn_abort(&self, st: &mut State, txn: TxnId) {
        if !st.aborting_txns.contains(&txn) {
            st.aborting_txns.push(txn);
            // One job failed: no result matters, stop the others as fast as possible.
            for m in st.members(txn) {
                let job = &mut st.jobs[m];
                if job.error.is_none() {
                    cancel_async(&self.inner.events, job, true);
                    if !job.started {
                        job.run_done = true;
                    }
                    job.shared.kick();
                }
            }
        }
        let members = st.members(txn);
        if members.iter().any(|&m| !st.jobs[m].run_done) {
            return; // the last one to finish finalizes them all
        }
        Self::defer(st, txn, false);
    }

    /// Queues the finalization of `txn` (`prepare` first when `prepare`), once.
    fn defer(st: &mut State, txn: TxnId, prepare: bool) {
        if st.finalizing.contains(&txn) {
            return;
        }
        st.finalizing.push(txn);
        st.deferred.push_back((txn, prepare));
    }

    /// Runs the finalizations decided so far (see the module docs).
    pub(crate) async fn settle(&self) {
        loop {
            let next = self.lock().await.deferred.pop_front();
            let Some((txn, prepare)) = next else {
                return;
            };
            if prepare {
                self.prepare_all(txn).await;
            }
            self.conclude_all(txn).await;
        }
    }

    /// Every member's `prepare`, unlocked; the first failure fails its job and cancels the
    /// others, so all of them abort.
    async fn prepare_all(&self, txn: TxnId) {
        let drivers: Vec<(String, Arc<dyn JobDriver>)> = {
            let st = self.lock().await;
            st.members(txn)
                .iter()
                .map(|&m| (st.jobs[m].id.clone(), st.jobs[m].driver.clone()))
                .collect()
        };
        for (id, driver) in drivers {
            if let Err(e) = driver.prepare().await {
                let mut st = self.lock().await;
                if let Ok(i) = st.idx(&id) {
                    st.jobs[i].error = Some(e);
                    self.update_rc(&mut st.jobs[i]);
                }
                for m in st.members(txn) {
                    if st.jobs[m].error.is_none() {
                        cancel_async(&self.inner.events, &mut st.jobs[m], true);
                    }
                }
                return;
            }
        }
    }

    /// Commits or aborts, then cleans, every member, one after the other.
    async fn conclude_all(&self, txn: TxnId) {
        let ids: Vec<String> = {
            let st = self.lock().await;
            st.members(txn)
                .iter()
                .map(|&m| st.jobs[m].id.clone())
                .collect()
        };
        for id in ids {
            let step = {
                let mut st = self.lock().await;
                let Ok(i) = st.idx(&id) else { continue };
                self.update_rc(&mut st.jobs[i]);
                (st.jobs[i].driver.clone(), st.jobs[i].error.is_none())
            };
            let (driver, commit) = step;
            if commit {
                driver.commit().await;
            } else {
                driver.abort().await;
            }
            driver.clean().await;
            let mut st = self.lock().await;
            if let Ok(i) = st.idx(&id) {
                self.concluded(&mut st, i);
            }
        }
        let mut st = self.lock().await;
        st.finalizing.retain(|t| *t != txn);
        st.aborting_txns.retain(|t| *t != txn);
        drop(st);
        self.inner.stir.notify_waiters();
    }

    pub(crate) async fn do_finalize(&self, st: &mut State, txn: TxnId) {
        Self::defer(st, txn, true);
    }

    /// A member's callbacks ran: its last event, `concluded`, and dismissal.
    fn concluded(&self, st: &mut State, i: usize) {
        let job = &mut st.jobs[i];
        if job.started && job.block {
            let info = job.info();
            (self.inner.events)(if job.force_cancel {
                JobEvent::Cancelled(info)
            } else {
                JobEvent::Completed(info)
            });
        }
        job.in_txn = false;
        transition(&self.inner.events, job, JobStatus::Concluded);
        if job.auto_dismiss || !job.started {
            self.dismiss_locked(st, i);
        }
    }
}
