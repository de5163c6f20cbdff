//! `blockdev-backup`, as a command and as a `transaction` action.
//!
//! The command is a transaction of one action, as in QEMU. Preparing the action runs QEMU's
//! checks in QEMU's order, freezes the bitmap, inserts the copy-before-write filter (the point
//! in time: the transaction's drained section holds the source) and creates the job; commit
//! starts it; abort cancels it, which gives the bitmap back and removes the filter.

use std::sync::Arc;

use block::BlockNode;
use block_jobs::{Backup, BackupSpec, BitmapMode, OnError, SyncMode};
use job::{JobOptions, TxnId};
use qmp::{QmpError, QmpResult, Schema};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::decode;
use crate::control::Control;

/// `x-perf`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Perf {
    use_copy_range: Option<bool>,
    max_workers: Option<i64>,
    max_chunk: Option<i64>,
    min_cluster_size: Option<u64>,
    /// Ours: microseconds (see `BackupSpec::guest_latency_budget`).
    guest_latency_budget: Option<i64>,
}

/// The arguments of `blockdev-backup` (QEMU's BlockdevBackup); `drive-backup` has the same
/// with `target` a file name.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct BackupArgs {
    job_id: Option<String>,
    pub(crate) device: String,
    pub(crate) target: String,
    pub(crate) sync: String,
    speed: Option<i64>,
    bitmap: Option<String>,
    bitmap_mode: Option<String>,
    compress: Option<bool>,
    on_source_error: Option<String>,
    on_target_error: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    filter_node_name: Option<String>,
    discard_source: Option<bool>,
    on_cbw_error: Option<String>,
    x_perf: Option<Perf>,
}

/// A prepared backup action: a created job, not started.
#[derive(Debug)]
pub struct Prepared {
    id: String,
}

impl Prepared {
    /// Starts the job.
    pub async fn commit(self, ctl: &Control) {
        if let Err(e) = ctl.jobs.start(&self.id).await {
            tracing::error!(target: "blockjobd", "starting backup '{}': {e}", self.id);
        }
    }

    /// Cancels the job: its abort and clean callbacks give the bitmap back and remove the
    /// filter.
    pub async fn abort(self, ctl: &Control) {
        let _ = ctl.jobs.cancel(&self.id, true).await;
    }
}

