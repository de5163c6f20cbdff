//! Exports: what the server offers, over a [`BlockBackend`].
//!
//! An [`Export`] holds a backend, so it is a parent of its node like any other: when the graph
//! re-points the backend's root edge (a filter inserted, a mirror pivots) the export follows.
//! Exports count their connections; deleting one retires it (no new clients), and
//! [`Export::closed`] resolves once the last client is gone. Metadata contexts
//! ([`MetaContext`]) answer block status queries.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use block::map::extent_at;
use block::BlockBackend;
use tokio::sync::watch;

use crate::proto::{self, tflags, Extent};

/// A metadata context an export can offer (`base:allocation`, `qemu:dirty-bitmap:…`).
#[async_trait]
pub trait MetaContext: Send + Sync + fmt::Debug {
    /// The context name as clients query it.
    fn name(&self) -> String;

    /// Extents from `offset` covering at most `len` bytes (at least one, at most `max`).
    async fn extents(
        &self,
        backend: &BlockBackend,
        offset: u64,
        len: u64,
        max: usize,
    ) -> block::Result<Vec<Extent>>;
}

/// `base:allocation` (hole/zero) or `qemu:allocation-depth` (layer of the chain).
#[derive(Debug)]
pub(crate) struct Allocation {
    pub(crate) depth: bool,
}

#[async_trait]
impl MetaContext for Allocation {
    fn name(&self) -> String {
        if self.depth {
            "qemu:allocation-depth".into()
        } else {
            "base:allocation".into()
        }
    }

    async fn extents(
        &self,
        backend: &BlockBackend,
        offset: u64,
        len: u64,
        max: usize,
    ) -> block::Result<Vec<Extent>> {
        let node = backend.node();
        let mut out: Vec<Extent> = Vec::new();
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let e = extent_at(&node, at, end - at).await?;
            let flags = if self.depth {
                if e.present {
                    e.depth + 1
                } else {
                    0
                }
            } else {
                (if e.data { 0 } else { proto::STATE_HOLE })
                    | (if e.zero { proto::STATE_ZERO } else { 0 })
            };
            let n = e.length.min(end - at) as u32;
            at += u64::from(n);
            let full = out.len() == max;
            match out.last_mut() {
                Some(last) if last.flags == flags && last.len.checked_add(n).is_some() => {
                    last.len += n
                }
                _ if full => break,
                _ => out.push(Extent { len: n, flags }),
            }
        }
        Ok(out)
    }
}

/// What `block-export-add` configures.
#[derive(Debug)]
pub struct ExportConfig {
    /// Export name clients ask for.
    pub name: String,
    /// Free-form description (NBD_INFO_DESCRIPTION and the export list).
    pub description: String,
    /// The node, through a backend that follows graph changes.
    pub backend: BlockBackend,
    /// Clients may write.
    pub writable: bool,
    /// Every write is made durable before it is acknowledged.
    pub writethrough: bool,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Further contexts (dirty bitmaps).
    pub extra_contexts: Vec<Arc<dyn MetaContext>>,
}

#[derive(Debug, Default)]
pub(crate) struct ExportState {
    pub(crate) clients: usize,
    pub(crate) retired: bool,
}

/// An export: served under its name while registered with a server.
#[derive(Debug)]
pub struct Export {
    pub(crate) config: ExportConfig,
    pub(crate) contexts: Vec<Arc<dyn MetaContext>>,
    pub(crate) state: watch::Sender<ExportState>,
    pub(crate) kill: watch::Sender<bool>,
}

impl Export {
    /// A new export; `base:allocation` is always context 0.
    pub fn new(config: ExportConfig) -> Arc<Export> {
        let mut contexts: Vec<Arc<dyn MetaContext>> = vec![Arc::new(Allocation { depth: false })];
        if config.allocation_depth {
            contexts.push(Arc::new(Allocation { depth: true }));
        }
        contexts.extend(config.extra_contexts.iter().cloned());
        Arc::new(Export {
            config,
            contexts,
            state: watch::Sender::new(ExportState::default()),
            kill: watch::Sender::new(false),
        })
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The backend (its node is the export's node right now).
    pub fn backend(&self) -> &BlockBackend {
        &self.config.backend
    }

    /// Whether clients may write.
    pub fn writable(&self) -> bool {
        self.config.writable
    }

    /// Connected clients (past the handshake).
    pub fn clients(&self) -> usize {
        self.state.borrow().clients
    }

    /// Refuses new clients from now on.
    pub fn retire(&self) {
        self.state.send_modify(|s| s.retired = true);
    }

    /// Retires the export and drops its clients (requests in flight finish first).
    pub fn disconnect_all(&self) {
        self.retire();
        self.kill.send_replace(true);
    }

    /// Resolves once the export is retired and has no client left.
    pub async fn closed(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|s| s.retired && s.clients == 0).await;
    }

    pub(crate) fn attach(self: &Arc<Self>) -> Option<ClientGuard> {
        let mut ok = false;
        self.state.send_if_modified(|s| {
            ok = !s.retired;
            if ok {
                s.clients += 1;
            }
            ok
        });
        ok.then(|| ClientGuard(self.clone()))
    }

    pub(crate) fn min_block(&self) -> u32 {
        self.config
            .backend
            .node()
            .facts()
            .request_alignment
            .clamp(1, 64 << 10)
    }

    pub(crate) fn transmission_flags(&self, structured: bool, multi_conn: bool) -> u16 {
        let mut f = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::SEND_CACHE;
        if structured {
            f |= tflags::SEND_DF;
        }
        if self.config.writable {
            f |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
        } else {
            f |= tflags::READ_ONLY;
        }
        if multi_conn {
            f |= tflags::CAN_MULTI_CONN;
        }
        f
    }

    /// Context ids a query selects (`list`: namespace prefixes allowed).
    pub(crate) fn match_query(&self, query: &str, list: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        for (id, c) in self.contexts.iter().enumerate() {
            let name = c.name();
            let hit = name == query
                || (list
                    && matches!(query, "base:" | "qemu:" | "qemu:dirty-bitmap:")
                    && name.starts_with(query));
            if hit {
                ids.push(id as u32);
            }
        }
        ids
    }
}

pub(crate) struct ClientGuard(Arc<Export>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.state.send_modify(|s| s.clients -= 1);
    }
}
