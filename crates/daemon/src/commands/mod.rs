//! One module per command (or per family of small queries); [`execute`] routes by name.
//! Arguments arrive checked against the schema, so handlers read them without re-validating
//! their types.

mod blockdev_add;
mod blockdev_del;
mod query;
mod query_named_block_nodes;

use qmp::{QmpError, QmpResult};
use serde_json::{json, Map, Value};

use crate::control::Control;

/// Runs `command` on the daemon state.
pub async fn execute(
    ctl: &mut Control,
    command: &str,
    arguments: Map<String, Value>,
) -> QmpResult<Value> {
    match command {
        "query-version" => Ok(query::version(ctl)),
        "query-commands" => Ok(query::commands(ctl)),
        "query-qmp-schema" => Ok(ctl.schema.introspect()),
        "query-block" => Ok(query::block()),
        "query-named-block-nodes" => Ok(query_named_block_nodes::run(ctl, &arguments)),
        "blockdev-add" => blockdev_add::run(ctl, &arguments).await,
        "blockdev-del" => blockdev_del::run(ctl, &arguments).await,
        "quit" => {
            ctl.shutdown.send_replace(true);
            Ok(json!({}))
        }
        other => Err(QmpError::command_not_found(other)),
    }
}
