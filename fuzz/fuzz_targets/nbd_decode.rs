//! Fuzz target: bytes an NBD client could send, through the handshake, request decoding and a
//! whole server connection (see the harness).
#![no_main]

#[path = "../../crates/nbd/tests/support/nbd_fuzz.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness::exercise(data);
});
