//! The NBD client: fixed-newstyle handshake (structured replies, `base:allocation`, NBD_OPT_GO
//! with block sizes, NBD_OPT_EXPORT_NAME as fallback) and concurrent requests on one
//! connection, matched to their replies by cookie.
//!
//! When the connection drops, requests in flight and new ones are retried on a fresh
//! connection for up to `reconnect_delay` (QEMU's `reconnect-delay`); after that they fail
//! with EIO until a reconnect succeeds.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use crate::proto::{self, chunk, cmd, info, opt, rep, tflags, Extent, ReplyHeader, Request};

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectTo {
    /// A unix socket path.
    Unix(PathBuf),
    /// Host and port.
    Tcp(String, String),
}

impl fmt::Display for ConnectTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectTo::Unix(p) => write!(f, "unix:{}", p.display()),
            ConnectTo::Tcp(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// A failed request or connection: a host errno and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientError {
    /// Host errno.
    pub errno: i32,
    /// What happened.
    pub message: String,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClientError {}

fn cerr(errno: i32, message: impl Into<String>) -> ClientError {
    ClientError {
        errno,
        message: message.into(),
    }
}

fn io_err(what: &str, e: std::io::Error) -> ClientError {
    cerr(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
}

/// What the server told us about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size (1 when not advertised).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum request size.
    pub max_block: u32,
    /// Structured replies are in use.
    pub structured: bool,
    /// The id of `base:allocation`, when negotiated.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// True when the export has transmission flag `flag`.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

trait Stream: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Stream for T {}

async fn connect(to: &ConnectTo) -> Result<Pin<Box<dyn Stream>>, ClientError> {
    match to {
        ConnectTo::Unix(p) => tokio::net::UnixStream::connect(p)
            .await
            .map(|s| Box::pin(s) as Pin<Box<dyn Stream>>)
            .map_err(|e| io_err(&format!("Failed to connect to '{}'", p.display()), e)),
        ConnectTo::Tcp(h, port) => {
            let s = tokio::net::TcpStream::connect(format!("{h}:{port}"))
                .await
                .map_err(|e| io_err(&format!("Failed to connect to '{h}:{port}'"), e))?;
            s.set_nodelay(true)
                .map_err(|e| io_err("Failed to set TCP_NODELAY", e))?;
            Ok(Box::pin(s))
        }
    }
}

async fn send_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    data: &[u8],
) -> Result<(), ClientError> {
    w.write_all(&proto::OptionHeader::encode(option, data))
        .await
        .map_err(|e| io_err("sending an option", e))
}

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    option: u32,
) -> Result<(u32, Vec<u8>), ClientError> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h)
        .await
        .map_err(|e| io_err("reading an option reply", e))?;
    let h = proto::OptionReplyHeader::decode(&h).map_err(|e| cerr(libc::EPROTO, e.0))?;
    if h.option != option {
        return Err(cerr(libc::EPROTO, "option reply for another option"));
    }
    if h.len > 64 << 10 {
        return Err(cerr(libc::EPROTO, "option reply too long"));
    }
    let mut data = vec![0u8; h.len as usize];
    r.read_exact(&mut data)
        .await
        .map_err(|e| io_err("reading an option reply", e))?;
    Ok((h.reply, data))
}

fn option_error(reply: u32, data: &[u8], what: &str) -> ClientError {
    let msg = String::from_utf8_lossy(data);
    let errno = if reply == rep::ERR_UNKNOWN {
        libc::ENOENT
    } else {
        libc::EINVAL
    };
    let sep = if msg.is_empty() { "" } else { ": " };
    cerr(
        errno,
        format!("{what} failed (server error {:#x}){sep}{msg}", reply),
    )
}

