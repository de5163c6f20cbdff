//! A short fuzz run on stable Rust: qemu-img-made qcow2 images (the cargo-fuzz seed corpus in
//! fuzz/corpus/qcow2_open) with random bytes overwritten in their metadata, opened and used.
//! Nothing may panic. The long run is `bench/fuzz.sh` (cargo fuzz, nightly).

#[path = "support/qcow2_fuzz.rs"]
mod harness;

use std::path::PathBuf;
use std::sync::LazyLock;

use proptest::prelude::*;
use proptest::test_runner::Config;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
});

fn seeds() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/qcow2_open");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 4, "seed corpus too small");
    seeds
}

static SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(seeds);

#[test]
fn seed_images_open() {
    // The harness is only worth something if valid images get all the way through it.
    for seed in SEEDS.iter() {
        assert_eq!(RT.block_on(harness::exercise(seed)), 2);
    }
}

/// Inputs the fuzzers found problems with (fuzz/regressions/qcow2_open) stay fixed.
#[test]
fn past_fuzz_findings_stay_fixed() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/qcow2_open");
    let entries = std::fs::read_dir(&dir).expect("regression inputs");
    for entry in entries.filter_map(|e| e.ok()) {
        let image = std::fs::read(entry.path()).expect("read input");
        let start = std::time::Instant::now();
        RT.block_on(harness::exercise(&image));
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{} took {:?}",
            entry.path().display(),
            start.elapsed()
        );
    }
}

/// Overwrites: (position, byte). Most land in the first clusters, where the metadata lives.
fn mutations() -> impl Strategy<Value = Vec<(usize, u8)>> {
    let pos = prop_oneof![
        3 => 0usize..512,
        3 => 0usize..16384,
        1 => any::<usize>(),
    ];
    prop::collection::vec((pos, any::<u8>()), 1..24)
}

proptest! {
    #![proptest_config(Config {
        // Each case takes well under a millisecond: run many more than the other suites.
        cases: std::env::var("QCOW2_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000),
        ..Config::default()
    })]

    #[test]
    fn mutated_images_never_panic(which in any::<prop::sample::Index>(), muts in mutations()) {
        let mut image = which.get(&SEEDS).clone();
        for (pos, byte) in muts {
            let at = pos % image.len();
            image[at] = byte;
        }
        RT.block_on(harness::exercise(&image));
    }
}
