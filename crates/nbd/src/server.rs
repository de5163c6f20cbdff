//! The NBD server: exports over block backends, the handshake, and transmission.
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

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use block::map::extent_at;
use block::{BlockBackend, BlockError, ErrorKind, IoVec, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::proto::{self, cflags, chunk, cmd, errno, info, opt, rep, tflags, Extent, Request};

/// Requests served at the same time on one connection; the reader waits beyond that.
const MAX_IN_FLIGHT: usize = 64;
/// Longest option data we read during the handshake; longer options get ERR_TOO_BIG.
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Most extents in one BLOCK_STATUS chunk.
const MAX_EXTENTS: usize = 128 << 10;
/// Granularity at which sparse reads are split into data and hole chunks.
const SPARSE_GRANULE: usize = 64 << 10;

/// Server-wide settings (`nbd-server-start`).
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// Most simultaneous connections; 0 = no limit. 1 also withholds multi-conn.
    pub max_connections: u32,
    /// Clients that have not finished the handshake by then are dropped; `None` = no limit.
    pub handshake_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 100,
            handshake_timeout: Some(Duration::from_secs(10)),
        }
    }
}

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
struct Allocation {
    depth: bool,
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
struct ExportState {
    clients: usize,
    retired: bool,
}

/// An export: served under its name while registered with a server.
#[derive(Debug)]
pub struct Export {
    config: ExportConfig,
    contexts: Vec<Arc<dyn MetaContext>>,
    state: watch::Sender<ExportState>,
    kill: watch::Sender<bool>,
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

