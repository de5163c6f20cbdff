//! A short fuzz run of the NBD server on stable Rust: the seed corpus of fuzz/corpus/nbd_decode,
//! mutated (bytes replaced, inserted, removed; truncation; pieces spliced together), through the
//! harness: a whole connection against an in-memory export. Nothing may panic and every
//! connection must end. The long run is `bench/fuzz.sh nbd_decode` (cargo fuzz).

#[path = "support/nbd_fuzz.rs"]
mod harness;

use std::path::PathBuf;
use std::sync::LazyLock;

use proptest::prelude::*;
use proptest::test_runner::Config;

fn seeds() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd_decode");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 8, "seed corpus too small");
    seeds
}

static SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(seeds);

fn count(haystack: &[u8], magic: u32) -> usize {
    let m = magic.to_be_bytes();
    haystack.windows(4).filter(|w| *w == m).count()
}

#[test]
fn seeds_reach_transmission() {
    // The harness is only worth something if valid input gets all the way through: the
    // structured seed's requests are answered with structured chunks, the simple one's with
    // simple replies.
    let replies: usize = SEEDS
        .iter()
        .map(|s| {
            let out = harness::exercise(s);
            count(&out, nbd::proto::SIMPLE_REPLY_MAGIC)
                + count(&out, nbd::proto::STRUCTURED_REPLY_MAGIC)
        })
        .sum();
    assert!(replies >= 15, "only {replies} replies from the seed corpus");
}

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    Splice(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Remove),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(s, a, b)| Edit::Splice(s, a, b)),
    ]
}

fn apply(mut data: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = data.len().max(1);
        match *e {
            Edit::Set(i, b) if !data.is_empty() => data[i % n] = b,
            Edit::Insert(i, b) => data.insert(i % (data.len() + 1), b),
            Edit::Remove(i) if !data.is_empty() => {
                data.remove(i % n);
            }
            Edit::Truncate(i) => data.truncate(i % (data.len() + 1)),
            Edit::Splice(s, a, b) => {
                let other = &SEEDS[s % SEEDS.len()];
                let start = a % (other.len() + 1);
                let end = start + b % (other.len() - start + 1);
                let at = a % (data.len() + 1);
                data.splice(at..at, other[start..end].iter().copied());
            }
            _ => {}
        }
    }
    data
}

fn cases() -> u32 {
    std::env::var("NBD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

proptest! {
    #![proptest_config(Config { cases: cases(), failure_persistence: None, ..Config::default() })]

    #[test]
    fn mutated_sessions_never_panic(
        seed in 0usize..64,
        edits in prop::collection::vec(edit(), 1..12),
    ) {
        let data = apply(SEEDS[seed % SEEDS.len()].clone(), &edits);
        harness::exercise(&data);
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        harness::exercise(&data);
    }
}
