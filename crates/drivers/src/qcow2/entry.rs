//! L1 and L2 entries, decoded into what they mean.

use block::{BlockError, Result};

/// Offset bits of L1 entries and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one: the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Compressed cluster descriptor.
pub const COMPRESSED: u64 = 1 << 62;
/// Reads as zero (v3).
pub const ZERO: u64 = 1;

/// Where a guest cluster's content comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: backing file, or zeroes.
    Unallocated,
    /// Reads as zero; `host` is a preallocated cluster, if any.
    Zero { host: Option<u64>, copied: bool },
    /// Data at `host`; `copied` when the refcount is exactly one.
    Normal { host: u64, copied: bool },
    /// Compressed data of `size` bytes at byte offset `host`.
    Compressed { host: u64, size: u64 },
}

impl Mapping {
    /// Decodes an L2 entry. `file_len` rounds up to the cluster: data must start in the file.
    pub fn decode(entry: u64, cluster_bits: u32, file_len: u64) -> Result<Mapping> {
        let cs = 1u64 << cluster_bits;
        let file_end = file_len.div_ceil(cs) * cs;
        if entry & COMPRESSED != 0 {
            let x = 62 - (cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
            let size = sectors * 512 - (host & 511);
            if host >= file_end {
                return Err(BlockError::corrupt(format!(
                    "compressed cluster at {host:#x} is outside the file ({file_len} bytes)"
                )));
            }
            return Ok(Mapping::Compressed { host, size });
        }
        let host = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        if host % cs != 0 {
            return Err(BlockError::corrupt(format!(
                "cluster offset {host:#x} is not cluster aligned"
            )));
        }
        if host != 0 && host >= file_end {
            return Err(BlockError::corrupt(format!(
                "cluster at {host:#x} is outside the file ({file_len} bytes)"
            )));
        }
        if entry & ZERO != 0 {
            return Ok(Mapping::Zero {
                host: (host != 0).then_some(host),
                copied,
            });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Normal { host, copied })
    }

    /// Host clusters this mapping holds a reference to: (first byte, byte length).
    pub fn host_range(&self, cluster_size: u64) -> Option<(u64, u64)> {
        match *self {
            Mapping::Normal { host, .. }
            | Mapping::Zero {
                host: Some(host), ..
            } => Some((host, cluster_size)),
            Mapping::Compressed { host, size } => Some((host, size)),
            _ => None,
        }
    }
}

/// Encodes a compressed descriptor.
pub fn compressed_entry(host: u64, size: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let sectors = ((host & 511) + size).div_ceil(512);
    COMPRESSED | ((sectors - 1) << x) | host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_round_trip() {
        for bits in [9u32, 16, 21] {
            let want = 3000.min((1u64 << bits) - 100);
            let e = compressed_entry(0x12345, want, bits);
            match Mapping::decode(e, bits, 1 << 40).expect("decode") {
                Mapping::Compressed { host, size } => {
                    assert_eq!(host, 0x12345);
                    assert!((want..want + 512).contains(&size));
                }
                m => panic!("decoded {m:?}"),
            }
        }
    }

    #[test]
    fn rejects_outside_and_unaligned() {
        assert!(Mapping::decode(COPIED | 0x20000, 16, 0x10000).is_err());
        assert!(Mapping::decode(COPIED | 0x10200, 16, 1 << 30).is_err());
        assert_eq!(
            Mapping::decode(ZERO, 16, 0).expect("zero"),
            Mapping::Zero {
                host: None,
                copied: false
            }
        );
    }
}