    fn attach(self: &Arc<Self>) -> Option<ClientGuard> {
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

    fn min_block(&self) -> u32 {
        self.config
            .backend
            .node()
            .facts()
            .request_alignment
            .clamp(1, 64 << 10)
    }

    fn transmission_flags(&self, structured: bool, multi_conn: bool) -> u16 {
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
    fn match_query(&self, query: &str, list: bool) -> Vec<u32> {
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

struct ClientGuard(Arc<Export>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.state.send_modify(|s| s.clients -= 1);
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
    config: ServerConfig,
    exports: Mutex<Vec<Arc<Export>>>,
    stop: watch::Sender<bool>,
    permits: Option<Arc<Semaphore>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NbdServer {
    /// A server with no exports.
    pub fn new(config: ServerConfig) -> Arc<NbdServer> {
        let permits = (config.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(config.max_connections as usize)));
        Arc::new(NbdServer {
            config,
            exports: Mutex::new(Vec::new()),
            stop: watch::Sender::new(false),
            permits,
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

    fn exports(&self) -> Vec<Arc<Export>> {
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
        transmission(session, rd, wr).await;
    }

    async fn handshake<R, W>(&self, rd: &mut R, wr: &mut W) -> std::io::Result<Option<Session>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        hello
            .extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        wr.write_all(&hello).await?;
        let client_flags = rd.read_u32().await?;
        if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Ok(None);
        }
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        let mut hs = Handshake::default();
        loop {
            let mut h = [0u8; 16];
            rd.read_exact(&mut h).await?;
            let Ok(header) = proto::OptionHeader::decode(&h) else {
                return Ok(None);
            };
            if header.len > MAX_OPTION_DATA {
                let mut sink = tokio::io::sink();
                tokio::io::copy(&mut rd.take(u64::from(header.len)), &mut sink).await?;
                reply(wr, header.option, rep::ERR_TOO_BIG, b"option data too long").await?;
                continue;
            }
            let mut data = vec![0u8; header.len as usize];
            rd.read_exact(&mut data).await?;
            let next = match self
                .option(&mut hs, header.option, &data, no_zeroes, wr)
                .await
            {
                Ok(next) => next,
                Err(OptError::Io(e)) => return Err(e),
                Err(OptError::Refuse(code, msg)) => {
                    reply(wr, header.option, code, msg.as_bytes()).await?;
                    Next::Continue
                }
            };
            match next {
                Next::Continue => {}
                Next::Close => return Ok(None),
                Next::Transmit(session) => return Ok(Some(session)),
            }
        }
    }

    fn find(&self, name: &str) -> Result<Arc<Export>, OptError> {
        self.export(name).ok_or_else(|| {
            OptError::Refuse(rep::ERR_UNKNOWN, format!("export '{name}' not present"))
        })
    }

    async fn option<W: AsyncWrite + Unpin>(
        &self,
        hs: &mut Handshake,
        option: u32,
        data: &[u8],
        no_zeroes: bool,
        wr: &mut W,
    ) -> Result<Next, OptError> {
        let multi_conn = self.config.max_connections != 1;
        match option {
            opt::EXPORT_NAME => {
                let Ok(name) = proto::Reader::new(data).string(data.len(), "export name") else {
                    return Ok(Next::Close);
                };
                // Counted as a client before it learns the export exists (no race with a
                // safe block-export-del).
                let Some((export, guard)) = self.export(&name).and_then(|e| {
                    let g = e.attach()?;
                    Some((e, g))
                }) else {
                    return Ok(Next::Close);
                };
                let mut v = Vec::with_capacity(134);
                v.extend_from_slice(&export.backend().len().to_be_bytes());
                v.extend_from_slice(
                    &export
                        .transmission_flags(hs.structured, multi_conn)
                        .to_be_bytes(),
                );
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&v).await?;
                let contexts = hs.contexts_for(&name);
                Ok(Next::Transmit(Session::new(
                    export,
                    guard,
                    hs.structured,
                    contexts,
                    multi_conn,
                )))
            }
            opt::ABORT => {
                reply(wr, option, rep::ACK, &[]).await?;
                Ok(Next::Close)
            }
            opt::LIST => {
                if !data.is_empty() {
                    return Err(invalid("NBD_OPT_LIST takes no data"));
                }
                for e in self.exports() {
                    let mut v = Vec::new();
                    proto::put_string32(&mut v, e.name());
                    v.extend_from_slice(e.config.description.as_bytes());
                    reply(wr, option, rep::SERVER, &v).await?;
                }
                reply(wr, option, rep::ACK, &[]).await?;
                Ok(Next::Continue)
            }
            opt::STARTTLS => Err(OptError::Refuse(
                rep::ERR_POLICY,
                "TLS is not configured".into(),
            )),
            opt::INFO | opt::GO => {
                let req = proto::InfoRequest::decode(data).map_err(|e| invalid(e.0))?;
                let export = self.find(&req.name)?;
                // A client that goes ahead is counted before it hears the final ACK.
                let guard = match option {
                    opt::GO => Some(export.attach().ok_or_else(|| {
                        OptError::Refuse(
                            rep::ERR_UNKNOWN,
                            format!("export '{}' not present", req.name),
                        )
                    })?),
                    _ => None,
                };
                let min = export.min_block();
                let asked_block_size = req.requests.contains(&info::BLOCK_SIZE);
                if option == opt::GO && min > 1 && !asked_block_size {
                    let msg = format!("export '{}' requires {min}-byte alignment", req.name);
                    return Err(OptError::Refuse(rep::ERR_BLOCK_SIZE_REQD, msg));
                }
                if req.requests.contains(&info::NAME) {
                    let mut v = info::NAME.to_be_bytes().to_vec();
                    v.extend_from_slice(export.name().as_bytes());
                    reply(wr, option, rep::INFO, &v).await?;
                }
                if req.requests.contains(&info::DESCRIPTION)
                    && !export.config.description.is_empty()
                {
                    let mut v = info::DESCRIPTION.to_be_bytes().to_vec();
                    v.extend_from_slice(export.config.description.as_bytes());
                    reply(wr, option, rep::INFO, &v).await?;
                }
                let mut v = info::BLOCK_SIZE.to_be_bytes().to_vec();
                v.extend_from_slice(&min.to_be_bytes());
                v.extend_from_slice(&min.max(4096).to_be_bytes());
                v.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
                reply(wr, option, rep::INFO, &v).await?;
                let mut v = info::EXPORT.to_be_bytes().to_vec();
                v.extend_from_slice(&export.backend().len().to_be_bytes());
                v.extend_from_slice(
                    &export
                        .transmission_flags(hs.structured, multi_conn)
                        .to_be_bytes(),
                );
                reply(wr, option, rep::INFO, &v).await?;
                reply(wr, option, rep::ACK, &[]).await?;
                let contexts = hs.contexts_for(&req.name);
                match guard {
                    Some(guard) => Ok(Next::Transmit(Session::new(
                        export,
                        guard,
                        hs.structured,
                        contexts,
                        multi_conn,
                    ))),
                    None => Ok(Next::Continue),
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return Err(invalid("option takes no data"));
                }
                if hs.structured {
                    return Err(invalid("structured replies already negotiated"));
                }
                hs.structured = true;
                reply(wr, option, rep::ACK, &[]).await?;
                Ok(Next::Continue)
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if !hs.structured {
                    return Err(invalid("structured replies must be negotiated first"));
                }
                let req = proto::MetaRequest::decode(data).map_err(|e| invalid(e.0))?;
                let export = self.find(&req.name)?;
                let mut ids: Vec<u32> = Vec::new();
                if req.queries.is_empty() && !set {
                    ids.extend(0..export.contexts.len() as u32);
                }
                for q in &req.queries {
                    for id in export.match_query(q, !set) {
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
                for &id in &ids {
                    let mut v = if set { id } else { 0 }.to_be_bytes().to_vec();
                    v.extend_from_slice(export.contexts[id as usize].name().as_bytes());
                    reply(wr, option, rep::META_CONTEXT, &v).await?;
                }
                if set {
                    hs.meta = Some((req.name, ids));
                }
                reply(wr, option, rep::ACK, &[]).await?;
                Ok(Next::Continue)
            }
            _ => Err(OptError::Refuse(
                rep::ERR_UNSUP,
                format!("option {option} is not supported"),
            )),
        }
    }
}

async fn accept(
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

async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    wr.write_all(&proto::option_reply(option, kind, data)).await
}

/// Why an option ends without its normal replies.
enum OptError {
    /// The connection failed.
    Io(std::io::Error),
    /// Refused with an error reply (type and message); negotiation goes on.
    Refuse(u32, String),
}

impl From<std::io::Error> for OptError {
    fn from(e: std::io::Error) -> Self {
        OptError::Io(e)
    }
}

fn invalid(msg: impl Into<String>) -> OptError {
    OptError::Refuse(rep::ERR_INVALID, msg.into())
}

#[derive(Default)]
struct Handshake {
    structured: bool,
    /// Export name and context ids of the last SET_META_CONTEXT.
    meta: Option<(String, Vec<u32>)>,
}

impl Handshake {
    fn contexts_for(&self, export: &str) -> Vec<u32> {
        match &self.meta {
            Some((name, ids)) if name == export => ids.clone(),
            _ => Vec::new(),
        }
    }
}

enum Next {
    Continue,
    Close,
    Transmit(Session),
}

/// What a connection negotiated.
struct Session {
    export: Arc<Export>,
    /// Counts this connection as a client of the export while it lives.
    _client: ClientGuard,
    structured: bool,
    contexts: Vec<u32>,
    flags: u16,
    min_block: u32,
}

impl Session {
    fn new(
        export: Arc<Export>,
        client: ClientGuard,
        structured: bool,
        contexts: Vec<u32>,
        multi_conn: bool,
    ) -> Self {
        let flags = export.transmission_flags(structured, multi_conn);
        let min_block = export.min_block();
        Session {
            export,
            _client: client,
            structured,
            contexts,
            flags,
            min_block,
        }
    }
}

type Writer = Arc<tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>>;

async fn transmission<R, W>(session: Session, mut rd: R, wr: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let session = Arc::new(session);
    let writer: Writer = Arc::new(tokio::sync::Mutex::new(Box::new(wr)));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut kill = session.export.kill.subscribe();
    let mut tasks = JoinSet::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut h = [0u8; proto::REQUEST_LEN];
        let read = tokio::select! {
            r = rd.read_exact(&mut h) => r,
            _ = kill.wait_for(|k| *k) => break,
        };
        if read.is_err() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        let Ok(req) = Request::decode(&h) else {
            break; // Not an NBD request: the stream cannot be resynchronised.
        };
        if req.kind == cmd::DISC {
            break;
        }
        let mut payload = None;
        if req.has_payload() {
            if req.len <= proto::MAX_PAYLOAD {
                let mut buf = BytesMut::with_capacity(req.len as usize);
                let mut take = (&mut rd).take(u64::from(req.len));
                let mut ok = true;
                while buf.len() < req.len as usize {
                    match take.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => {
                            ok = false;
                            break;
                        }
                        Ok(_) => {}
                    }
                }
                if !ok {
                    break;
                }
                payload = Some(buf.freeze());
            } else {
                // Too large to accept: consume it to stay in sync, then answer EINVAL.
                let mut sink = tokio::io::sink();
                let mut take = (&mut rd).take(u64::from(req.len));
                if tokio::io::copy(&mut take, &mut sink).await.ok() != Some(u64::from(req.len)) {
                    break;
                }
            }
        }
        let session = session.clone();
        let writer = writer.clone();
        tasks.spawn(async move {
            let _slot = slot;
            serve_request(&session, &writer, req, payload).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let _ = writer.lock().await.shutdown().await;
}

/// A request's failure: the wire error value and a message for structured error chunks.
struct Fail(u32, String);

impl From<BlockError> for Fail {
    fn from(e: BlockError) -> Self {
        let code = match e.kind() {
            ErrorKind::Unsupported => errno::ENOTSUP,
            _ => errno::from_host(e.errno()),
        };
        Fail(code, e.to_string())
    }
}

fn einval(msg: impl Into<String>) -> Fail {
    Fail(errno::EINVAL, msg.into())
}

fn check(session: &Session, req: &Request) -> Result<(), Fail> {
    // FUA is accepted on every command, as QEMU does; it only matters where data changes.
    let allowed = cflags::FUA
        | match req.kind {
            cmd::READ if session.structured => cflags::DF,
            cmd::READ | cmd::WRITE | cmd::TRIM | cmd::FLUSH | cmd::CACHE => 0,
            cmd::WRITE_ZEROES => cflags::NO_HOLE | cflags::FAST_ZERO,
            cmd::BLOCK_STATUS => cflags::REQ_ONE,
            other => return Err(einval(format!("unsupported command {other}"))),
        };
    if req.flags & !allowed != 0 {
        return Err(einval(format!(
            "unsupported flags {:#x} for command {}",
            req.flags & !allowed,
            req.kind
        )));
    }
    if req.kind == cmd::FLUSH {
        return Ok(());
    }
    let modifies = matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
    if modifies && session.flags & tflags::READ_ONLY != 0 {
        return Err(Fail(errno::EPERM, "export is read-only".into()));
    }
    if matches!(req.kind, cmd::READ | cmd::WRITE | cmd::CACHE) && req.len > proto::MAX_PAYLOAD {
        return Err(einval(format!(
            "length {} is larger than the maximum of {}",
            req.len,
            proto::MAX_PAYLOAD
        )));
    }
    let size = session.export.backend().len();
    let past_end = req
        .offset
        .checked_add(u64::from(req.len))
        .is_none_or(|end| end > size);
    if past_end {
        let code = if matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        return Err(Fail(
            code,
            format!(
                "request at offset {} length {} is past the end of the export ({size} bytes)",
                req.offset, req.len
            ),
        ));
    }
    let align = u64::from(session.min_block);
    if align > 1 && (req.offset % align != 0 || u64::from(req.len) % align != 0) {
        return Err(einval(format!(
            "request at offset {} length {} is not aligned to {align} bytes",
            req.offset, req.len
        )));
    }
    if req.kind == cmd::BLOCK_STATUS {
        if !session.structured || session.contexts.is_empty() {
            return Err(einval("no metadata context was negotiated"));
        }
        if req.len == 0 {
            return Err(einval("block status of zero length"));
        }
    }
    Ok(())
}

async fn serve_request(session: &Session, writer: &Writer, req: Request, payload: Option<Bytes>) {
    if let Err(f) = check(session, &req) {
        send_error(session, writer, &req, f).await;
        return;
    }
    if req.kind == cmd::WRITE && payload.is_none() {
        // Oversized write whose payload was skipped; `check` already answered it.
        return;
    }
    let backend = session.export.backend();
    let fua = req.flags & cflags::FUA != 0 || session.export.config.writethrough;
    let result: Result<(), Fail> = match req.kind {
        cmd::READ => {
            return read(session, writer, &req).await;
        }
        cmd::BLOCK_STATUS => {
            return block_status(session, writer, &req).await;
        }
        cmd::WRITE => {
            let data = IoVec::from(payload.unwrap_or_default());
            backend
                .write(
                    req.offset,
                    data,
                    WriteFlags {
                        fua,
                        ..WriteFlags::default()
                    },
                )
                .await
                .map_err(Fail::from)
        }
        cmd::WRITE_ZEROES => {
            let flags = ZeroFlags {
                may_unmap: req.flags & cflags::NO_HOLE == 0,
                no_fallback: req.flags & cflags::FAST_ZERO != 0,
                fua,
            };
            backend
                .write_zeroes(req.offset, u64::from(req.len), flags)
                .await
                .map_err(Fail::from)
        }
        cmd::TRIM => {
            let r = backend.discard(req.offset, u64::from(req.len)).await;
            match r {
                Ok(()) if fua => backend.flush().await.map_err(Fail::from),
                other => other.map_err(Fail::from),
            }
        }
        cmd::FLUSH => backend.flush().await.map_err(Fail::from),
        cmd::CACHE => backend
            .read(req.offset, req.len as usize)
            .await
            .map(drop)
            .map_err(Fail::from),
        _ => Err(einval("unsupported command")),
    };
    match result {
        Ok(()) => send(writer, &[&proto::simple_reply(0, req.cookie)]).await,
        Err(f) => send_error(session, writer, &req, f).await,
    }
}

async fn send(writer: &Writer, parts: &[&[u8]]) {
    let mut w = writer.lock().await;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    // Small replies go out in one write; large ones as header then data, without a copy.
    if parts.len() > 1 && total <= 64 << 10 {
        let mut v = Vec::with_capacity(total);
        for p in parts {
            v.extend_from_slice(p);
        }
        let _ = w.write_all(&v).await;
        return;
    }
    for p in parts {
        if w.write_all(p).await.is_err() {
            return;
        }
    }
}

async fn send_error(session: &Session, writer: &Writer, req: &Request, f: Fail) {
    let structured_only = matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS);
    if session.structured && structured_only {
        send(writer, &[&proto::error_chunk(req.cookie, f.0, &f.1)]).await;
    } else {
        send(writer, &[&proto::simple_reply(f.0, req.cookie)]).await;
    }
}

async fn read(session: &Session, writer: &Writer, req: &Request) {
    let data = match session
        .export
        .backend()
        .read(req.offset, req.len as usize)
        .await
    {
        Ok(d) => d,
        Err(e) => return send_error(session, writer, req, Fail::from(e)).await,
    };
    if !session.structured {
        return send(writer, &[&proto::simple_reply(0, req.cookie), &data]).await;
    }
    if req.flags & cflags::DF != 0 || data.is_empty() {
        return send_data_chunk(writer, req.cookie, true, req.offset, &data).await;
    }
    // Split into data and hole chunks at SPARSE_GRANULE, so zeroes need not cross the wire.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, piece) in data.chunks(SPARSE_GRANULE).enumerate() {
        let zero = block::buf::is_zero(piece);
        let start = i * SPARSE_GRANULE;
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += piece.len(),
            _ => runs.push((start, piece.len(), zero)),
        }
    }
    let last = runs.len() - 1;
    for (i, (start, len, zero)) in runs.into_iter().enumerate() {
        let done = i == last;
        let offset = req.offset + start as u64;
        if zero {
            let flags = if done { chunk::FLAG_DONE } else { 0 };
            let mut v = proto::chunk_header(flags, chunk::OFFSET_HOLE, req.cookie, 12).to_vec();
            v.extend_from_slice(&offset.to_be_bytes());
            v.extend_from_slice(&(len as u32).to_be_bytes());
            send(writer, &[&v]).await;
        } else {
            send_data_chunk(writer, req.cookie, done, offset, &data[start..start + len]).await;
        }
    }
}

async fn send_data_chunk(writer: &Writer, cookie: u64, done: bool, offset: u64, data: &[u8]) {
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    let header = proto::chunk_header(flags, chunk::OFFSET_DATA, cookie, 8 + data.len() as u32);
    send(writer, &[&header, &offset.to_be_bytes(), data]).await;
}

async fn block_status(session: &Session, writer: &Writer, req: &Request) {
    let max = if req.flags & cflags::REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let mut chunks = Vec::with_capacity(session.contexts.len());
    for &id in &session.contexts {
        let ctx = &session.export.contexts[id as usize];
        match ctx
            .extents(
                session.export.backend(),
                req.offset,
                u64::from(req.len),
                max,
            )
            .await
        {
            Ok(extents) => chunks.push((id, extents)),
            Err(e) => return send_error(session, writer, req, Fail::from(e)).await,
        }
    }
    let last = chunks.len().saturating_sub(1);
    for (i, (id, extents)) in chunks.into_iter().enumerate() {
        let flags = if i == last { chunk::FLAG_DONE } else { 0 };
        let len = 4 + 8 * extents.len() as u32;
        let mut v = proto::chunk_header(flags, chunk::BLOCK_STATUS, req.cookie, len).to_vec();
        v.extend_from_slice(&id.to_be_bytes());
        for e in extents {
            v.extend_from_slice(&e.len.to_be_bytes());
            v.extend_from_slice(&e.flags.to_be_bytes());
        }
        send(writer, &[&v]).await;
    }
}
