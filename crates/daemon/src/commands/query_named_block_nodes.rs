//! `query-named-block-nodes [flat]`: every node, newest first; without `flat`, each image's
//! backing chain nests in `backing-image`.

use qmp::{QmpResult, Schema};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::decode;
use crate::control::Control;
use crate::info::block_device_info;

/// The arguments.
#[derive(Debug, Deserialize)]
struct Args {
    flat: Option<bool>,
}

/// Runs the query.
pub fn run(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let Args { flat } = decode(args)?;
    let flat = flat.unwrap_or(false);
    Ok(Value::Array(
        ctl.nodes
            .newest_first()
            .into_iter()
            .map(|(_, entry)| block_device_info(&ctl.nodes, entry, flat))
            .collect(),
    ))
}

/// The schema of `query-named-block-nodes` and of the node information `query-block` shares.
pub(crate) fn schema(s: &mut Schema) {
    s.object(
        "BlockdevCacheInfo",
        &["writeback:bool", "direct:bool", "no-flush:bool"],
    )
    .object(
        "ImageInfo",
        &[
            "filename:str",
            "format:str",
            "*dirty-flag:bool",
            "*actual-size:int",
            "virtual-size:int",
            "*cluster-size:int",
            "*backing-filename:str",
            "*full-backing-filename:str",
            "*backing-filename-format:str",
            "*backing-image:ImageInfo",
            "*format-specific:any",
        ],
    )
    .object(
        "BlockDeviceInfo",
        &[
            "file:str",
            "*node-name:str",
            "ro:bool",
            "drv:str",
            "*backing_file:str",
            "backing_file_depth:int",
            "active:bool",
            "encrypted:bool",
            "detect_zeroes:BlockdevDetectZeroesOptions",
            "bps:int",
            "bps_rd:int",
            "bps_wr:int",
            "iops:int",
            "iops_rd:int",
            "iops_wr:int",
            "image:ImageInfo",
            "cache:BlockdevCacheInfo",
            "write_threshold:int",
            "*dirty-bitmaps:[BlockDirtyInfo]",
        ],
    )
    .object("QueryNamedBlockNodesArgs", &["*flat:bool"])
    .object(
        "BlockInfo",
        &[
            "device:str",
            "*qdev:str",
            "type:str",
            "removable:bool",
            "locked:bool",
            "*inserted:BlockDeviceInfo",
        ],
    );
    s.command(
        "query-named-block-nodes",
        Some("QueryNamedBlockNodesArgs"),
        Some("[BlockDeviceInfo]"),
        &[],
    );
}
