//! `query-version`, `query-commands`, `query-block`.

use serde_json::{json, Value};

use crate::control::Control;

/// `query-version`: the QEMU version we are compatible with, and our own in `package`.
pub fn version(ctl: &Control) -> Value {
    let (major, minor, micro) = qmp::message::QEMU_VERSION;
    json!({"qemu": {"micro": micro, "minor": minor, "major": major}, "package": ctl.package})
}

/// `query-commands`: every command of the schema.
pub fn commands(ctl: &Control) -> Value {
    Value::Array(
        ctl.schema
            .command_names()
            .map(|name| json!({"name": name}))
            .collect(),
    )
}

/// `query-block`: block devices attached to guest devices or named backends. A storage daemon
/// has neither, so the list is empty, as on qemu-storage-daemon; nodes are listed by
/// `query-named-block-nodes`.
pub fn block() -> Value {
    json!([])
}
