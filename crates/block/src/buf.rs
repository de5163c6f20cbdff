//! Request buffers. Reads fill an owned `BytesMut`; writes carry an [`IoVec`] of `Bytes`.
//!
//! Buffers are owned by the request, never borrowed: a driver hands them to the I/O engine and
//! gets them back when the kernel is done, so dropping a request's future never leaves the
//! kernel writing into freed memory. `Bytes` slices share one allocation, so splitting a write
//! across clusters or prepending copy-on-write padding costs no copy.

use bytes::{Bytes, BytesMut};

/// A gather list of immutable buffers, written as one contiguous range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoVec {
    parts: Vec<Bytes>,
    len: usize,
}

impl IoVec {
    /// An empty vector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a buffer (empty buffers are skipped).
    pub fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push(part);
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffers, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The bytes `[start, start + len)` of the vector, sharing the buffers.
    ///
    /// Panics when the range is not inside the vector: callers compute it from `len()`.
    pub fn slice(&self, start: usize, len: usize) -> IoVec {
        assert!(start + len <= self.len, "IoVec::slice out of range");
        let mut out = IoVec::new();
        let (mut skip, mut want) = (start, len);
        for part in &self.parts {
            if want == 0 {
                break;
            }
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            let take = (part.len() - skip).min(want);
            out.push(part.slice(skip..skip + take));
            skip = 0;
            want -= take;
        }
        out
    }

    /// One contiguous buffer with all the bytes (copies only when there are several parts).
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts[0].clone(),
            _ => {
                let mut out = BytesMut::with_capacity(self.len);
                for part in &self.parts {
                    out.extend_from_slice(part);
                }
                out.freeze()
            }
        }
    }

    /// True when every byte is zero.
    pub fn is_zero(&self) -> bool {
        self.parts.iter().all(|p| is_zero(p))
    }
}

impl From<Bytes> for IoVec {
    fn from(b: Bytes) -> Self {
        let mut v = IoVec::new();
        v.push(b);
        v
    }
}

impl From<Vec<u8>> for IoVec {
    fn from(b: Vec<u8>) -> Self {
        Bytes::from(b).into()
    }
}

/// A zero-filled read buffer of `len` bytes.
pub fn zeroed(len: usize) -> BytesMut {
    BytesMut::zeroed(len)
}

/// True when every byte of `buf` is zero (word at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned middle bytes.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_crosses_parts() {
        let mut v = IoVec::new();
        v.push(Bytes::from_static(b"abc"));
        v.push(Bytes::from_static(b""));
        v.push(Bytes::from_static(b"defgh"));
        assert_eq!(v.len(), 8);
        assert_eq!(v.slice(2, 4).to_bytes(), Bytes::from_static(b"cdef"));
        assert_eq!(v.slice(3, 5).parts().len(), 1);
        assert_eq!(v.slice(8, 0).len(), 0);
    }

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 1000];
        assert!(is_zero(&b[1..999]));
        b[997] = 1;
        assert!(!is_zero(&b[1..999]));
        assert!(is_zero(&b[..0]));
    }
}