async fn handshake(
    stream: Pin<Box<dyn Stream>>,
    export: &str,
) -> Result<(Arc<Conn>, ExportInfo), ClientError> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let e = |e| io_err("reading the NBD greeting", e);
    let magic = rd.read_u64().await.map_err(e)?;
    if magic != proto::NBDMAGIC {
        return Err(cerr(libc::EPROTO, "not an NBD server (bad magic)"));
    }
    if rd.read_u64().await.map_err(e)? != proto::IHAVEOPT {
        return Err(cerr(libc::EPROTO, "the server does not speak newstyle NBD"));
    }
    let server_flags = rd.read_u16().await.map_err(e)?;
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(cerr(
            libc::EPROTO,
            "the server does not speak fixed newstyle NBD",
        ));
    }
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    wr.write_all(&client_flags.to_be_bytes())
        .await
        .map_err(|e| io_err("sending client flags", e))?;

    send_option(&mut wr, opt::STRUCTURED_REPLY, &[]).await?;
    let (r, _) = read_option_reply(&mut rd, opt::STRUCTURED_REPLY).await?;
    let structured = r == rep::ACK;

    let mut base_allocation = None;
    if structured {
        let req = proto::MetaRequest {
            name: export.to_owned(),
            queries: vec!["base:allocation".into()],
        };
        send_option(&mut wr, opt::SET_META_CONTEXT, &req.encode()).await?;
        loop {
            let (r, data) = read_option_reply(&mut rd, opt::SET_META_CONTEXT).await?;
            match r {
                rep::META_CONTEXT if data.len() >= 4 && &data[4..] == b"base:allocation" => {
                    base_allocation = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]]))
                }
                rep::META_CONTEXT => {}
                rep::ACK => break,
                _ if rep::is_error(r) => break,
                _ => return Err(cerr(libc::EPROTO, "unexpected reply to SET_META_CONTEXT")),
            }
        }
    }

    let req = proto::InfoRequest {
        name: export.to_owned(),
        requests: vec![info::BLOCK_SIZE],
    };
    send_option(&mut wr, opt::GO, &req.encode()).await?;
    let mut size_flags: Option<(u64, u16)> = None;
    let (mut min, mut pref, mut max) = (1u32, 4096u32, proto::MAX_PAYLOAD);
    loop {
        let (r, data) = read_option_reply(&mut rd, opt::GO).await?;
        match r {
            rep::INFO => {
                let mut rr = proto::Reader::new(&data);
                let bad = |e: proto::ProtoError| cerr(libc::EPROTO, e.0);
                match rr.u16().map_err(bad)? {
                    info::EXPORT => {
                        size_flags = Some((rr.u64().map_err(bad)?, rr.u16().map_err(bad)?))
                    }
                    info::BLOCK_SIZE => {
                        min = rr.u32().map_err(bad)?.max(1);
                        pref = rr.u32().map_err(bad)?;
                        max = rr.u32().map_err(bad)?;
                    }
                    _ => {}
                }
            }
            rep::ACK => break,
            rep::ERR_UNSUP => {
                // An old server: NBD_OPT_EXPORT_NAME, which cannot report errors.
                send_option(&mut wr, opt::EXPORT_NAME, export.as_bytes()).await?;
                let e = |e| io_err("the server refused the export", e);
                let size = rd.read_u64().await.map_err(e)?;
                let flags = rd.read_u16().await.map_err(e)?;
                if !no_zeroes {
                    let mut z = [0u8; 124];
                    rd.read_exact(&mut z).await.map_err(e)?;
                }
                size_flags = Some((size, flags));
                break;
            }
            _ if rep::is_error(r) => {
                // Leave politely: the server need not log a broken negotiation.
                if send_option(&mut wr, opt::ABORT, &[]).await.is_ok() {
                    let _ = read_option_reply(&mut rd, opt::ABORT).await;
                }
                return Err(option_error(
                    r,
                    &data,
                    &format!("Requesting export '{export}'"),
                ));
            }
            _ => return Err(cerr(libc::EPROTO, "unexpected reply to NBD_OPT_GO")),
        }
    }
    let Some((size, flags)) = size_flags else {
        return Err(cerr(
            libc::EPROTO,
            "the server did not send the export size",
        ));
    };
    let info = ExportInfo {
        size,
        flags,
        min_block: min,
        preferred_block: pref,
        max_block: max.clamp(min, proto::MAX_PAYLOAD),
        structured,
        base_allocation,
    };
    Ok((Conn::start(rd, wr, info), info))
}

