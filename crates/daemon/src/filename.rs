//! The file name QEMU shows for a node (`file` and `image.filename` in the queries).
//!
//! A node that its file name alone would open again as it is (a file, a raw or qcow2 image
//! straight over one, a blkdebug node without rules) shows that name. Any other node shows
//! `json:` and the options that would open it again: the driver, the options that change what
//! the node does (a raw node's `offset`, blkdebug's rules), and the same for each child, a
//! backing file only when it is not the one the image's header names.
//!
//! QEMU works the name out again on every query, from the graph as it is then: while a backup's
//! filter sits between a format node and its file, the format node is named by its options,
//! the filter's included. [`NameRecipe`] is what a node keeps to do the same.
//!
//! QEMU prints those options from its own dictionary type, whose keys come out in the order of
//! their hash buckets, not in the order they were given; [`options_json`] reproduces that
//! order so the names read exactly as qemu-storage-daemon's.

use block::{BlockNode, ChildRole};
use serde_json::{json, Map, Value};

/// What a node is called, and what its parents need to name themselves.
#[derive(Clone, Debug, Default)]
pub struct NodeFileName {
    /// The plain name, when the node has one.
    pub exact: Option<String>,
    /// The options that would open the node again.
    pub options: Map<String, Value>,
    /// A protocol driver's node (file, nbd, null, blkdebug): a format node straight above it
    /// can borrow its plain name.
    pub protocol: bool,
}

impl NodeFileName {
    /// A protocol node that has a plain name.
    pub fn protocol(exact: Option<String>, options: Map<String, Value>) -> Self {
        Self {
            exact,
            options,
            protocol: true,
        }
    }

    /// A format node over `file`: its plain name is the file's when `file` is a protocol
    /// node with a plain name and nothing in `strong` (options that change the node, a
    /// backing file other than the header's) is set.
    pub fn format(file: &NodeFileName, options: Map<String, Value>, strong: bool) -> Self {
        let exact = match (&file.exact, file.protocol && !strong) {
            (Some(name), true) => Some(name.clone()),
            _ => None,
        };
        Self {
            exact,
            options,
            protocol: false,
        }
    }

    /// A filter that shows its filtered child's name (copy-before-write, snapshot-access).
    pub fn filter(shown: String, options: Map<String, Value>) -> Self {
        Self {
            exact: Some(shown),
            options,
            protocol: false,
        }
    }

    /// The name the queries show.
    pub fn shown(&self) -> String {
        match &self.exact {
            Some(name) => name.clone(),
            None => format!("json:{}", options_json(&self.options)),
        }
    }
}

