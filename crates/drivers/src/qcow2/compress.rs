//! Compressed clusters: raw deflate with a 4 KiB window (what QEMU reads with
//! `inflateInit2(-12)`), or zstd frames.

use block::{BlockError, Result};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::header::CompressionType;

/// Compresses one cluster. `None` when the result would not save at least one sector.
pub fn compress(kind: CompressionType, data: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = data.len().saturating_sub(512);
    let out = match kind {
        CompressionType::Zlib => {
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = Vec::with_capacity(data.len());
            let status = c
                .compress_vec(data, &mut out, FlushCompress::Finish)
                .map_err(|e| BlockError::invalid(format!("deflate failed: {e}")))?;
            if status != Status::StreamEnd {
                return Ok(None);
            }
            out
        }
        CompressionType::Zstd => zstd::bulk::compress(data, 0)
            .map_err(|e| BlockError::invalid(format!("zstd compression failed: {e}")))?,
    };
    Ok((out.len() <= limit && !out.is_empty()).then_some(out))
}

/// Decompresses `src` (which may carry trailing bytes of the last sector) into `out`, which must
/// be filled exactly.
pub fn decompress(kind: CompressionType, src: &[u8], out: &mut [u8]) -> Result<()> {
    let short = || BlockError::corrupt("compressed cluster does not decompress to a full cluster");
    match kind {
        CompressionType::Zlib => {
            let mut d = Decompress::new(false);
            let r = d.decompress(src, out, FlushDecompress::Finish);
            match r {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => Err(short()),
                Err(e) => Err(BlockError::corrupt(format!("compressed cluster: {e}"))),
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|e| BlockError::corrupt(format!("zstd: {e}")))?;
            let mut input = InBuffer::around(src);
            let mut output = OutBuffer::around(out);
            while output.pos() < output.capacity() {
                let before = (input.pos(), output.pos());
                dec.run(&mut input, &mut output)
                    .map_err(|e| BlockError::corrupt(format!("compressed cluster: zstd: {e}")))?;
                if (input.pos(), output.pos()) == before {
                    return Err(short());
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_kinds() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 300) as u8;
        }
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &data)
                .expect("compress")
                .expect("compressible");
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xAA; 100]);
            let mut out = vec![0u8; 65536];
            decompress(kind, &padded, &mut out).expect("decompress");
            assert_eq!(out, data);
            assert!(decompress(kind, &c[..c.len() / 2], &mut out).is_err());
        }
    }

    #[test]
    fn incompressible_is_none() {
        let mut x = 0x1234_5678u32;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &data)
            .expect("compress")
            .is_none());
    }
}
