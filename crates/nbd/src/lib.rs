//! The NBD protocol, written from the protocol specification
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>).
//!
//! ```text
//!  proto   pure encoding and decoding of the wire format (fuzzed: no I/O, no panics)
//!  server  fixed-newstyle handshake + transmission over a block::BlockBackend, one task per
//!          connection, requests served concurrently, replies serialised per connection
//!  client  handshake (GO, structured replies, base:allocation) and concurrent requests
//!          matched to replies by cookie; used by the `nbd` block driver
//! ```
//!
//! The crate knows the block layer only through `BlockBackend` (I/O) and the allocation map;
//! metadata contexts other than the built-in ones plug in through [`server::MetaContext`].

pub mod client;
pub mod export;
mod handshake;
pub mod proto;
pub mod server;
mod transmission;

pub use client::{Client, ClientError, ConnectTo};
pub use server::{Export, ExportConfig, MetaContext, NbdServer, ServerConfig};
