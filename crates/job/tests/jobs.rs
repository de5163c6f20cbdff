//! The job manager with fake jobs: every verb in every state (against the verb table), the
//! event sequences of the contract, and transactions in the shapes of QEMU's
//! tests/unit/test-blockjob-txn.c (both failure orders, cancel races).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use job::status::{verb_allowed, ALL_VERBS};
use job::{
    ErrorAction, IoOperation, JobContext, JobDriver, JobEvent, JobManager, JobOptions, JobStatus,
    JobVerb,
};
use tokio::sync::Semaphore;

/// A job that takes `steps` steps, each released by a permit of `go`.
struct Fake {
    steps: u64,
    go: Arc<Semaphore>,
    fail: bool,
    /// Reaches `ready` after its steps and waits for complete (or a cancel).
    converge: bool,
    completed: Mutex<bool>,
    /// Ignores cancels until its steps are done.
    stubborn: bool,
    /// Never returns.
    stuck: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn new(steps: u64, go: &Arc<Semaphore>, log: &Arc<Mutex<Vec<String>>>) -> Fake {
        Fake {
            steps,
            go: go.clone(),
            fail: false,
            converge: false,
            completed: Mutex::new(false),
            stubborn: false,
            stuck: false,
            log: log.clone(),
        }
    }
}

#[async_trait]
impl JobDriver for Fake {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        ctx.progress_set_remaining(self.steps);
        if self.stuck {
            std::future::pending::<()>().await;
        }
        for _ in 0..self.steps {
            // Wait for the step's permit, as a job waits for I/O: pausable and cancellable.
            loop {
                ctx.pause_point().await;
                if ctx.is_cancelled() && !self.stubborn {
                    return Ok(());
                }
                if let Ok(p) = self.go.try_acquire() {
                    p.forget();
                    break;
                }
                if self.stubborn {
                    // ctx.sleep returns at once for a cancelled job; this one does not care.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else {
                    ctx.sleep(Duration::from_millis(1)).await;
                }
            }
            ctx.progress_update(1);
        }
        if self.converge {
            ctx.ready().await;
            loop {
                if ctx.is_cancelled() || *self.completed.lock().expect("c") {
                    break;
                }
                ctx.sleep(Duration::from_millis(2)).await;
            }
        }
        if self.fail {
            return Err("Input/output error".into());
        }
        Ok(())
    }

    fn can_complete(&self) -> bool {
        self.converge
    }

    fn complete(&self) -> Result<(), String> {
        *self.completed.lock().expect("c") = true;
        Ok(())
    }

    async fn commit(&self) {
        self.log.lock().expect("log").push("commit".into());
    }

    async fn abort(&self) {
        self.log.lock().expect("log").push("abort".into());
    }

    async fn clean(&self) {
        self.log.lock().expect("log").push("clean".into());
    }
}

struct World {
    mgr: JobManager,
    events: Arc<Mutex<Vec<JobEvent>>>,
    log: Arc<Mutex<Vec<String>>>,
    go: Arc<Semaphore>,
}

impl World {
    fn new() -> World {
        World::with_bound(Duration::from_secs(5))
    }

    fn with_bound(bound: Duration) -> World {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        World {
            mgr: JobManager::with_cancel_bound(
                Arc::new(move |e| sink.lock().expect("events").push(e)),
                bound,
            ),
            events,
            log: Arc::new(Mutex::new(Vec::new())),
            go: Arc::new(Semaphore::new(0)),
        }
    }

    fn fake(&self, steps: u64) -> Fake {
        Fake::new(steps, &self.go, &self.log)
    }

