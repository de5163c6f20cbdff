//! `nbd-server-start/stop`, `block-export-add/del`, `query-block-exports`, and the deprecated
//! `nbd-server-add/remove`, with QEMU's messages.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use block::{BlockBackend, BlockNode, ChildRole, EdgePerm, Parent, Perm};
use nbd::server::{Listener, MetaContext};
use nbd::{Export, ExportConfig, NbdServer, ServerConfig};
use qmp::{QmpError, QmpResult, Schema};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::bitmap;
use super::decode;
use crate::control::Control;
use crate::exports::{BitmapContext, RemoveMode};
use crate::nodes::error_text;

/// `nbd-server-start`'s arguments: the address in QMP's legacy form (`{type, data: {…}}`).
#[derive(Debug, Deserialize)]
struct ServerStartArgs {
    addr: LegacyAddress,
    #[serde(rename = "max-connections", default = "default_max_connections")]
    max_connections: u32,
    #[serde(
        rename = "handshake-max-seconds",
        default = "default_handshake_seconds"
    )]
    handshake_max_seconds: u64,
}

fn default_max_connections() -> u32 {
    100
}

fn default_handshake_seconds() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
enum LegacyAddress {
    Unix { path: String },
    Inet { host: String, port: String },
}

/// `block-export-add`'s arguments (type nbd).
#[derive(Debug, Deserialize)]
struct ExportAddArgs {
    id: String,
    #[serde(rename = "node-name")]
    node_name: String,
    name: Option<String>,
    description: Option<String>,
    #[serde(default)]
    writable: bool,
    #[serde(default)]
    writethrough: bool,
    #[serde(rename = "allocation-depth", default)]
    allocation_depth: bool,
    #[serde(default)]
    bitmaps: Vec<Value>,
}

/// `nbd-server-add`'s arguments (deprecated).
#[derive(Debug, Deserialize)]
struct NbdServerAddArgs {
    device: String,
    name: Option<String>,
    description: Option<String>,
    #[serde(default)]
    writable: bool,
    bitmap: Option<Value>,
}

/// `block-export-del` (`id`) and `nbd-server-remove` (`name`).
#[derive(Debug, Deserialize)]
struct ExportDelArgs {
    #[serde(alias = "name")]
    id: String,
    #[serde(default)]
    mode: Option<String>,
}

/// Binds a unix socket, replacing a stale socket file, as QEMU does.
fn bind_unix(path: &str) -> std::io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

/// `nbd-server-start`, with the address in QMP's legacy form (`{type, data: {…}}`).
pub async fn server_start(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    if ctl.exports.server().is_some() {
        return Err(QmpError::generic("NBD server already running"));
    }
    let args: ServerStartArgs = decode(args)?;
    let (listener, socket) = match &args.addr {
        LegacyAddress::Unix { path } => {
            let l = bind_unix(path)
                .map_err(|e| QmpError::generic(format!("Failed to bind socket to {path}: {e}")))?;
            (Listener::Unix(l), Some(PathBuf::from(path)))
        }
        LegacyAddress::Inet { host, port } => {
            let port: u16 = port
                .parse()
                .map_err(|_| QmpError::generic(format!("Failed to parse port '{port}'")))?;
            let l = tokio::net::TcpListener::bind((host.as_str(), port))
                .await
                .map_err(|e| QmpError::generic(format!("Failed to bind socket: {e}")))?;
            (Listener::Tcp(l), None)
        }
    };
    let config = ServerConfig {
        max_connections: args.max_connections,
        handshake_timeout: match args.handshake_max_seconds {
            0 => None,
            n => Some(Duration::from_secs(n)),
        },
        ..ServerConfig::default()
    };
    ctl.exports
        .start_server(NbdServer::new(config), listener, socket);
    Ok(json!({}))
}

/// `nbd-server-stop`.
pub async fn server_stop(ctl: &mut Control) -> QmpResult<Value> {
    ctl.exports.stop_server().await.map_err(QmpError::generic)?;
    Ok(json!({}))
}

/// QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// What both `block-export-add` and `nbd-server-add` create.
struct NewExport<'a> {
    id: &'a str,
    node_name: &'a str,
    /// `device` of nbd-server-add, for its lookup message.
    device: Option<&'a str>,
    name: Option<&'a str>,
    description: Option<&'a str>,
    writable: bool,
    writethrough: bool,
    allocation_depth: bool,
    bitmaps: Vec<&'a Value>,
}

