//! Jobs in the daemon: the job manager's events as QMP events, and the `create` job of
//! `blockdev-create`.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use block::{BlockNode, Child, ChildRole, EdgePerm, EdgeSpec, Parent, Perm};
use drivers::file::FileDriver;
use drivers::qcow2::{self, CreateOptions, Preallocation};
use job::{ErrorAction, EventSink, IoOperation, JobContext, JobDriver, JobEvent, JobInfo};
use qmp::Event;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// Turns job events into QMP events on `events`.
pub fn event_sink(events: broadcast::Sender<Event>) -> EventSink {
    Arc::new(move |e: JobEvent| {
        let (name, data) = match e {
            JobEvent::StatusChange { id, status } => (
                "JOB_STATUS_CHANGE",
                json!({"id": id, "status": status.as_str()}),
            ),
            JobEvent::Ready(i) => ("BLOCK_JOB_READY", progress(&i)),
            JobEvent::Completed(i) => {
                let mut data = progress(&i);
                if let (Some(err), Some(m)) = (&i.error, data.as_object_mut()) {
                    m.insert("error".into(), json!(err));
                }
                ("BLOCK_JOB_COMPLETED", data)
            }
            JobEvent::Cancelled(i) => ("BLOCK_JOB_CANCELLED", progress(&i)),
            JobEvent::Pending(i) => ("BLOCK_JOB_PENDING", json!({"type": i.job_type, "id": i.id})),
            JobEvent::Error {
                id,
                operation,
                action,
            } => (
                "BLOCK_JOB_ERROR",
                json!({
                    "device": id,
                    "operation": match operation {
                        IoOperation::Read => "read",
                        IoOperation::Write => "write",
                    },
                    "action": match action {
                        ErrorAction::Ignore => "ignore",
                        ErrorAction::Report => "report",
                        ErrorAction::Stop => "stop",
                    },
                }),
            ),
        };
        // No monitor listening is fine: the event is simply not seen.
        let _ = events.send(Event::new(name, Some(data)));
    })
}

fn progress(i: &JobInfo) -> Value {
    json!({
        "type": i.job_type,
        "device": i.id,
        "len": i.total,
        "offset": i.current,
        "speed": i.speed,
    })
}

/// What `blockdev-create` makes.
#[derive(Debug)]
pub enum CreateSpec {
    /// A file of `size` bytes.
    File {
        /// Path.
        filename: PathBuf,
        /// Size in bytes.
        size: u64,
        /// `off`, `falloc` or `full`.
        preallocation: String,
    },
    /// A qcow2 image on a node (or the error QEMU would give looking it up).
    Qcow2 {
        /// The node to format.
        file: Result<Arc<BlockNode>, String>,
        /// Image options.
        opts: CreateOptions,
    },
    /// Options the job refuses when it runs (QEMU checks these in the job too).
    Invalid(String),
}

/// The job of `blockdev-create` (type `create`). Progress is 0/1 until it is done, as in QEMU.
#[derive(Debug)]
pub struct CreateJob {
    spec: CreateSpec,
}

impl CreateJob {
    /// A job making `spec`.
    pub fn new(spec: CreateSpec) -> CreateJob {
        CreateJob { spec }
    }
}

#[async_trait]
impl JobDriver for CreateJob {
    fn job_type(&self) -> &'static str {
        "create"
    }

    async fn run(&self, ctx: JobContext) -> Result<(), String> {
        ctx.progress_set_remaining(1);
        let result = self.make(&ctx).await;
        // QEMU counts the step as done whether it worked or not.
        ctx.progress_update(1);
        result
    }
}

impl CreateJob {
    async fn make(&self, ctx: &JobContext) -> Result<(), String> {
        match &self.spec {
            CreateSpec::File {
                filename,
                size,
                preallocation,
            } => create_file(ctx, filename, *size, preallocation).await?,
            CreateSpec::Invalid(why) => return Err(why.clone()),
            CreateSpec::Qcow2 { file, opts } => {
                let node = file.clone()?;
                // Written and grown as QEMU's create does it: refused while a format uses
                // the node (two allocators on one file) or another process locks the image.
                let spec = EdgeSpec::new(ChildRole::Root, Parent::unnamed());
                let need = EdgePerm::new(Perm::WRITE | Perm::RESIZE, Perm::ALL);
                let child =
                    Child::attach(spec, node, need).map_err(|e| crate::nodes::error_text(&e))?;
                qcow2::create(&child, opts)
                    .await
                    .map_err(|e| crate::nodes::error_text(&e))?;
            }
        }
        Ok(())
    }
}

