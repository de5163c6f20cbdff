//! `blockdev-add`: opens a node (and its inline children) from its typed options.
//!
//! The schema has checked which members each driver takes before the options are decoded,
//! so [`BlockdevOptions`] holds the members of every driver side by side, each optional; the
//! opener of each driver (`crate::nodes`) reads its own.

use qmp::QmpResult;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};

use super::decode;
use crate::control::Control;

/// A child: a node by name, or inline options for a new implicit node.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum BlockdevRef {
    /// An existing node.
    Name(String),
    /// A new node.
    Inline(Box<BlockdevOptions>),
}

/// `cache`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CacheOptions {
    /// O_DIRECT.
    pub direct: Option<bool>,
    /// Flushes are ignored.
    pub no_flush: Option<bool>,
}

/// One `inject-error` rule of blkdebug.
#[derive(Clone, Debug, Deserialize)]
pub struct InjectRule {
    /// `read_aio` or `write_aio`.
    pub event: String,
    /// The errno (default EIO).
    pub errno: Option<i64>,
    /// The 512-byte sector the rule matches.
    pub sector: Option<i64>,
    /// Fire once.
    pub once: Option<bool>,
    /// Accepted, as QEMU's.
    #[allow(dead_code)]
    pub immediately: Option<bool>,
}

/// The `server` of the nbd driver.
#[derive(Clone, Debug, Deserialize)]
pub struct NbdServer {
    /// `unix` or `inet`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Socket path (unix).
    pub path: Option<String>,
    /// Host (inet).
    pub host: Option<String>,
    /// Port (inet).
    pub port: Option<String>,
}

/// `{node, name}` of a bitmap.
#[derive(Clone, Debug, Deserialize)]
pub struct BitmapRef {
    /// Node name.
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

/// `null` and absent told apart: `Some(None)` is `null`.
fn nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<BlockdevRef>>, D::Error> {
    Option::<BlockdevRef>::deserialize(d).map(Some)
}

/// The options of `blockdev-add` (QEMU's BlockdevOptions), every driver's members side by side.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevOptions {
    /// The driver.
    pub driver: String,
    /// The node's name (required at top level).
    pub node_name: Option<String>,
    /// `ignore` or `unmap`.
    pub discard: Option<String>,
    /// Cache mode.
    pub cache: Option<CacheOptions>,
    /// Read-only.
    pub read_only: Option<bool>,
    /// Fall back to read-only when writing is refused.
    pub auto_read_only: Option<bool>,
    /// `off` only.
    #[allow(dead_code)]
    pub detect_zeroes: Option<String>,
    /// file: the host file.
    pub filename: Option<String>,
    /// file: image locks.
    pub locking: Option<String>,
    /// file: `threads` only.
    #[allow(dead_code)]
    pub aio: Option<String>,
    /// raw, qcow2, copy-before-write, snapshot-access: the `file` child.
    pub file: Option<BlockdevRef>,
    /// raw: where the data starts.
    pub offset: Option<u64>,
    /// raw: how much of it; null-co: its size.
    pub size: Option<u64>,
    /// qcow2: the backing file (`null`: none; absent: from the header).
    #[serde(default, deserialize_with = "nullable")]
    pub backing: Option<Option<BlockdevRef>>,
    /// null-co: reads return zeroes.
    #[allow(dead_code)]
    pub read_zeroes: Option<bool>,
    /// blkdebug: the image.
    pub image: Option<BlockdevRef>,
    /// blkdebug: the rules.
    pub inject_error: Option<Vec<InjectRule>>,
    /// nbd: where the server is.
    pub server: Option<NbdServer>,
    /// nbd: the export name.
    pub export: Option<String>,
    /// nbd: seconds requests wait while reconnecting.
    pub reconnect_delay: Option<u64>,
    /// copy-before-write: where old data goes.
    pub target: Option<BlockdevRef>,
    /// copy-before-write: copy only this bitmap's dirty clusters.
    pub bitmap: Option<BitmapRef>,
    /// copy-before-write: `break-guest-write` or `break-snapshot`.
    pub on_cbw_error: Option<String>,
    /// copy-before-write: seconds a guest write may wait for its copy.
    pub cbw_timeout: Option<u64>,
    /// copy-before-write: smallest copy cluster.
    pub min_cluster_size: Option<u64>,
}

/// Runs the command.
pub async fn run(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let opts: BlockdevOptions = decode(args)?;
    ctl.nodes.add(&opts).await?;
    Ok(json!({}))
}