fn add(ctl: &mut Control, x: NewExport<'_>) -> QmpResult<Value> {
    if !id_wellformed(x.id) {
        return Err(QmpError::generic("Invalid block export id"));
    }
    if ctl.exports.has_id(x.id) {
        return Err(QmpError::generic(format!(
            "Block export id '{}' is already in use",
            x.id
        )));
    }
    let entry = ctl.nodes.entry(x.node_name).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{}' nor node-name='{}'",
            x.device.unwrap_or(""),
            x.node_name
        ))
    })?;
    let node = entry.node.clone();
    if x.writable && entry.read_only {
        return Err(QmpError::generic(
            "Cannot export read-only node as writable",
        ));
    }
    // Attached as QEMU attaches it: first needing read (and write), sharing everything; the
    // NBD export then stops sharing resize, below.
    let mut need = EdgePerm::new(Perm::CONSISTENT_READ, Perm::ALL);
    if x.writable {
        need.perm |= Perm::WRITE;
    }
    let backend = BlockBackend::attach(node.clone(), Parent::unnamed(), need).map_err(generic)?;
    let Some(server) = ctl.exports.server().cloned() else {
        return Err(QmpError::generic("NBD server not running"));
    };
    let name = x.name.unwrap_or(x.node_name);
    if name.len() > nbd::proto::MAX_STRING {
        return Err(QmpError::generic(format!("export name '{name}' too long")));
    }
    let description = x.description.unwrap_or("");
    if description.len() > nbd::proto::MAX_STRING {
        return Err(QmpError::generic(format!(
            "description '{description}' too long"
        )));
    }
    if server.export(name).is_some() {
        return Err(QmpError::generic(format!(
            "NBD server already has export named '{name}'"
        )));
    }
    // Nothing may resize the node under a client.
    backend
        .set_need(EdgePerm::new(need.perm, !Perm::RESIZE))
        .map_err(generic)?;
    let bitmaps = export_bitmaps(ctl, &node, &x)?;
    let export = Export::new(ExportConfig {
        name: name.to_owned(),
        description: description.to_owned(),
        backend,
        writable: x.writable,
        writethrough: x.writethrough,
        allocation_depth: x.allocation_depth,
        extra_contexts: bitmaps
            .iter()
            .map(|(node, name)| {
                Arc::new(BitmapContext {
                    node: node.clone(),
                    name: name.clone(),
                }) as Arc<dyn MetaContext>
            })
            .collect(),
    });
    server
        .add_export(export.clone())
        .map_err(QmpError::generic)?;
    for (node, name) in &bitmaps {
        node.with_bitmap(name, |b| b.set_busy(true));
    }
    ctl.exports.insert(x.id.to_owned(), export, bitmaps);
    Ok(json!({}))
}

