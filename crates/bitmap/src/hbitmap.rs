//! A bitmap with summary levels, so that "where is the next set bit", "where is the next clear
//! bit" and "how many are set" stay fast on a bitmap of billions of bits.
//!
//! ```text
//!   any[1]   1 0 …           one bit per word of any[0]: "that word is non-zero"
//!   any[0]   1 0 0 1 …       one bit per leaf word: "that word has a set bit"
//!   words    0x00f0 0 0 0x1 …  the bits themselves, 64 per word, bit i = word i/64, bit i%64
//!   gaps[0]  1 1 1 1 …       one bit per leaf word: "that word has a clear bit"
//! ```
//!
//! Each search walks up the summary until it finds a non-empty word, then straight down: a
//! bitmap of 2^32 bits has five levels, so a search over an empty terabyte costs a handful of
//! word reads. The count is kept as bits change. The leaf words, in little-endian byte order,
//! are the serialised form (bit i is bit i%8 of byte i/8, as in qcow2's bitmap tables).

use std::fmt;

const BITS: u64 = 64;

/// A fixed-length bitmap with fast searches for set and clear bits.
#[derive(Clone, PartialEq, Eq)]
pub struct HBitmap {
    len: u64,
    count: u64,
    words: Vec<u64>,
    /// Summary of the words that have a set bit.
    any: Summary,
    /// Summary of the words that have a clear bit (among the `len` valid bits).
    gaps: Summary,
}

impl fmt::Debug for HBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HBitmap")
            .field("len", &self.len)
            .field("count", &self.count)
            .finish()
    }
}

/// Bit `j` of `levels[0]` stands for item `j`; bit `k` of `levels[l + 1]` is set when word `k`
/// of `levels[l]` is non-zero. The last level has one word.
#[derive(Clone, PartialEq, Eq, Default)]
struct Summary {
    levels: Vec<Vec<u64>>,
}

fn words_for(bits: u64) -> usize {
    bits.div_ceil(BITS) as usize
}

/// Bits `from..` of a word.
fn mask_from(from: u64) -> u64 {
    !0u64 << (from % BITS)
}

impl Summary {
    /// A summary of `items` items, all set when `all` is true.
    fn new(items: u64, all: bool) -> Summary {
        let mut levels = Vec::new();
        let mut n = items;
        while n > 0 {
            let words = words_for(n);
            let mut level = vec![if all { !0 } else { 0 }; words];
            if all && n % BITS != 0 {
                if let Some(last) = level.last_mut() {
                    *last = (1u64 << (n % BITS)) - 1;
                }
            }
            levels.push(level);
            if words == 1 {
                break;
            }
            n = words as u64;
        }
        Summary { levels }
    }

    /// Sets or clears item `j`, updating the levels above when a word changes between zero and
    /// non-zero.
    fn put(&mut self, mut j: u64, on: bool) {
        for level in &mut self.levels {
            let w = &mut level[(j / BITS) as usize];
            let was = *w != 0;
            if on {
                *w |= 1 << (j % BITS);
            } else {
                *w &= !(1 << (j % BITS));
            }
            if (*w != 0) == was {
                return;
            }
            j /= BITS;
        }
    }

    /// The first set item at or after `from`.
    fn next(&self, from: u64) -> Option<u64> {
        self.next_at(0, from)
    }

    fn next_at(&self, level: usize, from: u64) -> Option<u64> {
        let words = self.levels.get(level)?;
        let w = (from / BITS) as usize;
        let word = *words.get(w)?;
        let m = word & mask_from(from);
        if m != 0 {
            return Some(w as u64 * BITS + u64::from(m.trailing_zeros()));
        }
        let k = self.next_at(level + 1, w as u64 + 1)?;
        let word = words[k as usize];
        Some(k * BITS + u64::from(word.trailing_zeros()))
    }
}

