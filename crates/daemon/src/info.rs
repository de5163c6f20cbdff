//! What `query-named-block-nodes` reports about a node (QEMU's BlockDeviceInfo and ImageInfo).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use block::{BlockNode, ChildRole, InfoValue};
use serde_json::{json, Map, Value};

use crate::nodes::{NodeEntry, Nodes};

/// A driver's format-specific value as JSON.
pub fn info_value(v: &InfoValue) -> Value {
    match v {
        InfoValue::Str(s) => json!(s),
        InfoValue::Bool(b) => json!(b),
        InfoValue::Int(i) => json!(i),
        InfoValue::List(l) => Value::Array(l.iter().map(info_value).collect()),
        InfoValue::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| ((*k).to_owned(), info_value(v)))
                .collect(),
        ),
    }
}

fn backing_of(node: &Arc<BlockNode>) -> Option<Arc<BlockNode>> {
    node.child(ChildRole::Backing).map(|c| c.node())
}

/// Whether QEMU treats the node's driver as a filter (its image chain goes on through the
/// filtered child).
fn is_filter(node: &BlockNode) -> bool {
    matches!(
        node.driver_name(),
        "copy-before-write" | "blkdebug" | "throttle"
    )
}

/// The next image down the chain: the backing file, or a filter's child.
fn chain_next(node: &Arc<BlockNode>) -> Option<Arc<BlockNode>> {
    if is_filter(node) {
        return primary_child(node);
    }
    backing_of(node)
}

fn backing_depth(node: &Arc<BlockNode>) -> u64 {
    let mut depth = 0;
    let mut at = chain_next(node);
    while let Some(n) = at {
        depth += 1;
        at = chain_next(&n);
    }
    depth
}

/// Bytes the node's host file takes on disk, as QEMU finds them: a file node's own, a format's
/// or filter's from the child it stores its data in. Protocol drivers without a host file
/// (nbd, blkdebug) report none, and so does anything above them; null reports 0.
fn actual_size(nodes: &Nodes, entry: &NodeEntry) -> Option<u64> {
    let node = &entry.node;
    match node.driver_name() {
        "null-co" | "null-aio" => return Some(0),
        "nbd" | "blkdebug" => return None,
        "file" => {}
        _ => {
            if let Some(child) = primary_child(node).and_then(|c| nodes.entry_of(&c)) {
                return actual_size(nodes, child);
            }
        }
    }
    let path = entry.host_file.as_ref()?;
    std::fs::metadata(path).ok().map(|md| md.blocks() * 512)
}

/// The child a filter passes requests to, or a format's image.
fn primary_child(node: &BlockNode) -> Option<Arc<BlockNode>> {
    node.child(ChildRole::Filtered)
        .or_else(|| node.child(ChildRole::File))
        .map(|c| c.node())
}

/// The node that answers for `node`'s driver information (QEMU's `bdrv_get_info`: cluster
/// size and dirty flag), if any: filters and raw pass the question to their child; nbd,
/// null and snapshot-access have no answer.
fn info_node(node: &Arc<BlockNode>) -> Option<Arc<BlockNode>> {
    match node.driver_name() {
        "copy-before-write" | "blkdebug" | "throttle" | "raw" => {
            primary_child(node).and_then(|c| info_node(&c))
        }
        "nbd" | "null-co" | "null-aio" | "snapshot-access" => None,
        _ => Some(node.clone()),
    }
}

/// ImageInfo of `entry`'s node; with `chain`, the backing images nest as `backing-image`.
fn image_info(nodes: &Nodes, entry: &NodeEntry, chain: bool) -> Value {
    let node = &entry.node;
    let info = node.image_info();
    let mut m = Map::new();
    // QEMU counts node lengths in 512-byte sectors, rounded up.
    m.insert("virtual-size".into(), json!(node.len().div_ceil(512) * 512));
    m.insert("filename".into(), json!(nodes.file_name(node)));
    let answers = info_node(node);
    if let Some(cluster) = answers.as_ref().and_then(|n| n.facts().cluster_size) {
        m.insert("cluster-size".into(), json!(cluster));
    }
    m.insert("format".into(), json!(node.driver_name()));
    if let Some(size) = actual_size(nodes, entry) {
        m.insert("actual-size".into(), json!(size));
    }
    if matches!(node.driver_name(), "qcow2" | "file") {
        let data: Map<String, Value> = info
            .specific
            .iter()
            .map(|(k, v)| ((*k).to_owned(), info_value(v)))
            .collect();
        m.insert(
            "format-specific".into(),
            json!({"type": node.driver_name(), "data": data}),
        );
    }
    if let Some(n) = &answers {
        m.insert("dirty-flag".into(), json!(n.image_info().dirty));
    }
    // The backing file the image's header names, attached or not (QEMU's `backing_file`).
    if let Some(backing) = &info.backing_file {
        m.insert("backing-filename".into(), json!(backing));
        let full = if Path::new(backing).is_absolute() {
            Some(backing.clone())
        } else {
            entry.host_file.as_ref().map(|image| {
                drivers::open::resolve_backing(image, backing)
                    .display()
                    .to_string()
            })
        };
        if let Some(full) = full {
            m.insert("full-backing-filename".into(), json!(full));
        }
        if let Some(fmt) = &info.backing_format {
            m.insert("backing-filename-format".into(), json!(fmt));
        }
    }
    if chain {
        if let Some(be) = backing_of(node).and_then(|b| nodes.entry_of(&b)) {
            m.insert("backing-image".into(), image_info(nodes, be, true));
        }
    }
    if chain && is_filter(node) {
        if let Some(entry) = primary_child(node).and_then(|c| nodes.entry_of(&c)) {
            m.insert("backing-image".into(), image_info(nodes, entry, true));
        }
    }
    Value::Object(m)
}

/// BlockDeviceInfo of one node.
pub fn block_device_info(nodes: &Nodes, entry: &NodeEntry, flat: bool) -> Value {
    let node = &entry.node;
    let mut m = Map::new();
    m.insert("file".into(), json!(nodes.file_name(node)));
    m.insert("node-name".into(), json!(node.name()));
    m.insert("ro".into(), json!(entry.read_only));
    m.insert("drv".into(), json!(node.driver_name()));
    if let Some(backing) = backing_of(node) {
        m.insert("backing_file".into(), json!(nodes.file_name(&backing)));
    }
    // QEMU counts the chain only while gathering it: flat answers say 0.
    let depth = if flat { 0 } else { backing_depth(node) };
    m.insert("backing_file_depth".into(), json!(depth));
    m.insert("active".into(), json!(true));
    m.insert("encrypted".into(), json!(false));
    m.insert("detect_zeroes".into(), json!(node.detect_zeroes().as_str()));
    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        m.insert(k.into(), json!(0));
    }
    m.insert("image".into(), image_info(nodes, entry, !flat));
    m.insert(
        "cache".into(),
        json!({"writeback": true, "direct": entry.cache.direct, "no-flush": entry.cache.no_flush}),
    );
    m.insert("write_threshold".into(), json!(0));
    if let Some(bitmaps) = crate::commands::dirty_info(node) {
        m.insert("dirty-bitmaps".into(), bitmaps);
    }
    Value::Object(m)
}
