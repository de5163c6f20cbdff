//! A short fuzz run of the NBD server on stable Rust: the seed corpus of fuzz/corpus/nbd_decode,
//! mutated (bytes replaced, inserted, removed; truncation; pieces spliced together), through the
//! harness: a whole connection against an in-memory export. Nothing may panic and every
//! connection must end. The long run is `bench/fuzz.sh nbd_decode` (cargo fuzz).

#[path = "support/nbd_fuzz.rs"]
mod harness;
#[path = "../../../fuzz/stable_mutations.rs"]
mod mutate;

use std::sync::LazyLock;

use proptest::prelude::*;
use proptest::test_runner::Config;

static SEEDS: LazyLock<Vec<Vec<u8>>> =
    LazyLock::new(|| mutate::load_seeds(env!("CARGO_MANIFEST_DIR"), "nbd_decode", 8));

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

proptest! {
    #![proptest_config(Config { cases: mutate::cases("NBD_FUZZ_CASES", 1500), failure_persistence: None, ..Config::default() })]

    #[test]
    fn mutated_sessions_never_panic(
        seed in 0usize..64,
        edits in prop::collection::vec(mutate::edit((0..=255).collect()), 1..12),
    ) {
        let data = mutate::apply(SEEDS[seed % SEEDS.len()].clone(), &edits, &SEEDS);
        harness::exercise(&data);
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        harness::exercise(&data);
    }
}