impl HBitmap {
    /// A bitmap of `len` bits, all clear.
    pub fn new(len: u64) -> HBitmap {
        let words = words_for(len);
        HBitmap {
            len,
            count: 0,
            words: vec![0; words],
            any: Summary::new(words as u64, false),
            gaps: Summary::new(words as u64, true),
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Number of set bits in `[start, end)`.
    pub fn count_range(&self, start: u64, end: u64) -> u64 {
        let end = end.min(self.len);
        let mut n = 0;
        let mut at = start;
        while at < end {
            let j = at / BITS;
            let word_end = ((j + 1) * BITS).min(end);
            n += u64::from((self.words[j as usize] & range_mask(at, word_end)).count_ones());
            at = word_end;
        }
        n
    }

    /// Whether bit `i` is set (false past the end).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / BITS) as usize] & (1 << (i % BITS)) != 0
    }

    /// The valid bits of word `j`.
    fn valid(&self, j: usize) -> u64 {
        let last = self.words.len() - 1;
        if j == last && self.len % BITS != 0 {
            (1u64 << (self.len % BITS)) - 1
        } else {
            !0
        }
    }

    /// Replaces the bits of word `j` selected by `mask` with those of `value`.
    fn store(&mut self, j: usize, value: u64, mask: u64) {
        let old = self.words[j];
        let new = (old & !mask) | (value & mask);
        if new == old {
            return;
        }
        self.words[j] = new;
        self.count = self.count + u64::from(new.count_ones()) - u64::from(old.count_ones());
        if (old != 0) != (new != 0) {
            self.any.put(j as u64, new != 0);
        }
        let valid = self.valid(j);
        if (old & valid != valid) != (new & valid != valid) {
            self.gaps.put(j as u64, new & valid != valid);
        }
    }

    fn fill_range(&mut self, start: u64, end: u64, value: u64) {
        let end = end.min(self.len);
        let mut at = start;
        while at < end {
            let j = at / BITS;
            let word_end = ((j + 1) * BITS).min(end);
            self.store(j as usize, value, range_mask(at, word_end));
            at = word_end;
        }
    }

    /// Sets bits `[start, end)` (clamped to the length).
    pub fn set_range(&mut self, start: u64, end: u64) {
        self.fill_range(start, end, !0);
    }

    /// Clears bits `[start, end)` (clamped to the length).
    pub fn reset_range(&mut self, start: u64, end: u64) {
        self.fill_range(start, end, 0);
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        self.set_range(0, self.len);
    }

    /// Clears every bit.
    pub fn reset_all(&mut self) {
        *self = HBitmap::new(self.len);
    }

    /// The first set bit in `[from, end)`.
    pub fn next_set(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.len);
        if from >= end {
            return None;
        }
        let w = (from / BITS) as usize;
        let m = self.words[w] & mask_from(from);
        let found = if m != 0 {
            w as u64 * BITS + u64::from(m.trailing_zeros())
        } else {
            let k = self.any.next(w as u64 + 1)?;
            k * BITS + u64::from(self.words[k as usize].trailing_zeros())
        };
        (found < end).then_some(found)
    }

