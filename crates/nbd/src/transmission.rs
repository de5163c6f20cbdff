//! Transmission: requests read in order, served concurrently (at most 64 in flight per
//! connection, and the data they hold within the server's buffer budget), replies written
//! whole under one writer lock.

use std::sync::Arc;

use block::{BlockError, ErrorKind, IoVec, WriteFlags, ZeroFlags};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::export::{ClientGuard, Export};
use crate::proto::{self, cflags, chunk, cmd, errno, tflags, Request};
use crate::server::{BufferBudget, MAX_EXTENTS, MAX_IN_FLIGHT, SPARSE_GRANULE};

/// What a connection negotiated.
pub(crate) struct Session {
    pub(crate) export: Arc<Export>,
    /// Counts this connection as a client of the export while it lives.
    pub(crate) _client: ClientGuard,
    pub(crate) structured: bool,
    pub(crate) contexts: Vec<u32>,
    pub(crate) flags: u16,
    pub(crate) min_block: u32,
}

impl Session {
    pub(crate) fn new(
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

pub(crate) type Writer = Arc<tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>>;

pub(crate) async fn transmission<R, W>(
    session: Session,
    mut rd: R,
    wr: W,
    buffers: Option<Arc<BufferBudget>>,
) where
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
        // The data this request holds while served (a write's payload, a read's reply) comes
        // out of the server's budget before the payload leaves the socket.
        let data = match req.kind {
            cmd::READ | cmd::WRITE if req.len <= proto::MAX_PAYLOAD => req.len as usize,
            _ => 0,
        };
        let mut held = None;
        if let (Some(b), true) = (&buffers, data > 0) {
            held = tokio::select! {
                p = b.take(data) => p,
                _ = kill.wait_for(|k| *k) => break,
            };
        }
        let mut payload = None;
        if req.has_payload() {
            if req.len <= proto::MAX_PAYLOAD {
                // Page-aligned when large, so an O_DIRECT write takes it as it is.
                let mut buf = block::buf::zeroed_for_io(req.len as usize);
                if rd.read_exact(&mut buf[..]).await.is_err() {
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
            let _held = held;
            serve_request(&session, &writer, req, payload).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let _ = writer.lock().await.shutdown().await;
}

/// A request's failure: the wire error value and a message for structured error chunks.
pub(crate) struct Fail(u32, String);

impl From<BlockError> for Fail {
    fn from(e: BlockError) -> Self {
        let code = match e.kind() {
            ErrorKind::Unsupported => errno::ENOTSUP,
            _ => errno::from_host(e.errno()),
        };
        Fail(code, e.to_string())
    }
}

pub(crate) fn einval(msg: impl Into<String>) -> Fail {
    Fail(errno::EINVAL, msg.into())
}

pub(crate) fn check(session: &Session, req: &Request) -> Result<(), Fail> {
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

pub(crate) async fn serve_request(
    session: &Session,
    writer: &Writer,
    req: Request,
    payload: Option<Bytes>,
) {
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

pub(crate) async fn send(writer: &Writer, parts: &[&[u8]]) {
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

pub(crate) async fn send_error(session: &Session, writer: &Writer, req: &Request, f: Fail) {
    let structured_only = matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS);
    if session.structured && structured_only {
        send(writer, &[&proto::error_chunk(req.cookie, f.0, &f.1)]).await;
    } else {
        send(writer, &[&proto::simple_reply(f.0, req.cookie)]).await;
    }
}

pub(crate) async fn read(session: &Session, writer: &Writer, req: &Request) {
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

pub(crate) async fn send_data_chunk(
    writer: &Writer,
    cookie: u64,
    done: bool,
    offset: u64,
    data: &[u8],
) {
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    let header = proto::chunk_header(flags, chunk::OFFSET_DATA, cookie, 8 + data.len() as u32);
    send(writer, &[&header, &offset.to_be_bytes(), data]).await;
}

pub(crate) async fn block_status(session: &Session, writer: &Writer, req: &Request) {
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
