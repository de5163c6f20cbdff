//! One module per command (or per family of small queries); [`execute`] routes by name.
//! Arguments arrive checked against the schema, so handlers read them without re-validating
//! their types.

mod backup;
mod bitmap;
pub mod blockdev_add;
mod blockdev_del;
mod drive_backup;
mod export;
mod job;
pub mod object;
mod query;
mod query_named_block_nodes;
mod transaction;

pub use bitmap::dirty_info;

use qmp::{QmpError, QmpResult};
use serde_json::{json, Map, Value};

use crate::control::Control;

/// Declares every command of this module's families, with its argument and reply types, in
/// the order `query-commands` lists them.
pub(crate) fn schema(s: &mut qmp::Schema) {
    blockdev_add::schema(s);
    blockdev_del::schema(s);
    query_named_block_nodes::schema(s);
    query::schema(s);
    export::schema(s);
    bitmap::schema(s);
    transaction::schema(s);
    job::schema(s);
    backup::schema(s);
    drive_backup::schema(s);
    object::schema(s);
}

/// A command's arguments as its typed struct. They passed the schema check already, so the
/// types agree; a failure here is ours, and is reported like any other argument error.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(args: &Map<String, Value>) -> QmpResult<T> {
    serde_json::from_value(Value::Object(args.clone()))
        .map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))
}

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
        "query-named-block-nodes" => query_named_block_nodes::run(ctl, &arguments),
        "blockdev-add" => blockdev_add::run(ctl, &arguments).await,
        "blockdev-del" => blockdev_del::run(ctl, &arguments).await,
        "nbd-server-start" => export::server_start(ctl, &arguments).await,
        "nbd-server-stop" => export::server_stop(ctl).await,
        "block-export-add" => export::block_export_add(ctl, &arguments),
        "block-export-del" => export::block_export_del(ctl, &arguments),
        "query-block-exports" => Ok(ctl.exports.query()),
        "nbd-server-add" => export::nbd_server_add(ctl, &arguments),
        "nbd-server-remove" => export::nbd_server_remove(ctl, &arguments),
        "block-dirty-bitmap-add"
        | "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable"
        | "block-dirty-bitmap-merge" => bitmap::run(ctl, command, &arguments).await,
        "x-debug-block-dirty-bitmap-sha256" => bitmap::sha256(ctl, &arguments),
        "transaction" => transaction::run(ctl, &arguments).await,
        "blockdev-backup" | "drive-backup" => {
            let args = arguments;
            transaction::apply(ctl, &[(command, &args)], false).await
        }
        "job-pause" | "job-resume" | "job-cancel" | "job-complete" | "job-finalize"
        | "job-dismiss" => job::job_verb(ctl, command, &arguments).await,
        "block-job-set-speed"
        | "block-job-cancel"
        | "block-job-pause"
        | "block-job-resume"
        | "block-job-complete"
        | "block-job-dismiss"
        | "block-job-finalize"
        | "block-job-change" => job::block_job_verb(ctl, command, &arguments).await,
        "query-jobs" => Ok(job::query_jobs(ctl).await),
        "query-block-jobs" => Ok(job::query_block_jobs(ctl).await),
        "blockdev-create" => job::blockdev_create(ctl, &arguments).await,
        "object-add" => object::add(ctl, &arguments),
        "object-del" => object::del(ctl, &arguments),
        "qom-get" => object::get(ctl, &arguments),
        "qom-set" => object::set(ctl, &arguments),
        "quit" => {
            // Exports end, then jobs are cancelled (concluded ones dismissed), while the
            // monitors still listen: BLOCK_EXPORT_DELETED and the jobs' last
            // JOB_STATUS_CHANGE events reach the client before quit's reply, as with QEMU.
            ctl.exports.shutdown().await;
            ctl.jobs.cancel_all().await;
            ctl.shutdown.send_replace(true);
            Ok(json!({}))
        }
        other => Err(QmpError::command_not_found(other)),
    }
}
