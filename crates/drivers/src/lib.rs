//! blockjob's block drivers.
//!
//! ```text
//!  open_image(path, format) ──▶ qcow2 ──file──▶ file        (backing chains: qcow2 ──backing──▶ …)
//!                          └──▶ raw ───file──▶ file
//!  null-co: standalone
//! ```
//!
//! The `file` driver talks to the host through the I/O engine ([`engine`]); format
//! drivers (`raw`, `qcow2`) reach their `file` child only through child edges, so every request
//! they make goes through the generic request path.

pub mod blkdebug;
pub mod engine;
pub mod file;
pub mod mem;
pub mod nbd;
pub mod null;
pub mod open;
pub mod qcow2;
pub mod raw;
pub mod throttle;

pub use open::{open_image, probe_format, Format, OpenOptions};
