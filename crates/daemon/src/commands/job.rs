//! `job-*`, `block-job-*`, `query-jobs`, `query-block-jobs` and `blockdev-create`.
//!
//! The generic `job-*` commands name a job by `id` and answer "Job not found" (GenericError);
//! the `block-job-*` ones name it by `device` (or `id`), see only block jobs, and answer
//! DeviceNotActive "Block job '…' not found", as QEMU does.

use std::sync::Arc;

use job::{JobError, JobInfo, JobOptions, JobVerb};
use qmp::{ErrorClass, QmpError, QmpResult, Schema};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::decode;
use crate::control::Control;
use crate::jobs::{create_spec, CreateJob};

/// The arguments of `job-*` verbs.
#[derive(Debug, Deserialize)]
struct JobArgs {
    id: String,
}

/// The arguments of `block-job-*` verbs: the job by `device` (or `id`), and what the verb
/// takes.
#[derive(Debug, Deserialize)]
struct BlockJobArgs {
    device: Option<String>,
    id: Option<String>,
    #[serde(default)]
    speed: i64,
    #[serde(default)]
    force: bool,
}

/// `blockdev-create`'s arguments.
#[derive(Debug, Deserialize)]
struct CreateArgs {
    #[serde(rename = "job-id")]
    job_id: String,
    options: Map<String, Value>,
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
    let JobArgs { id } = decode(args)?;
    let id = id.as_str();
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
    let args: BlockJobArgs = decode(args)?;
    let name = if matches!(
        command,
        "block-job-dismiss" | "block-job-finalize" | "block-job-change"
    ) {
        args.id.as_deref()
    } else {
        args.device.as_deref()
    };
    let id = block_job(ctl, name.unwrap_or_default()).await?;
    let jobs = &ctl.jobs;
    match command {
        "block-job-set-speed" => jobs.set_speed(&id, args.speed).await,
        "block-job-cancel" => {
            let force = args.force;
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
            // As in QEMU, a job whose type has no change refuses before the options are
            // looked at (the type in them is checked by the job types that change: mirror).
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
    let args: CreateArgs = decode(args)?;
    let spec = create_spec(&args.options, |name| {
        ctl.nodes.entry(name).map(|e| e.node.clone())
    })
    .map_err(QmpError::generic)?;
    let id = args.job_id.as_str();
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

const JOB_TYPES: &[&str] = &[
    "commit",
    "stream",
    "mirror",
    "backup",
    "create",
    "amend",
    "snapshot-load",
    "snapshot-save",
    "snapshot-delete",
];

/// The schema of the job commands (and `blockdev-create`, whose job is `create`).
pub(crate) fn schema(s: &mut Schema) {
    s.enumeration("JobType", JOB_TYPES)
        .enumeration(
            "JobStatus",
            &[
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null",
            ],
        )
        .object(
            "JobInfo",
            &[
                "id:str",
                "type:JobType",
                "status:JobStatus",
                "current-progress:int",
                "total-progress:int",
                "*error:str",
            ],
        )
        .object("JobIdArgs", &["id:str"])
        .object("BlockJobDeviceArgs", &["device:str"])
        .object("BlockJobSetSpeedArgs", &["device:str", "speed:int"])
        .object("BlockJobCancelArgs", &["device:str", "*force:bool"])
        .enumeration("BlockDeviceIoStatus", &["ok", "failed", "nospace"])
        .enumeration("MirrorCopyMode", &["background", "write-blocking"])
        .object("BlockJobInfoMirror", &["actively-synced:bool"])
        .object("BlockJobChangeOptionsMirror", &["copy-mode:MirrorCopyMode"])
        .union(
            "BlockJobInfo",
            &[
                "type:JobType",
                "device:str",
                "len:int",
                "offset:int",
                "busy:bool",
                "paused:bool",
                "speed:int",
                "io-status:BlockDeviceIoStatus",
                "ready:bool",
                "status:JobStatus",
                "auto-finalize:bool",
                "auto-dismiss:bool",
                "*error:str",
            ],
            "type",
            &[("mirror", "BlockJobInfoMirror")],
        )
        .union(
            "BlockJobChangeOptions",
            &["id:str", "type:JobType"],
            "type",
            &[("mirror", "BlockJobChangeOptionsMirror")],
        )
        .enumeration("PreallocMode", &["off", "metadata", "falloc", "full"])
        .enumeration("BlockdevQcow2Version", &["v2", "v3"])
        .enumeration("Qcow2CompressionType", &["zlib", "zstd"])
        .object(
            "BlockdevCreateOptionsFile",
            &["filename:str", "size:size", "*preallocation:PreallocMode"],
        )
        .object(
            "BlockdevCreateOptionsQcow2",
            &[
                "file:BlockdevRef",
                "size:size",
                "*version:BlockdevQcow2Version",
                "*backing-file:str",
                "*backing-fmt:BlockdevDriver",
                "*cluster-size:size",
                "*preallocation:PreallocMode",
                "*lazy-refcounts:bool",
                "*refcount-bits:int",
                "*compression-type:Qcow2CompressionType",
            ],
        )
        .union(
            "BlockdevCreateOptions",
            &["driver:BlockdevDriver"],
            "driver",
            &[
                ("file", "BlockdevCreateOptionsFile"),
                ("qcow2", "BlockdevCreateOptionsQcow2"),
            ],
        )
        .object(
            "BlockdevCreateArgs",
            &["job-id:str", "options:BlockdevCreateOptions"],
        )
        .object("JobStatusChangeData", &["id:str", "status:JobStatus"])
        .object(
            "BlockJobProgressData",
            &[
                "type:JobType",
                "device:str",
                "len:int",
                "offset:int",
                "speed:int",
            ],
        )
        .object(
            "BlockJobCompletedData",
            &[
                "type:JobType",
                "device:str",
                "len:int",
                "offset:int",
                "speed:int",
                "*error:str",
            ],
        )
        .enumeration("IoOperationType", &["read", "write"])
        .enumeration("BlockErrorAction", &["ignore", "report", "stop"])
        .object(
            "BlockJobErrorData",
            &[
                "device:str",
                "operation:IoOperationType",
                "action:BlockErrorAction",
            ],
        )
        .object("BlockJobPendingData", &["type:JobType", "id:str"]);
    s.command("job-pause", Some("JobIdArgs"), None, &[])
        .command("job-resume", Some("JobIdArgs"), None, &[])
        .command("job-cancel", Some("JobIdArgs"), None, &[])
        .command("job-complete", Some("JobIdArgs"), None, &[])
        .command("job-finalize", Some("JobIdArgs"), None, &[])
        .command("job-dismiss", Some("JobIdArgs"), None, &[])
        .command("query-jobs", None, Some("[JobInfo]"), &[])
        .command(
            "block-job-set-speed",
            Some("BlockJobSetSpeedArgs"),
            None,
            &[],
        )
        .command("block-job-cancel", Some("BlockJobCancelArgs"), None, &[])
        .command("block-job-pause", Some("BlockJobDeviceArgs"), None, &[])
        .command("block-job-resume", Some("BlockJobDeviceArgs"), None, &[])
        .command("block-job-complete", Some("BlockJobDeviceArgs"), None, &[])
        .command("block-job-dismiss", Some("JobIdArgs"), None, &[])
        .command("block-job-finalize", Some("JobIdArgs"), None, &[])
        .command("block-job-change", Some("BlockJobChangeOptions"), None, &[])
        .command("query-block-jobs", None, Some("[BlockJobInfo]"), &[])
        .command("blockdev-create", Some("BlockdevCreateArgs"), None, &[]);
}
