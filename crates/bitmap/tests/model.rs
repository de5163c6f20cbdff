//! HBitmap and DirtyBitmap against a plain `Vec<bool>`: every operation applied to both, every
//! query compared. Lengths reach three summary levels (over 4096 words' worth of bits).

use bitmap::{DirtyBitmap, HBitmap};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Set(u64, u64),
    Reset(u64, u64),
    SetAll,
    ResetAll,
    /// Merge a bitmap with these ranges set.
    Merge(Vec<(u64, u64)>),
    /// Replace the bits from a byte-aligned offset with these bytes.
    Deserialize(u64, Vec<u8>),
}

fn range(len: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..=len, 0..=len).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

fn op(len: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => range(len).prop_map(|(a, b)| Op::Set(a, b)),
        3 => range(len).prop_map(|(a, b)| Op::Reset(a, b)),
        1 => Just(Op::SetAll),
        1 => Just(Op::ResetAll),
        2 => prop::collection::vec(range(len), 0..4).prop_map(Op::Merge),
        2 => ((0..=len / 8), prop::collection::vec(any::<u8>(), 0..80))
            .prop_map(|(k, d)| Op::Deserialize(k * 8, d)),
    ]
}

fn case() -> impl Strategy<Value = (u64, Vec<Op>, Vec<(u64, u64)>)> {
    prop_oneof![0u64..200, 200u64..300_000].prop_flat_map(|len| {
        (
            Just(len),
            prop::collection::vec(op(len), 1..24),
            prop::collection::vec(range(len + 70), 1..12),
        )
    })
}

fn apply(b: &mut HBitmap, m: &mut [bool], op: &Op) {
    let len = m.len() as u64;
    match op {
        Op::Set(a, e) => {
            b.set_range(*a, *e);
            m[*a as usize..*e as usize].fill(true);
        }
        Op::Reset(a, e) => {
            b.reset_range(*a, *e);
            m[*a as usize..*e as usize].fill(false);
        }
        Op::SetAll => {
            b.set_all();
            m.fill(true);
        }
        Op::ResetAll => {
            b.reset_all();
            m.fill(false);
        }
        Op::Merge(ranges) => {
            let mut other = HBitmap::new(len);
            for (a, e) in ranges {
                other.set_range(*a, *e);
                m[*a as usize..*e as usize].fill(true);
            }
            b.merge(&other);
        }
        Op::Deserialize(start, data) => {
            b.deserialize(*start, data);
            for (k, byte) in data.iter().enumerate() {
                for bit in 0..8 {
                    let i = start + 8 * k as u64 + bit;
                    if i < len {
                        m[i as usize] = byte & (1 << bit) != 0;
                    }
                }
            }
        }
    }
}

fn model_next(m: &[bool], from: u64, end: u64, want: bool) -> Option<u64> {
    let end = end.min(m.len() as u64);
    (from..end).find(|&i| m[i as usize] == want)
}

fn check(b: &HBitmap, m: &[bool], probes: &[(u64, u64)]) -> Result<(), TestCaseError> {
    let len = m.len() as u64;
    prop_assert_eq!(b.len(), len);
    prop_assert_eq!(b.count(), m.iter().filter(|&&x| x).count() as u64);
    for &(from, end) in probes {
        prop_assert_eq!(b.next_set(from, end), model_next(m, from, end, true));
        prop_assert_eq!(b.next_clear(from, end), model_next(m, from, end, false));
        prop_assert_eq!(b.get(from), from < len && m[from as usize]);
        let (lo, hi) = (from.min(len), end.min(len));
        prop_assert_eq!(
            b.count_range(from, end),
            if lo < hi {
                m[lo as usize..hi as usize].iter().filter(|&&x| x).count() as u64
            } else {
                0
            }
        );
        let max = (end - from) / 3 + 1;
        let expect = model_next(m, from, end, true).map(|s| {
            let stop = (s..end.min(len).min(s + max)).find(|&i| !m[i as usize]);
            (s, stop.unwrap_or(end.min(len).min(s + max)) - s)
        });
        prop_assert_eq!(b.next_set_run(from, end, max), expect);
    }
    // Serialisation is the model's bits, LSB first, with clear padding.
    let mut bytes = vec![0u8; len.div_ceil(8) as usize + 3];
    b.serialize(0, &mut bytes);
    for (i, &bit) in m.iter().enumerate() {
        prop_assert_eq!(bytes[i / 8] & (1 << (i % 8)) != 0, bit);
    }
    let mut back = HBitmap::new(len);
    back.deserialize(0, &bytes);
    prop_assert!(&back == b, "deserialize(serialize(b)) == b");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn hbitmap_matches_a_vec_of_bools((len, ops, probes) in case()) {
        let mut b = HBitmap::new(len);
        let mut m = vec![false; len as usize];
        for op in &ops {
            apply(&mut b, &mut m, op);
            check(&b, &m, &probes)?;
        }
    }

    /// Byte-level dirty bitmap: a write marks every granule it touches, merge across
    /// granularities keeps every dirty byte dirty, dirty areas cover exactly the dirty granules.
    #[test]
    fn dirty_bitmap_marks_every_granule_a_write_touches(
        size in 1u64..2_000_000,
        g_shift in 9u32..17,
        h_shift in 9u32..17,
        writes in prop::collection::vec((0u64..2_100_000, 0u64..300_000), 0..12),
    ) {
        let (g, h) = (1u64 << g_shift, 1u64 << h_shift);
        let mut b = DirtyBitmap::new(Some("b".into()), size, g).expect("bitmap");
        let mut model = vec![false; size.div_ceil(g) as usize];
        for &(off, len) in &writes {
            b.record_write(off, len);
            let end = (off + len).min(size);
            if off < end {
                for k in off / g..end.div_ceil(g) {
                    model[k as usize] = true;
                }
            }
        }
        let dirty = model.iter().filter(|&&x| x).count() as u64;
        prop_assert_eq!(b.dirty_bytes(), dirty * g);
        // Walk the areas: they must be exactly the dirty granules, clamped to the disk.
        let mut at = 0;
        let mut seen = vec![false; model.len()];
        while let Some((start, len)) = b.next_dirty_area(at, u64::MAX, u64::MAX) {
            prop_assert!(start >= at && len > 0 && start + len <= size);
            for k in start / g..(start + len).div_ceil(g) {
                seen[k as usize] = true;
            }
            at = start + len;
        }
        prop_assert_eq!(&seen, &model);
        // Merging into another granularity loses no dirty byte.
        let mut other = DirtyBitmap::new(None, size, h).expect("bitmap");
        other.merge_from(&b).expect("merge");
        for (k, &d) in model.iter().enumerate() {
            if d {
                prop_assert!(other.is_dirty(k as u64 * g));
            }
        }
    }
}