/// What a finished request produced.
#[derive(Debug)]
enum Outcome {
    Done,
    Data(BytesMut),
    Extents(Vec<Extent>),
    Failed(ClientError),
}

struct Pending {
    kind: u16,
    offset: u64,
    buf: Option<BytesMut>,
    extents: Vec<Extent>,
    error: Option<ClientError>,
    reply: oneshot::Sender<Result<Outcome, Lost>>,
}

/// The connection broke before the reply came.
#[derive(Debug)]
struct Lost;

struct Conn {
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Mutex<HashMap<u64, Pending>>,
    dead: AtomicBool,
    cookies: AtomicU64,
    base_allocation: Option<u32>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conn {
    fn start<R, W>(rd: R, wr: W, info: ExportInfo) -> Arc<Conn>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let conn = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(Box::new(wr)),
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            cookies: AtomicU64::new(1),
            base_allocation: info.base_allocation,
            reader: Mutex::new(None),
        });
        let weak = Arc::downgrade(&conn);
        let task = tokio::spawn(async move {
            let mut rd = rd;
            // Whatever ended the loop, requests still waiting are retried or failed by `call`.
            let _ended_by = receive(&weak, &mut rd).await;
            if let Some(conn) = weak.upgrade() {
                conn.fail_all();
            }
        });
        *lock(&conn.reader) = Some(task);
        conn
    }

    fn fail_all(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for (_, p) in lock(&self.pending).drain() {
            let _ = p.reply.send(Err(Lost));
        }
    }

    async fn call(
        &self,
        req: Request,
        payload: Option<&Bytes>,
        buf: Option<BytesMut>,
    ) -> Result<Outcome, Lost> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(Lost);
        }
        let cookie = self.cookies.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(
            cookie,
            Pending {
                kind: req.kind,
                offset: req.offset,
                buf,
                extents: Vec::new(),
                error: None,
                reply: tx,
            },
        );
        let header = Request { cookie, ..req }.encode();
        let sent = {
            let mut w = self.writer.lock().await;
            let r = w.write_all(&header).await;
            match (r, payload) {
                (Ok(()), Some(p)) => w.write_all(p).await,
                (r, _) => r,
            }
        };
        if sent.is_err() {
            self.fail_all();
        }
        rx.await.unwrap_or(Err(Lost))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.reader).take() {
            t.abort();
        }
    }
}