/// The bitmaps an export offers, checked as QEMU checks them: a bare name is looked up on the
/// node and down its backing chain; a `{node, name}` pair where it says. Busy or inconsistent
/// bitmaps are refused, and so is a recording bitmap named alone on a read-only export when
/// the node holding it is writable (it would change under the reader), as in QEMU.
fn export_bitmaps(
    ctl: &Control,
    node: &Arc<BlockNode>,
    x: &NewExport<'_>,
) -> QmpResult<Vec<(Arc<BlockNode>, String)>> {
    let writable = |n: &Arc<BlockNode>| !ctl.nodes.entry(n.name()).is_some_and(|e| e.read_only);
    let mut out: Vec<(Arc<BlockNode>, String)> = Vec::new();
    for spec in &x.bitmaps {
        // QEMU refuses a recording bitmap on a read-only export only when it found the
        // bitmap by name, and only on a writable node; a `{node, name}` pair is not checked.
        let (holder, name, check_recording) = match spec {
            Value::String(name) => {
                let mut at = Some(node.clone());
                let mut found = None;
                while let Some(n) = at {
                    if n.bitmaps().iter().any(|b| b.name() == Some(name)) {
                        found = Some(n);
                        break;
                    }
                    at = n
                        .child(ChildRole::Backing)
                        .or_else(|| n.child(ChildRole::Filtered))
                        .map(|c| c.node());
                }
                let holder = found
                    .ok_or_else(|| QmpError::generic(format!("Bitmap '{name}' is not found")))?;
                let check = writable(&holder);
                (holder, name.clone(), check)
            }
            other => {
                let n = other.get("node").and_then(Value::as_str).unwrap_or("");
                let name = other.get("name").and_then(Value::as_str).unwrap_or("");
                let holder = bitmap::node(ctl, n)?;
                if !holder.bitmaps().iter().any(|b| b.name() == Some(name)) {
                    return Err(QmpError::generic(format!(
                        "Dirty bitmap '{name}' not found"
                    )));
                }
                (holder, name.to_owned(), false)
            }
        };
        let (busy, inconsistent, recording) = holder
            .with_bitmap(&name, |b| (b.busy(), b.inconsistent(), b.recording()))
            .unwrap_or_default();
        // Before the busy check, as in QEMU.
        if !x.writable && check_recording && recording {
            return Err(QmpError::generic(format!(
                "Enabled bitmap '{name}' incompatible with readonly export"
            )));
        }
        if busy
            || out
                .iter()
                .any(|(n, m)| Arc::ptr_eq(n, &holder) && *m == name)
        {
            return Err(QmpError::generic(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        if inconsistent {
            return Err(QmpError::generic(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        out.push((holder, name));
    }
    Ok(out)
}

/// `block-export-add` (type nbd).
pub fn block_export_add(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let a: ExportAddArgs = decode(args)?;
    add(
        ctl,
        NewExport {
            id: &a.id,
            node_name: &a.node_name,
            device: None,
            name: a.name.as_deref(),
            description: a.description.as_deref(),
            writable: a.writable,
            writethrough: a.writethrough,
            allocation_depth: a.allocation_depth,
            bitmaps: a.bitmaps.iter().collect(),
        },
    )
}

/// `nbd-server-add` (deprecated): an export whose id is its name.
pub fn nbd_server_add(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    if ctl.exports.server().is_none() {
        return Err(QmpError::generic("NBD server not running"));
    }
    let a: NbdServerAddArgs = decode(args)?;
    let device = a.device.as_str();
    let name = a.name.as_deref().unwrap_or(device);
    add(
        ctl,
        NewExport {
            id: name,
            node_name: device,
            device: Some(device),
            name: Some(name),
            description: a.description.as_deref(),
            writable: a.writable,
            writethrough: false,
            allocation_depth: false,
            bitmaps: a.bitmap.iter().collect(),
        },
    )
}

/// `block-export-del`, and the deprecated `nbd-server-remove` (`block-export-del` by name).
pub fn block_export_del(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let a: ExportDelArgs = decode(args)?;
    let mode = match a.mode.as_deref() {
        Some("hard") => RemoveMode::Hard,
        _ => RemoveMode::Safe,
    };
    ctl.exports.delete(&a.id, mode).map_err(QmpError::generic)?;
    Ok(json!({}))
}

/// `nbd-server-remove` (deprecated): `block-export-del` by id.
pub fn nbd_server_remove(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    block_export_del(ctl, args)
}

fn generic(e: block::BlockError) -> QmpError {
    QmpError::generic(error_text(&e))
}

/// The schema of the NBD server and export commands.
pub(crate) fn schema(s: &mut Schema) {
    s.enumeration("SocketAddressType", &["inet", "unix"])
        .object("InetSocketAddress", &["host:str", "port:str"])
        .object("UnixSocketAddress", &["path:str"])
        .object("InetSocketAddressWrapper", &["data:InetSocketAddress"])
        .object("UnixSocketAddressWrapper", &["data:UnixSocketAddress"])
        .union(
            "SocketAddressLegacy",
            &["type:SocketAddressType"],
            "type",
            &[
                ("inet", "InetSocketAddressWrapper"),
                ("unix", "UnixSocketAddressWrapper"),
            ],
        )
        .union(
            "SocketAddress",
            &["type:SocketAddressType"],
            "type",
            &[("inet", "InetSocketAddress"), ("unix", "UnixSocketAddress")],
        )
        .object(
            "NbdServerStartArgs",
            &[
                "addr:SocketAddressLegacy",
                "*max-connections:uint32",
                "*handshake-max-seconds:uint32",
            ],
        )
        .object(
            "NbdServerOptions",
            &[
                "addr:SocketAddress",
                "*max-connections:uint32",
                "*handshake-max-seconds:uint32",
            ],
        )
        .enumeration("BlockExportType", &["nbd"])
        .union(
            "BlockExportOptions",
            &[
                "type:BlockExportType",
                "id:str",
                "node-name:str",
                "*writable:bool",
                "*writethrough:bool",
            ],
            "type",
            &[("nbd", "BlockExportOptionsNbd")],
        )
        .object(
            "BlockExportOptionsNbd",
            &[
                "*name:str",
                "*description:str",
                "*bitmaps:[BlockDirtyBitmapOrStr]",
                "*allocation-depth:bool",
            ],
        )
        .enumeration("BlockExportRemoveMode", &["safe", "hard"])
        .object(
            "BlockExportDelArgs",
            &["id:str", "*mode:BlockExportRemoveMode"],
        )
        .object(
            "BlockExportInfo",
            &[
                "id:str",
                "type:BlockExportType",
                "node-name:str",
                "shutting-down:bool",
            ],
        )
        .object(
            "NbdServerAddOptions",
            &[
                "device:str",
                "*name:str",
                "*description:str",
                "*writable:bool",
                "*bitmap:str",
            ],
        )
        .object(
            "NbdServerRemoveArgs",
            &["name:str", "*mode:BlockExportRemoveMode"],
        )
        .object("BlockExportDeletedData", &["id:str"]);
    s.command("nbd-server-start", Some("NbdServerStartArgs"), None, &[])
        .command("nbd-server-stop", None, None, &[])
        .command("block-export-add", Some("BlockExportOptions"), None, &[])
        .command("block-export-del", Some("BlockExportDelArgs"), None, &[])
        .command("query-block-exports", None, Some("[BlockExportInfo]"), &[])
        .command(
            "nbd-server-add",
            Some("NbdServerAddOptions"),
            None,
            &["deprecated"],
        )
        .command(
            "nbd-server-remove",
            Some("NbdServerRemoveArgs"),
            None,
            &["deprecated"],
        );
}
