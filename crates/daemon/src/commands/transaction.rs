//! `transaction`: every action in phases, all or nothing.
//!
//! The nodes the actions name are drained together first (and what is below them), so the
//! actions share one point in time: no guest write is in flight across it. Inside that
//! section each action is prepared in order (its change applied and recorded); when one
//! fails, every earlier one is aborted, newest first, and the failure is the reply. Otherwise
//! all commit. The section ends, and only then does each action clean up what needs I/O
//! (a removed persistent bitmap leaves the image).
//!
//! Bitmap actions refuse `completion-mode: grouped`, as in QEMU: they start no jobs. The job
//! actions of Step 6 (`blockdev-backup`, `drive-backup`) will put their jobs in one `JobTxn`
//! when grouped.

use std::sync::Arc;

use block::BlockNode;
use qmp::{QmpError, QmpResult};
use serde_json::{json, Map, Value};

use super::bitmap::{self, Undo};
use crate::control::Control;

fn prepare(ctl: &Control, kind: &str, data: &Map<String, Value>, grouped: bool) -> QmpResult<Undo> {
    if grouped {
        // None of these start jobs, so there is nothing to group.
        return Err(QmpError::generic(format!(
            "Action '{kind}' does not support transaction property completion-mode = grouped"
        )));
    }
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

/// The nodes an action names (those that exist: a wrong name fails in prepare).
fn nodes_named(ctl: &Control, data: &Map<String, Value>) -> Vec<Arc<BlockNode>> {
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

/// Runs the transaction.
pub async fn run(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let grouped = args
        .get("properties")
        .and_then(|p| p.get("completion-mode"))
        .and_then(Value::as_str)
        == Some("grouped");
    let empty = Map::new();
    let actions: Vec<(&str, &Map<String, Value>)> = args
        .get("actions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|action| {
            let kind = action.get("type").and_then(Value::as_str).unwrap_or("");
            let data = action
                .get("data")
                .and_then(Value::as_object)
                .unwrap_or(&empty);
            (kind, data)
        })
        .collect();
    let mut involved: Vec<Arc<BlockNode>> = Vec::new();
    for (_, data) in &actions {
        for node in nodes_named(ctl, data) {
            if !involved.iter().any(|n| Arc::ptr_eq(n, &node)) {
                involved.push(node);
            }
        }
    }
    let section = block::graph::drained(&involved).await;
    let mut prepared = Vec::new();
    for (kind, data) in &actions {
        match prepare(ctl, kind, data, grouped) {
            Ok(undo) => prepared.push(undo),
            Err(e) => {
                for undo in prepared.into_iter().rev() {
                    undo.undo();
                }
                return Err(e);
            }
        }
    }
    let cleanups: Vec<_> = prepared.into_iter().filter_map(Undo::commit).collect();
    drop(section);
    for clean in cleanups {
        clean.run().await?;
    }
    Ok(json!({}))
}
