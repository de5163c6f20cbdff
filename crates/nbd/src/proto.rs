//! The NBD wire format: constants, and decoders/encoders over byte slices.
//!
//! Nothing here does I/O; every decoder takes untrusted bytes and returns an error rather than
//! panicking, so the fuzz target can drive them directly.

use std::fmt;

/// "NBDMAGIC": the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the 124 zero bytes after NBD_OPT_EXPORT_NAME may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// NBD_CMD_TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_CMD_FLAG_DF is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA are visible across connections.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// NBD_CMD_CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// NBD_CMD_FLAG_FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes.
pub mod opt {
    /// Select an export and end negotiation (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Extended headers (not supported here).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of a list.
    pub const SERVER: u32 = 2;
    /// One piece of export information.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR + 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    /// Block size information must be requested.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    /// Request too big.
    pub const ERR_TOO_BIG: u32 = ERR + 9;

    /// True for the error reply types.
    pub fn is_error(t: u32) -> bool {
        t & ERR != 0
    }
}

/// NBD_INFO types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must not punch holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Read reply in one chunk.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes: fail fast rather than write slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Last chunk of the reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload (used to end a reply).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A range that reads as zero.
    pub const OFFSET_HOLE: u16 = 2;
    /// Extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;

    /// True for the error chunk types.
    pub fn is_error(t: u16) -> bool {
        t & (1 << 15) != 0
    }
}

/// Error values on the wire (not the host's errnos).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// The wire value for a host errno (unknown ones become EINVAL, as the spec asks).
    /// EACCES is one of those, as in QEMU's server: a snapshot read of a range that is no
    /// longer kept says "Invalid argument".
    pub fn from_host(e: i32) -> u32 {
        match e {
            libc::EPERM | libc::EROFS => EPERM,
            libc::EIO => EIO,
            libc::ENOMEM => ENOMEM,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::ENOTSUP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EINVAL,
        }
    }

    /// The host errno for a wire value.
    pub fn to_host(e: u32) -> i32 {
        match e {
            EPERM => libc::EPERM,
            EIO => libc::EIO,
            ENOMEM => libc::ENOMEM,
            ENOSPC => libc::ENOSPC,
            EOVERFLOW => libc::EOVERFLOW,
            ENOTSUP => libc::ENOTSUP,
            ESHUTDOWN => libc::ESHUTDOWN,
            _ => libc::EINVAL,
        }
    }
}

/// base:allocation flags.
pub const STATE_HOLE: u32 = 1 << 0;
/// base:allocation: reads as zero.
pub const STATE_ZERO: u32 = 1 << 1;
/// qemu:dirty-bitmap: dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Largest read or write payload we accept or send in one request (32 MiB, as QEMU).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest string (export name, description, context name) the spec allows.
pub const MAX_STRING: usize = 4096;

/// A malformed message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtoError {}

fn perr(msg: impl Into<String>) -> ProtoError {
    ProtoError(msg.into())
}

/// A big-endian reader over an untrusted slice.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return Err(perr(format!(
                "message truncated: {n} bytes wanted, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// A u16.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A u64.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string of `len` bytes: UTF-8, no NUL, at most [`MAX_STRING`].
    pub fn string(&mut self, len: usize, what: &str) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(perr(format!("{what} is longer than {MAX_STRING} bytes")));
        }
        let raw = self.bytes(len)?;
        if raw.contains(&0) {
            return Err(perr(format!("{what} contains a NUL byte")));
        }
        String::from_utf8(raw.to_vec()).map_err(|_| perr(format!("{what} is not UTF-8")))
    }

    /// A string preceded by its u32 length.
    pub fn string32(&mut self, what: &str) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        self.string(len, what)
    }

    /// Fails unless everything was consumed.
    pub fn finish(&self, what: &str) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(perr(format!(
                "{what} has {} unexpected trailing bytes",
                self.buf.len()
            )))
        }
    }
}

/// The header of an option request (after the IHAVEOPT magic has been checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code.
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Decodes the 16-byte header: magic, option, length.
    pub fn decode(b: &[u8; 16]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(b);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(perr(format!("bad option magic {magic:#x}")));
        }
        Ok(Self {
            option: r.u32()?,
            len: r.u32()?,
        })
    }

    /// Encodes the header (client side).
    pub fn encode(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + data.len());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }
}

/// Data of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Information types asked for.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Decodes the option data.
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(data);
        let name = r.string32("export name")?;
        let n = r.u16()? as usize;
        if n * 2 != r.remaining() {
            return Err(perr(
                "information request count does not match the option length",
            ));
        }
        let requests = (0..n).map(|_| r.u16()).collect::<Result<_, _>>()?;
        Ok(Self { name, requests })
    }

    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put_string32(&mut v, &self.name);
        v.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }
}

/// Data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: String,
    /// Queries (context names or namespace prefixes).
    pub queries: Vec<String>,
}

impl MetaRequest {
    /// Decodes the option data.
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(data);
        let name = r.string32("export name")?;
        let n = r.u32()? as usize;
        // Each query takes at least its 4-byte length: bounds the allocation by the input.
        if n > r.remaining() / 4 {
            return Err(perr("query count does not match the option length"));
        }
        let mut queries = Vec::with_capacity(n);
        for _ in 0..n {
            queries.push(r.string32("metadata context query")?);
        }
        r.finish("metadata context request")?;
        Ok(Self { name, queries })
    }

    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put_string32(&mut v, &self.name);
        v.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string32(&mut v, q);
        }
        v
    }
}

