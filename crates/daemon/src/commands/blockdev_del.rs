//! `blockdev-del`: closes a node created by `blockdev-add` that nothing uses any more.

use qmp::QmpResult;
use serde_json::{json, Map, Value};

use crate::control::Control;

/// Runs the command.
pub async fn run(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let name = args
        .get("node-name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    ctl.nodes.delete(name).await?;
    Ok(json!({}))
}
