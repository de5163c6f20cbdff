//! `transaction`: every action in phases, all or nothing.
//!
//! The nodes the actions name are drained together first (and what is below them), so the
//! actions share one point in time: no guest write is in flight across it. Inside that
//! section each action is prepared in order (its change applied and recorded); when one
//! fails, every earlier one is aborted, newest first, and the failure is the reply. Otherwise
//! all commit. The section ends, and only then does each action clean up what needs I/O
//! (a removed persistent bitmap leaves the image).
//!
//! `blockdev-backup` actions create their jobs in prepare (the filter goes in inside the
//! section: every backup and bitmap change of the transaction shares one point in time) and
//! start them in commit; with `completion-mode: grouped` their jobs share one job transaction
//! (nobody finalizes until all are done; one failure cancels the rest). Bitmap actions refuse
//! grouped, as in QEMU: they start no jobs.

use std::sync::Arc;

use block::BlockNode;
use qmp::{QmpError, QmpResult, Schema};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::bitmap::{self, Undo};
use super::decode;
use super::{backup, drive_backup};
use crate::control::Control;

/// A prepared action, to commit or abort.
#[derive(Debug)]
enum Prepared {
    Bitmap(Undo),
    Backup(backup::Prepared),
}

fn prepare_bitmap(ctl: &Control, kind: &str, data: &Map<String, Value>) -> QmpResult<Undo> {
    match kind {
        "abort" => Err(QmpError::generic("Transaction aborted using Abort action")),
        "block-dirty-bitmap-add" => bitmap::add(ctl, data),
        "block-dirty-bitmap-remove" => bitmap::remove(ctl, data),
        "block-dirty-bitmap-clear" => bitmap::clear(ctl, data),
        "block-dirty-bitmap-enable" => bitmap::set_recording(ctl, data, true),
        "block-dirty-bitmap-disable" => bitmap::set_recording(ctl, data, false),
        "block-dirty-bitmap-merge" => bitmap::merge(ctl, data),
        other => Err(QmpError::generic(format!(
            "Parameter 'type' does not accept value '{other}'"
        ))),
    }
}

fn starts_job(kind: &str) -> bool {
    matches!(kind, "blockdev-backup" | "drive-backup")
}

/// The nodes an action names (those that exist: a wrong name fails in prepare).
fn nodes_named(ctl: &Control, kind: &str, data: &Map<String, Value>) -> Vec<Arc<BlockNode>> {
    match kind {
        "blockdev-backup" => return backup::nodes_named(ctl, data),
        "drive-backup" => return drive_backup::nodes_named(ctl, data),
        _ => {}
    }
    let mut names: Vec<&str> = data
        .get("node")
        .and_then(Value::as_str)
        .into_iter()
        .collect();
    for source in data
        .get("bitmaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(n) = source.get("node").and_then(Value::as_str) {
            names.push(n);
        }
    }
    names
        .into_iter()
        .filter_map(|n| ctl.nodes.entry(n).map(|e| e.node.clone()))
        .collect()
}

