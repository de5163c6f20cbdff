//! Seed loading and byte-level mutations for the short fuzz runs on stable Rust (proptest),
//! shared by the tests of several crates (`#[path]`-included). The long runs use cargo-fuzz.

#![allow(dead_code)]

use std::path::Path;

use proptest::prelude::*;

/// The seed corpus `fuzz/corpus/<target>`, sorted; at least `min` files.
pub fn load_seeds(manifest_dir: &str, target: &str, min: usize) -> Vec<Vec<u8>> {
    let dir = Path::new(manifest_dir)
        .join("../../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= min, "seed corpus {target} too small");
    seeds
}

/// One change to an input.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Overwrite a byte.
    Set(usize, u8),
    /// Insert a byte.
    Insert(usize, u8),
    /// Remove a byte.
    Remove(usize),
    /// Cut the input short.
    Truncate(usize),
    /// Insert a piece of another seed.
    Splice(usize, usize, usize),
}

/// Edits; inserted bytes come from `alphabet` (syntax characters for text formats).
pub fn edit(alphabet: Vec<u8>) -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), prop::sample::select(alphabet)).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Remove),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(s, a, b)| Edit::Splice(s, a, b)),
    ]
}

/// Applies `edits` to `data`; splices take pieces of `seeds`.
pub fn apply(mut data: Vec<u8>, edits: &[Edit], seeds: &[Vec<u8>]) -> Vec<u8> {
    for e in edits {
        let n = data.len().max(1);
        match *e {
            Edit::Set(i, b) if !data.is_empty() => data[i % n] = b,
            Edit::Insert(i, b) => data.insert(i % (data.len() + 1), b),
            Edit::Remove(i) if !data.is_empty() => {
                data.remove(i % n);
            }
            Edit::Truncate(i) => data.truncate(i % (data.len() + 1)),
            Edit::Splice(s, a, b) if !seeds.is_empty() => {
                let other = &seeds[s % seeds.len()];
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

/// Case count from the environment variable `var`, else `default`.
pub fn cases(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
