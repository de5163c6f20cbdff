//! blockjobd: a qemu-storage-daemon compatible daemon.
//!
//! ```text
//!  argv ─▶ cli (qsd options) ─▶ server::run ─▶ start-up items ─┐
//!                                  │                            ▼
//!  QMP clients ─▶ qmp::MonitorHub ─┴─▶ control (one owner) ─▶ commands/* ─▶ nodes (drivers)
//! ```
//!
//! Only this crate sees both the protocol (`qmp`) and the block layer (`block`, `drivers`).

pub mod cli;
pub mod commands;
pub mod control;
pub mod info;
pub mod keyval;
pub mod nodes;
pub mod schema;
pub mod server;