/// Appends a u32 length and the string.
pub fn put_string32(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
}

/// An option reply: magic, option, type, length, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The header of an option reply (client side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option replied to.
    pub option: u32,
    /// Reply type.
    pub reply: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Decodes the 20-byte header.
    pub fn decode(b: &[u8; 20]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(b);
        let magic = r.u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(perr(format!("bad option reply magic {magic:#x}")));
        }
        Ok(Self {
            option: r.u32()?,
            reply: r.u32()?,
            len: r.u32()?,
        })
    }
}

/// A transmission request header (28 bytes; a write's payload follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Decodes a request header.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(b);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(perr(format!("bad request magic {magic:#x}")));
        }
        Ok(Self {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// True when the request carries a payload of `len` bytes.
    pub fn has_payload(&self) -> bool {
        self.kind == cmd::WRITE
    }
}

/// A simple reply header (16 bytes).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured chunk header (20 bytes) for a payload of `len` bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An error chunk: header and payload.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut v = Vec::with_capacity(26 + msg.len());
    v.extend_from_slice(&chunk_header(
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// The first 4 bytes of any reply in transmission, telling simple from structured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply: error and cookie (a read's data follows when error is 0).
    Simple {
        /// Error value.
        error: u32,
        /// Cookie.
        cookie: u64,
    },
    /// Structured chunk.
    Chunk {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Cookie.
        cookie: u64,
        /// Payload length.
        len: u32,
    },
}

/// Decodes the rest of a reply header once its magic is known: `rest` holds 12 bytes for a
/// simple reply, 16 for a chunk.
pub fn decode_reply(magic: u32, rest: &[u8]) -> Result<ReplyHeader, ProtoError> {
    let mut r = Reader::new(rest);
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
            error: r.u32()?,
            cookie: r.u64()?,
        }),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Chunk {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            len: r.u32()?,
        }),
        other => Err(perr(format!("bad reply magic {other:#x}"))),
    }
}

/// Length of the header after the magic for each reply kind.
pub fn reply_rest_len(magic: u32) -> Option<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Some(12),
        STRUCTURED_REPLY_MAGIC => Some(16),
        _ => None,
    }
}

/// One extent of a BLOCK_STATUS chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u32,
    /// Context-defined flags.
    pub flags: u32,
}

/// Decodes a BLOCK_STATUS chunk payload: context id and extents.
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<Extent>), ProtoError> {
    let mut r = Reader::new(payload);
    let id = r.u32()?;
    if r.remaining() == 0 || r.remaining() % 8 != 0 {
        return Err(perr("block status chunk without whole extents"));
    }
    let mut extents = Vec::with_capacity(r.remaining() / 8);
    while r.remaining() > 0 {
        extents.push(Extent {
            len: r.u32()?,
            flags: r.u32()?,
        });
    }
    Ok((id, extents))
}

/// Decodes an error chunk payload: error value and message.
pub fn decode_error_chunk(payload: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut r = Reader::new(payload);
    let error = r.u32()?;
    let len = r.u16()? as usize;
    let msg = r.bytes(len)?;
    Ok((error, String::from_utf8_lossy(msg).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: cflags::FUA,
            kind: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert!(Request::decode(&bad).is_err());
    }

    #[test]
    fn info_request_checks_lengths() {
        let req = InfoRequest {
            name: "disk".into(),
            requests: vec![info::BLOCK_SIZE, info::NAME],
        };
        assert_eq!(InfoRequest::decode(&req.encode()), Ok(req.clone()));
        let mut long = req.encode();
        long.push(0);
        assert!(InfoRequest::decode(&long).is_err());
        assert!(InfoRequest::decode(&[0, 0, 0, 9, b'a']).is_err());
        assert!(
            InfoRequest::decode(&[0, 0, 0, 1, 0, 0, 0]).is_err(),
            "NUL in name"
        );
    }

    #[test]
    fn meta_request_bounds_query_count_by_input() {
        let req = MetaRequest {
            name: "d".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(MetaRequest::decode(&req.encode()), Ok(req));
        // A count of 4 billion queries in 9 bytes is refused before allocating anything.
        assert!(MetaRequest::decode(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]).is_err());
    }

    #[test]
    fn errnos_map_both_ways() {
        assert_eq!(errno::from_host(libc::EROFS), errno::EPERM);
        assert_eq!(errno::from_host(libc::ENOENT), errno::EINVAL);
        assert_eq!(errno::to_host(errno::ENOSPC), libc::ENOSPC);
        assert_eq!(errno::to_host(9999), libc::EINVAL);
    }

    #[test]
    fn block_status_payload_needs_whole_extents() {
        let mut p = 7u32.to_be_bytes().to_vec();
        assert!(decode_block_status(&p).is_err());
        p.extend_from_slice(&[0, 0, 16, 0, 0, 0, 0, 3]);
        assert_eq!(
            decode_block_status(&p),
            Ok((
                7,
                vec![Extent {
                    len: 4096,
                    flags: 3
                }]
            ))
        );
        p.push(1);
        assert!(decode_block_status(&p).is_err());
    }
}