/// The reply loop: runs until the connection breaks or a reply makes no sense.
async fn receive<R: AsyncRead + Unpin>(conn: &std::sync::Weak<Conn>, rd: &mut R) -> ClientError {
    let proto_err = |m: &str| cerr(libc::EPROTO, m.to_owned());
    loop {
        let magic = match rd.read_u32().await {
            Ok(m) => m,
            Err(e) => return io_err("reading a reply", e),
        };
        let Some(rest_len) = proto::reply_rest_len(magic) else {
            return proto_err("bad reply magic");
        };
        let mut rest = [0u8; 16];
        if let Err(e) = rd.read_exact(&mut rest[..rest_len]).await {
            return io_err("reading a reply", e);
        }
        let Ok(header) = proto::decode_reply(magic, &rest[..rest_len]) else {
            return proto_err("bad reply header");
        };
        let Some(conn) = conn.upgrade() else {
            return proto_err("client gone");
        };
        let cookie = match header {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        };
        let Some(mut p) = lock(&conn.pending).remove(&cookie) else {
            return proto_err("reply to an unknown request");
        };
        let done = match header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    p.error = Some(cerr(
                        proto::errno::to_host(error),
                        format!("server error {error}"),
                    ));
                } else if p.kind == cmd::READ {
                    let Some(buf) = p.buf.as_mut() else {
                        return proto_err("read without a buffer");
                    };
                    if let Err(e) = rd.read_exact(buf).await {
                        return io_err("reading read data", e);
                    }
                }
                true
            }
            ReplyHeader::Chunk {
                flags, kind, len, ..
            } => {
                if let Err(e) = chunk_payload(&mut p, kind, len, rd, conn.base_allocation).await {
                    return e;
                }
                flags & chunk::FLAG_DONE != 0
            }
        };
        if done {
            let outcome = match (p.error.take(), p.kind) {
                (Some(e), _) => Outcome::Failed(e),
                (None, cmd::READ) => Outcome::Data(p.buf.take().unwrap_or_default()),
                (None, cmd::BLOCK_STATUS) => Outcome::Extents(std::mem::take(&mut p.extents)),
                (None, _) => Outcome::Done,
            };
            let _ = p.reply.send(Ok(outcome));
        } else {
            lock(&conn.pending).insert(cookie, p);
        }
    }
}

async fn chunk_payload<R: AsyncRead + Unpin>(
    p: &mut Pending,
    kind: u16,
    len: u32,
    rd: &mut R,
    base_allocation: Option<u32>,
) -> Result<(), ClientError> {
    let bad = |m: &str| cerr(libc::EPROTO, m.to_owned());
    let read_err = |e| io_err("reading a reply chunk", e);
    if len > proto::MAX_PAYLOAD + 4096 {
        return Err(bad("reply chunk too long"));
    }
    match kind {
        chunk::OFFSET_DATA | chunk::OFFSET_HOLE => {
            let hole = kind == chunk::OFFSET_HOLE;
            if len < 8 || (hole && len != 12) {
                return Err(bad("malformed read chunk"));
            }
            let offset = rd.read_u64().await.map_err(read_err)?;
            let n = if hole {
                u64::from(rd.read_u32().await.map_err(read_err)?)
            } else {
                u64::from(len - 8)
            };
            let Some(buf) = p.buf.as_mut() else {
                return Err(bad("read chunk for a request that is not a read"));
            };
            let start = offset
                .checked_sub(p.offset)
                .filter(|s| s.saturating_add(n) <= buf.len() as u64)
                .ok_or_else(|| bad("read chunk outside the request"))?
                as usize;
            let range = &mut buf[start..start + n as usize];
            if hole {
                range.fill(0);
            } else {
                rd.read_exact(range).await.map_err(read_err)?;
            }
        }
        _ => {
            let mut payload = vec![0u8; len as usize];
            rd.read_exact(&mut payload).await.map_err(read_err)?;
            if kind == chunk::BLOCK_STATUS {
                let (id, extents) = proto::decode_block_status(&payload).map_err(|e| bad(&e.0))?;
                if Some(id) == base_allocation {
                    p.extents = extents;
                }
            } else if chunk::is_error(kind) {
                let (error, msg) = proto::decode_error_chunk(&payload)
                    .unwrap_or((proto::errno::EIO, String::new()));
                let msg = if msg.is_empty() {
                    format!("server error {error}")
                } else {
                    msg
                };
                p.error = Some(cerr(proto::errno::to_host(error), msg));
            }
        }
    }
    Ok(())
}

/// An NBD client of one export.
#[derive(Debug)]
pub struct Client {
    target: ConnectTo,
    export: String,
    info: ExportInfo,
    reconnect_delay: Duration,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

impl Client {
    /// Connects and negotiates.
    pub async fn connect(
        target: ConnectTo,
        export: &str,
        reconnect_delay: Duration,
    ) -> Result<Client, ClientError> {
        let stream = connect(&target).await?;
        let (conn, info) = handshake(stream, export).await?;
        Ok(Client {
            target,
            export: export.to_owned(),
            info,
            reconnect_delay,
            conn: tokio::sync::Mutex::new(Some(conn)),
        })
    }

