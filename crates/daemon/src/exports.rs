//! Block exports and the NBD server: what `nbd-server-*`, `block-export-*` and
//! `query-block-exports` act on.
//!
//! ```text
//!  block-export-add ─▶ Export (a BlockBackend: root edge to the node) ─▶ NbdServer by name
//!  block-export-del ─▶ retire (safe: refused while clients are connected; hard: drop them)
//!                      └─ last client gone ─▶ entry removed, edge dropped, BLOCK_EXPORT_DELETED
//! ```
//!
//! The registry is shared with the task that finishes a hard deletion in the background, so it
//! sits behind a mutex; commands still reach it only through the control loop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use block::{BlockBackend, BlockNode};
use nbd::proto::Extent;
use nbd::server::{Listener, MetaContext};
use nbd::{Export, NbdServer};
use qmp::Event;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// A dirty bitmap exported as `qemu:dirty-bitmap:<name>`: extents with flag 1 are dirty. The
/// bitmap is busy for as long as the export exists ([`ExportEntry::bitmaps`]).
#[derive(Debug)]
pub struct BitmapContext {
    /// The node holding the bitmap (not necessarily the exported node).
    pub node: Arc<BlockNode>,
    /// The bitmap's name.
    pub name: String,
}

/// Longest extent reported, so that lengths fit the protocol's 32 bits.
const MAX_EXTENT: u64 = 1 << 31;

#[async_trait]
impl MetaContext for BitmapContext {
    fn name(&self) -> String {
        format!("qemu:dirty-bitmap:{}", self.name)
    }

    async fn extents(
        &self,
        _backend: &BlockBackend,
        offset: u64,
        len: u64,
        max: usize,
    ) -> block::Result<Vec<Extent>> {
        let bitmaps = self.node.bitmaps();
        let Some(b) = bitmaps.iter().find(|b| b.name() == Some(&self.name)) else {
            // Busy bitmaps cannot be removed; reaching this means the node itself went.
            return Err(block::BlockError::invalid(format!(
                "bitmap '{}' is gone",
                self.name
            )));
        };
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end && out.len() < max.max(1) {
            let (stop, flags) = if b.is_dirty(at) && at < b.disk_size() {
                (b.next_clean(at, end).unwrap_or(end), 1)
            } else {
                let next = b.next_dirty_area(at, end, u64::MAX).map_or(end, |(s, _)| s);
                (next, 0)
            };
            let n = (stop - at).min(MAX_EXTENT);
            out.push(Extent {
                len: n as u32,
                flags,
            });
            at += n;
        }
        Ok(out)
    }
}

/// One export as `query-block-exports` lists it.
#[derive(Debug)]
pub struct ExportEntry {
    /// The export id.
    pub id: String,
    /// The NBD export.
    pub export: Arc<Export>,
    /// Deletion has started; the entry goes when the last client has gone.
    pub shutting_down: bool,
    /// Exported dirty bitmaps, busy until the entry goes.
    pub bitmaps: Vec<(Arc<BlockNode>, String)>,
}

impl ExportEntry {
    /// The export is gone: its bitmaps are free again.
    fn release(&self) {
        for (node, name) in &self.bitmaps {
            node.with_bitmap(name, |b| b.set_busy(false));
        }
    }
}

/// The running NBD server.
#[derive(Debug)]
struct Running {
    server: Arc<NbdServer>,
    task: tokio::task::JoinHandle<()>,
    socket: Option<PathBuf>,
}

/// The exports and the NBD server.
#[derive(Debug)]
pub struct Exports {
    entries: Arc<Mutex<Vec<ExportEntry>>>,
    server: Option<Running>,
    events: broadcast::Sender<Event>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn deleted(events: &broadcast::Sender<Event>, id: &str) {
    // No monitor listening is fine: the event is simply not seen.
    let _ = events.send(Event::new(
        "BLOCK_EXPORT_DELETED",
        Some(json!({ "id": id })),
    ));
}

/// Drops entry `id` and announces it, unless someone else already did.
fn remove(entries: &Mutex<Vec<ExportEntry>>, events: &broadcast::Sender<Event>, id: &str) {
    let gone: Vec<ExportEntry> = {
        let mut entries = lock(entries);
        let (gone, kept) = std::mem::take(&mut *entries)
            .into_iter()
            .partition(|e| e.id == id);
        *entries = kept;
        gone
    };
    for entry in &gone {
        entry.release();
    }
    if !gone.is_empty() {
        deleted(events, id);
    }
}

/// How `block-export-del` treats connected clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Disconnect them.
    Hard,
}

