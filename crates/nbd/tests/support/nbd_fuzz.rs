//! The NBD fuzz harness: bytes a client could send, through the decoders and through a whole
//! server connection (handshake and transmission) over an in-memory stream, against a 1 MiB
//! writable in-memory export with every built-in metadata context. Shared by the cargo-fuzz
//! target `nbd_decode` and the stable short run in `nbd_fuzz.rs`.

use std::sync::Arc;

use block::{BlockBackend, BlockNode};
use drivers::mem::MemDriver;
use nbd::proto;
use nbd::{Export, ExportConfig, NbdServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `data` through the decoders and a server connection; returns what the server sent.
pub fn exercise(data: &[u8]) -> Vec<u8> {
    let _ = proto::InfoRequest::decode(data);
    let _ = proto::MetaRequest::decode(data);
    let _ = proto::decode_block_status(data);
    let _ = proto::decode_error_chunk(data);
    if let Some(head) = data.get(..proto::REQUEST_LEN) {
        let mut b = [0u8; proto::REQUEST_LEN];
        b.copy_from_slice(head);
        let _ = proto::Request::decode(&b);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let server = NbdServer::new(ServerConfig {
            max_connections: 0,
            handshake_timeout: None,
            buffer_budget: 64 << 10,
        });
        let node = BlockNode::new("d", Arc::new(MemDriver::new(vec![0u8; 1 << 20])));
        let export = Export::new(ExportConfig {
            name: "d".into(),
            description: "fuzz".into(),
            backend: BlockBackend::new(node),
            writable: true,
            writethrough: false,
            allocation_depth: true,
            extra_contexts: Vec::new(),
        });
        server.add_export(export).expect("export");
        let (client, end) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(async move { server.serve_connection(end).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let receive = async {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let ((), out) = tokio::join!(send, receive);
        task.await.expect("the connection task panicked");
        out
    })
}
