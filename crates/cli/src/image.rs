//! Offline image commands: info, create, map, copy.

use std::path::Path;
use std::sync::Arc;

use block::map::map_range;
use block::{BlockError, BlockNode, ChildRole, Result};
use drivers::file::FileDriver;
use drivers::qcow2::{self, CompressionType, CreateOptions, Preallocation};
use drivers::{open_image, Format, OpenOptions};
use serde_json::{json, Map, Value};

/// `info` as JSON, shaped like `qemu-img info --output=json`.
pub fn info_json(node: &Arc<BlockNode>) -> Value {
    let info = node.image_info();
    let mut v = Map::new();
    v.insert("virtual-size".into(), json!(node.len()));
    v.insert("filename".into(), json!(node.name()));
    v.insert("format".into(), json!(info.format));
    if let Some(cs) = node.facts().cluster_size {
        v.insert("cluster-size".into(), json!(cs));
    }
    if let Ok(m) = std::fs::metadata(node.name()) {
        use std::os::unix::fs::MetadataExt;
        v.insert("actual-size".into(), json!(m.blocks() * 512));
    }
    if let Some(b) = &info.backing_file {
        v.insert("backing-filename".into(), json!(b));
        let full = drivers::open::resolve_backing(Path::new(node.name()), b);
        v.insert(
            "full-backing-filename".into(),
            json!(full.display().to_string()),
        );
    }
    if let Some(f) = &info.backing_format {
        v.insert("backing-filename-format".into(), json!(f));
    }
    if !info.specific.is_empty() {
        let data: Map<String, Value> = info
            .specific
            .iter()
            .map(|(k, val)| ((*k).to_owned(), daemon::info::info_value(val)))
            .collect();
        v.insert(
            "format-specific".into(),
            json!({"type": info.format, "data": data}),
        );
    }
    v.insert("dirty-flag".into(), json!(info.dirty));
    Value::Object(v)
}

/// `info` for humans, like `qemu-img info`.
pub fn info_text(node: &Arc<BlockNode>) -> String {
    let j = info_json(node);
    let mut out = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\n",
        node.name(),
        j["format"].as_str().unwrap_or("?"),
        human(node.len()),
        node.len()
    );
    if let Some(a) = j["actual-size"].as_u64() {
        out += &format!("disk size: {}\n", human(a));
    }
    if let Some(cs) = j["cluster-size"].as_u64() {
        out += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = j["backing-filename"].as_str() {
        out += &format!("backing file: {b}\n");
    }
    if let Some(f) = j["backing-filename-format"].as_str() {
        out += &format!("backing file format: {f}\n");
    }
    if let Some(data) = j["format-specific"]["data"].as_object() {
        out += "Format specific information:\n";
        for (k, v) in data {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            out += &format!("    {}: {v}\n", k.replace('-', " "));
        }
    }
    out
}

/// Sizes the way qemu-img prints them.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000", "")
    }
}

/// Parses sizes like `1G`, `512M`, `64k`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                _ => return Err(BlockError::invalid(format!("Invalid size '{s}'"))),
            };
            (&s[..i], mul)
        }
        _ => (s, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| BlockError::invalid(format!("Invalid size '{s}'")))?;
    if n < 0.0 || !n.is_finite() {
        return Err(BlockError::invalid(format!("Invalid size '{s}'")));
    }
    Ok((n * mul as f64) as u64)
}

