//! The factory: opens an image file with its format driver and its backing chain.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use block::{BlockError, BlockNode, Child, ChildRole, Result};

use crate::file::{FileDriver, FileOptions};
use crate::qcow2::{self, Qcow2Driver};
use crate::raw::RawDriver;

/// Image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Raw bytes.
    Raw,
    /// qcow2.
    Qcow2,
}

impl Format {
    /// Parses a format name.
    pub fn parse(name: &str) -> Result<Format> {
        match name {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(BlockError::unsupported(format!("Unknown driver '{other}'"))),
        }
    }

    /// The format name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// How to open an image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open read-only (backing files always are).
    pub read_only: bool,
    /// O_DIRECT on every file of the chain.
    pub direct: bool,
    /// Ignore flushes (cache=unsafe).
    pub no_flush: bool,
    /// Do not open the backing file.
    pub no_backing: bool,
    /// How the files do host I/O.
    pub io: crate::file::IoTuning,
}

/// Longest backing chain we follow.
const MAX_CHAIN: usize = 64;

/// Detects the format from the first bytes of the file.
pub async fn probe_format(file: &Child) -> Result<Format> {
    let len = file.node().len().min(4);
    let head = file.read(0, len as usize).await?;
    Ok(if head.as_ref() == qcow2::header::MAGIC.to_be_bytes() {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Opens `path` as `format` (probed when `None`), with its backing chain.
pub async fn open_image(
    path: &Path,
    format: Option<Format>,
    opts: &OpenOptions,
) -> Result<Arc<BlockNode>> {
    let mut seen = Vec::new();
    open_layer(path, format, opts, !opts.read_only, &mut seen).await
}

async fn open_layer(
    path: &Path,
    format: Option<Format>,
    opts: &OpenOptions,
    writable: bool,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<BlockNode>> {
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| BlockError::io(format!("Could not open '{}'", path.display()), e))?;
    if seen.contains(&canonical) {
        return Err(BlockError::invalid(format!(
            "Backing file '{}' forms a loop in the backing chain",
            path.display()
        )));
    }
    if seen.len() >= MAX_CHAIN {
        return Err(BlockError::invalid(format!(
            "Backing chain is longer than {MAX_CHAIN} images"
        )));
    }
    seen.push(canonical);
    let file_opts = FileOptions {
        filename: path.to_path_buf(),
        read_only: !writable,
        direct: opts.direct,
        no_flush: opts.no_flush,
        locking: true,
        aio: None,
        io: opts.io,
    };
    let file_node = BlockNode::new(
        format!("{}#file", path.display()),
        Arc::new(FileDriver::open(file_opts)?),
    );
    let file = Child::new(ChildRole::File, file_node);
    let format = match format {
        Some(f) => f,
        None => probe_format(&file).await?,
    };
    let name = path.display().to_string();
    let driver: Arc<dyn block::BlockDriver> = match format {
        Format::Raw => Arc::new(RawDriver::new(file, 0, None, writable)?),
        Format::Qcow2 => {
            let header = qcow2::read_header(&file)
                .await
                .map_err(|e| e.within(&name))?;
            let backing = match (&header.backing_file, opts.no_backing) {
                (Some(b), false) => {
                    let bpath = resolve_backing(path, b);
                    let bfmt = header
                        .backing_format
                        .as_deref()
                        .map(Format::parse)
                        .transpose()?;
                    let node = Box::pin(open_layer(&bpath, bfmt, opts, false, seen))
                        .await
                        .map_err(|e| {
                            e.within(format!("Could not open backing file of '{name}'"))
                        })?;
                    Some(Child::new(ChildRole::Backing, node))
                }
                _ => None,
            };
            Arc::new(
                Qcow2Driver::open(file, writable, backing)
                    .await
                    .map_err(|e| e.within(&name))?,
            )
        }
    };
    Ok(BlockNode::new(name, driver))
}

/// A relative backing file name is relative to the directory of the image naming it.
pub fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    image
        .parent()
        .map_or_else(|| b.to_path_buf(), |dir| dir.join(b))
}
