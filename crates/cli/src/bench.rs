//! `blockjob bench`: the request loop of `qemu-img bench`, on our block layer.
//!
//! `count` requests of `buffer_size` bytes, `depth` of them in flight, at `offset`,
//! `offset + step`, … wrapping at the end of the image. The same options and the same output
//! as `qemu-img bench`, so that `bench/` scripts can run both and compare.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{BlockError, BlockNode, IoVec, Result, WriteFlags};
use bytes::Bytes;
use tokio::task::JoinSet;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Number of requests.
    pub count: u64,
    /// Requests in flight.
    pub depth: usize,
    /// Offset of the first request.
    pub offset: u64,
    /// Bytes per request.
    pub buffer_size: u64,
    /// Distance between the offsets of consecutive requests.
    pub step: u64,
    /// Write instead of read.
    pub write: bool,
    /// Byte written by write requests.
    pub pattern: u8,
    /// Flush after this many requests (0: never).
    pub flush_interval: u64,
    /// Flush without waiting for the requests in flight first.
    pub no_drain: bool,
}

impl BenchOptions {
    /// The line `qemu-img bench` prints before it starts.
    pub fn describe(&self) -> String {
        format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            self.count,
            if self.write { "write" } else { "read" },
            self.buffer_size,
            self.depth,
            self.offset,
            self.step
        )
    }

    fn validate(&self, size: u64) -> Result<()> {
        if self.depth == 0 {
            return Err(BlockError::invalid("Invalid queue depth specified"));
        }
        if self.buffer_size == 0 || self.buffer_size > i32::MAX as u64 {
            return Err(BlockError::invalid("Invalid buffer size specified"));
        }
        if self.offset.saturating_add(self.buffer_size) > size {
            return Err(BlockError::invalid(format!(
                "Offset {} plus buffer size {} is past the end of the image ({size} bytes)",
                self.offset, self.buffer_size
            )));
        }
        if self.flush_interval > 0 && !self.write {
            return Err(BlockError::invalid(
                "--flush-interval is only available in write tests",
            ));
        }
        Ok(())
    }
}

/// Offsets of the requests: start, then `+ step`, wrapping inside the image.
struct Offsets {
    next: u64,
    step: u64,
    len: u64,
    size: u64,
}

impl Iterator for Offsets {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let at = self.next;
        let mut n = at + self.step;
        if n + self.len > self.size {
            n %= self.size;
            if n + self.len > self.size {
                n = 0;
            }
        }
        self.next = n;
        Some(at)
    }
}

/// Runs the benchmark; returns the time from the first request to the last completion.
pub async fn run(node: &Arc<BlockNode>, o: &BenchOptions) -> Result<Duration> {
    o.validate(node.len())?;
    let mut offsets = Offsets {
        next: o.offset,
        step: o.step,
        len: o.buffer_size,
        size: node.len(),
    };
    let data = Bytes::from(vec![o.pattern; o.buffer_size as usize]);
    let len = o.buffer_size as usize;
    let start = Instant::now();
    let mut in_flight = JoinSet::new();
    let mut issued = 0;
    while issued < o.count || !in_flight.is_empty() {
        while issued < o.count && in_flight.len() < o.depth {
            if o.flush_interval > 0 && issued > 0 && issued % o.flush_interval == 0 {
                if !o.no_drain {
                    drain(&mut in_flight).await?;
                }
                node.flush().await?;
            }
            let at = offsets.next().unwrap_or(0);
            let node = node.clone();
            if o.write {
                let iov = IoVec::from(data.clone());
                in_flight.spawn(async move { node.write(at, iov, WriteFlags::default()).await });
            } else {
                in_flight.spawn(async move { node.read(at, len).await.map(drop) });
            }
            issued += 1;
        }
        if let Some(done) = in_flight.join_next().await {
            flatten(done)?;
        }
    }
    Ok(start.elapsed())
}

async fn drain(set: &mut JoinSet<Result<()>>) -> Result<()> {
    while let Some(done) = set.join_next().await {
        flatten(done)?;
    }
    Ok(())
}

fn flatten(done: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    done.map_err(|e| BlockError::invalid(format!("bench request failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wrap_like_qemu_img_bench() {
        // qemu-img bench -s 4k -S 3M on an 8 MiB image writes 0, 3M, 6M, 1M, 4M, 7M, 2M, 5M.
        let mib = 1 << 20;
        let o = Offsets {
            next: 0,
            step: 3 * mib,
            len: 4096,
            size: 8 * mib,
        };
        let got: Vec<u64> = o.take(9).map(|x| x / mib).collect();
        assert_eq!(got, [0, 3, 6, 1, 4, 7, 2, 5, 0]);
    }
}
