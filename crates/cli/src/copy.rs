//! Offline copy of an image into a new one, keeping sparseness: zero and unallocated ranges of
//! the source (resolved through its backing chain) are neither read nor written, and data
//! chunks that turn out to be all zero are skipped too. N workers copy chunks in parallel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::map::extent_at;
use block::{BlockError, BlockNode, IoVec, Result, WriteFlags};
use bytes::BytesMut;

/// Largest chunk one worker copies at once (qemu-img convert uses 2 MiB too).
const CHUNK: u64 = 2 << 20;

/// Copy settings.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Parallel workers.
    pub workers: usize,
    /// Write whole clusters compressed (qcow2 targets).
    pub compress: bool,
    /// Show progress on stderr.
    pub progress: bool,
}

/// What a copy did.
#[derive(Clone, Debug, Default)]
pub struct CopyStats {
    /// Bytes read from the source and written.
    pub copied: u64,
    /// Bytes skipped because they read as zero.
    pub skipped: u64,
    /// Wall time.
    pub elapsed: Duration,
}

struct Cursor {
    next: u64,
    pending: Vec<(u64, u64)>,
}

/// Copies all of `src` into `dst` (same size, freshly created: reads as zero).
pub async fn copy(
    src: Arc<BlockNode>,
    dst: Arc<BlockNode>,
    opts: &CopyOptions,
) -> Result<CopyStats> {
    let size = src.len();
    if dst.len() < size {
        return Err(BlockError::invalid("target is smaller than the source"));
    }
    let granule = match (opts.compress, dst.facts().cluster_size) {
        (true, Some(cs)) => u64::from(cs),
        (true, None) => {
            return Err(BlockError::unsupported(
                "the target format has no compressed clusters",
            ))
        }
        _ => 1,
    };
    let start = Instant::now();
    let cursor = Arc::new(Mutex::new(Cursor {
        next: 0,
        pending: Vec::new(),
    }));
    let copied = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..opts.workers.max(1) {
        let (src, dst, cursor) = (src.clone(), dst.clone(), cursor.clone());
        let (copied, skipped, compress) = (copied.clone(), skipped.clone(), opts.compress);
        tasks.push(tokio::spawn(async move {
            // One buffer per worker, reused: no allocation or zeroing per chunk.
            let mut buf = BytesMut::new();
            while let Some((off, len)) = next_chunk(&src, &cursor, size, granule, &skipped).await? {
                buf.resize(len as usize, 0);
                let data = src.read_into(off, buf).await?.freeze();
                if block::buf::is_zero(&data) {
                    skipped.fetch_add(len, Ordering::Relaxed);
                } else {
                    if compress {
                        write_compressed(&dst, off, data.clone(), granule).await?;
                    } else {
                        dst.write(off, IoVec::from(data.clone()), WriteFlags::default())
                            .await?;
                    }
                    copied.fetch_add(len, Ordering::Relaxed);
                }
                // The write is done with the buffer; take it back unless someone kept a view.
                buf = data.try_into_mut().unwrap_or_default();
            }
            Ok::<(), BlockError>(())
        }));
    }
    let progress = opts.progress.then(|| {
        let (copied, skipped) = (copied.clone(), skipped.clone());
        tokio::spawn(async move {
            loop {
                let done = copied.load(Ordering::Relaxed) + skipped.load(Ordering::Relaxed);
                eprint!(
                    "\r    ({:.2}/100%)",
                    done as f64 * 100.0 / size.max(1) as f64
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let mut first_err = None;
    for t in tasks {
        let r = t
            .await
            .map_err(|e| BlockError::invalid(format!("copy worker failed: {e}")))?;
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    if let Some(p) = progress {
        p.abort();
        eprintln!("\r    (100.00/100%)");
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    dst.flush().await?;
    Ok(CopyStats {
        copied: copied.load(Ordering::Relaxed),
        skipped: skipped.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

/// The next data chunk to copy; zero ranges found on the way are counted and skipped.
async fn next_chunk(
    src: &Arc<BlockNode>,
    cursor: &Mutex<Cursor>,
    size: u64,
    granule: u64,
    skipped: &AtomicU64,
) -> Result<Option<(u64, u64)>> {
    loop {
        let at = {
            let mut c = cursor.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(chunk) = c.pending.pop() {
                return Ok(Some(chunk));
            }
            if c.next >= size {
                return Ok(None);
            }
            c.next
        };
        let want = (size - at).min(64 * CHUNK);
        let e = extent_at(src, at, want).await?;
        let mut len = e.length;
        if granule > 1 {
            // Compressed copies go whole cluster by whole cluster.
            len = ((at + len).div_ceil(granule) * granule).min(size) - at;
        }
        let mut c = cursor.lock().unwrap_or_else(|p| p.into_inner());
        if c.next != at {
            continue; // another worker moved on meanwhile
        }
        c.next = at + len;
        if e.zero && granule == 1 {
            skipped.fetch_add(len, Ordering::Relaxed);
            continue;
        }
        let mut off = at + len;
        while off > at {
            let start = if (off - at) % CHUNK == 0 {
                off - CHUNK
            } else {
                off - (off - at) % CHUNK
            };
            c.pending.push((start, off - start));
            off = start;
        }
        if let Some(chunk) = c.pending.pop() {
            return Ok(Some(chunk));
        }
    }
}

async fn write_compressed(
    dst: &Arc<BlockNode>,
    off: u64,
    data: bytes::Bytes,
    cs: u64,
) -> Result<()> {
    if !dst.supports_compressed() {
        return Err(BlockError::unsupported(
            "the target format has no compressed clusters",
        ));
    }
    let mut at = 0;
    while at < data.len() {
        let n = (cs as usize).min(data.len() - at);
        let piece = data.slice(at..at + n);
        if !block::buf::is_zero(&piece) {
            dst.write(
                off + at as u64,
                IoVec::from(piece),
                WriteFlags::compressed(),
            )
            .await?;
        }
        at += n;
    }
    Ok(())
}
