//! `blockdev-add`: opens a node (and its inline children) from its typed options.
//!
//! The schema has checked which members each driver takes before the options are decoded,
//! so [`BlockdevOptions`] holds the members of every driver side by side, each optional; the
//! opener of each driver (`crate::nodes`) reads its own.

use qmp::{QmpResult, Schema};
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
    /// One of QEMU's event names ([`block::DebugEvent::NAMES`]).
    pub event: String,
    /// The errno (default EIO).
    pub errno: Option<i64>,
    /// The 512-byte sector the rule matches.
    pub sector: Option<i64>,
    /// Fire once.
    pub once: Option<bool>,
    /// The one kind of request the rule fails (default: all but block-status).
    pub iotype: Option<String>,
    /// Accepted, as QEMU's.
    pub immediately: Option<bool>,
    /// Only in this state of the node.
    pub state: Option<i64>,
}

/// One `set-state` rule of blkdebug.
#[derive(Clone, Debug, Deserialize)]
pub struct SetStateRule {
    /// The event that triggers it.
    pub event: String,
    /// Only in this state.
    pub state: Option<i64>,
    /// The state it moves the node to.
    pub new_state: i64,
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
    /// `off`, `on` or `unmap` (checked by the schema).
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
    /// null-co: nanoseconds each request takes.
    pub latency_ns: Option<u64>,
    /// null-co: reads return zeroes.
    pub read_zeroes: Option<bool>,
    /// blkdebug: the image.
    pub image: Option<BlockdevRef>,
    /// blkdebug: the rules.
    pub inject_error: Option<Vec<InjectRule>>,
    /// blkdebug: the state transitions.
    pub set_state: Option<Vec<SetStateRule>>,
    /// blkdebug: request alignment.
    pub align: Option<i64>,
    /// blkdebug: largest read or write.
    pub max_transfer: Option<i32>,
    /// blkdebug: write-zeroes alignment.
    pub opt_write_zero: Option<i32>,
    /// blkdebug: largest write-zeroes.
    pub max_write_zero: Option<i32>,
    /// blkdebug: discard alignment.
    pub opt_discard: Option<i32>,
    /// blkdebug: largest discard.
    pub max_discard: Option<i32>,
    /// nbd: where the server is.
    pub server: Option<NbdServer>,
    /// nbd: the export name.
    pub export: Option<String>,
    /// nbd: seconds requests wait while reconnecting.
    pub reconnect_delay: Option<u64>,
    /// throttle: the `throttle-group` object whose limits apply.
    pub throttle_group: Option<String>,
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

/// The drivers `blockdev-add` accepts.
pub const DRIVERS: &[&str] = &[
    "blkdebug",
    "copy-before-write",
    "file",
    "nbd",
    "null-aio",
    "null-co",
    "qcow2",
    "raw",
    "snapshot-access",
    "throttle",
];

/// `blockdev-add`'s schema: every driver's options, and the command.
pub(crate) fn schema(s: &mut Schema) {
    s.enumeration("BlockdevDriver", DRIVERS)
        .enumeration("BlockdevDiscardOptions", &["ignore", "unmap"])
        .enumeration("BlockdevDetectZeroesOptions", &["off", "on", "unmap"])
        .enumeration("BlockdevAioOptions", &["threads", "io_uring"])
        .enumeration("OnOffAuto", &["auto", "on", "off"])
        .object("BlockdevCacheOptions", &["*direct:bool", "*no-flush:bool"])
        .union(
            "BlockdevOptions",
            &[
                "driver:BlockdevDriver",
                "*node-name:str",
                "*discard:BlockdevDiscardOptions",
                "*cache:BlockdevCacheOptions",
                "*read-only:bool",
                "*auto-read-only:bool",
                "*detect-zeroes:BlockdevDetectZeroesOptions",
            ],
            "driver",
            &[
                ("blkdebug", "BlockdevOptionsBlkdebug"),
                ("copy-before-write", "BlockdevOptionsCbw"),
                ("snapshot-access", "BlockdevOptionsGenericFormat"),
                ("file", "BlockdevOptionsFile"),
                ("nbd", "BlockdevOptionsNbd"),
                ("null-aio", "BlockdevOptionsNull"),
                ("null-co", "BlockdevOptionsNull"),
                ("qcow2", "BlockdevOptionsQcow2"),
                ("raw", "BlockdevOptionsRaw"),
                ("throttle", "BlockdevOptionsThrottle"),
            ],
        )
        .object(
            "BlockdevOptionsThrottle",
            &["throttle-group:str", "file:BlockdevRef"],
        )
        .object(
            "BlockdevOptionsFile",
            &[
                "filename:str",
                "*locking:OnOffAuto",
                "*aio:BlockdevAioOptions",
            ],
        )
        .object(
            "BlockdevOptionsNull",
            &["*size:size", "*latency-ns:uint64", "*read-zeroes:bool"],
        )
        .object(
            "BlockdevOptionsNbd",
            &[
                "server:SocketAddress",
                "*export:str",
                "*reconnect-delay:uint32",
            ],
        )
        .object(
            "BlockdevOptionsRaw",
            &["file:BlockdevRef", "*offset:uint64", "*size:uint64"],
        )
        .object(
            "BlockdevOptionsQcow2",
            &["file:BlockdevRef", "*backing:BlockdevRefOrNull"],
        )
        .enumeration("BlkdebugEvent", block::DebugEvent::NAMES)
        .enumeration(
            "BlkdebugIOType",
            &[
                "read",
                "write",
                "write-zeroes",
                "discard",
                "flush",
                "block-status",
            ],
        )
        .object(
            "BlkdebugInjectErrorOptions",
            &[
                "event:BlkdebugEvent",
                "*state:int",
                "*errno:int",
                "*sector:int",
                "*iotype:BlkdebugIOType",
                "*once:bool",
                "*immediately:bool",
            ],
        )
        .object(
            "BlockdevOptionsBlkdebug",
            &[
                "image:BlockdevRef",
                "*align:int",
                "*max-transfer:int32",
                "*opt-write-zero:int32",
                "*max-write-zero:int32",
                "*opt-discard:int32",
                "*max-discard:int32",
                "*inject-error:[BlkdebugInjectErrorOptions]",
                "*set-state:[BlkdebugSetStateOptions]",
            ],
        )
        .object(
            "BlkdebugSetStateOptions",
            &["event:BlkdebugEvent", "*state:int", "new_state:int"],
        )
        .enumeration("OnCbwError", &["break-guest-write", "break-snapshot"])
        .object("BlockDirtyBitmapRef", &["node:str", "name:str"])
        .object(
            "BlockdevOptionsCbw",
            &[
                "file:BlockdevRef",
                "target:BlockdevRef",
                "*bitmap:BlockDirtyBitmapRef",
                "*on-cbw-error:OnCbwError",
                "*cbw-timeout:int",
                "*min-cluster-size:size",
            ],
        )
        .object("BlockdevOptionsGenericFormat", &["file:BlockdevRef"])
        .alternate("BlockdevRef", &["BlockdevOptions", "str"])
        .alternate("BlockdevRefOrNull", &["BlockdevOptions", "str", "null"]);
    s.command("blockdev-add", Some("BlockdevOptions"), None, &[]);
}
