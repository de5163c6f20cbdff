//! Our client against our server in one process: I/O, block status, exports following graph
//! changes (a filter inserted above the exported node), retirement.

use std::sync::Arc;
use std::time::Duration;

use block::graph::{insert_filter, remove_filter};
use block::testing::PassThrough;
use block::{BlockBackend, BlockNode};
use bytes::{Bytes, BytesMut};
use drivers::mem::MemDriver;
use nbd::server::Listener;
use nbd::{Client, ConnectTo, Export, ExportConfig, NbdServer, ServerConfig};

async fn serve(
    node: Arc<BlockNode>,
) -> (tempfile::TempDir, Arc<NbdServer>, Arc<Export>, ConnectTo) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = NbdServer::new(ServerConfig::default());
    let export = Export::new(ExportConfig {
        name: "d".into(),
        description: String::new(),
        backend: BlockBackend::new(node),
        writable: true,
        writethrough: false,
        allocation_depth: false,
        extra_contexts: Vec::new(),
    });
    server.add_export(export.clone()).expect("add");
    tokio::spawn(server.clone().run(Listener::Unix(listener)));
    (dir, server, export, ConnectTo::Unix(path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_follows_a_filter_inserted_above_its_node() {
    let node = BlockNode::new("disk", Arc::new(MemDriver::new(vec![0u8; 1 << 20])));
    let (_dir, server, export, to) = serve(node.clone()).await;
    let client = Client::connect(to, "d", Duration::ZERO)
        .await
        .expect("connect");
    assert_eq!(client.info().size, 1 << 20);
    assert!(client.info().structured && client.info().base_allocation.is_some());

    client
        .write(4096, Bytes::from(vec![7u8; 4096]), false)
        .await
        .expect("write");
    let mut counting = None;
    let inserted = insert_filter(&node, |edge| {
        let c = PassThrough::new(edge);
        counting = Some(c.clone());
        Ok(BlockNode::new("filter", c))
    })
    .await
    .expect("insert");
    let counting = counting.expect("filter built");
    assert_eq!(export.backend().node().name(), "filter");
    // Writes from the already connected client now pass through the filter, eight in flight.
    let client = Arc::new(client);
    let writes: Vec<_> = (0..8u64)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                c.write(i * 65536, Bytes::from(vec![9u8; 512]), i == 0)
                    .await
            })
        })
        .collect();
    for w in writes {
        w.await.expect("task").expect("write");
    }
    assert_eq!(counting.writes(), 8);
    let back = client
        .read_into(4096, BytesMut::zeroed(4096))
        .await
        .expect("read");
    assert!(back.iter().all(|&b| b == 7));
    let extents = client.block_status(0, 1 << 20).await.expect("status");
    assert_eq!(
        extents.iter().map(|e| u64::from(e.len)).sum::<u64>(),
        1 << 20
    );

    remove_filter(&inserted).await.expect("remove");
    assert_eq!(export.backend().node().name(), "disk");
    client.flush().await.expect("flush");

    // Retiring the export drops the client; a reconnect finds no export.
    server.remove_export("d");
    export.disconnect_all();
    tokio::time::timeout(Duration::from_secs(5), export.closed())
        .await
        .expect("closed");
    // The first request may still go out on the old connection before the client has seen
    // it close ("connection was lost"); the next one reconnects and is told the export is gone.
    let mut e = client
        .read_into(0, BytesMut::zeroed(512))
        .await
        .expect_err("export gone");
    if e.message.contains("connection was lost") {
        e = client
            .read_into(0, BytesMut::zeroed(512))
            .await
            .expect_err("export gone");
    }
    assert!(e.message.contains("'d'"), "{e}");
}
