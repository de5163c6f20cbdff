//! The QEMU Machine Protocol, server side, with no block knowledge.
//!
//! ```text
//!  bytes ─▶ wire::Framer ─▶ message::parse_request ─▶ server::MonitorHub (negotiation)
//!                                                        │ schema::Schema::check_arguments
//!                                                        ▼
//!                                                  server::Dispatcher (the daemon)
//! ```
//!
//! The daemon supplies the schema of what it implements and a [`Dispatcher`]; this crate does
//! the wire format, QEMU's error classes and messages, events and introspection.

pub mod error;
pub mod message;
pub mod schema;
pub mod server;
pub mod wire;

pub use error::{ErrorClass, QmpError, QmpResult};
pub use message::{event_watermark, Event, Request};
pub use schema::Schema;
pub use server::{Dispatcher, MonitorHub};
