//! Fuzz target: arbitrary bytes opened and used as a qcow2 image (see the harness).
#![no_main]

#[path = "../../crates/drivers/tests/support/qcow2_fuzz.rs"]
mod harness;

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime")
});

fuzz_target!(|data: &[u8]| {
    RT.block_on(harness::exercise(data));
});
