//! Fuzz target: bytes a QMP client could send, through framing, parsing, request and schema
//! checking (see the harness).
#![no_main]

#[path = "../../crates/daemon/tests/support/qmp_fuzz.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness::exercise(data);
});