/// Creation options from `-o key=value,...` (qemu-img's names).
pub fn qcow2_options(size: u64, opts: &[String]) -> Result<CreateOptions> {
    let mut c = CreateOptions::new(size);
    for kv in opts.iter().flat_map(|o| o.split(',')) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| BlockError::invalid(format!("Invalid option '{kv}'")))?;
        match k {
            "cluster_size" => c.cluster_size = parse_size(v)?,
            "refcount_bits" => {
                c.refcount_bits = v
                    .parse()
                    .map_err(|_| BlockError::invalid(format!("Invalid refcount_bits '{v}'")))?
            }
            "compat" => {
                c.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(BlockError::invalid(format!("Invalid compat '{v}'"))),
                }
            }
            "preallocation" => {
                c.preallocation = match v {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    _ => {
                        return Err(BlockError::unsupported(format!(
                            "Unsupported preallocation mode '{v}'"
                        )))
                    }
                }
            }
            "compression_type" => {
                c.compression = match v {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => {
                        return Err(BlockError::invalid(format!(
                            "Invalid compression_type '{v}'"
                        )))
                    }
                }
            }
            "lazy_refcounts" => c.lazy_refcounts = v == "on",
            other => return Err(BlockError::invalid(format!("Invalid parameter '{other}'"))),
        }
    }
    Ok(c)
}

/// Creates an image of `format`.
pub async fn create(
    path: &Path,
    format: Format,
    size: u64,
    qcow2_opts: Option<CreateOptions>,
) -> Result<()> {
    match format {
        Format::Raw => FileDriver::create(path, size),
        Format::Qcow2 => {
            FileDriver::create(path, 0)?;
            let file = FileDriver::open(drivers::file::FileOptions::new(path))?;
            let node = BlockNode::new(path.display().to_string(), Arc::new(file));
            let child = block::Child::new(ChildRole::File, node.clone());
            let opts = qcow2_opts.unwrap_or_else(|| CreateOptions::new(size));
            let r = qcow2::create(&child, &opts).await;
            node.close().await?;
            r
        }
    }
}

/// `map --output=json`, same ranges and fields as qemu-img.
pub async fn map_json(node: &Arc<BlockNode>) -> Result<String> {
    let entries = map_range(node, 0, node.len()).await?;
    let lines: Vec<String> = entries
        .iter()
        .map(|e| {
            let mut s = format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            );
            if let Some(o) = e.offset {
                s += &format!(", \"offset\": {o}");
            }
            s + "}"
        })
        .collect();
    Ok(format!("[{}]", lines.join(",\n")))
}

/// `map` for humans: the data extents and where they live.
pub async fn map_text(node: &Arc<BlockNode>) -> Result<String> {
    let entries = map_range(node, 0, node.len()).await?;
    let mut out = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    for e in entries.iter().filter(|e| e.data && e.present) {
        let mapped = e
            .offset
            .map_or_else(|| "-".to_owned(), |o| format!("{o:#x}"));
        out += &format!(
            "{:<16}{:<16}{:<16}depth {}\n",
            format!("{:#x}", e.start),
            format!("{:#x}", e.length),
            mapped,
            e.depth
        );
    }
    Ok(out)
}

/// Opens an image for the offline commands.
pub async fn open(
    path: &Path,
    format: Option<&str>,
    read_only: bool,
    cache: Cache,
) -> Result<Arc<BlockNode>> {
    let format = format.map(Format::parse).transpose()?;
    open_image(
        path,
        format,
        &OpenOptions {
            read_only,
            direct: cache.direct,
            no_flush: cache.no_flush,
            no_backing: false,
            io: drivers::file::IoTuning::default(),
        },
    )
    .await
}

/// A QEMU cache mode (`-t`), as its two switches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cache {
    /// O_DIRECT.
    pub direct: bool,
    /// Flushes are ignored.
    pub no_flush: bool,
}

impl Cache {
    /// Parses a cache mode: `writeback` (default), `none` (O_DIRECT) or `unsafe` (no flushes).
    pub fn parse(mode: &str) -> Result<Cache> {
        match mode {
            "writeback" => Ok(Cache::default()),
            "none" => Ok(Cache {
                direct: true,
                no_flush: false,
            }),
            "unsafe" => Ok(Cache {
                direct: false,
                no_flush: true,
            }),
            "writethrough" | "directsync" => Err(BlockError::unsupported(format!(
                "cache mode '{mode}' is not supported yet (use writeback, none or unsafe)"
            ))),
            other => Err(BlockError::invalid(format!(
                "Invalid cache option: {other}"
            ))),
        }
    }
}
