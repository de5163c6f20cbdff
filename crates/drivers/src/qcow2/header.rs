//! The qcow2 header and its extensions (docs/interop/qcow2.txt, "Header" and "Header
//! extensions"): parsed with every offset and size checked against the file, serialised back
//! with unknown extensions preserved.

use block::{BlockError, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: u32 = 104;
/// Our v3 header length: includes the compression type byte, padded to 8.
pub const V3_HEADER_LEN_WITH_COMPRESSION: u32 = 112;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// The bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts): repair before writing.
    pub const DIRTY: u64 = 1 << 0;
    /// The image was found corrupt: read-only use only.
    pub const CORRUPT: u64 = 1 << 1;
    /// Data lives in an external file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type field is not zlib.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended L2 entries (subclusters).
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Bits we know.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is raw.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Compression of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate, 4 KiB window (QEMU's default).
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A header extension we keep but do not interpret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawExtension {
    /// Extension type.
    pub kind: u32,
    /// Its payload.
    pub data: Vec<u8>,
}

/// The parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: CompressionType,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Feature name table entries: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Extensions kept verbatim (bitmaps, unknown ones).
    pub other_extensions: Vec<RawExtension>,
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn corrupt(what: impl Into<String>) -> BlockError {
    BlockError::corrupt(format!("qcow2 header: {}", what.into()))
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// L2 entries per table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let l2_span = 1u64 << (cluster_bits * 2 - 3);
        size.div_ceil(l2_span)
    }

    /// Parses cluster 0 (`buf` holds at least the first cluster or the whole file if shorter).
    /// `file_len` bounds every offset.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN {
            return Err(corrupt(format!("file is too short ({} bytes)", buf.len())));
        }
        if be32(buf, 0) != MAGIC {
            return Err(BlockError::invalid("Image is not in qcow2 format"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(BlockError::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(corrupt("v3 header is truncated"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN || h.header_length as u64 > h.cluster_size() {
                return Err(corrupt(format!(
                    "invalid header length {}",
                    h.header_length
                )));
            }
            if h.header_length > V3_HEADER_LEN && buf.len() > 104 {
                h.compression = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    n => {
                        return Err(BlockError::unsupported(format!(
                            "Unknown compression type {n}"
                        )))
                    }
                };
            }
        }
        h.validate(file_len)?;
        h.parse_extensions(buf)?;
        h.parse_backing_name(buf)?;
        Ok(h)
    }

    fn validate(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount order {} is too big",
                self.refcount_order
            )));
        }
        if self.crypt_method != 0 {
            return Err(BlockError::unsupported(
                "encrypted qcow2 images are not supported",
            ));
        }
        if self.size > (1u64 << 62) {
            return Err(corrupt(format!("image size {} is too big", self.size)));
        }
        let l1_needed = Self::l1_entries_for(self.size, self.cluster_bits);
        if u64::from(self.l1_size) < l1_needed {
            return Err(corrupt(format!(
                "L1 table is too small ({} < {l1_needed} entries)",
                self.l1_size
            )));
        }
        if u64::from(self.l1_size) > (32 << 20) / 8 * 8 {
            return Err(corrupt(format!("L1 size {} is too big", self.l1_size)));
        }
        let check_table = |what: &str, off: u64, bytes: u64| -> Result<()> {
            if off % cs != 0 {
                return Err(corrupt(format!(
                    "{what} offset {off:#x} is not cluster aligned"
                )));
            }
            if bytes > 0
                && off
                    .checked_add(bytes)
                    .is_none_or(|end| end > file_len.max(cs))
            {
                return Err(corrupt(format!(
                    "{what} at {off:#x} ({bytes} bytes) is outside the file ({file_len} bytes)"
                )));
            }
            Ok(())
        };
        check_table(
            "L1 table",
            self.l1_table_offset,
            u64::from(self.l1_size) * 8,
        )?;
        if self.refcount_table_clusters == 0 {
            return Err(corrupt("no refcount table"));
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters) * cs,
        )?;
        if self.refcount_table_offset == 0 {
            return Err(corrupt("refcount table at offset 0"));
        }
        if self.nb_snapshots > 65536 {
            return Err(corrupt(format!(
                "too many snapshots ({})",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0 {
            check_table("snapshot table", self.snapshots_offset, 1)?;
        }
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let start = self.header_length as usize;
        let end = if self.backing_file_offset > 0 && (self.backing_file_offset as usize) > start {
            (self.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len().min(self.cluster_size() as usize)
        };
        let mut at = start;
        while at + 8 <= end {
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                break;
            }
            if at + len > end {
                return Err(corrupt(format!(
                    "header extension {kind:#x} overruns the header cluster"
                )));
            }
            let data = &buf[at..at + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_end = e[2..].iter().position(|&b| b == 0).map_or(48, |p| p + 2);
                        let name = String::from_utf8_lossy(&e[2..name_end]).into_owned();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                EXT_CRYPTO => {
                    return Err(BlockError::unsupported(
                        "encrypted qcow2 images are not supported",
                    ));
                }
                _ => self.other_extensions.push(RawExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            at += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let (off, len) = (
            self.backing_file_offset as usize,
            self.backing_file_size as usize,
        );
        if len > 1023 {
            return Err(corrupt(format!(
                "backing file name is too long ({len} bytes)"
            )));
        }
        if off.checked_add(len).is_none_or(|e| e > buf.len()) {
            return Err(corrupt("backing file name is outside the header cluster"));
        }
        self.backing_file = Some(String::from_utf8_lossy(&buf[off..off + len]).into_owned());
        Ok(())
    }

    /// Names of the set incompatible bits this implementation does not know.
    pub fn unknown_incompatible(&self) -> Vec<String> {
        let unknown = self.incompatible & !incompat::KNOWN;
        (0..64)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| {
                self.feature_names
                    .iter()
                    .find(|(t, bit, _)| *t == 0 && u32::from(*bit) == b)
                    .map_or_else(
                        || format!("Unknown incompatible feature: bit {b}"),
                        |(_, _, n)| n.clone(),
                    )
            })
            .collect()
    }

    /// True when an extension of `kind` is present.
    pub fn has_extension(&self, kind: u32) -> bool {
        self.other_extensions.iter().any(|e| e.kind == kind)
    }

    /// Serialises the header, extensions and backing file name into one cluster. The feature
    /// name table is left out for clusters of 4 KiB and less, as QEMU leaves it out (it would
    /// crowd out a backing file name), and when it does not fit.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        if self.cluster_size() <= 4096 {
            return self.serialize_with(false);
        }
        self.serialize_with(true)
            .or_else(|_| self.serialize_with(false))
    }

    fn serialize_with(&self, with_feature_table: bool) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut at = if self.version == 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            let hl = self.header_length.max(V3_HEADER_LEN_WITH_COMPRESSION);
            put32(&mut b, 100, hl);
            b[104] = match self.compression {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            };
            hl as usize
        } else {
            V2_HEADER_LEN
        };
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(fmt) = &self.backing_format {
            exts.push((EXT_BACKING_FORMAT, fmt.as_bytes().to_vec()));
        }
        if self.version == 3 && with_feature_table {
            exts.push((EXT_FEATURE_TABLE, feature_table()));
        }
        exts.extend(
            self.other_extensions
                .iter()
                .map(|e| (e.kind, e.data.clone())),
        );
        for (kind, data) in exts {
            let padded = data.len().div_ceil(8) * 8;
            if at + 8 + padded + 8 > cs {
                return Err(BlockError::invalid(
                    "header extensions do not fit in the header cluster",
                ));
            }
            put32(&mut b, at, kind);
            put32(&mut b, at + 4, data.len() as u32);
            b[at + 8..at + 8 + data.len()].copy_from_slice(&data);
            at += 8 + padded;
        }
        at += 8; // end-of-extensions marker (zeroes)
        if let Some(name) = &self.backing_file {
            if at + name.len() > cs || name.len() > 1023 {
                return Err(BlockError::invalid(
                    "backing file name does not fit in the header cluster",
                ));
            }
            b[at..at + name.len()].copy_from_slice(name.as_bytes());
            put64(&mut b, 8, at as u64);
            put32(&mut b, 16, name.len() as u32);
        }
        Ok(b)
    }
}

/// The feature name table QEMU writes (type, bit, name), so tools can name our bits.
fn feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut out = Vec::new();
    for (t, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = t;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&e);
    }
    out
}