    /// What the server advertised.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// The server address.
    pub fn target(&self) -> &ConnectTo {
        &self.target
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.export
    }

    async fn live_conn(&self) -> Result<Arc<Conn>, ClientError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.dead.load(Ordering::SeqCst) {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let stream = connect(&self.target).await?;
        let (conn, info) = handshake(stream, &self.export).await?;
        if info.size != self.info.size {
            return Err(cerr(
                libc::EIO,
                format!(
                    "the export changed size across a reconnect ({} to {} bytes)",
                    self.info.size, info.size
                ),
            ));
        }
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn call(
        &self,
        req: Request,
        payload: Option<Bytes>,
        buf: Option<BytesMut>,
    ) -> Result<Outcome, ClientError> {
        let deadline = Instant::now() + self.reconnect_delay;
        // A read's buffer goes with the request; a retry after a lost connection gets a new one.
        let buf_len = buf.as_ref().map(BytesMut::len);
        let mut buf = buf;
        loop {
            let attempt = buf.take().or_else(|| buf_len.map(BytesMut::zeroed));
            let last = match self.live_conn().await {
                Ok(conn) => match conn.call(req, payload.as_ref(), attempt).await {
                    Ok(Outcome::Failed(e)) => return Err(e),
                    Ok(o) => return Ok(o),
                    Err(Lost) => cerr(libc::EIO, "the NBD connection was lost"),
                },
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn request(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 0,
            offset,
            len,
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, ClientError> {
        let len = u32::try_from(buf.len()).map_err(|_| cerr(libc::EINVAL, "read too large"))?;
        match self
            .call(Self::request(cmd::READ, 0, offset, len), None, Some(buf))
            .await?
        {
            Outcome::Data(d) => Ok(d),
            _ => Err(cerr(libc::EPROTO, "read reply without data")),
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len()).map_err(|_| cerr(libc::EINVAL, "write too large"))?;
        let flags = if fua { proto::cflags::FUA } else { 0 };
        self.call(
            Self::request(cmd::WRITE, flags, offset, len),
            Some(data),
            None,
        )
        .await
        .map(drop)
    }

    /// Writes zeroes (`flags`: NO_HOLE, FAST_ZERO, FUA).
    pub async fn write_zeroes(&self, offset: u64, len: u32, flags: u16) -> Result<(), ClientError> {
        self.call(
            Self::request(cmd::WRITE_ZEROES, flags, offset, len),
            None,
            None,
        )
        .await
        .map(drop)
    }

    /// Trims a range.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(Self::request(cmd::TRIM, 0, offset, len), None, None)
            .await
            .map(drop)
    }

    /// Flushes.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.call(Self::request(cmd::FLUSH, 0, 0, 0), None, None)
            .await
            .map(drop)
    }

    /// `base:allocation` extents from `offset` (empty when the context was not negotiated).
    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, ClientError> {
        if self.info.base_allocation.is_none() {
            return Ok(Vec::new());
        }
        match self
            .call(Self::request(cmd::BLOCK_STATUS, 0, offset, len), None, None)
            .await?
        {
            Outcome::Extents(e) => Ok(e),
            _ => Err(cerr(libc::EPROTO, "block status reply without extents")),
        }
    }

    /// Sends NBD_CMD_DISC and closes the connection.
    pub async fn disconnect(&self) {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.take() {
            let header = Self::request(cmd::DISC, 0, 0, 0).encode();
            let mut w = conn.writer.lock().await;
            let _ = w.write_all(&header).await;
            let _ = w.shutdown().await;
            conn.dead.store(true, Ordering::SeqCst);
        }
    }

    /// True when the export accepts writes.
    pub fn writable(&self) -> bool {
        !self.info.has(tflags::READ_ONLY)
    }
}
