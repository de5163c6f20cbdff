//! The NBD server: listening, connections, and the exports it offers. Exports are in
//! [`crate::export`], the handshake in [`crate::handshake`], transmission in
//! [`crate::transmission`].
//!
//! ```text
//!  listener ──accept (max-connections permits)──▶ connection task
//!     handshake (deadline: handshake-max-seconds) ── options ──▶ GO / EXPORT_NAME
//!     transmission: reader loop ──spawn per request──▶ handler ──▶ BlockBackend
//!                                                         └──▶ replies, one writer lock
//! ```
//!
//! An [`Export`] holds a [`BlockBackend`], so it is a parent of its node like any other: when
//! the graph re-points the backend's root edge (a filter inserted, a mirror pivots) the export
//! follows. Exports count their connections; deleting one retires it (no new clients), and
//! [`Export::closed`] resolves once the last client is gone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::transmission::transmission;

pub use crate::export::{Export, ExportConfig, MetaContext};

/// Requests served at the same time on one connection; the reader waits beyond that.
pub(crate) const MAX_IN_FLIGHT: usize = 64;
/// Longest option data we read during the handshake; longer options get ERR_TOO_BIG.
pub(crate) const MAX_OPTION_DATA: u32 = 64 << 10;
/// Most extents in one BLOCK_STATUS chunk.
pub(crate) const MAX_EXTENTS: usize = 128 << 10;
/// Granularity at which sparse reads are split into data and hole chunks.
pub(crate) const SPARSE_GRANULE: usize = 64 << 10;

/// Default [`ServerConfig::buffer_budget`]: with the floor's requests, enough data in flight
/// to keep a disk busy (`bench/rss.sh`, `bench/nbd.sh`).
pub const DEFAULT_BUFFER_BUDGET: usize = 2 << 20;
/// Requests admitted whatever their size, on top of the budget.
pub(crate) const BUFFER_FLOOR: usize = 4;
/// The budget's unit.
pub(crate) const BUFFER_UNIT: usize = 4096;

/// Server-wide settings (`nbd-server-start`).
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// Most simultaneous connections; 0 = no limit. 1 also withholds multi-conn.
    pub max_connections: u32,
    /// Clients that have not finished the handshake by then are dropped; `None` = no limit.
    pub handshake_timeout: Option<Duration>,
    /// Bytes of read and write data that requests may hold at once, across every connection,
    /// beyond the first few requests (which go on whatever their size): a request waits
    /// (before its payload is read off the socket) until its data fits, so memory stays
    /// bounded however many clients queue how much. A request larger than the budget takes
    /// all of it. 0 = no limit.
    pub buffer_budget: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 100,
            handshake_timeout: Some(Duration::from_secs(10)),
            buffer_budget: DEFAULT_BUFFER_BUDGET,
        }
    }
}

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

/// The NBD server: a set of named exports and the connections to them.
#[derive(Debug)]
pub struct NbdServer {
    pub(crate) config: ServerConfig,
    pub(crate) exports: Mutex<Vec<Arc<Export>>>,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) permits: Option<Arc<Semaphore>>,
    /// The buffer budget, shared by every connection.
    pub(crate) buffers: Option<Arc<BufferBudget>>,
}

/// [`ServerConfig::buffer_budget`] in units of [`BUFFER_UNIT`], beside a floor of requests
/// admitted whatever their size, so a few large requests still stream at full speed.
#[derive(Debug)]
pub(crate) struct BufferBudget {
    units: usize,
    free: Arc<Semaphore>,
    floor: Arc<Semaphore>,
}

impl BufferBudget {
    fn new(bytes: usize) -> BufferBudget {
        let units = bytes.div_ceil(BUFFER_UNIT).min(Semaphore::MAX_PERMITS);
        BufferBudget {
            units,
            free: Arc::new(Semaphore::new(units)),
            floor: Arc::new(Semaphore::new(BUFFER_FLOOR)),
        }
    }

