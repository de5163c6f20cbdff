//! `query-version`, `query-commands`, `query-block`.

use qmp::Schema;
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

/// `query-block`'s schema (its types are the node information's).
pub(crate) fn schema(s: &mut Schema) {
    s.command("query-block", None, Some("[BlockInfo]"), &[]);
}
