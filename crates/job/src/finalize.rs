//! The end of a job: its `run` returned, so it waits for its transaction, then is finalized
//! (prepare, commit or abort, clean) with the rest of it, or aborted with it.

use std::sync::atomic::Ordering;

use crate::driver::*;
use crate::manager::*;
use crate::status::JobStatus;
use crate::verbs::cancel_async;

impl JobManager {
    /// `run` returned (or was abandoned): QEMU's job_completed.
    pub(crate) async fn run_finished(&self, id: &str, result: Result<(), String>) {
        let mut st = self.lock().await;
        self.completed_locked(&mut st, id, result).await;
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
                    cancel_async(job, true);
                    if !job.started {
                        job.run_done = true;
                    }
                    job.shared.wake.notify_one();
                }
            }
        }
        let members = st.members(txn);
        if members.iter().any(|&m| !st.jobs[m].run_done) {
            return; // the last one to finish finalizes them all
        }
        for id in members
            .iter()
            .map(|&m| st.jobs[m].id.clone())
            .collect::<Vec<_>>()
        {
            self.finalize_single(st, &id).await;
        }
        st.aborting_txns.retain(|t| *t != txn);
    }

    pub(crate) async fn do_finalize(&self, st: &mut State, txn: TxnId) {
        let members = st.members(txn);
        for &m in &members {
            if let Err(e) = st.jobs[m].driver.prepare().await {
                st.jobs[m].error = Some(e);
                self.update_rc(&mut st.jobs[m]);
                self.txn_abort(st, txn).await;
                return;
            }
        }
        for id in members
            .iter()
            .map(|&m| st.jobs[m].id.clone())
            .collect::<Vec<_>>()
        {
            self.finalize_single(st, &id).await;
        }
    }

    pub(crate) async fn finalize_single(&self, st: &mut State, id: &str) {
        let Ok(i) = st.idx(id) else { return };
        self.update_rc(&mut st.jobs[i]);
        let driver = st.jobs[i].driver.clone();
        if st.jobs[i].error.is_none() {
            driver.commit().await;
        } else {
            driver.abort().await;
        }
        driver.clean().await;
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
