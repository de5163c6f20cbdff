//! `blockdev-add`: opens a node (and its inline children) from checked options.

use qmp::QmpResult;
use serde_json::{json, Map, Value};

use crate::control::Control;

/// Runs the command.
pub async fn run(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    ctl.nodes.add(args).await?;
    Ok(json!({}))
}
