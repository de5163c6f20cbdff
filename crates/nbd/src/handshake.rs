//! The fixed-newstyle handshake: options until NBD_OPT_GO or NBD_OPT_EXPORT_NAME picks an
//! export, within the server's handshake deadline.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::Export;
use crate::proto::{self, info, opt, rep};
use crate::server::NbdServer;
use crate::server::MAX_OPTION_DATA;
use crate::transmission::Session;

pub(crate) async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    wr.write_all(&proto::option_reply(option, kind, data)).await
}

/// Why an option ends without its normal replies.
pub(crate) enum OptError {
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

pub(crate) fn invalid(msg: impl Into<String>) -> OptError {
    OptError::Refuse(rep::ERR_INVALID, msg.into())
}

#[derive(Default)]
pub(crate) struct Handshake {
    pub(crate) structured: bool,
    /// Export name and context ids of the last SET_META_CONTEXT.
    pub(crate) meta: Option<(String, Vec<u32>)>,
}

impl Handshake {
    pub(crate) fn contexts_for(&self, export: &str) -> Vec<u32> {
        match &self.meta {
            Some((name, ids)) if name == export => ids.clone(),
            _ => Vec::new(),
        }
    }
}

pub(crate) enum Next {
    Continue,
    Close,
    Transmit(Session),
}

impl NbdServer {
    pub(crate) async fn handshake<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
    ) -> std::io::Result<Option<Session>>
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

    pub(crate) fn find(&self, name: &str) -> Result<Arc<Export>, OptError> {
        self.export(name).ok_or_else(|| {
            OptError::Refuse(rep::ERR_UNKNOWN, format!("export '{name}' not present"))
        })
    }

    pub(crate) async fn option<W: AsyncWrite + Unpin>(
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
