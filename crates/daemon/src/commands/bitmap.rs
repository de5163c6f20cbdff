//! `block-dirty-bitmap-add/remove/clear/enable/disable/merge` and
//! `x-debug-block-dirty-bitmap-sha256`.
//!
//! Each change returns an [`Undo`], so that `transaction` can apply actions one by one and roll
//! back every earlier one when a later one fails; the plain commands commit at once. Error
//! texts are QEMU's (see tests/bitmaps.rs, which compares them with qemu-storage-daemon).

use std::sync::Arc;

use bitmap::{check_granularity, DirtyBitmap, HBitmap};
use block::BlockNode;
use qmp::{QmpError, QmpResult, Schema};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::decode;
use crate::control::Control;

/// Longest bitmap name (qcow2's limit, which QEMU applies to every bitmap).
const MAX_NAME: usize = 1023;

/// How to take back one applied bitmap change.
#[derive(Debug)]
pub enum Undo {
    /// A bitmap was added.
    Added { node: Arc<BlockNode>, name: String },
    /// A bitmap is to be removed: it stays, busy, until the change commits.
    Removing { node: Arc<BlockNode>, name: String },
    /// The bits of a bitmap changed (clear, merge).
    Bits {
        node: Arc<BlockNode>,
        name: String,
        bits: HBitmap,
    },
    /// Recording was switched (enable, disable).
    Recording {
        node: Arc<BlockNode>,
        name: String,
        was: bool,
    },
}

impl Undo {
    /// Takes the change back.
    pub fn undo(self) {
        match self {
            Undo::Added { node, name } => node.bitmaps().retain(|b| b.name() != Some(&name)),
            Undo::Removing { node, name } => {
                node.with_bitmap(&name, |b| b.set_busy(false));
            }
            Undo::Bits { node, name, bits } => {
                node.with_bitmap(&name, |b| b.restore(bits));
            }
            Undo::Recording { node, name, was } => {
                node.with_bitmap(&name, |b| b.set_recording(was));
            }
        }
    }

    /// Makes the change final in memory (inside the transaction's drained section). A
    /// removed persistent bitmap still has to leave the image: that is the clean-up returned.
    pub fn commit(self) -> Option<Clean> {
        if let Undo::Removing { node, name } = self {
            let persistent = {
                let mut bitmaps = node.bitmaps();
                let persistent = bitmaps
                    .iter()
                    .any(|b| b.name() == Some(&name) && b.persistent());
                bitmaps.retain(|b| b.name() != Some(&name));
                persistent
            };
            if persistent {
                return Some(Clean { node, name });
            }
        }
        None
    }
}

/// What is left to do after a committed change, outside the drained section: a removed
/// persistent bitmap leaves the image at once, as in QEMU.
#[derive(Debug)]
pub struct Clean {
    node: Arc<BlockNode>,
    name: String,
}

impl Clean {
    /// Removes the bitmap from the image.
    pub async fn run(self) -> QmpResult<()> {
        let Clean { node, name } = self;
        node.remove_stored_bitmap(&name).await.map_err(|e| {
            QmpError::generic(format!(
                "Failed to remove bitmap '{name}' from the image: {}",
                crate::nodes::error_text(&e)
            ))
        })
    }
}

/// The node of `block-dirty-bitmap-add` (looked up as device or node name).
fn node_for_add(ctl: &Control, name: &str) -> QmpResult<Arc<BlockNode>> {
    ctl.nodes
        .entry(name)
        .map(|e| e.node.clone())
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
}

/// The node holding the bitmaps another command names.
pub fn node(ctl: &Control, name: &str) -> QmpResult<Arc<BlockNode>> {
    ctl.nodes
        .entry(name)
        .map(|e| e.node.clone())
        .ok_or_else(|| QmpError::generic(format!("Node '{name}' not found")))
}

fn not_found(name: &str) -> QmpError {
    QmpError::generic(format!("Dirty bitmap '{name}' not found"))
}

fn busy(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Bitmap '{name}' is currently in use by another operation and cannot be used"
    ))
}

/// What a command may do with a bitmap in a given state (QEMU's bitmap checks, in its order:
/// busy, read-only, inconsistent).
#[derive(Clone, Copy)]
enum Allow {
    /// Changes the bits: not busy, not read-only, not inconsistent (clear, merge target).
    Modify,
    /// Not busy, not inconsistent (enable, disable, merge source).
    Use,
    /// Not busy, not read-only (remove works on inconsistent bitmaps).
    Remove,
}

