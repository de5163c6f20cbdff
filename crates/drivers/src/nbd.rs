//! The `nbd` protocol driver: a node whose bytes live on an NBD server (a backup or mirror
//! target on another host, or any qemu-nbd / qemu-storage-daemon export).

use std::time::Duration;

use async_trait::async_trait;
use block::{BlockDriver, BlockError, BlockStatus, ErrorKind, Facts, IoVec, Result};
use block::{WriteFlags, ZeroFlags};
use bytes::BytesMut;
use nbd::proto::{cflags, tflags, STATE_HOLE, STATE_ZERO};
use nbd::{Client, ClientError, ConnectTo};

/// A node over an NBD export.
#[derive(Debug)]
pub struct NbdDriver {
    client: Client,
    writable: bool,
}

fn block_err(what: &str, e: ClientError) -> BlockError {
    BlockError::io(
        format!("{what}: {}", e.message),
        std::io::Error::from_raw_os_error(e.errno),
    )
}

impl NbdDriver {
    /// Connects to `export` on `target`. A read-only export can only be opened read-only.
    pub async fn connect(
        target: ConnectTo,
        export: &str,
        reconnect_delay: Duration,
        read_only: bool,
    ) -> Result<Self> {
        let client = Client::connect(target, export, reconnect_delay)
            .await
            .map_err(|e| BlockError::new(ErrorKind::Io, e.message))?;
        if !read_only && !client.writable() {
            // QEMU's text: its NBD driver reports the refusal without a message while the
            // node has no file name yet, so the generic open error is what the user sees.
            return Err(BlockError::read_only(
                "Could not open image: Permission denied",
            ));
        }
        Ok(Self {
            client,
            writable: !read_only,
        })
    }

    /// The export name.
    pub fn export(&self) -> &str {
        self.client.export()
    }

    /// Where the server is.
    pub fn target(&self) -> &ConnectTo {
        self.client.target()
    }

    fn has(&self, flag: u16) -> bool {
        self.client.info().has(flag)
    }

    /// Largest request length (below 4 GiB) that keeps to the block size.
    fn max_len(&self) -> u64 {
        let align = u64::from(self.client.info().min_block.max(1));
        (u64::from(u32::MAX) / align) * align
    }

    /// `[offset, offset+len)` cut into requests of at most [`max_len`](Self::max_len) bytes.
    fn requests(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
        let step = self.max_len();
        let end = offset + len;
        (0..len.div_ceil(step)).map(move |i| {
            let at = offset + i * step;
            (at, (end - at).min(step) as u32)
        })
    }
}

#[async_trait]
impl BlockDriver for NbdDriver {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn len(&self) -> u64 {
        self.client.info().size
    }

    fn facts(&self) -> Facts {
        let info = self.client.info();
        Facts {
            request_alignment: info.min_block,
            memory_alignment: 1,
            max_transfer: info.max_block,
            cluster_size: None,
            growable: false,
            updates_metadata: false,
        }
    }

    fn writable(&self) -> bool {
        self.writable
    }

    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.client
            .read_into(offset, buf)
            .await
            .map_err(|e| block_err("NBD read", e))
    }

    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        let fua = flags.fua && self.has(tflags::SEND_FUA);
        self.client
            .write(offset, data.to_bytes(), fua)
            .await
            .map_err(|e| block_err("NBD write", e))?;
        if flags.fua && !fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if !self.has(tflags::SEND_WRITE_ZEROES) {
            if flags.no_fallback {
                return Err(BlockError::unsupported(
                    "the NBD server cannot write zeroes",
                ));
            }
            let max = u64::from(self.client.info().max_block);
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(max);
                let zeroes = IoVec::from(vec![0u8; n as usize]);
                let wf = WriteFlags {
                    fua: flags.fua,
                    ..WriteFlags::default()
                };
                self.write(at, zeroes, wf).await?;
                at += n;
            }
            return Ok(());
        }
        if flags.no_fallback && !self.has(tflags::SEND_FAST_ZERO) {
            return Err(BlockError::unsupported(
                "the NBD server has no fast write-zeroes",
            ));
        }
        let mut f = 0;
        if !flags.may_unmap {
            f |= cflags::NO_HOLE;
        }
        if flags.no_fallback {
            f |= cflags::FAST_ZERO;
        }
        if flags.fua && self.has(tflags::SEND_FUA) {
            f |= cflags::FUA;
        }
        for (at, n) in self.requests(offset, len) {
            self.client
                .write_zeroes(at, n, f)
                .await
                .map_err(|e| match e.errno {
                    libc::ENOTSUP if flags.no_fallback => {
                        BlockError::unsupported("the NBD server has no fast write-zeroes")
                    }
                    _ => block_err("NBD write zeroes", e),
                })?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.has(tflags::SEND_TRIM) {
            return Ok(());
        }
        for (at, n) in self.requests(offset, len) {
            self.client
                .trim(at, n)
                .await
                .map_err(|e| block_err("NBD trim", e))?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if !self.has(tflags::SEND_FLUSH) {
            return Ok(());
        }
        self.client
            .flush()
            .await
            .map_err(|e| block_err("NBD flush", e))
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let ask = len.min(self.max_len()) as u32;
        let extents = self
            .client
            .block_status(offset, ask)
            .await
            .map_err(|e| block_err("NBD block status", e))?;
        let Some(first) = extents.first().filter(|e| e.len > 0) else {
            return Ok(BlockStatus::data(len, None));
        };
        let data = first.flags & STATE_HOLE == 0;
        let zero = first.flags & STATE_ZERO != 0;
        Ok(BlockStatus {
            len: u64::from(first.len).min(len),
            allocated: data || zero,
            data,
            zero,
            compressed: false,
            host_offset: None,
            recurse: false,
        })
    }

    async fn close(&self) -> Result<()> {
        let flushed = self.flush().await;
        self.client.disconnect().await;
        flushed
    }
}
