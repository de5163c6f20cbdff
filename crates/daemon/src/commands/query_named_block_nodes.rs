//! `query-named-block-nodes [flat]`: every node, newest first; without `flat`, each image's
//! backing chain nests in `backing-image`.

use serde_json::{Map, Value};

use crate::control::Control;
use crate::info::block_device_info;

/// Runs the query.
pub fn run(ctl: &Control, args: &Map<String, Value>) -> Value {
    let flat = args.get("flat").and_then(Value::as_bool).unwrap_or(false);
    Value::Array(
        ctl.nodes
            .newest_first()
            .into_iter()
            .map(|(_, entry)| block_device_info(&ctl.nodes, entry, flat))
            .collect(),
    )
}