/// Runs `f` on bitmap `name` of `node` after checking it may be used as `allow` says.
fn use_bitmap<T>(
    node: &BlockNode,
    name: &str,
    allow: Allow,
    f: impl FnOnce(&mut DirtyBitmap) -> T,
) -> QmpResult<T> {
    node.with_bitmap(name, |b| {
        if b.busy() {
            return Err(busy(name));
        }
        if matches!(allow, Allow::Modify | Allow::Remove) && b.readonly() {
            return Err(QmpError::generic(format!(
                "Bitmap '{name}' is readonly and cannot be modified"
            )));
        }
        if matches!(allow, Allow::Modify | Allow::Use) && b.inconsistent() {
            return Err(QmpError::generic(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        Ok(f(b))
    })
    .ok_or_else(|| not_found(name))?
}

/// The granularity QEMU picks when none is given: the cluster size within [4 KiB, 64 KiB], or
/// 64 KiB for nodes without clusters.
fn default_granularity(node: &BlockNode) -> u64 {
    match node.facts().cluster_size {
        Some(c) if c > 0 => u64::from(c).clamp(4096, 65536),
        _ => 65536,
    }
}

/// `block-dirty-bitmap-add`'s arguments.
#[derive(Debug, Deserialize)]
struct AddArgs {
    node: String,
    name: String,
    granularity: Option<u64>,
    #[serde(default)]
    persistent: bool,
    #[serde(default)]
    disabled: bool,
}

/// The arguments of the commands that name one bitmap (`BlockDirtyBitmap`).
#[derive(Debug, Deserialize)]
struct BitmapArgs {
    node: String,
    name: String,
}

/// `block-dirty-bitmap-merge`'s arguments.
#[derive(Debug, Deserialize)]
struct MergeArgs {
    node: String,
    target: String,
    bitmaps: Vec<MergeSource>,
}

/// A merge source: a bitmap of the target's node by name, or one of any node.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MergeSource {
    Local(String),
    Anywhere { node: String, name: String },
}

/// `block-dirty-bitmap-add`.
pub fn add(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Undo> {
    let args: AddArgs = decode(args)?;
    let name = args.name.as_str();
    if name.is_empty() {
        return Err(QmpError::generic("Bitmap name cannot be empty"));
    }
    let node = node_for_add(ctl, &args.node)?;
    let granularity = match args.granularity {
        Some(g) => {
            check_granularity(g).map_err(|e| QmpError::generic(e.to_string()))?;
            g
        }
        None => default_granularity(&node),
    };
    let persistent = args.persistent;
    if persistent {
        let why = if !node.stores_bitmaps() {
            Some("Operation not supported")
        } else if !node.writable() {
            Some("the node is read-only")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(QmpError::generic(format!(
                "Can't store persistent bitmaps to {}: {why}",
                node.name()
            )));
        }
    }
    let mut bitmaps = node.bitmaps();
    if bitmaps.iter().any(|b| b.name() == Some(name)) {
        return Err(QmpError::generic(format!("Bitmap already exists: {name}")));
    }
    if name.len() > MAX_NAME {
        return Err(QmpError::generic(format!("Bitmap name too long: {name}")));
    }
    let mut b = DirtyBitmap::new(Some(name.to_owned()), node.len(), granularity)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    if args.disabled {
        b.set_recording(false);
    }
    b.set_persistent(persistent);
    bitmaps.push(b);
    drop(bitmaps);
    Ok(Undo::Added {
        node,
        name: name.to_owned(),
    })
}

/// `block-dirty-bitmap-remove`: the bitmap is marked busy until the change commits.
pub fn remove(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Undo> {
    let BitmapArgs { node: n, name } = decode(args)?;
    let (node, name) = (node(ctl, &n)?, name.as_str());
    use_bitmap(&node, name, Allow::Remove, |b| b.set_busy(true))?;
    Ok(Undo::Removing {
        node,
        name: name.to_owned(),
    })
}

/// `block-dirty-bitmap-clear`.
pub fn clear(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Undo> {
    let BitmapArgs { node: n, name } = decode(args)?;
    let (node, name) = (node(ctl, &n)?, name.as_str());
    let bits = use_bitmap(&node, name, Allow::Modify, DirtyBitmap::clear)?;
    Ok(Undo::Bits {
        node,
        name: name.to_owned(),
        bits,
    })
}

/// `block-dirty-bitmap-enable` (`on`) and `-disable`.
pub fn set_recording(ctl: &Control, args: &Map<String, Value>, on: bool) -> QmpResult<Undo> {
    let BitmapArgs { node: n, name } = decode(args)?;
    let (node, name) = (node(ctl, &n)?, name.as_str());
    let was = use_bitmap(&node, name, Allow::Use, |b| {
        let was = b.recording();
        b.set_recording(on);
        was
    })?;
    Ok(Undo::Recording {
        node,
        name: name.to_owned(),
        was,
    })
}

/// `block-dirty-bitmap-merge`: every source ORed into the target, all or nothing.
pub fn merge(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Undo> {
    let args: MergeArgs = decode(args)?;
    let node = node(ctl, &args.node)?;
    let target = args.target.as_str();
    use_bitmap(&node, target, Allow::Modify, |_| ())?;
    // Copy the sources first: a source may live on the target's node (one lock at a time).
    let mut sources = Vec::new();
    for src in &args.bitmaps {
        let (src_node, src_name) = match src {
            MergeSource::Local(name) => (node.clone(), name.as_str()),
            MergeSource::Anywhere { node: n, name } => (self::node(ctl, n)?, name.as_str()),
        };
        sources.push(use_bitmap(&src_node, src_name, Allow::Use, |b| b.clone())?);
    }
    let mut merged = use_bitmap(&node, target, Allow::Modify, |b| b.clone())?;
    for src in &sources {
        if src.disk_size() != merged.disk_size() {
            return Err(QmpError::generic(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                merged.disk_size(),
                src.disk_size()
            )));
        }
        merged
            .merge_from(src)
            .map_err(|e| QmpError::generic(e.to_string()))?;
    }
    let merged_bits = merged.bits().clone();
    let bits = use_bitmap(&node, target, Allow::Modify, |b| {
        let old = b.clear();
        b.restore(merged_bits);
        old
    })?;
    Ok(Undo::Bits {
        node,
        name: target.to_owned(),
        bits,
    })
}

/// `x-debug-block-dirty-bitmap-sha256`: SHA-256 of the bits as 64-bit little-endian words,
/// which is what QEMU hashes, so the two agree on equal bitmaps.
pub fn sha256(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let BitmapArgs { node: n, name } = decode(args)?;
    let (node, name) = (node(ctl, &n)?, name.as_str());
    let digest = node
        .with_bitmap(name, |b| {
            let mut h = Sha256::new();
            for w in b.bits().words() {
                h.update(w.to_le_bytes());
            }
            h.finalize()
        })
        .ok_or_else(|| not_found(name))?;
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(json!({ "sha256": hex }))
}

/// `dirty-bitmaps` of a node for the queries: newest first; `None` when it has none. A
/// bitmap frozen for a job counts as recording (its successor records) and busy, and the
/// successor is listed too, unnamed, where its creation puts it — as qsd shows them during an
/// incremental backup.
pub fn dirty_info(node: &BlockNode) -> Option<Value> {
    let bitmaps = node.bitmaps();
    if bitmaps.is_empty() {
        return None;
    }
    let entry = |b: &DirtyBitmap, recording: bool| {
        let mut m = Map::new();
        if let Some(n) = b.name() {
            m.insert("name".into(), json!(n));
        }
        m.insert("recording".into(), json!(recording));
        m.insert("persistent".into(), json!(b.persistent()));
        m.insert("busy".into(), json!(b.busy()));
        m.insert("granularity".into(), json!(b.granularity()));
        m.insert("count".into(), json!(b.dirty_bytes()));
        if b.inconsistent() {
            m.insert("inconsistent".into(), json!(true));
        }
        Value::Object(m)
    };
    let mut listed: Vec<(u64, Value)> = Vec::new();
    for b in bitmaps.iter() {
        let successor = b.successor();
        let recording = b.recording() || successor.is_some_and(DirtyBitmap::recording);
        listed.push((b.order(), entry(b, recording)));
        if let Some(s) = successor {
            listed.push((s.order(), entry(s, s.recording())));
        }
    }
    // Newest first, a job's successor ranking as new as when the job made it.
    listed.sort_by_key(|(order, _)| std::cmp::Reverse(*order));
    Some(Value::Array(listed.into_iter().map(|(_, v)| v).collect()))
}

/// Runs a bitmap command outside a transaction: the change is final at once.
pub async fn run(ctl: &Control, command: &str, args: &Map<String, Value>) -> QmpResult<Value> {
    let undo = match command {
        "block-dirty-bitmap-add" => add(ctl, args)?,
        "block-dirty-bitmap-remove" => remove(ctl, args)?,
        "block-dirty-bitmap-clear" => clear(ctl, args)?,
        "block-dirty-bitmap-enable" => set_recording(ctl, args, true)?,
        "block-dirty-bitmap-disable" => set_recording(ctl, args, false)?,
        "block-dirty-bitmap-merge" => merge(ctl, args)?,
        other => return Err(QmpError::command_not_found(other)),
    };
    if let Some(clean) = undo.commit() {
        clean.run().await?;
    }
    Ok(json!({}))
}

/// The schema of the dirty bitmap commands.
pub(crate) fn schema(s: &mut Schema) {
    s.object(
        "BlockDirtyInfo",
        &[
            "*name:str",
            "count:int",
            "granularity:uint32",
            "recording:bool",
            "busy:bool",
            "persistent:bool",
            "*inconsistent:bool",
        ],
    )
    .object("BlockDirtyBitmap", &["node:str", "name:str"])
    .alternate("BlockDirtyBitmapOrStr", &["str", "BlockDirtyBitmap"])
    .object(
        "BlockDirtyBitmapAdd",
        &[
            "node:str",
            "name:str",
            "*granularity:uint32",
            "*persistent:bool",
            "*disabled:bool",
        ],
    )
    .object(
        "BlockDirtyBitmapMerge",
        &["node:str", "target:str", "bitmaps:[BlockDirtyBitmapOrStr]"],
    )
    .object("BlockDirtyBitmapSha256", &["sha256:str"]);
    s.command(
        "block-dirty-bitmap-add",
        Some("BlockDirtyBitmapAdd"),
        None,
        &[],
    )
    .command(
        "block-dirty-bitmap-remove",
        Some("BlockDirtyBitmap"),
        None,
        &[],
    )
    .command(
        "block-dirty-bitmap-clear",
        Some("BlockDirtyBitmap"),
        None,
        &[],
    )
    .command(
        "block-dirty-bitmap-enable",
        Some("BlockDirtyBitmap"),
        None,
        &[],
    )
    .command(
        "block-dirty-bitmap-disable",
        Some("BlockDirtyBitmap"),
        None,
        &[],
    )
    .command(
        "block-dirty-bitmap-merge",
        Some("BlockDirtyBitmapMerge"),
        None,
        &[],
    )
    .command(
        "x-debug-block-dirty-bitmap-sha256",
        Some("BlockDirtyBitmap"),
        Some("BlockDirtyBitmapSha256"),
        &["unstable"],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use drivers::null::NullDriver;

    #[test]
    fn internal_bitmaps_are_listed_without_a_name() {
        let node = BlockNode::new("n", Arc::new(NullDriver::new(1 << 20)));
        let handle = node.add_internal_bitmap(65536).expect("internal");
        let info = dirty_info(&node).expect("listed");
        assert_eq!(
            info,
            json!([{"recording": true, "persistent": false, "busy": false,
                    "granularity": 65536, "count": 0}])
        );
        drop(handle);
        assert!(dirty_info(&node).is_none());
    }

    /// What qsd 10.0.2 lists on the source of an incremental backup of bitmap `inc` (bitmaps
    /// `old`, `inc`, `new` added in that order): the successor first, `inc` busy and
    /// recording.
    #[test]
    fn a_frozen_bitmap_and_its_successor_are_listed_as_qsd_lists_them() {
        let node = BlockNode::new("src", Arc::new(NullDriver::new(16 << 20)));
        for name in ["old", "inc", "new"] {
            let b = DirtyBitmap::new(Some(name.into()), 16 << 20, 65536).expect("bitmap");
            node.bitmaps().push(b);
        }
        node.with_bitmap("inc", DirtyBitmap::create_successor)
            .expect("inc")
            .expect("successor");
        let entry = |name: Option<&str>, busy: bool| {
            let mut v = json!({"recording": true, "persistent": false, "busy": busy,
                               "granularity": 65536, "count": 0});
            if let Some(n) = name {
                v["name"] = json!(n);
            }
            v
        };
        assert_eq!(
            dirty_info(&node).expect("listed"),
            json!([
                entry(None, false),
                entry(Some("new"), false),
                entry(Some("inc"), true),
                entry(Some("old"), false)
            ])
        );
    }
}