/// Runs a transaction of `actions` (`(type, data)`).
pub async fn apply(
    ctl: &mut Control,
    actions: &[(&str, &Map<String, Value>)],
    grouped: bool,
) -> QmpResult<Value> {
    if grouped {
        // Only actions that start jobs can be grouped; checked before anything is done.
        if let Some((kind, _)) = actions.iter().find(|(k, _)| !starts_job(k)) {
            return Err(QmpError::generic(format!(
                "Action '{kind}' does not support transaction property completion-mode = grouped"
            )));
        }
    }
    let txn = if grouped {
        Some(ctl.jobs.new_txn().await)
    } else {
        None
    };
    let mut involved: Vec<Arc<BlockNode>> = Vec::new();
    for (kind, data) in actions {
        for node in nodes_named(ctl, kind, data) {
            if !involved.iter().any(|n| Arc::ptr_eq(n, &node)) {
                involved.push(node);
            }
        }
    }
    let section = block::graph::drained(&involved).await;
    let mut prepared = Vec::new();
    let mut failure = None;
    for (kind, data) in actions {
        let p = if *kind == "drive-backup" {
            drive_backup::prepare(ctl, data, txn)
                .await
                .map(Prepared::Backup)
        } else if starts_job(kind) {
            backup::prepare(ctl, data, txn).await.map(Prepared::Backup)
        } else {
            prepare_bitmap(ctl, kind, data).map(Prepared::Bitmap)
        };
        match p {
            Ok(p) => prepared.push(p),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failure {
        for p in prepared.into_iter().rev() {
            match p {
                Prepared::Bitmap(undo) => undo.undo(),
                Prepared::Backup(b) => b.abort(ctl).await,
            }
        }
        drop(section);
        ctl.nodes.prune();
        return Err(e);
    }
    // Committed last action first, as QEMU commits a transaction: jobs start (`running`) in
    // the reverse order of their `created`.
    let mut cleanups = Vec::new();
    for p in prepared.into_iter().rev() {
        match p {
            Prepared::Bitmap(undo) => cleanups.extend(undo.commit()),
            Prepared::Backup(b) => b.commit(ctl).await,
        }
    }
    drop(section);
    for clean in cleanups {
        clean.run().await?;
    }
    Ok(json!({}))
}

/// One action: its type and its arguments (decoded by the action's own module).
#[derive(Debug, Deserialize)]
struct Action {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Map<String, Value>,
}

/// `properties`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Properties {
    completion_mode: Option<String>,
}

/// The arguments of `transaction`.
#[derive(Debug, Deserialize)]
struct Args {
    actions: Vec<Action>,
    #[serde(default)]
    properties: Properties,
}

/// Runs the `transaction` command.
pub async fn run(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let args: Args = decode(args)?;
    let grouped = args.properties.completion_mode.as_deref() == Some("grouped");
    let actions: Vec<(&str, &Map<String, Value>)> = args
        .actions
        .iter()
        .map(|a| (a.kind.as_str(), &a.data))
        .collect();
    apply(ctl, &actions, grouped).await
}

/// `transaction`'s schema: its actions and properties.
pub(crate) fn schema(s: &mut Schema) {
    s.enumeration(
        "TransactionActionKind",
        &[
            "abort",
            "blockdev-backup",
            "block-dirty-bitmap-add",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
            "block-dirty-bitmap-merge",
            "drive-backup",
        ],
    )
    .object("Abort", &[])
    .object("AbortWrapper", &["data:Abort"])
    .object("BlockdevBackupWrapper", &["data:BlockdevBackup"])
    .object("DriveBackupWrapper", &["data:DriveBackup"])
    .object("BlockDirtyBitmapAddWrapper", &["data:BlockDirtyBitmapAdd"])
    .object("BlockDirtyBitmapWrapper", &["data:BlockDirtyBitmap"])
    .object(
        "BlockDirtyBitmapMergeWrapper",
        &["data:BlockDirtyBitmapMerge"],
    )
    .union(
        "TransactionAction",
        &["type:TransactionActionKind"],
        "type",
        &[
            ("abort", "AbortWrapper"),
            ("blockdev-backup", "BlockdevBackupWrapper"),
            ("block-dirty-bitmap-add", "BlockDirtyBitmapAddWrapper"),
            ("block-dirty-bitmap-remove", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-clear", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-enable", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-disable", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-merge", "BlockDirtyBitmapMergeWrapper"),
            ("drive-backup", "DriveBackupWrapper"),
        ],
    )
    .enumeration("ActionCompletionMode", &["individual", "grouped"])
    .object(
        "TransactionProperties",
        &["*completion-mode:ActionCompletionMode"],
    )
    .object(
        "TransactionArgs",
        &[
            "actions:[TransactionAction]",
            "*properties:TransactionProperties",
        ],
    );
    s.command("transaction", Some("TransactionArgs"), None, &[]);
}
