//! A short fuzz run of QMP decoding on stable Rust: the seed corpus of fuzz/corpus/qmp_decode,
//! mutated (bytes replaced, inserted, removed; truncation; pieces spliced together), through
//! the harness. Nothing may panic. The long run is `bench/fuzz.sh qmp_decode` (cargo fuzz).

#[path = "support/qmp_fuzz.rs"]
mod harness;
#[path = "../../../fuzz/stable_mutations.rs"]
mod mutate;

use std::sync::LazyLock;

use proptest::prelude::*;
use proptest::test_runner::Config;

static SEEDS: LazyLock<Vec<Vec<u8>>> =
    LazyLock::new(|| mutate::load_seeds(env!("CARGO_MANIFEST_DIR"), "qmp_decode", 8));

#[test]
fn seeds_pass_the_schema() {
    // The harness is only worth something if valid input gets all the way through.
    let passed: usize = SEEDS.iter().map(|s| harness::exercise(s)).sum();
    assert!(
        passed >= 8,
        "only {passed} seed requests passed schema checking"
    );
}

proptest! {
    #![proptest_config(Config { cases: mutate::cases("QMP_FUZZ_CASES", 3000), failure_persistence: None, ..Config::default() })]

    #[test]
    fn mutated_messages_never_panic(
        seed in 0usize..64,
        edits in prop::collection::vec(mutate::edit(b"{}[]\",:\\ 0x-.e".to_vec()), 1..12),
    ) {
        let data = mutate::apply(SEEDS[seed % SEEDS.len()].clone(), &edits, &SEEDS);
        harness::exercise(&data);
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        harness::exercise(&data);
    }
}
