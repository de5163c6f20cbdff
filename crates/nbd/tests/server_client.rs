//! Our client against our server in one process: I/O, block status, exports following graph
//! changes (a filter inserted above the exported node), retirement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use block::driver::{BlockDriver, BlockStatus, WriteFlags, ZeroFlags};
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
    serve_with(node, ServerConfig::default()).await
}

async fn serve_with(
    node: Arc<BlockNode>,
    config: ServerConfig,
) -> (tempfile::TempDir, Arc<NbdServer>, Arc<Export>, ConnectTo) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = NbdServer::new(config);
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

/// A slow in-memory disk that records the most read and write data it held at once.
#[derive(Debug)]
struct Gauge {
    disk: Arc<MemDriver>,
    now: AtomicU64,
    most: AtomicU64,
}

impl Gauge {
    async fn hold<T>(&self, bytes: u64, io: impl std::future::Future<Output = T>) -> T {
        let now = self.now.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let r = io.await;
        self.now.fetch_sub(bytes, Ordering::SeqCst);
        r
    }
}

#[async_trait]
impl BlockDriver for Gauge {
    fn driver_name(&self) -> &'static str {
        "gauge"
    }
    fn len(&self) -> u64 {
        self.disk.len()
    }
    fn writable(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> block::Result<BytesMut> {
        self.hold(buf.len() as u64, self.disk.read(offset, buf))
            .await
    }
    async fn write(&self, offset: u64, data: block::IoVec, f: WriteFlags) -> block::Result<()> {
        self.hold(data.len() as u64, self.disk.write(offset, data, f))
            .await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> block::Result<()> {
        self.disk.write_zeroes(offset, len, f).await
    }
    async fn discard(&self, offset: u64, len: u64) -> block::Result<()> {
        self.disk.discard(offset, len).await
    }
    async fn flush(&self) -> block::Result<()> {
        self.disk.flush().await
    }
    async fn block_status(&self, offset: u64, len: u64) -> block::Result<BlockStatus> {
        self.disk.block_status(offset, len).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hold_no_more_data_than_the_buffer_budget_and_the_floor() {
    const BUDGET: u64 = 64 << 10;
    const REQ: u64 = 16 << 10;
    let gauge = Arc::new(Gauge {
        disk: Arc::new(MemDriver::new(vec![0u8; 4 << 20])),
        now: AtomicU64::new(0),
        most: AtomicU64::new(0),
    });
    let node = BlockNode::new("disk", gauge.clone());
    let config = ServerConfig {
        buffer_budget: BUDGET as usize,
        ..ServerConfig::default()
    };
    let (_dir, _server, _export, to) = serve_with(node, config).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let c = Client::connect(to.clone(), "d", Duration::ZERO)
            .await
            .expect("connect");
        clients.push(Arc::new(c));
    }
    // 64 writes of 16 KiB, 16 per connection at once, then one larger than the budget.
    let mut io = Vec::new();
    for i in 0..64u64 {
        let c = clients[(i % 4) as usize].clone();
        io.push(tokio::spawn(async move {
            c.write(i * REQ, Bytes::from(vec![i as u8 + 1; REQ as usize]), false)
                .await
        }));
    }
    for w in io {
        w.await.expect("task").expect("write");
    }
    // The floor lets 4 requests in whatever their size, the budget 4 more of 16 KiB.
    let most = gauge.most.swap(0, Ordering::SeqCst);
    assert!(most <= 8 * REQ, "writes held {most} bytes at once");
    assert!(
        most > 4 * REQ,
        "writes were not served beyond the floor: {most}"
    );
    // A request larger than the budget takes all of it.
    let big = Bytes::from(vec![0xee; 4 * BUDGET as usize]);
    clients[0]
        .write(2 << 20, big.clone(), false)
        .await
        .expect("write");
    gauge.most.store(0, Ordering::SeqCst);
    // Reads come out of the same budget.
    let mut io = Vec::new();
    for i in 0..64u64 {
        let c = clients[(i % 4) as usize].clone();
        io.push(tokio::spawn(async move {
            let back = c.read_into(i * REQ, BytesMut::zeroed(REQ as usize)).await?;
            Ok::<_, nbd::ClientError>((i, back))
        }));
    }
    for r in io {
        let (i, back) = r.await.expect("task").expect("read");
        assert!(back.iter().all(|&b| b == i as u8 + 1), "read {i}");
    }
    let most = gauge.most.load(Ordering::SeqCst);
    assert!(most <= 8 * REQ, "reads held {most} bytes at once");
    assert!(
        most > 4 * REQ,
        "reads were not served beyond the floor: {most}"
    );
    let back = clients[1]
        .read_into(2 << 20, BytesMut::zeroed(big.len()))
        .await
        .expect("read");
    assert_eq!(&back[..], &big[..]);
}