/// What a node keeps to work out its name from its children's at query time.
#[derive(Clone, Debug)]
pub enum NameRecipe {
    /// A protocol node whose name never changes (file, nbd, null).
    Fixed(NodeFileName),
    /// blkdebug over its `image`, with its `inject-error` rules flattened as QEMU keeps them.
    Blkdebug {
        /// Its limits (`align`, …) and flattened rules (`inject-error.N.*`, `set-state.N.*`).
        rules: Map<String, Value>,
        /// Rules or limits were given: the node is a `json:` one.
        has_rules: bool,
    },
    /// A format node (raw, qcow2) over its `file`.
    Format {
        /// The driver.
        driver: &'static str,
        /// Options that change what the node is (raw's `offset` and `size`).
        strong: Map<String, Value>,
        /// Whether the format has backing files (qcow2).
        backed: bool,
        /// The backing file name the node was opened with (QEMU's `auto_backing_file`): the
        /// opened backing node's name when it came from the header, else the header's text.
        auto_backing: Option<String>,
    },
    /// A `throttle` filter: named by its options, its group's name among them (QEMU's filters
    /// cannot be reopened from a file name).
    Throttle {
        /// The `throttle-group`.
        group: String,
    },
    /// A filter shown under its first child's name, with its children under their keys.
    Filter {
        /// The driver.
        driver: &'static str,
        /// Each child's key and edge role.
        children: Vec<(&'static str, ChildRole)>,
    },
}

impl NameRecipe {
    /// The node's naming now, given how to name each of its children.
    pub fn resolve(
        &self,
        node: &BlockNode,
        name_of: &dyn Fn(&BlockNode) -> NodeFileName,
    ) -> NodeFileName {
        let child = |role| node.child(role).map(|c| name_of(&c.node()));
        match self {
            NameRecipe::Fixed(naming) => naming.clone(),
            NameRecipe::Blkdebug { rules, has_rules } => {
                let image = child(ChildRole::Filtered).unwrap_or_default();
                // QEMU's order of insertion: the driver, the options, then the children.
                let mut options = Map::new();
                options.insert("driver".into(), json!("blkdebug"));
                options.extend(rules.clone());
                options.insert("image".into(), Value::Object(image.options.clone()));
                let exact = match (&image.exact, has_rules) {
                    (Some(name), false) => Some(format!("blkdebug::{name}")),
                    _ => None,
                };
                NodeFileName::protocol(exact, options)
            }
            NameRecipe::Format {
                driver,
                strong,
                backed,
                auto_backing,
            } => {
                let file = child(ChildRole::File).unwrap_or_default();
                let mut options = Map::new();
                options.insert("driver".into(), json!(driver));
                options.extend(strong.clone());
                options.insert("file".into(), Value::Object(file.options.clone()));
                // A backing file other than the one it was opened with, or none where one
                // was named, is part of what the node is.
                let backing = if *backed {
                    child(ChildRole::Backing)
                } else {
                    None
                };
                let overridden = match &backing {
                    Some(b) => auto_backing.as_deref() != Some(b.shown().as_str()),
                    None => *backed && auto_backing.is_some(),
                };
                if overridden {
                    let value = backing.map_or(Value::Null, |b| Value::Object(b.options));
                    options.insert("backing".into(), value);
                }
                NodeFileName::format(&file, options, overridden || !strong.is_empty())
            }
            NameRecipe::Throttle { group } => {
                let file = child(ChildRole::Filtered).unwrap_or_default();
                let mut options = Map::new();
                options.insert("driver".into(), json!("throttle"));
                options.insert("throttle-group".into(), json!(group));
                options.insert("file".into(), Value::Object(file.options));
                NodeFileName {
                    exact: None,
                    options,
                    protocol: false,
                }
            }
            NameRecipe::Filter { driver, children } => {
                let mut options = Map::new();
                options.insert("driver".into(), json!(driver));
                let mut shown = None;
                for (key, role) in children {
                    let naming = child(*role).unwrap_or_default();
                    shown.get_or_insert_with(|| naming.shown());
                    options.insert((*key).into(), Value::Object(naming.options));
                }
                NodeFileName::filter(shown.unwrap_or_default(), options)
            }
        }
    }
}

/// QEMU's dictionary bucket of a key (its `tdb_hash`, modulo its 512 buckets).
fn bucket(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &byte) in key.as_bytes().iter().enumerate() {
        value = value.wrapping_add(u32::from(byte) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// `options` as QEMU prints a dictionary: keys in bucket order (keys sharing a bucket newest
/// first: the last one inserted comes first), `", "` and `": "` between items, non-ASCII
/// characters as `\uXXXX`.
pub fn options_json(options: &Map<String, Value>) -> String {
    let mut out = String::new();
    write_object(&mut out, options);
    out
}

fn write_object(out: &mut String, m: &Map<String, Value>) {
    let mut keys: Vec<(usize, &String)> = m.keys().enumerate().collect();
    keys.sort_by_key(|&(i, k)| (bucket(k), std::cmp::Reverse(i)));
    let keys: Vec<&String> = keys.into_iter().map(|(_, k)| k).collect();
    out.push('{');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_str(out, k);
        out.push_str(": ");
        write_value(out, &m[k.as_str()]);
    }
    out.push('}');
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Object(m) => write_object(out, m),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::String(s) => write_str(out, s),
        other => out.push_str(&other.to_string()),
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (' '..'\u{7f}').contains(&c) => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("an object"),
        }
    }

    #[test]
    fn keys_come_out_in_qemus_order() {
        // Recorded on qemu-storage-daemon 10.0.2.
        let file = map(json!({"driver": "file", "filename": "./a.raw"}));
        // Inserted as QEMU inserts them: the driver, the rules as it keeps them, the child.
        let rules = map(json!({
            "driver": "blkdebug",
            "inject-error.0.once": true,
            "inject-error.0.sector": 8,
            "inject-error.0.errno": 5,
            "inject-error.0.iotype": "write",
            "inject-error.0.event": "write_aio",
            "image": file,
        }));
        assert_eq!(
            options_json(&rules),
            r#"{"inject-error.0.once": true, "image": {"driver": "file", "filename": "./a.raw"}, "driver": "blkdebug", "inject-error.0.iotype": "write", "inject-error.0.event": "write_aio", "inject-error.0.errno": 5, "inject-error.0.sector": 8}"#
        );
        let raw = map(json!({
            "driver": "raw",
            "offset": 0,
            "file": {"driver": "file", "filename": "d é/b.raw"},
        }));
        assert_eq!(
            options_json(&raw),
            r#"{"offset": 0, "driver": "raw", "file": {"driver": "file", "filename": "d \u00E9/b.raw"}}"#
        );
        let qcow2 = map(
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": "ov.qcow2"}, "backing": null}),
        );
        assert_eq!(
            options_json(&qcow2),
            r#"{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "ov.qcow2"}}"#
        );
    }

    #[test]
    fn a_format_borrows_only_a_protocol_nodes_plain_name() {
        let file = NodeFileName::protocol(Some("a.qcow2".into()), Map::new());
        assert_eq!(
            NodeFileName::format(&file, Map::new(), false).shown(),
            "a.qcow2"
        );
        let strong = NodeFileName::format(&file, map(json!({"driver": "raw", "size": 1})), true);
        assert_eq!(strong.shown(), r#"json:{"driver": "raw", "size": 1}"#);
        let over_format = NodeFileName::format(
            &NodeFileName::format(&file, Map::new(), false),
            map(json!({"driver": "raw"})),
            false,
        );
        assert_eq!(over_format.shown(), r#"json:{"driver": "raw"}"#);
    }
}