/// Creates (or truncates) the file, then preallocates: `falloc` reserves the blocks, `full`
/// writes zeroes, in 1 MiB steps that honour pause and cancel.
async fn create_file(
    ctx: &JobContext,
    path: &std::path::Path,
    size: u64,
    preallocation: &str,
) -> Result<(), String> {
    let name = path.display().to_string();
    FileDriver::create(path, if preallocation == "off" { size } else { 0 })
        .map_err(|e| crate::nodes::error_text(&e))?;
    match preallocation {
        "off" => Ok(()),
        "falloc" => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("Could not open '{name}': {e}"))?;
            let len = i64::try_from(size).map_err(|_| "Could not resize file: Invalid argument")?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            let r = tokio::task::spawn_blocking(move || {
                // SAFETY: fallocate on a descriptor `f` keeps open until the call returns.
                let r = unsafe { libc::posix_fallocate(fd, 0, len) };
                drop(f);
                r
            })
            .await
            .map_err(|e| e.to_string())?;
            if r != 0 {
                return Err(format!(
                    "Could not preallocate data for the new file: {}",
                    std::io::Error::from_raw_os_error(r)
                ));
            }
            Ok(())
        }
        "full" => {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("Could not open '{name}': {e}"))?;
            let chunk = vec![0u8; 1 << 20];
            let mut done = 0;
            while done < size {
                ctx.pause_point().await;
                if ctx.is_cancelled() {
                    return Err("Operation canceled".into());
                }
                let n = (size - done).min(chunk.len() as u64) as usize;
                f = tokio::task::spawn_blocking({
                    let chunk = chunk[..n].to_vec();
                    move || f.write_all(&chunk).map(|()| f)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("Could not write zeros for preallocation: {e}"))?;
                done += n as u64;
            }
            Ok(())
        }
        other => Err(format!("Unsupported preallocation mode: {other}")),
    }
}

/// Reads `blockdev-create`'s checked options into a [`CreateSpec`]. Node references are looked
/// up now; a missing node or a bad option fails the job, not the command, as in QEMU. Only a
/// driver without image creation fails the command.
pub fn create_spec(
    options: &Map<String, Value>,
    find_node: impl Fn(&str) -> Option<Arc<BlockNode>>,
) -> Result<CreateSpec, String> {
    let s = |k: &str| options.get(k).and_then(Value::as_str);
    let u = |k: &str| options.get(k).and_then(Value::as_u64);
    match s("driver").unwrap_or_default() {
        "file" => {
            let preallocation = s("preallocation").unwrap_or("off");
            if preallocation == "metadata" {
                return Ok(CreateSpec::Invalid(
                    "Unsupported preallocation mode: metadata".into(),
                ));
            }
            Ok(CreateSpec::File {
                filename: PathBuf::from(s("filename").unwrap_or_default()),
                size: u("size").unwrap_or(0),
                preallocation: preallocation.to_owned(),
            })
        }
        "qcow2" => {
            let file = match options.get("file") {
                Some(Value::String(name)) => find_node(name)
                    .ok_or_else(|| format!("Cannot find device='{name}' nor node-name='{name}'")),
                _ => Err(
                    "blockjobd takes the qcow2 'file' of blockdev-create as a node name only"
                        .to_owned(),
                ),
            };
            let mut opts = CreateOptions::new(u("size").unwrap_or(0));
            if let Some(cs) = u("cluster-size") {
                opts.cluster_size = cs;
            }
            if s("version") == Some("v2") {
                opts.version = 2;
            }
            opts.backing_file = s("backing-file").map(str::to_owned);
            opts.backing_format = s("backing-fmt").map(str::to_owned);
            if let Some(b) = options.get("lazy-refcounts").and_then(Value::as_bool) {
                opts.lazy_refcounts = b;
            }
            if let Some(r) = u("refcount-bits") {
                opts.refcount_bits = u32::try_from(r).unwrap_or(u32::MAX);
            }
            if s("compression-type") == Some("zstd") {
                opts.compression = qcow2::CompressionType::Zstd;
            }
            opts.preallocation = match s("preallocation").unwrap_or("off") {
                "off" => Preallocation::Off,
                "metadata" => Preallocation::Metadata,
                other => {
                    return Ok(CreateSpec::Invalid(format!(
                        "blockjobd does not support preallocation={other} for qcow2 yet"
                    )))
                }
            };
            Ok(CreateSpec::Qcow2 { file, opts })
        }
        _ => Err("Driver does not support blockdev-create".into()),
    }
}