    /// Waits until a request holding `bytes` of data may go on: one of the floor's requests,
    /// or its bytes out of the budget (all of it for more than the budget). `None` only if
    /// the budget were closed, which it never is.
    pub(crate) async fn take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.floor.clone().try_acquire_owned() {
            return Some(p);
        }
        let units = u32::try_from(bytes.div_ceil(BUFFER_UNIT).min(self.units)).unwrap_or(u32::MAX);
        tokio::select! {
            p = self.free.clone().acquire_many_owned(units) => p.ok(),
            p = self.floor.clone().acquire_owned() => p.ok(),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NbdServer {
    /// A server with no exports.
    pub fn new(config: ServerConfig) -> Arc<NbdServer> {
        let permits = (config.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(config.max_connections as usize)));
        let buffers =
            (config.buffer_budget > 0).then(|| Arc::new(BufferBudget::new(config.buffer_budget)));
        Arc::new(NbdServer {
            config,
            exports: Mutex::new(Vec::new()),
            stop: watch::Sender::new(false),
            permits,
            buffers,
        })
    }

    /// The settings.
    pub fn config(&self) -> ServerConfig {
        self.config
    }

    /// Serves `export` under its name; fails if the name is taken.
    pub fn add_export(&self, export: Arc<Export>) -> Result<(), String> {
        let mut exports = lock(&self.exports);
        if exports.iter().any(|e| e.name() == export.name()) {
            return Err(format!(
                "NBD server already has export named '{}'",
                export.name()
            ));
        }
        exports.push(export);
        Ok(())
    }

    /// Stops serving the export named `name` (clients already connected stay).
    pub fn remove_export(&self, name: &str) -> Option<Arc<Export>> {
        let mut exports = lock(&self.exports);
        let i = exports.iter().position(|e| e.name() == name)?;
        Some(exports.remove(i))
    }

    /// The export named `name`.
    pub fn export(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.exports)
            .iter()
            .find(|e| e.name() == name)
            .cloned()
    }

    pub(crate) fn exports(&self) -> Vec<Arc<Export>> {
        lock(&self.exports).clone()
    }

    /// Stops accepting and drops clients still in the handshake. Exports are left to the
    /// caller (retire them to end their connections).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Accepts connections until [`stop`](Self::stop).
    pub async fn run(self: Arc<Self>, listener: Listener) {
        let mut stop = self.stop.subscribe();
        let mut conns = JoinSet::new();
        loop {
            let permit = match &self.permits {
                Some(p) => tokio::select! {
                    p = p.clone().acquire_owned() => match p {
                        Ok(p) => Some(p),
                        Err(_) => break,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                },
                None => None,
            };
            let accepted = tokio::select! {
                a = accept(&listener) => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            while conns.try_join_next().is_some() {}
            match accepted {
                Ok(stream) => {
                    let server = self.clone();
                    let span = tracing::debug_span!(target: "nbd_connection", "nbd_connection");
                    conns.spawn(tracing::Instrument::instrument(
                        async move {
                            let _permit = permit;
                            tracing::debug!(target: "nbd_connection", "accepted");
                            server.serve_connection(stream).await;
                            tracing::debug!(target: "nbd_connection", "closed");
                        },
                        span,
                    ));
                }
                Err(e) => {
                    tracing::warn!(target: "blockjobd", "accepting an NBD client: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Connections end on their own: in the handshake through `stop`, in transmission
        // when their export is retired.
        conns.detach_all();
    }

    /// Serves one client on `stream` until it disconnects or is dropped.
    pub async fn serve_connection<S>(self: &Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, mut wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(64 << 10, rd);
        let mut stop = self.stop.subscribe();
        let handshake = async {
            match self.config.handshake_timeout {
                Some(t) => tokio::time::timeout(t, self.handshake(&mut rd, &mut wr))
                    .await
                    .unwrap_or(Ok(None)),
                None => self.handshake(&mut rd, &mut wr).await,
            }
        };
        let session = tokio::select! {
            s = handshake => s,
            _ = stop.wait_for(|s| *s) => Ok(None),
        };
        let session = match session {
            Ok(Some(session)) => session,
            Ok(None) => {
                tracing::debug!(target: "nbd_connection", "handshake ended without an export");
                let _ = wr.shutdown().await;
                return;
            }
            Err(e) => {
                tracing::debug!(target: "nbd_connection", "handshake failed: {e}");
                let _ = wr.shutdown().await;
                return;
            }
        };
        tracing::debug!(target: "nbd_connection", export = %session.export.name(), "transmission");
        transmission(session, rd, wr, self.buffers.clone()).await;
    }
}

pub(crate) async fn accept(
    listener: &Listener,
) -> std::io::Result<std::pin::Pin<Box<dyn AsyncStream + Send>>> {
    match listener {
        Listener::Unix(l) => Ok(Box::pin(l.accept().await?.0)),
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            s.set_nodelay(true)?;
            Ok(Box::pin(s))
        }
    }
}

/// A byte stream (unix or TCP).
pub trait AsyncStream: AsyncRead + AsyncWrite {}
impl<T: AsyncRead + AsyncWrite> AsyncStream for T {}
