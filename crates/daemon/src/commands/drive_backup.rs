//! `drive-backup` (deprecated in QEMU, kept for the tools that still send it), as a command and
//! as a `transaction` action: `blockdev-backup` into a file the command creates (or, with
//! `mode: existing`, opens) itself.
//!
//! In QEMU's order: the source is found; the format defaults to the source's unless the image
//! exists; a source a job uses is refused; `sync: top` without a backing image becomes `full`; the
//! image is created with the source's size (for `top` backed by the source's backing image, for
//! `none` by the source itself, both by the name they were opened with); the target is opened with
//! `discard: unmap`, `detect-zeroes: unmap` and the source's cache mode, under an automatic node
//! name, and for `none` with the source node as its backing. The rest is `blockdev-backup`'s. The
//! job owns the target: it is closed when the job cleans up. A file created before a later check
//! failed is left on disk, as QEMU leaves it.

use std::path::Path;
use std::sync::Arc;

use block::{BlockNode, Child, ChildRole, EdgePerm, EdgeSpec, Parent, Perm};
use drivers::file::{FileDriver, FileOptions};
use drivers::qcow2;
use job::TxnId;
use qmp::{QmpError, QmpResult, Schema};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::backup::{self, BackupArgs, Prepared};
use super::decode;
use crate::control::Control;
use crate::nodes::error_text;

/// The members `drive-backup` adds to the common backup ones.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct DriveArgs {
    format: Option<String>,
    mode: Option<String>,
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

/// The file name of `node` as it was opened (QEMU's refreshed filename: a backing file's
/// name joined to its overlay's directory), from the registry.
fn file_name(ctl: &Control, node: &BlockNode) -> String {
    ctl.nodes.file_name(node)
}

/// Prints a line on the daemon's standard output, as QEMU does when it creates an image; a
/// closed or broken stdout is no error.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Creates `path` as an empty image of `format` (`raw` or `qcow2`), as `qemu-img create`
/// would, and prints QEMU's "Formatting" line.
async fn create(
    path: &str,
    format: &str,
    size: u64,
    backing: Option<(String, String)>,
) -> QmpResult<()> {
    match format {
        "raw" => {
            if backing.is_some() {
                return Err(generic("Backing file not supported for file format 'raw'"));
            }
            say(&format!("Formatting '{path}', fmt=raw size={size}"));
            FileDriver::create(Path::new(path), size).map_err(|e| generic(error_text(&e)))
        }
        "qcow2" => {
            let mut line = format!(
                "Formatting '{path}', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size={size}"
            );
            if let Some((file, fmt)) = &backing {
                line.push_str(&format!(" backing_file={file} backing_fmt={fmt}"));
            }
            say(&format!("{line} lazy_refcounts=off refcount_bits=16"));
            FileDriver::create(Path::new(path), 0).map_err(|e| generic(error_text(&e)))?;
            let file =
                FileDriver::open(FileOptions::new(path)).map_err(|e| generic(error_text(&e)))?;
            let node = BlockNode::new("drive-backup-create", Arc::new(file));
            let spec = EdgeSpec::new(ChildRole::Root, Parent::unnamed());
            let need = EdgePerm::new(Perm::WRITE | Perm::RESIZE, Perm::ALL);
            let child =
                Child::attach(spec, node.clone(), need).map_err(|e| generic(error_text(&e)))?;
            let mut opts = qcow2::CreateOptions::new(size);
            if let Some((file, fmt)) = backing {
                opts.backing_file = Some(file);
                opts.backing_format = Some(fmt);
            }
            let made = qcow2::create(&child, &opts).await;
            drop(child);
            let closed = node.close().await;
            made.and(closed).map_err(|e| generic(error_text(&e)))
        }
        other => Err(generic(format!("Unknown file format '{other}'"))),
    }
}

/// Prepares a `drive-backup` action (see the module docs).
pub async fn prepare(
    ctl: &mut Control,
    data: &Map<String, Value>,
    txn: Option<TxnId>,
) -> QmpResult<Prepared> {
    let mut args: BackupArgs = decode(data)?;
    let drive: DriveArgs = decode(data)?;
    let source = backup::find(ctl, &args.device)?;
    let existing = drive.mode.as_deref() == Some("existing");
    let format = drive
        .format
        .clone()
        .or_else(|| (!existing).then(|| source.driver_name().to_owned()));
    crate::nodes::refuse_busy(&source)?;
    // What the new image is backed by.
    let mut backing = None;
    if args.sync == "top" {
        match source.child(ChildRole::Backing).map(|c| c.node()) {
            Some(b) => backing = Some(b),
            None => args.sync = "full".into(),
        }
    } else if args.sync == "none" {
        backing = Some(source.clone());
    }
    let size = source.len();
    if !existing {
        let format = format.as_deref().unwrap_or("raw");
        let base = backing
            .as_ref()
            .map(|b| (file_name(ctl, b), b.driver_name().to_owned()));
        create(&args.target, format, size, base).await?;
    }
    let format = match format {
        Some(f) => f,
        None => {
            // The probe's own error names a backing file; opening the image does not.
            let mut ro = FileOptions::new(&args.target);
            ro.read_only = true;
            drop(FileDriver::open(ro).map_err(|e| generic(error_text(&e)))?);
            crate::nodes::probe(Path::new(&args.target)).await?
        }
    };
    if !matches!(format.as_str(), "raw" | "qcow2") {
        return Err(generic(format!("Unknown driver '{format}'")));
    }
    let cache = ctl
        .nodes
        .entry(source.name())
        .map(|e| e.cache)
        .unwrap_or_default();
    let mut opts = json!({
        "driver": format,
        "discard": "unmap",
        "detect-zeroes": "unmap",
        "cache": {"direct": cache.direct, "no-flush": cache.no_flush},
        "file": {"driver": "file", "filename": args.target},
    });
    if args.sync == "none" {
        // The target's backing is the source node itself, not a second opening of its file.
        opts["backing"] = json!(source.name());
    }
    let opts = match opts {
        Value::Object(m) => decode(&m)?,
        _ => return Err(generic("internal error: target options")),
    };
    let owned = ctl.nodes.open_for_job(&opts).await?;
    let Some(target) = owned.last().cloned() else {
        return Err(generic("internal error: no target node"));
    };
    let top = target.name().to_owned();
    let prepared = backup::prepare_nodes(ctl, &args, source, target, txn, owned).await;
    if prepared.is_err() {
        ctl.nodes.prune();
        ctl.nodes.close_job_node(&top).await;
    }
    prepared
}

/// The nodes a `drive-backup` action names, for the transaction's drained section (its target
/// does not exist yet).
pub fn nodes_named(ctl: &Control, data: &Map<String, Value>) -> Vec<Arc<BlockNode>> {
    data.get("device")
        .and_then(Value::as_str)
        .and_then(|n| ctl.nodes.entry(n).map(|e| e.node.clone()))
        .into_iter()
        .collect()
}

/// `drive-backup`'s schema.
pub(crate) fn schema(s: &mut Schema) {
    s.enumeration("NewImageMode", &["existing", "absolute-paths"])
        .object(
            "DriveBackup",
            &[
                &[
                    "*job-id:str",
                    "device:str",
                    "target:str",
                    "*format:str",
                    "sync:MirrorSyncMode",
                    "*mode:NewImageMode",
                ],
                backup::AFTER_SYNC,
            ]
            .concat(),
        );
    s.command("drive-backup", Some("DriveBackup"), None, &["deprecated"]);
}
