//! The verbs of the job framework (pause, resume, cancel, complete, finalize, dismiss,
//! set-speed), checked against QEMU's verb table.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::driver::*;
use crate::manager::*;
use crate::status::{verb_allowed, verb_refused, JobStatus, JobVerb};

impl JobManager {
    /// Shutdown: force-cancels every job and waits (up to the cancel bound and a second) for
    /// them to end; concluded jobs are dismissed, those the cancel concluded too.
    pub async fn cancel_all(&self) {
        let ids: Vec<(String, JobStatus)> = {
            let st = self.lock().await;
            st.jobs.iter().map(|j| (j.id.clone(), j.status)).collect()
        };
        for (id, status) in ids {
            let _ = if status == JobStatus::Concluded {
                self.dismiss(&id).await
            } else {
                self.cancel(&id, true).await
            };
        }
        let deadline = Instant::now() + self.inner.cancel_bound + Duration::from_secs(1);
        while Instant::now() < deadline {
            let busy = {
                let st = self.lock().await;
                st.jobs.iter().any(|j| j.started && !j.run_done)
            };
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // QEMU goes on cancelling until no job is left, and cancelling a concluded job
        // dismisses it: jobs the cancel concluded end too (`null`), auto-dismiss or not.
        self.settle().await;
        let mut st = self.lock().await;
        while let Some(i) = st
            .jobs
            .iter()
            .position(|j| j.status == JobStatus::Concluded)
        {
            self.dismiss_locked(&mut st, i);
        }
    }

    /// `job-pause`.
    pub async fn pause(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        let job = &mut st.jobs[i];
        check(job, JobVerb::Pause)?;
        if job.user_paused {
            return Err(refused("Job is already paused"));
        }
        job.user_paused = true;
        job.pause_count += 1;
        job.set_pause_requested();
        if job.parked {
            self.show_paused(job);
        }
        job.shared.kick();
        Ok(())
    }

    /// `job-resume` (also clears a block job's error status).
    pub async fn resume(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        let job = &mut st.jobs[i];
        if !job.user_paused {
            return Err(refused("Can't resume a job that was not paused"));
        }
        check(job, JobVerb::Resume)?;
        job.user_paused = false;
        job.pause_count -= 1;
        job.io_status = IoStatus::Ok;
        self.unpause(job);
        Ok(())
    }

    /// Pauses a job without anything the user sees: it stops at its next pause point until
    /// [`resume_internal`](Self::resume_internal). Used around graph changes.
    pub async fn pause_internal(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        let job = &mut st.jobs[i];
        job.pause_count += 1;
        job.set_pause_requested();
        Ok(())
    }

    /// Ends a [`pause_internal`](Self::pause_internal).
    pub async fn resume_internal(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        let job = &mut st.jobs[i];
        job.pause_count = job.pause_count.saturating_sub(1);
        self.unpause(job);
        Ok(())
    }

    pub(crate) fn show_paused(&self, job: &mut JobRec) {
        if job.resume_to.is_none() && matches!(job.status, JobStatus::Running | JobStatus::Ready) {
            let back = job.status;
            let to = if back == JobStatus::Ready {
                JobStatus::Standby
            } else {
                JobStatus::Paused
            };
            job.resume_to = Some(back);
            transition(&self.inner.events, job, to);
        }
    }

    pub(crate) fn unpause(&self, job: &mut JobRec) {
        job.set_pause_requested();
        if !job.user_paused {
            if let Some(back) = job.resume_to.take() {
                transition(&self.inner.events, job, back);
            }
        }
        if job.pause_count == 0 {
            job.shared.kick();
        }
    }

    /// `job-cancel` (`force`) or `block-job-cancel` (soft unless `force`).
    pub async fn cancel(&self, id: &str, force: bool) -> Result<(), JobError> {
        {
            let mut st = self.lock().await;
            let i = st.idx(id)?;
            check(&st.jobs[i], JobVerb::Cancel)?;
            if st.finalizing.contains(&st.jobs[i].txn) {
                // Its finalization is decided and running: that is how it ends.
                return Ok(());
            }
            self.cancel_locked(&mut st, i, force).await;
        }
        self.settle().await;
        Ok(())
    }

    /// Refuses a soft cancel of a user-paused job, as block-job-cancel does.
    pub async fn user_paused(&self, id: &str) -> Result<bool, JobError> {
        let st = self.lock().await;
        st.get(id).map(|j| j.user_paused).ok_or(JobError::NotFound)
    }

    pub(crate) async fn cancel_locked(&self, st: &mut State, i: usize, force: bool) {
        cancel_async(&self.inner.events, &mut st.jobs[i], force);
        let job = &st.jobs[i];
        if !job.started {
            // Never ran: it completes now, as cancelled.
            let id = job.id.clone();
            self.completed_locked(st, &id, Ok(())).await;
        } else if job.run_done {
            if job.force_cancel {
                let txn = job.txn;
                self.txn_abort(st, txn).await;
            }
        } else {
            job.shared.kick();
        }
    }

    /// `job-complete`.
    pub async fn complete(&self, id: &str) -> Result<(), JobError> {
        let st = self.lock().await;
        let job = st.get(id).ok_or(JobError::NotFound)?;
        check(job, JobVerb::Complete)?;
        if job.cancelled || !job.driver.can_complete() {
            return Err(refused(format!(
                "The active block job '{id}' cannot be completed"
            )));
        }
        job.driver.complete().map_err(JobError::Refused)?;
        job.shared.kick();
        Ok(())
    }

    /// `job-finalize`: finalizes every job of the transaction.
    pub async fn finalize(&self, id: &str) -> Result<(), JobError> {
        {
            let mut st = self.lock().await;
            let i = st.idx(id)?;
            check(&st.jobs[i], JobVerb::Finalize)?;
            let txn = st.jobs[i].txn;
            self.do_finalize(&mut st, txn).await;
        }
        self.settle().await;
        Ok(())
    }

    /// `job-dismiss`.
    pub async fn dismiss(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        check(&st.jobs[i], JobVerb::Dismiss)?;
        self.dismiss_locked(&mut st, i);
        Ok(())
    }

    /// `block-job-set-speed`.
    pub async fn set_speed(&self, id: &str, speed: i64) -> Result<(), JobError> {
        let st = self.lock().await;
        let job = st.get(id).ok_or(JobError::NotFound)?;
        check(job, JobVerb::SetSpeed)?;
        let speed = u64::try_from(speed)
            .map_err(|_| refused("Parameter 'speed' expects a non-negative value"))?;
        {
            let mut r = lock_std(&job.shared.rate);
            r.limit.set_speed(speed);
            r.speed = speed;
            r.not_before = None;
        }
        job.shared.kick();
        Ok(())
    }

    /// Drops a job that was created but could not be set up (a refused speed): `null`, and
    /// nothing of its driver runs (the caller undoes what it prepared), as QEMU's early fail.
    pub async fn early_fail(&self, id: &str) -> Result<(), JobError> {
        let mut st = self.lock().await;
        let i = st.idx(id)?;
        if st.jobs[i].started {
            return Err(refused("the job has started"));
        }
        self.dismiss_locked(&mut st, i);
        Ok(())
    }

    pub(crate) fn dismiss_locked(&self, st: &mut State, i: usize) {
        transition(&self.inner.events, &mut st.jobs[i], JobStatus::Null);
        st.jobs.remove(i);
    }
}

pub(crate) fn check(job: &JobRec, verb: JobVerb) -> Result<(), JobError> {
    if verb_allowed(verb, job.status) {
        Ok(())
    } else {
        Err(refused(verb_refused(&job.id, job.status, verb)))
    }
}

/// QEMU's job_cancel_async: records the cancel and lifts a user pause.
pub(crate) fn cancel_async(events: &EventSink, job: &mut JobRec, force: bool) {
    let force = job.driver.cancel(force);
    if job.user_paused {
        job.user_paused = false;
        job.pause_count -= 1;
        job.set_pause_requested();
        // A job stopped by an I/O error is not waited for (see `Shared::kick`), but QEMU
        // resumes it inside the command: its `running` comes before the reply.
        if job.pause_count == 0 && job.shared.error_stopped.load(Ordering::SeqCst) {
            if let Some(back) = job.resume_to.take() {
                transition(events, job, back);
            }
        }
    }
    if job.run_done && !force {
        return;
    }
    job.cancelled = true;
    job.force_cancel |= force;
    job.shared.cancel_requested.store(true, Ordering::SeqCst);
    if job.force_cancel {
        job.shared.cancelled.store(true, Ordering::SeqCst);
        job.shared.force_cancel.send_replace(true);
    }
    job.shared.kick();
}