fn on_error(v: Option<&str>) -> OnError {
    match v {
        Some("ignore") => OnError::Ignore,
        Some("stop") => OnError::Stop,
        Some("enospc") => OnError::Enospc,
        Some("auto") => OnError::Auto,
        _ => OnError::Report,
    }
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

pub(crate) fn find(ctl: &Control, name: &str) -> QmpResult<Arc<BlockNode>> {
    ctl.nodes
        .entry(name)
        .map(|e| e.node.clone())
        .ok_or_else(|| {
            generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
}

use crate::nodes::refuse_busy;

/// The nodes a backup action names, for the transaction's drained section.
pub fn nodes_named(ctl: &Control, data: &Map<String, Value>) -> Vec<Arc<BlockNode>> {
    ["device", "target"]
        .iter()
        .filter_map(|k| data.get(*k).and_then(Value::as_str))
        .filter_map(|n| ctl.nodes.entry(n).map(|e| e.node.clone()))
        .collect()
}

/// Prepares a backup action (see the module docs); `txn`: the group of a grouped
/// transaction.
pub async fn prepare(
    ctl: &mut Control,
    data: &Map<String, Value>,
    txn: Option<TxnId>,
) -> QmpResult<Prepared> {
    let args: BackupArgs = decode(data)?;
    let source = find(ctl, &args.device)?;
    let target = find(ctl, &args.target)?;
    prepare_nodes(ctl, &args, source, target, txn, Vec::new()).await
}

/// The part of a backup action after its nodes are found (`drive-backup` opens its target
/// first): `owned` are nodes the action opened for the job (parents last), closed and
/// released when the job cleans up.
pub(crate) async fn prepare_nodes(
    ctl: &mut Control,
    args: &BackupArgs,
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    txn: Option<TxnId>,
    owned: Vec<Arc<BlockNode>>,
) -> QmpResult<Prepared> {
    let mut sync = args.sync.as_str();
    if matches!(sync, "bitmap" | "incremental") && args.bitmap.is_none() {
        return Err(generic(format!(
            "must provide a valid bitmap name for '{sync}' sync mode"
        )));
    }
    let mut bitmap_mode = args.bitmap_mode.as_deref();
    if sync == "incremental" {
        if bitmap_mode.is_some_and(|m| m != "on-success") {
            return Err(generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        sync = "bitmap";
        bitmap_mode = Some("on-success");
    }
    if let Some(name) = &args.bitmap {
        let state = source.with_bitmap(name, |b| (b.busy(), b.inconsistent()));
        let Some((busy, inconsistent)) = state else {
            return Err(generic(format!("Bitmap '{name}' could not be found")));
        };
        let Some(mode) = bitmap_mode else {
            return Err(generic(
                "Bitmap sync mode must be given when providing a bitmap",
            ));
        };
        if busy {
            return Err(generic(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        if inconsistent {
            return Err(generic(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        if sync == "none" {
            return Err(generic(
                "sync mode 'none' does not produce meaningful bitmap outputs",
            ));
        }
        if mode == "never" && sync != "bitmap" {
            return Err(generic(format!(
                "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{sync}'"
            )));
        }
    } else if bitmap_mode.is_some() {
        return Err(generic("Cannot specify bitmap sync mode without a bitmap"));
    }
    if Arc::ptr_eq(&source, &target) {
        return Err(generic("Source and target cannot be the same"));
    }
    if args.compress == Some(true) && !target.supports_compressed() {
        // QEMU names the target's device here, which qsd's nodes do not have.
        return Err(generic("Compression is not supported for this drive "));
    }
    for node in [&source, &target] {
        refuse_busy(node)?;
    }
    let perf = args.x_perf.clone().unwrap_or_default();
    let max_workers = perf.max_workers.unwrap_or(64);
    if !(1..=i64::from(i32::MAX)).contains(&max_workers) {
        return Err(generic("max-workers must be between 1 and 2147483647"));
    }
    let max_chunk = perf.max_chunk.unwrap_or(0);
    if max_chunk < 0 {
        return Err(generic(
            "max-chunk must be zero (which means no limit) or positive",
        ));
    }
    let budget = match perf.guest_latency_budget {
        None => None,
        Some(us) if us > 0 => Some(std::time::Duration::from_micros(us.unsigned_abs())),
        Some(_) => return Err(generic("guest-latency-budget must be positive")),
    };
    let filter_node_name = match &args.filter_node_name {
        Some(name) => {
            crate::nodes::check_node_name(name)
                .map_err(|e| generic(format!("Could not create node: {}", e.desc)))?;
            if ctl.nodes.entry(name).is_some() {
                return Err(generic(format!(
                    "Could not create node: Duplicate nodes with node-name='{name}'"
                )));
            }
            name.clone()
        }
        None => ctl.nodes.new_auto_name(),
    };
    // qsd's nodes have no device names, so the default job id is empty (and refused).
    let job_id = args.job_id.clone().unwrap_or_default();
    let spec = BackupSpec {
        job_id: job_id.clone(),
        source: source.clone(),
        target,
        sync: match sync {
            "full" => SyncMode::Full,
            "top" => SyncMode::Top,
            "none" => SyncMode::None,
            _ => SyncMode::Bitmap,
        },
        bitmap: args.bitmap.clone().map(|name| {
            let mode = match bitmap_mode {
                Some("never") => BitmapMode::Never,
                Some("always") => BitmapMode::Always,
                _ => BitmapMode::OnSuccess,
            };
            (name, mode)
        }),
        on_source_error: on_error(args.on_source_error.as_deref()),
        on_target_error: on_error(args.on_target_error.as_deref()),
        filter_node_name,
        compress: args.compress.unwrap_or(false),
        max_workers: usize::try_from(max_workers).unwrap_or(64),
        max_chunk: u64::try_from(max_chunk).unwrap_or(0),
        min_cluster_size: perf.min_cluster_size.unwrap_or(0),
        use_copy_range: perf.use_copy_range.unwrap_or(false),
        discard_source: args.discard_source.unwrap_or(false),
        guest_latency_budget: budget,
        on_cbw_error: match args.on_cbw_error.as_deref() {
            Some("break-snapshot") => filters::OnCbwError::BreakSnapshot,
            _ => filters::OnCbwError::BreakGuestWrite,
        },
    };
    let backup = Backup::prepare(spec).await.map_err(generic)?;
    let undo = |backup: Arc<Backup>| async move {
        job::JobDriver::abort(&*backup).await;
        job::JobDriver::clean(&*backup).await;
    };
    let release_owned = ctl
        .nodes
        .releaser(owned.iter().map(|n| n.name().to_owned()).collect());
    if !owned.is_empty() {
        backup.on_clean_async(async move {
            for node in owned.iter().rev() {
                if let Err(e) = node.close().await {
                    tracing::error!(target: "blockjobd", "closing node '{}': {e}", node.name());
                }
            }
        });
    }
    match backup.filter() {
        Some(filter) => {
            let release = ctl.nodes.add_job_node(
                filter,
                crate::nodes::cbw_recipe(),
                backup.copy_before_write(),
            );
            backup.on_clean(move || {
                release();
                release_owned();
            });
        }
        None => backup.on_clean(release_owned),
    }
    let opts = JobOptions {
        block: true,
        auto_finalize: args.auto_finalize.unwrap_or(true),
        auto_dismiss: args.auto_dismiss.unwrap_or(true),
        txn,
        ..JobOptions::new(job_id.clone())
    };
    if let Err(e) = ctl.jobs.create(backup.clone(), opts).await {
        undo(backup).await;
        ctl.nodes.prune();
        return Err(generic(e.to_string()));
    }
    if let Err(e) = ctl.jobs.set_speed(&job_id, args.speed.unwrap_or(0)).await {
        undo(backup).await;
        ctl.nodes.prune();
        let _ = ctl.jobs.early_fail(&job_id).await;
        return Err(generic(e.to_string()));
    }
    Ok(Prepared { id: job_id })
}

/// `blockdev-backup`'s schema.
pub(crate) fn schema(s: &mut Schema) {
    s.enumeration(
        "MirrorSyncMode",
        &["top", "full", "none", "incremental", "bitmap"],
    )
    .enumeration("BitmapSyncMode", &["on-success", "never", "always"])
    .enumeration(
        "BlockdevOnError",
        &["report", "ignore", "enospc", "stop", "auto"],
    )
    .object(
        "BackupPerf",
        &[
            "*use-copy-range:bool",
            "*max-workers:int",
            "*max-chunk:int",
            "*min-cluster-size:size",
            "*guest-latency-budget:int",
        ],
    )
    .object(
        "BlockdevBackup",
        &[
            &[
                "*job-id:str",
                "device:str",
                "target:str",
                "sync:MirrorSyncMode",
            ],
            AFTER_SYNC,
        ]
        .concat(),
    );
    s.command("blockdev-backup", Some("BlockdevBackup"), None, &[]);
}

/// The members every backup command has after `sync` (QEMU's BackupCommon), in order.
pub(crate) const AFTER_SYNC: &[&str] = &[
    "*speed:int",
    "*bitmap:str",
    "*bitmap-mode:BitmapSyncMode",
    "*compress:bool",
    "*on-source-error:BlockdevOnError",
    "*on-target-error:BlockdevOnError",
    "*auto-finalize:bool",
    "*auto-dismiss:bool",
    "*filter-node-name:str",
    "*discard-source:bool",
    "*on-cbw-error:OnCbwError",
    "*x-perf:BackupPerf",
];