impl Exports {
    /// No server, no exports.
    pub fn new(events: broadcast::Sender<Event>) -> Self {
        Self {
            entries: Arc::new(Mutex::new(Vec::new())),
            server: None,
            events,
        }
    }

    /// The NBD server, when started.
    pub fn server(&self) -> Option<&Arc<NbdServer>> {
        self.server.as_ref().map(|r| &r.server)
    }

    /// Starts serving on `listener`.
    pub fn start_server(
        &mut self,
        server: Arc<NbdServer>,
        listener: Listener,
        socket: Option<PathBuf>,
    ) {
        let task = tokio::spawn(server.clone().run(listener));
        self.server = Some(Running {
            server,
            task,
            socket,
        });
    }

    /// `query-block-exports`, newest first.
    pub fn query(&self) -> Value {
        let entries = lock(&self.entries);
        Value::Array(
            entries
                .iter()
                .rev()
                .map(|e| {
                    json!({
                        "node-name": e.export.backend().node().name(),
                        "shutting-down": e.shutting_down,
                        "type": "nbd",
                        "id": e.id,
                    })
                })
                .collect(),
        )
    }

    /// True when an export (even one shutting down) has this id.
    pub fn has_id(&self, id: &str) -> bool {
        lock(&self.entries).iter().any(|e| e.id == id)
    }

    /// Registers an export already added to the server, with the bitmaps it made busy.
    pub fn insert(&self, id: String, export: Arc<Export>, bitmaps: Vec<(Arc<BlockNode>, String)>) {
        lock(&self.entries).push(ExportEntry {
            id,
            export,
            shutting_down: false,
            bitmaps,
        });
    }

    /// Deletes export `id`: at once when no client is connected (the event precedes the
    /// reply, as in QEMU), otherwise in the background once the clients are gone.
    pub fn delete(&self, id: &str, mode: RemoveMode) -> Result<(), String> {
        let export = {
            let mut entries = lock(&self.entries);
            let Some(entry) = entries.iter_mut().find(|e| e.id == id) else {
                return Err(format!("Export '{id}' is not found"));
            };
            if entry.shutting_down {
                return Err(format!("Export '{id}' is already shutting down"));
            }
            if mode == RemoveMode::Safe && entry.export.clients() > 0 {
                return Err(format!("export '{id}' still in use"));
            }
            entry.shutting_down = true;
            entry.export.clone()
        };
        if let Some(server) = self.server() {
            server.remove_export(export.name());
        }
        match mode {
            RemoveMode::Safe => export.retire(),
            RemoveMode::Hard => export.disconnect_all(),
        }
        if export.clients() == 0 {
            self.finish(id);
            return Ok(());
        }
        let entries = self.entries.clone();
        let events = self.events.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            export.closed().await;
            drop(export);
            remove(&entries, &events, &id);
        });
        Ok(())
    }

    fn finish(&self, id: &str) {
        remove(&self.entries, &self.events, id);
    }

    /// `nbd-server-stop`: every export goes (clients dropped), then the listener.
    pub async fn stop_server(&mut self) -> Result<(), String> {
        let Some(running) = self.server.take() else {
            return Err("NBD server not running".into());
        };
        running.server.stop();
        let live: Vec<Arc<Export>> = {
            let entries = lock(&self.entries);
            entries.iter().map(|e| e.export.clone()).collect()
        };
        for e in &live {
            running.server.remove_export(e.name());
            e.disconnect_all();
        }
        // Clients finish their requests in flight; a stuck one does not hold the daemon.
        let all_closed = async {
            for e in &live {
                e.closed().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), all_closed).await;
        let ids: Vec<String> = lock(&self.entries).iter().map(|e| e.id.clone()).collect();
        for id in ids.iter().rev() {
            self.finish(id);
        }
        running.task.abort();
        if let Some(p) = running.socket {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// Daemon shutdown: like `nbd-server-stop`, when a server runs.
    pub async fn shutdown(&mut self) {
        if self.server.is_some() {
            let _ = self.stop_server().await;
        }
    }
}
