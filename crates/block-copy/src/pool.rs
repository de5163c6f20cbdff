//! Read buffers of the background copy, used again chunk after chunk.
//!
//! A copy task reads a chunk (up to 1 MiB) into a buffer, writes it to the target and lets it
//! go. Left to the allocator, those buffers are allocated on one thread and freed on another,
//! and glibc's per-thread arenas keep several MiB of freed chunks each: a backup with 4 chunks
//! of 1 MiB in flight peaked at 10 MiB of anonymous memory above its idle size, against the
//! 4 MiB it held. Here a finished task hands its buffer back when nothing else still refers to
//! it (a snapshot read may hold a slice), and the next task reads into it, so the memory a copy
//! holds at its peak is the chunks it had in flight at once. The pool goes with its copy.

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

/// At most this many idle buffers are kept (what 64 workers need).
const MAX_IDLE: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct BufPool {
    idle: Mutex<Vec<BytesMut>>,
}

impl BufPool {
    /// A zeroed buffer of `len` bytes, starting on a 4 KiB boundary (as
    /// [`block::buf::zeroed_for_io`]): an idle one whose room is at least `len` and less than
    /// twice it, else a new one. Idle buffers of another size (the chunk size changed) go.
    pub(crate) fn take(&self, len: usize) -> BytesMut {
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|b| fits(b, len));
            idle.pop()
        };
        match found {
            Some(mut b) => {
                b.clear();
                b.resize(len, 0);
                b
            }
            None => block::buf::zeroed_for_io(len),
        }
    }

    /// Takes `data` back if nothing else refers to its memory.
    pub(crate) fn give(&self, data: Bytes) {
        let Ok(b) = data.try_into_mut() else {
            return;
        };
        if b.as_ptr().align_offset(4096) != 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(b);
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn fits(b: &BytesMut, len: usize) -> bool {
    b.capacity() >= len && b.capacity() < 2 * len.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_read_into_again() {
        let pool = BufPool::default();
        let mut b = pool.take(1 << 20);
        assert_eq!(b.as_ptr().align_offset(4096), 0);
        b[0] = 7;
        let ptr = b.as_ptr();
        let frozen = b.freeze();
        // The target write and a held slice share it, then let go.
        let write = frozen.clone();
        let slice = frozen.slice(4096..8192);
        drop(write);
        drop(slice);
        pool.give(frozen);
        assert_eq!(pool.idle(), 1);
        let again = pool.take(1 << 20);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), 1 << 20);
        assert!(again.iter().all(|&x| x == 0), "a reused buffer is zeroed");
    }

    #[test]
    fn a_buffer_still_referred_to_is_not_taken_back() {
        let pool = BufPool::default();
        let frozen = pool.take(65536).freeze();
        let held = frozen.slice(0..4096);
        pool.give(frozen);
        assert_eq!(pool.idle(), 0);
        assert_eq!(held.len(), 4096);
    }

    #[test]
    fn buffers_of_another_size_are_let_go() {
        let pool = BufPool::default();
        pool.give(pool.take(1 << 20).freeze());
        pool.give(pool.take(1 << 20).freeze());
        assert_eq!(pool.idle(), 1);
        let small = pool.take(256 << 10);
        assert_eq!(
            pool.idle(),
            0,
            "1 MiB buffers are not kept for 256 KiB chunks"
        );
        assert!(small.capacity() < 512 << 10);
        // A shorter tail still fits a buffer less than twice its size.
        pool.give(small.freeze());
        let tail = pool.take(200 << 10);
        assert_eq!(tail.len(), 200 << 10);
        assert_eq!(pool.idle(), 0);
    }
}
