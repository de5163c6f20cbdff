//! blockjob's block layer.
//!
//! ```text
//!  BlockBackend (exports, jobs)          graph: drained sections, insert_filter,
//!        │ root edge (perm: needs/shares)   replace_node (edits re-point edges)
//!        ▼                                  perm: every edit re-checks permissions
//!  BlockNode ──request path──▶ dyn BlockDriver ──Child edges──▶ BlockNode …
//!   (drain gate, bounds, hooks,     (file, raw, qcow2, null-co: in the `drivers` crate)
//!    bitmaps, alignment/RMW,
//!    range locks)
//! ```
//!
//! The I/O engine that turns requests into syscalls lives beside the `file` driver, its only
//! user (`drivers::engine`).
//!
//! Drivers state facts and answer raw operations; everything generic lives once in the request
//! path ([`node`]). Block status is the one primitive behind reads of sparse images, `map`, and
//! (later) sync modes and zero skipping ([`map`]).

pub mod backend;
pub mod buf;
pub mod child;
pub mod drain;
pub mod driver;
pub mod error;
pub mod graph;
pub mod io_class;
pub mod map;
pub mod node;
pub mod perm;
pub mod range_lock;
pub mod request;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use backend::BlockBackend;
pub use buf::IoVec;
pub use driver::{BlockDriver, BlockStatus, DebugEvent, Facts, ImageInfo, InfoValue};
pub use driver::{WriteFlags, ZeroFlags};
pub use error::{BlockError, ErrorKind, Result, ResultExt};
pub use node::{BitmapHandle, BlockNode, Child, ChildRole, DetectZeroes, EdgeSpec};
pub use perm::{EdgePerm, Parent, Perm, PermPolicy};
