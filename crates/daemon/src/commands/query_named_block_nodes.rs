//! `query-named-block-nodes [flat]`: every node, newest first; without `flat`, each image's
//! backing chain nests in `backing-image`.

use qmp::QmpResult;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::decode;
use crate::control::Control;
use crate::info::block_device_info;

/// The arguments.
#[derive(Debug, Deserialize)]
struct Args {
    flat: Option<bool>,
}

/// Runs the query.
pub fn run(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let Args { flat } = decode(args)?;
    let flat = flat.unwrap_or(false);
    Ok(Value::Array(
        ctl.nodes
            .newest_first()
            .into_iter()
            .map(|(_, entry)| block_device_info(&ctl.nodes, entry, flat))
            .collect(),
    ))
}
