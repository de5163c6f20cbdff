//! `job-*`, `block-job-*`, `query-jobs`, `query-block-jobs` and `blockdev-create`.
//!
//! The generic `job-*` commands name a job by `id` and answer "Job not found" (GenericError);
//! the `block-job-*` ones name it by `device` (or `id`), see only block jobs, and answer
//! DeviceNotActive "Block job '…' not found", as QEMU does.

use std::sync::Arc;

use job::{JobError, JobInfo, JobOptions, JobVerb};
use qmp::{ErrorClass, QmpError, QmpResult};
use serde_json::{json, Map, Value};

use crate::control::Control;
use crate::jobs::{create_spec, CreateJob};

fn s<'a>(m: &'a Map<String, Value>, k: &str) -> &'a str {
    m.get(k).and_then(Value::as_str).unwrap_or_default()
}

fn job_error(e: JobError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The id of block job `name`, or QEMU's DeviceNotActive error.
async fn block_job(ctl: &Control, name: &str) -> QmpResult<String> {
    match ctl.jobs.info(name).await {
        Ok(i) if i.block => Ok(i.id),
        _ => Err(QmpError::new(
            ErrorClass::DeviceNotActive,
            format!("Block job '{name}' not found"),
        )),
    }
}

/// `job-pause`, `job-resume`, `job-cancel`, `job-complete`, `job-finalize`, `job-dismiss`.
pub async fn job_verb(ctl: &Control, command: &str, args: &Map<String, Value>) -> QmpResult<Value> {
    let id = s(args, "id");
    let jobs = &ctl.jobs;
    match command {
        "job-pause" => jobs.pause(id).await,
        "job-resume" => jobs.resume(id).await,
        // job-cancel always forces, as in QEMU.
        "job-cancel" => jobs.cancel(id, true).await,
        "job-complete" => jobs.complete(id).await,
        "job-finalize" => jobs.finalize(id).await,
        "job-dismiss" => jobs.dismiss(id).await,
        other => return Err(QmpError::command_not_found(other)),
    }
    .map_err(job_error)?;
    Ok(json!({}))
}

/// The `block-job-*` verbs.
pub async fn block_job_verb(
    ctl: &Control,
    command: &str,
    args: &Map<String, Value>,
) -> QmpResult<Value> {
    let key = if matches!(
        command,
        "block-job-dismiss" | "block-job-finalize" | "block-job-change"
    ) {
        "id"
    } else {
        "device"
    };
    let id = block_job(ctl, s(args, key)).await?;
    let jobs = &ctl.jobs;
    match command {
        "block-job-set-speed" => {
            let speed = args.get("speed").and_then(Value::as_i64).unwrap_or(0);
            jobs.set_speed(&id, speed).await
        }
        "block-job-cancel" => {
            let force = args.get("force").and_then(Value::as_bool).unwrap_or(false);
            if !force && jobs.user_paused(&id).await.unwrap_or(false) {
                return Err(QmpError::generic(format!(
                    "The block job for device '{id}' is currently paused"
                )));
            }
            jobs.cancel(&id, force).await
        }
        "block-job-pause" => jobs.pause(&id).await,
        "block-job-resume" => jobs.resume(&id).await,
        "block-job-complete" => jobs.complete(&id).await,
        "block-job-dismiss" => jobs.dismiss(&id).await,
        "block-job-finalize" => jobs.finalize(&id).await,
        "block-job-change" => {
            jobs.check_verb(&id, JobVerb::Change)
                .await
                .map_err(job_error)?;
            let info = jobs.info(&id).await.map_err(job_error)?;
            if s(args, "type") != info.job_type {
                return Err(QmpError::generic(format!(
                    "Job type {} is different from the job's type {}",
                    s(args, "type"),
                    info.job_type
                )));
            }
            Err(JobError::Refused("Job type does not support change".into()))
        }
        other => return Err(QmpError::command_not_found(other)),
    }
    .map_err(job_error)?;
    Ok(json!({}))
}

fn job_info(i: &JobInfo) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(i.id));
    m.insert("type".into(), json!(i.job_type));
    m.insert("status".into(), json!(i.status.as_str()));
    m.insert("current-progress".into(), json!(i.current));
    m.insert("total-progress".into(), json!(i.total));
    if let Some(e) = &i.error {
        m.insert("error".into(), json!(e));
    }
    Value::Object(m)
}

/// `query-jobs`: every job, newest first.
pub async fn query_jobs(ctl: &Control) -> Value {
    Value::Array(ctl.jobs.query().await.iter().map(job_info).collect())
}

/// `query-block-jobs`: the block jobs, newest first.
pub async fn query_block_jobs(ctl: &Control) -> Value {
    let list = ctl
        .jobs
        .query()
        .await
        .iter()
        .filter(|i| i.block)
        .map(|i| {
            let mut m = Map::new();
            m.insert("type".into(), json!(i.job_type));
            m.insert("device".into(), json!(i.id));
            m.insert("len".into(), json!(i.total));
            m.insert("offset".into(), json!(i.current));
            m.insert("busy".into(), json!(i.busy));
            m.insert("paused".into(), json!(i.paused));
            m.insert("speed".into(), json!(i.speed));
            m.insert("io-status".into(), json!(i.io_status.as_str()));
            m.insert(
                "ready".into(),
                json!(matches!(
                    i.status,
                    job::JobStatus::Ready | job::JobStatus::Standby
                )),
            );
            m.insert("status".into(), json!(i.status.as_str()));
            m.insert("auto-finalize".into(), json!(i.auto_finalize));
            m.insert("auto-dismiss".into(), json!(i.auto_dismiss));
            if let Some(e) = &i.error {
                m.insert("error".into(), json!(e));
            }
            Value::Object(m)
        })
        .collect();
    Value::Array(list)
}

/// `blockdev-create`: a `create` job, concluded until dismissed (QEMU's manual dismiss).
pub async fn blockdev_create(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let empty = Map::new();
    let options = args
        .get("options")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let spec = create_spec(options, |name| {
        ctl.nodes.entry(name).map(|e| e.node.clone())
    })
    .map_err(QmpError::generic)?;
    let id = s(args, "job-id");
    let opts = JobOptions {
        auto_dismiss: false,
        ..JobOptions::new(id)
    };
    ctl.jobs
        .create(Arc::new(CreateJob::new(spec)), opts)
        .await
        .map_err(job_error)?;
    ctl.jobs.start(id).await.map_err(job_error)?;
    Ok(json!({}))
}