    /// The first clear bit in `[from, end)`.
    pub fn next_clear(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.len);
        if from >= end {
            return None;
        }
        let w = (from / BITS) as usize;
        let m = !self.words[w] & self.valid(w) & mask_from(from);
        let found = if m != 0 {
            w as u64 * BITS + u64::from(m.trailing_zeros())
        } else {
            let k = self.gaps.next(w as u64 + 1)?;
            let free = !self.words[k as usize] & self.valid(k as usize);
            k * BITS + u64::from(free.trailing_zeros())
        };
        (found < end).then_some(found)
    }

    /// The first run of set bits in `[from, end)`, at most `max` long: `(start, length)`.
    pub fn next_set_run(&self, from: u64, end: u64, max: u64) -> Option<(u64, u64)> {
        let start = self.next_set(from, end)?;
        let limit = end.min(self.len).min(start.saturating_add(max.max(1)));
        let stop = self.next_clear(start, limit).unwrap_or(limit);
        Some((start, stop - start))
    }

    /// Sets every bit that is set in `other` (same length).
    ///
    /// # Panics
    /// When the lengths differ; callers check compatibility first.
    pub fn merge(&mut self, other: &HBitmap) {
        assert_eq!(self.len, other.len, "merging bitmaps of different lengths");
        let mut j = 0;
        while let Some(k) = other.any.next(j) {
            self.store(k as usize, !0, other.words[k as usize]);
            j = k + 1;
        }
    }

    /// The leaf words: bit i is bit i%64 of word i/64; bits past the end are clear.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Bits `[start, start + 8 * out.len())` as bytes, bit i%8 of byte i/8; bits past the end
    /// read as clear. `start` must be a multiple of 8.
    pub fn serialize(&self, start: u64, out: &mut [u8]) {
        debug_assert_eq!(start % 8, 0);
        for (k, byte) in out.iter_mut().enumerate() {
            let first = start / 8 + k as u64;
            let w = (first / 8) as usize;
            *byte = match self.words.get(w) {
                Some(word) => (word >> ((first % 8) * 8)) as u8,
                None => 0,
            };
        }
    }

    /// Replaces bits `[start, start + 8 * data.len())` (clamped to the length) with `data`,
    /// laid out as [`serialize`](Self::serialize) writes it. `start` must be a multiple of 8.
    pub fn deserialize(&mut self, start: u64, data: &[u8]) {
        debug_assert_eq!(start % 8, 0);
        let end = (start + 8 * data.len() as u64).min(self.len);
        let mut at = start;
        while at < end {
            let j = at / BITS;
            let word_end = ((j + 1) * BITS).min(end);
            let mut value = 0u64;
            let mut bit = at;
            while bit < word_end {
                let byte = data[((bit - start) / 8) as usize];
                value |= u64::from(byte) << (bit % BITS);
                bit += 8;
            }
            self.store(j as usize, value, range_mask(at, word_end));
            at = word_end;
        }
    }
}

/// The bits `[start, end)` of the word holding `start` (`end` within that word or its end).
fn range_mask(start: u64, end: u64) -> u64 {
    let lo = start % BITS;
    let n = end - start;
    if n >= BITS {
        !0
    } else {
        ((1u64 << n) - 1) << lo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searches_cross_levels() {
        // 2^20 bits: three summary levels.
        let mut b = HBitmap::new(1 << 20);
        assert_eq!(b.next_set(0, u64::MAX), None);
        assert_eq!(b.next_clear(0, u64::MAX), Some(0));
        b.set_range(700_001, 700_003);
        assert_eq!(b.next_set(0, u64::MAX), Some(700_001));
        assert_eq!(b.next_set(700_002, u64::MAX), Some(700_002));
        assert_eq!(b.next_set(700_003, u64::MAX), None);
        assert_eq!(b.next_set(0, 700_001), None);
        assert_eq!(b.count(), 2);
        b.set_all();
        assert_eq!(b.count(), 1 << 20);
        assert_eq!(b.next_clear(0, u64::MAX), None);
        b.reset_range(999_999, 1_000_000);
        assert_eq!(b.next_clear(0, u64::MAX), Some(999_999));
        assert_eq!(b.next_set_run(999_990, u64::MAX, 100), Some((999_990, 9)));
    }

    #[test]
    fn a_terabyte_at_512_bytes_is_searchable() {
        // 2^31 bits (1 TiB at 512-byte granularity): 256 MiB of words.
        let len = 1u64 << 31;
        let mut b = HBitmap::new(len);
        b.set_range(len - 3, len);
        assert_eq!(b.next_set(0, u64::MAX), Some(len - 3));
        assert_eq!(b.next_set_run(0, u64::MAX, u64::MAX), Some((len - 3, 3)));
        assert_eq!(b.count(), 3);
    }

    #[test]
    fn merge_keeps_the_bits_already_set() {
        // Regression found by the model test: merge used to replace whole words.
        let mut a = HBitmap::new(2);
        a.set_range(1, 2);
        let mut b = HBitmap::new(2);
        b.set_range(0, 1);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.next_clear(0, 2), None);
    }

    #[test]
    fn serialised_bytes_are_lsb_first() {
        let mut b = HBitmap::new(20);
        b.set_range(1, 2);
        b.set_range(9, 11);
        let mut out = [0u8; 4];
        b.serialize(0, &mut out);
        assert_eq!(out, [0b10, 0b110, 0, 0]);
        let mut c = HBitmap::new(20);
        c.deserialize(0, &[0xff, 0xff, 0xff]);
        assert_eq!(c.count(), 20, "bits past the end are ignored");
    }
}
