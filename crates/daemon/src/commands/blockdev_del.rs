//! `blockdev-del`: closes a node created by `blockdev-add` that nothing uses any more.

use qmp::{QmpResult, Schema};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::decode;
use crate::control::Control;

/// The arguments.
#[derive(Debug, Deserialize)]
struct Args {
    #[serde(rename = "node-name")]
    node_name: String,
}

/// Runs the command.
pub async fn run(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let Args { node_name } = decode(args)?;
    ctl.nodes.delete(&node_name).await?;
    Ok(json!({}))
}

/// `blockdev-del`'s schema.
pub(crate) fn schema(s: &mut Schema) {
    s.object("BlockdevDelArgs", &["node-name:str"]);
    s.command("blockdev-del", Some("BlockdevDelArgs"), None, &[]);
}
