//! `transaction`: actions applied in order, all or nothing. Each action's change is applied
//! at once and recorded; when one fails every earlier change is taken back, newest first, and
//! the failure is the reply. Only then are the changes made final (a removed bitmap goes).

use qmp::{QmpError, QmpResult};
use serde_json::{json, Map, Value};

use super::bitmap::{self, Undo};
use crate::control::Control;

fn apply(ctl: &Control, kind: &str, data: &Map<String, Value>, grouped: bool) -> QmpResult<Undo> {
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

/// Runs the transaction.
pub async fn run(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let grouped = args
        .get("properties")
        .and_then(|p| p.get("completion-mode"))
        .and_then(Value::as_str)
        == Some("grouped");
    let empty = Map::new();
    let mut done = Vec::new();
    for action in args
        .get("actions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = action.get("type").and_then(Value::as_str).unwrap_or("");
        let data = action
            .get("data")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        match apply(ctl, kind, data, grouped) {
            Ok(undo) => done.push(undo),
            Err(e) => {
                for undo in done.into_iter().rev() {
                    undo.undo();
                }
                return Err(e);
            }
        }
    }
    for undo in done {
        undo.commit().await?;
    }
    Ok(json!({}))
}
