//! blockjobd: a qemu-storage-daemon compatible daemon.
//!
//! ```text
//!  argv ─▶ cli (qsd options) ─▶ server::run ─▶ start-up items ─┐
//!                                  │                            ▼
//!  QMP clients ─▶ qmp::MonitorHub ─┴─▶ control (one owner) ─▶ commands/* ─▶ nodes (drivers)
//!                                                                        └──▶ exports (nbd)
//! ```
//!
//! Only this crate sees the protocols (`qmp`, `nbd`) and the block layer (`block`, `drivers`) together.

pub mod cli;
pub mod commands;
pub mod control;
pub mod exports;
pub mod filename;
pub mod info;
pub mod jobs;
pub mod keyval;
pub mod nodes;
pub mod schema;
pub mod server;
pub mod trace;