    /// Events as short strings: `id:status` for status changes, `COMPLETED(id)` etc.
    fn trace(&self) -> Vec<String> {
        self.events
            .lock()
            .expect("events")
            .iter()
            .map(|e| match e {
                JobEvent::StatusChange { id, status } => format!("{id}:{status}"),
                JobEvent::Ready(i) => format!("READY({})", i.id),
                JobEvent::Pending(i) => format!("PENDING({})", i.id),
                JobEvent::Completed(i) => match &i.error {
                    Some(e) => format!("COMPLETED({},{e})", i.id),
                    None => format!("COMPLETED({})", i.id),
                },
                JobEvent::Cancelled(i) => format!("CANCELLED({})", i.id),
                JobEvent::Error { id, .. } => format!("ERROR({id})"),
            })
            .collect()
    }

    fn clear(&self) {
        self.events.lock().expect("events").clear();
    }

    async fn status(&self, id: &str) -> Option<JobStatus> {
        self.mgr.info(id).await.ok().map(|i| i.status)
    }

    /// Waits until job `id` has `status` (None: gone).
    async fn wait_for(&self, id: &str, status: Option<JobStatus>) {
        for _ in 0..2000 {
            if self.status(id).await == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!(
            "job {id} never reached {status:?} (is {:?}); events {:?}",
            self.status(id).await,
            self.trace()
        );
    }

    /// Waits until job `id` is parked at a pause point.
    async fn wait_parked(&self, id: &str) {
        for _ in 0..2000 {
            if let Ok(i) = self.mgr.info(id).await {
                if !i.busy {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("job {id} never stopped");
    }

    async fn add(&self, fake: Fake, opts: JobOptions) {
        self.mgr.create(Arc::new(fake), opts).await.expect("create");
    }
}

fn block(id: &str) -> JobOptions {
    JobOptions {
        block: true,
        ..JobOptions::new(id)
    }
}

fn manual(id: &str) -> JobOptions {
    JobOptions {
        auto_finalize: false,
        auto_dismiss: false,
        ..block(id)
    }
}

/// `opts` as a member of transaction `txn`.
fn member(txn: job::TxnId, opts: JobOptions) -> JobOptions {
    JobOptions {
        txn: Some(txn),
        ..opts
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

#[tokio::test]
async fn a_job_runs_to_the_end_with_the_contract_sequence() {
    let w = World::new();
    w.add(w.fake(2), block("j")).await;
    w.mgr.start("j").await.expect("start");
    w.go.add_permits(2);
    w.wait_for("j", None).await;
    assert_eq!(
        w.trace(),
        s(&[
            "j:created",
            "j:running",
            "j:waiting",
            "j:pending",
            "COMPLETED(j)",
            "j:concluded",
            "j:null"
        ])
    );
    assert_eq!(*w.log.lock().expect("log"), s(&["commit", "clean"]));
}

#[tokio::test]
async fn manual_finalize_and_dismiss() {
    let w = World::new();
    w.add(w.fake(1), manual("j")).await;
    w.mgr.start("j").await.expect("start");
    w.go.add_permits(1);
    w.wait_for("j", Some(JobStatus::Pending)).await;
    assert_eq!(
        w.trace(),
        s(&[
            "j:created",
            "j:running",
            "j:waiting",
            "j:pending",
            "PENDING(j)"
        ])
    );
    w.clear();
    w.mgr.finalize("j").await.expect("finalize");
    assert_eq!(w.trace(), s(&["COMPLETED(j)", "j:concluded"]));
    let info = w.mgr.info("j").await.expect("info");
    assert_eq!((info.current, info.total), (1, 1));
    w.clear();
    w.mgr.dismiss("j").await.expect("dismiss");
    assert_eq!(w.trace(), s(&["j:null"]));
    assert_eq!(w.mgr.dismiss("j").await, Err(job::JobError::NotFound));
}

#[tokio::test]
async fn pause_resume_then_cancel() {
    let w = World::new();
    w.add(w.fake(3), block("j")).await;
    w.mgr.start("j").await.expect("start");
    w.mgr.pause("j").await.expect("pause");
    w.wait_for("j", Some(JobStatus::Paused)).await;
    assert_eq!(
        w.mgr.pause("j").await.expect_err("twice").to_string(),
        "Job is already paused"
    );
    w.mgr.resume("j").await.expect("resume");
    assert_eq!(
        w.mgr.resume("j").await.expect_err("twice").to_string(),
        "Can't resume a job that was not paused"
    );
    w.mgr.cancel("j", true).await.expect("cancel");
    w.wait_for("j", None).await;
    assert_eq!(
        w.trace(),
        s(&[
            "j:created",
            "j:running",
            "j:paused",
            "j:running",
            "j:aborting",
            "CANCELLED(j)",
            "j:concluded",
            "j:null"
        ])
    );
    assert_eq!(*w.log.lock().expect("log"), s(&["abort", "clean"]));
}

#[tokio::test]
async fn cancelling_a_paused_job_resumes_it_first() {
    let w = World::new();
    w.add(w.fake(3), manual("j")).await;
    w.mgr.start("j").await.expect("start");
    w.mgr.pause("j").await.expect("pause");
    w.wait_for("j", Some(JobStatus::Paused)).await;
    w.mgr.cancel("j", true).await.expect("cancel");
    w.wait_for("j", Some(JobStatus::Concluded)).await;
    assert_eq!(
        w.trace(),
        s(&[
            "j:created",
            "j:running",
            "j:paused",
            "j:running",
            "j:aborting",
            "CANCELLED(j)",
            "j:concluded"
        ])
    );
    let info = w.mgr.info("j").await.expect("info");
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
}

#[tokio::test]
async fn a_failing_job_reports_its_error() {
    let w = World::new();
    let mut f = w.fake(1);
    f.fail = true;
    w.add(f, block("j")).await;
    w.mgr.start("j").await.expect("start");
    w.go.add_permits(1);
    w.wait_for("j", None).await;
    assert_eq!(
        w.trace(),
        s(&[
            "j:created",
            "j:running",
            "j:aborting",
            "COMPLETED(j,Input/output error)",
            "j:concluded",
            "j:null"
        ])
    );
}

#[tokio::test]
async fn a_job_cancelled_before_it_starts_emits_no_block_event() {
    let w = World::new();
    w.add(w.fake(1), manual("j")).await;
    w.mgr.cancel("j", true).await.expect("cancel");
    assert_eq!(
        w.trace(),
        s(&["j:created", "j:aborting", "j:concluded", "j:null"])
    );
}

#[tokio::test]
async fn a_job_cancelled_in_pending_is_cancelled() {
    let w = World::new();
    w.add(w.fake(1), manual("j")).await;
    w.mgr.start("j").await.expect("start");
    w.go.add_permits(1);
    w.wait_for("j", Some(JobStatus::Pending)).await;
    w.clear();
    w.mgr.cancel("j", false).await.expect("cancel");
    assert_eq!(w.trace(), s(&["j:aborting", "CANCELLED(j)", "j:concluded"]));
}

#[tokio::test]
async fn ready_standby_and_complete() {
    let w = World::new();
    let mut f = w.fake(1);
    f.converge = true;
    w.add(f, block("m")).await;
    w.mgr.start("m").await.expect("start");
    assert!(w.mgr.complete("m").await.is_err(), "not ready yet");
    w.go.add_permits(1);
    w.wait_for("m", Some(JobStatus::Ready)).await;
    w.mgr.pause("m").await.expect("pause");
    w.wait_for("m", Some(JobStatus::Standby)).await;
    // Accepted in standby; takes effect on resume.
    w.mgr.complete("m").await.expect("complete in standby");
    w.mgr.resume("m").await.expect("resume");
    w.wait_for("m", None).await;
    assert_eq!(
        w.trace(),
        s(&[
            "m:created",
            "m:running",
            "m:ready",
            "READY(m)",
            "m:standby",
            "m:ready",
            "m:waiting",
            "m:pending",
            "COMPLETED(m)",
            "m:concluded",
            "m:null"
        ])
    );
}

#[tokio::test]
async fn internal_pauses_do_not_flap_the_status() {
    let w = World::new();
    w.add(w.fake(2), block("j")).await;
    w.mgr.start("j").await.expect("start");
    w.mgr.pause_internal("j").await.expect("pause");
    w.go.add_permits(1);
    w.wait_parked("j").await;
    assert_eq!(w.status("j").await, Some(JobStatus::Running));
    // A user pause while parked shows at once, and its resume too.
    w.mgr.pause("j").await.expect("pause");
    assert_eq!(w.status("j").await, Some(JobStatus::Paused));
    w.mgr.resume("j").await.expect("resume");
    assert_eq!(w.status("j").await, Some(JobStatus::Running));
    w.mgr.resume_internal("j").await.expect("resume");
    w.go.add_permits(1);
    w.wait_for("j", None).await;
    assert_eq!(
        w.trace(),
        s(&[
            "j:created",
            "j:running",
            "j:paused",
            "j:running",
            "j:waiting",
            "j:pending",
            "COMPLETED(j)",
            "j:concluded",
            "j:null"
        ])
    );
}

#[tokio::test]
async fn a_stuck_job_is_abandoned_after_the_cancel_bound() {
    let w = World::with_bound(Duration::from_millis(100));
    let mut f = w.fake(1);
    f.stuck = true;
    w.add(f, block("j")).await;
    w.mgr.start("j").await.expect("start");
    let t0 = std::time::Instant::now();
    w.mgr.cancel("j", true).await.expect("cancel");
    w.wait_for("j", None).await;
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(w.trace().contains(&"CANCELLED(j)".to_owned()));
}

#[tokio::test]
async fn repeated_error_events_are_rate_limited() {
    let w = World::new();
    struct Erring;
    #[async_trait]
    impl JobDriver for Erring {
        fn job_type(&self) -> &'static str {
            "backup"
        }
        async fn run(&self, ctx: JobContext) -> Result<(), String> {
            for _ in 0..500 {
                ctx.io_error(IoOperation::Write, ErrorAction::Ignore, false)
                    .await;
            }
            Ok(())
        }
    }
    w.mgr
        .create(Arc::new(Erring), block("e"))
        .await
        .expect("create");
    w.mgr.start("e").await.expect("start");
    w.wait_for("e", None).await;
    let errors = w.trace().iter().filter(|e| e.starts_with("ERROR")).count();
    assert_eq!(
        errors, 1,
        "500 identical errors within a second make one event"
    );
}

#[tokio::test]
async fn an_error_with_stop_pauses_until_resumed() {
    let w = World::new();
    struct StopOnce;
    #[async_trait]
    impl JobDriver for StopOnce {
        fn job_type(&self) -> &'static str {
            "backup"
        }
        async fn run(&self, ctx: JobContext) -> Result<(), String> {
            ctx.io_error(IoOperation::Write, ErrorAction::Stop, true)
                .await;
            Ok(())
        }
    }
    w.mgr
        .create(Arc::new(StopOnce), manual("e"))
        .await
        .expect("create");
    w.mgr.start("e").await.expect("start");
    w.wait_for("e", Some(JobStatus::Paused)).await;
    let info = w.mgr.info("e").await.expect("info");
    assert!(info.paused);
    assert_eq!(info.io_status, job::IoStatus::NoSpace);
    w.mgr.resume("e").await.expect("resume");
    w.wait_for("e", Some(JobStatus::Pending)).await;
    assert_eq!(
        w.mgr.info("e").await.expect("info").io_status,
        job::IoStatus::Ok
    );
}

#[tokio::test]
async fn speed_limits_progress() {
    let w = World::new();
    struct Copier;
    #[async_trait]
    impl JobDriver for Copier {
        fn job_type(&self) -> &'static str {
            "backup"
        }
        async fn run(&self, ctx: JobContext) -> Result<(), String> {
            ctx.progress_set_remaining(40 * 65536);
            for _ in 0..40 {
                ctx.rate_wait().await;
                ctx.progress_update(65536);
                ctx.rate_charge(65536);
            }
            Ok(())
        }
    }
    let opts = JobOptions {
        speed: 4 << 20,
        ..block("c")
    };
    w.mgr.create(Arc::new(Copier), opts).await.expect("create");
    let t0 = std::time::Instant::now();
    w.mgr.start("c").await.expect("start");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        w.mgr
            .set_speed("c", -1)
            .await
            .expect_err("negative")
            .to_string(),
        "Parameter 'speed' expects a non-negative value"
    );
    w.wait_for("c", None).await;
    // 2.5 MiB at 4 MiB/s: about 0.6 s (the first slice does not wait).
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// Brings a fresh job `j` (in a world of its own) into `status`.
async fn job_in(status: JobStatus) -> World {
    let w = World::new();
    let mut f = w.fake(1);
    f.converge = matches!(status, JobStatus::Ready | JobStatus::Standby);
    match status {
        JobStatus::Created => w.add(f, manual("j")).await,
        JobStatus::Running | JobStatus::Paused | JobStatus::Ready | JobStatus::Standby => {
            w.add(f, manual("j")).await;
            w.mgr.start("j").await.expect("start");
            if matches!(status, JobStatus::Ready | JobStatus::Standby) {
                w.go.add_permits(1);
                w.wait_for("j", Some(JobStatus::Ready)).await;
            }
            if matches!(status, JobStatus::Paused | JobStatus::Standby) {
                w.mgr.pause("j").await.expect("pause");
                w.wait_for("j", Some(status)).await;
            }
        }
        JobStatus::Waiting => {
            // Done, but its transaction partner is not.
            let txn = w.mgr.new_txn().await;
            w.add(f, member(txn, manual("j"))).await;
            let mut other = w.fake(1);
            other.go = Arc::new(Semaphore::new(0));
            w.add(other, member(txn, manual("k"))).await;
            w.mgr.start("j").await.expect("start");
            w.mgr.start("k").await.expect("start");
            w.go.add_permits(1);
            w.wait_for("j", Some(JobStatus::Waiting)).await;
        }
        JobStatus::Pending | JobStatus::Concluded => {
            w.add(f, manual("j")).await;
            w.mgr.start("j").await.expect("start");
            w.go.add_permits(1);
            w.wait_for("j", Some(JobStatus::Pending)).await;
            if status == JobStatus::Concluded {
                w.mgr.finalize("j").await.expect("finalize");
            }
        }
        JobStatus::Aborting => {
            // Failed; its partner ignores the cancel until released.
            let txn = w.mgr.new_txn().await;
            f.fail = true;
            w.add(f, member(txn, manual("j"))).await;
            let mut other = w.fake(1);
            other.stubborn = true;
            other.go = Arc::new(Semaphore::new(0));
            w.add(other, member(txn, manual("k"))).await;
            w.mgr.start("j").await.expect("start");
            w.mgr.start("k").await.expect("start");
            w.go.add_permits(1);
            w.wait_for("j", Some(JobStatus::Aborting)).await;
        }
        other => panic!("no recipe for {other}"),
    }
    assert_eq!(w.status("j").await, Some(status));
    w
}

async fn apply(w: &World, verb: JobVerb) -> Result<(), String> {
    let r = match verb {
        JobVerb::Cancel => w.mgr.cancel("j", true).await,
        JobVerb::Pause => w.mgr.pause("j").await,
        JobVerb::Resume => w.mgr.resume("j").await,
        JobVerb::SetSpeed => w.mgr.set_speed("j", 1 << 20).await,
        JobVerb::Complete => w.mgr.complete("j").await,
        JobVerb::Finalize => w.mgr.finalize("j").await,
        JobVerb::Dismiss => w.mgr.dismiss("j").await,
        JobVerb::Change => w.mgr.check_verb("j", JobVerb::Change).await,
    };
    r.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_in_every_state_follows_the_verb_table() {
    use JobStatus::*;
    for status in [
        Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting, Concluded,
    ] {
        for verb in ALL_VERBS {
            let w = job_in(status).await;
            let got = apply(&w, verb).await;
            let refused = format!(
                "Job 'j' in state '{}' cannot accept command verb '{}'",
                status.as_str(),
                verb.as_str()
            );
            let user_paused = matches!(status, Paused | Standby);
            let expected: Result<(), String> = match verb {
                // The pause flag is checked before the table, as in QEMU.
                JobVerb::Resume if !user_paused => {
                    Err("Can't resume a job that was not paused".into())
                }
                _ if !verb_allowed(verb, status) => Err(refused),
                JobVerb::Pause if user_paused => Err("Job is already paused".into()),
                _ => Ok(()),
            };
            assert_eq!(got, expected, "{verb:?} in {status}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_pair_one_fails_the_other_is_cancelled_even_when_done() {
    for failing_first in [true, false] {
        let w = World::new();
        let txn = w.mgr.new_txn().await;
        let mut a = w.fake(1);
        a.fail = true;
        let ga = Arc::new(Semaphore::new(0));
        let gb = Arc::new(Semaphore::new(0));
        a.go = ga.clone();
        let mut b = w.fake(1);
        b.go = gb.clone();
        w.add(a, member(txn, block("a"))).await;
        w.add(b, member(txn, block("b"))).await;
        w.mgr.start("a").await.expect("start");
        w.mgr.start("b").await.expect("start");
        // Let both reach their first step.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if failing_first {
            // a fails while b is still working: b is force-cancelled and stops at once.
            ga.add_permits(1);
        } else {
            gb.add_permits(1);
            w.wait_for("b", Some(JobStatus::Waiting)).await;
            ga.add_permits(1);
        }
        w.wait_for("a", None).await;
        w.wait_for("b", None).await;
        let t = w.trace();
        assert!(
            t.contains(&"COMPLETED(a,Input/output error)".to_owned()),
            "{t:?}"
        );
        assert!(t.contains(&"CANCELLED(b)".to_owned()), "{t:?}");
        assert!(t.contains(&"b:aborting".to_owned()), "{t:?}");
        assert!(!t.contains(&"a:pending".to_owned()) && !t.contains(&"b:pending".to_owned()));
        let log = w.log.lock().expect("log").clone();
        assert_eq!(log, s(&["abort", "clean", "abort", "clean"]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_pair_nobody_is_pending_until_all_are_waiting_and_one_finalize_does_all() {
    let w = World::new();
    let txn = w.mgr.new_txn().await;
    let ga = Arc::new(Semaphore::new(0));
    let gb = Arc::new(Semaphore::new(0));
    let mut a = w.fake(1);
    a.go = ga.clone();
    let mut b = w.fake(1);
    b.go = gb.clone();
    w.add(a, member(txn, manual("a"))).await;
    w.add(b, member(txn, manual("b"))).await;
    w.mgr.start("a").await.expect("start");
    w.mgr.start("b").await.expect("start");
    ga.add_permits(1);
    w.wait_for("a", Some(JobStatus::Waiting)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(w.status("a").await, Some(JobStatus::Waiting));
    gb.add_permits(1);
    w.wait_for("b", Some(JobStatus::Pending)).await;
    assert_eq!(w.status("a").await, Some(JobStatus::Pending));
    w.mgr.finalize("b").await.expect("finalize");
    assert_eq!(w.status("a").await, Some(JobStatus::Concluded));
    assert_eq!(w.status("b").await, Some(JobStatus::Concluded));
    assert_eq!(
        *w.log.lock().expect("log"),
        s(&["commit", "clean", "commit", "clean"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_pair_cancel_races_a_failure() {
    // One job fails while the other is being cancelled by the user: both end, once each,
    // and nothing commits.
    for _ in 0..20 {
        let w = World::new();
        let txn = w.mgr.new_txn().await;
        let mut a = w.fake(1);
        a.fail = true;
        let ga = Arc::new(Semaphore::new(0));
        a.go = ga.clone();
        let b = w.fake(1000);
        w.add(a, member(txn, block("a"))).await;
        w.add(b, member(txn, block("b"))).await;
        w.mgr.start("a").await.expect("start");
        w.mgr.start("b").await.expect("start");
        let mgr = w.mgr.clone();
        let cancel = tokio::spawn(async move { mgr.cancel("b", true).await });
        ga.add_permits(1);
        let _ = cancel.await.expect("task");
        w.wait_for("a", None).await;
        w.wait_for("b", None).await;
        // Whichever wins, each job ends exactly once (a failed job that was also
        // force-cancelled reports CANCELLED, as in QEMU) and nothing commits.
        let t = w.trace();
        for id in ["a", "b"] {
            let ends = t
                .iter()
                .filter(|e| {
                    *e == &format!("CANCELLED({id})") || e.starts_with(&format!("COMPLETED({id}"))
                })
                .count();
            assert_eq!(ends, 1, "{id}: {t:?}");
        }
        assert!(t.contains(&"CANCELLED(b)".to_owned()), "{t:?}");
        assert!(!w.log.lock().expect("log").contains(&"commit".to_owned()));
    }
}

#[tokio::test]
async fn ids_are_checked() {
    let w = World::new();
    assert_eq!(
        w.mgr
            .create(Arc::new(w.fake(1)), JobOptions::new(""))
            .await
            .expect_err("empty")
            .to_string(),
        "Invalid job ID ''"
    );
    w.add(w.fake(1), manual("j")).await;
    assert_eq!(
        w.mgr
            .create(Arc::new(w.fake(1)), JobOptions::new("j"))
            .await
            .expect_err("dup")
            .to_string(),
        "Job ID 'j' already in use"
    );
}

/// A job whose commit waits until released, as a completion step that drains a busy node
/// to edit the graph would.
struct SlowCommit {
    release: Arc<Semaphore>,
    committed: Arc<Mutex<bool>>,
}

#[async_trait]
impl JobDriver for SlowCommit {
    fn job_type(&self) -> &'static str {
        "backup"
    }
    async fn run(&self, _ctx: JobContext) -> Result<(), String> {
        Ok(())
    }
    async fn commit(&self) {
        if let Ok(p) = self.release.acquire().await {
            p.forget();
        }
        *self.committed.lock().expect("committed") = true;
    }
}

/// Finalization callbacks run without the manager's lock: while one job's commit waits,
/// queries answer, another job takes its verbs, and a cancel of the finalizing job changes
/// nothing (its finalization is decided).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_commit_blocks_neither_queries_nor_other_jobs() {
    let w = World::new();
    let release = Arc::new(Semaphore::new(0));
    let committed = Arc::new(Mutex::new(false));
    let slow = SlowCommit {
        release: release.clone(),
        committed: committed.clone(),
    };
    w.mgr
        .create(Arc::new(slow), block("slow"))
        .await
        .expect("create");
    w.add(w.fake(1000), block("other")).await;
    w.mgr.start("other").await.expect("start");
    w.mgr.start("slow").await.expect("start");
    let within = Duration::from_secs(2);
    tokio::time::timeout(within, w.wait_for("slow", Some(JobStatus::Pending)))
        .await
        .expect("the job's status is readable while its commit waits");
    let list = tokio::time::timeout(within, w.mgr.query())
        .await
        .expect("query-jobs answers during the commit");
    assert_eq!(list.len(), 2);
    tokio::time::timeout(within, w.mgr.pause("other"))
        .await
        .expect("another job's verb answers")
        .expect("pause");
    tokio::time::timeout(within, w.mgr.cancel("slow", true))
        .await
        .expect("cancel answers")
        .expect("cancel");
    assert!(!*committed.lock().expect("committed"));
    release.add_permits(1);
    w.wait_for("slow", None).await;
    assert!(*committed.lock().expect("committed"));
    let trace = w.trace();
    assert!(
        trace.iter().any(|e| e == "COMPLETED(slow)"),
        "committed, not cancelled: {trace:?}"
    );
    w.mgr.cancel("other", true).await.expect("cancel other");
    w.wait_for("other", None).await;
}
