//! Interop with QEMU both ways: images made by qemu-img/qemu-io read and written by us, images
//! we make and write checked by `qemu-img check`, `qemu-io read -P` and `qemu-img compare`.

mod common;

use block::{IoVec, WriteFlags, ZeroFlags};
use common::*;
use drivers::qcow2::{CompressionType, CreateOptions, Preallocation};

async fn expect_pattern(node: &std::sync::Arc<block::BlockNode>, off: u64, len: usize, byte: u8) {
    let data = node.read(off, len).await.expect("read");
    assert!(
        data.iter().all(|&b| b == byte),
        "expected {byte:#x} at {off}+{len}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_made_images_are_read_and_written() {
    for (compat, cs) in [
        ("0.10", "65536"),
        ("1.1", "512"),
        ("1.1", "4096"),
        ("1.1", "65536"),
        ("1.1", "2M"),
    ] {
        let dir = tmp();
        let img = p(&dir, "q.qcow2");
        let opts = format!("compat={compat},cluster_size={cs}");
        qemu_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "8M"],
        );
        qemu_ok(
            "qemu-io",
            &[
                "-c",
                "write -P 0x11 0 100k",
                "-c",
                "write -z 1M 64k",
                "-c",
                "write -P 0x22 3M 5000",
                s(&img),
            ],
        );
        let node = open_rw(&img).await;
        expect_pattern(&node, 0, 100 << 10, 0x11).await;
        expect_pattern(&node, 1 << 20, 64 << 10, 0).await;
        expect_pattern(&node, 3 << 20, 5000, 0x22).await;
        expect_pattern(&node, 6 << 20, 4096, 0).await;
        let w = IoVec::from(vec![0x33u8; 70000]);
        node.write((2 << 20) + 1000, w, WriteFlags::default())
            .await
            .expect("write");
        node.write_zeroes(50 << 10, 20 << 10, ZeroFlags::default())
            .await
            .expect("zeroes");
        node.discard(4 << 20, 1 << 20).await.expect("discard");
        node.close().await.expect("close");
        check_clean(&img);
        qemu_read_pattern(&img, "qcow2", 0x33, (2 << 20) + 1000, 70000);
        qemu_read_pattern(&img, "qcow2", 0x11, 0, 50 << 10);
        qemu_read_pattern(&img, "qcow2", 0, 50 << 10, 20 << 10);
        qemu_read_pattern(&img, "qcow2", 0x11, 70 << 10, 30 << 10);
        qemu_read_pattern(&img, "qcow2", 0x22, 3 << 20, 5000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_on_write_from_a_qemu_backing_chain() {
    let dir = tmp();
    let (base, mid, top) = (
        p(&dir, "base.qcow2"),
        p(&dir, "mid.qcow2"),
        p(&dir, "top.qcow2"),
    );
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_ok("qemu-io", &["-c", "write -P 0x44 0 1M", s(&base)]);
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&mid),
        ],
    );
    qemu_ok("qemu-io", &["-c", "write -P 0x55 512k 64k", s(&mid)]);
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    let node = open_rw(&top).await;
    expect_pattern(&node, 512 << 10, 64 << 10, 0x55).await;
    node.write(
        100_000,
        IoVec::from(vec![0x66u8; 3000]),
        WriteFlags::default(),
    )
    .await
    .expect("write");
    node.write(
        (512 << 10) + 10,
        IoVec::from(vec![0x77u8; 10]),
        WriteFlags::default(),
    )
    .await
    .expect("write");
    node.close().await.expect("close");
    check_clean(&top);
    qemu_read_pattern(&top, "qcow2", 0x44, 0, 100_000);
    qemu_read_pattern(&top, "qcow2", 0x66, 100_000, 3000);
    qemu_read_pattern(&top, "qcow2", 0x44, 103_000, (512 << 10) - 103_000);
    qemu_read_pattern(&top, "qcow2", 0x55, 512 << 10, 10);
    qemu_read_pattern(&top, "qcow2", 0x77, (512 << 10) + 10, 10);
    qemu_read_pattern(&top, "qcow2", 0x55, (512 << 10) + 20, (64 << 10) - 20);
    // The base and mid images were not touched.
    qemu_read_pattern(&mid, "qcow2", 0x44, 0, 512 << 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_clusters_from_qemu_zlib_and_zstd() {
    for ctype in ["zlib", "zstd"] {
        let dir = tmp();
        let (raw, img) = (p(&dir, "src.raw"), p(&dir, "c.qcow2"));
        qemu_ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "2M"]);
        qemu_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x12 0 1M",
                "-c",
                "write -P 0x34 1100k 300k",
                s(&raw),
            ],
        );
        let o = format!("compression_type={ctype}");
        qemu_ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &o,
                s(&raw),
                s(&img),
            ],
        );
        let node = open_rw(&img).await;
        expect_pattern(&node, 0, 1 << 20, 0x12).await;
        expect_pattern(&node, 1100 << 10, 300 << 10, 0x34).await;
        node.write(
            70_000,
            IoVec::from(vec![0x56u8; 1000]),
            WriteFlags::default(),
        )
        .await
        .expect("write");
        node.close().await.expect("close");
        check_clean(&img);
        qemu_read_pattern(&img, "qcow2", 0x12, 0, 70_000);
        qemu_read_pattern(&img, "qcow2", 0x56, 70_000, 1000);
        qemu_read_pattern(&img, "qcow2", 0x12, 71_000, (1 << 20) - 71_000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_images_pass_qemu_img_check_in_every_shape() {
    let shapes: Vec<CreateOptions> = vec![
        CreateOptions {
            version: 2,
            ..CreateOptions::new(8 << 20)
        },
        CreateOptions {
            cluster_size: 512,
            ..CreateOptions::new(8 << 20)
        },
        CreateOptions {
            cluster_size: 2 << 20,
            ..CreateOptions::new(8 << 20)
        },
        CreateOptions {
            refcount_bits: 1,
            ..CreateOptions::new(8 << 20)
        },
        CreateOptions {
            refcount_bits: 64,
            ..CreateOptions::new(8 << 20)
        },
        CreateOptions {
            compression: CompressionType::Zstd,
            ..CreateOptions::new(8 << 20)
        },
        CreateOptions {
            preallocation: Preallocation::Metadata,
            ..CreateOptions::new(8 << 20)
        },
    ];
    for opts in shapes {
        let dir = tmp();
        let (img, raw) = (p(&dir, "o.qcow2"), p(&dir, "model.raw"));
        create_qcow2(&img, &opts).await;
        check_clean(&img);
        qemu_ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "8M"]);
        let node = open_rw(&img).await;
        node.write(
            1000,
            IoVec::from(vec![0xabu8; 200_000]),
            WriteFlags::default(),
        )
        .await
        .expect("w");
        node.write(
            5 << 20,
            IoVec::from(vec![0xcdu8; 1 << 20]),
            WriteFlags::default(),
        )
        .await
        .expect("w");
        node.write_zeroes(
            100_000,
            50_000,
            ZeroFlags {
                may_unmap: true,
                ..ZeroFlags::default()
            },
        )
        .await
        .expect("z");
        node.discard(5 << 20, 512 << 10).await.expect("discard");
        // After discard the range's content is unspecified; make it defined for the compare.
        node.write_zeroes(5 << 20, 512 << 10, ZeroFlags::default())
            .await
            .expect("z");
        node.close().await.expect("close");
        qemu_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xab 1000 200000",
                "-c",
                "write -z 100000 50000",
                "-c",
                "write -P 0xcd 5767168 524288",
                s(&raw),
            ],
        );
        check_clean(&img);
        let cmp = qemu_ok(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&raw)],
        );
        assert!(cmp.contains("Images are identical"), "{opts:?}: {cmp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refcount_table_grows_with_small_clusters() {
    let dir = tmp();
    let img = p(&dir, "grow.qcow2");
    // 512-byte clusters, 16-bit refcounts: the first refcount table covers 8 MiB of file.
    create_qcow2(
        &img,
        &CreateOptions {
            cluster_size: 512,
            ..CreateOptions::new(64 << 20)
        },
    )
    .await;
    let node = open_rw(&img).await;
    for i in 0..24u64 {
        node.write(
            i << 20,
            IoVec::from(vec![i as u8 + 1; 1 << 20]),
            WriteFlags::default(),
        )
        .await
        .expect("w");
    }
    node.close().await.expect("close");
    check_clean(&img);
    for i in [0u64, 11, 23] {
        qemu_read_pattern(&img, "qcow2", i as u8 + 1, i << 20, 1 << 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_lazy_refcount_image_is_repaired_on_open() {
    let dir = tmp();
    let img = p(&dir, "lazy.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            s(&img),
            "16M",
        ],
    );
    // qemu-io dies by SIGKILL with lazy refcounts: the dirty bit stays set, refcounts are stale.
    let _ = qemu(
        "qemu-io",
        &["-c", "write -P 0x21 0 3M", "-c", "sigraise 9", s(&img)],
    );
    let info = qemu_ok("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    let node = open_rw(&img).await;
    expect_pattern(&node, 0, 3 << 20, 0x21).await;
    node.write(
        8 << 20,
        IoVec::from(vec![0x22u8; 1 << 20]),
        WriteFlags::default(),
    )
    .await
    .expect("w");
    node.close().await.expect("close");
    check_clean(&img);
    let info = qemu_ok("qemu-img", &["info", "--output=json", s(&img)]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
    qemu_read_pattern(&img, "qcow2", 0x21, 0, 3 << 20);
    qemu_read_pattern(&img, "qcow2", 0x22, 8 << 20, 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_snapshots_stay_intact() {
    let dir = tmp();
    let img = p(&dir, "snap.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_ok("qemu-io", &["-c", "write -P 0x01 0 2M", s(&img)]);
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", s(&img)]);
    let node = open_rw(&img).await;
    node.write(4096, IoVec::from(vec![0x02u8; 8192]), WriteFlags::default())
        .await
        .expect("w");
    node.discard(1 << 20, 1 << 20).await.expect("discard");
    node.close().await.expect("close");
    check_clean(&img);
    qemu_read_pattern(&img, "qcow2", 0x02, 4096, 8192);
    qemu_read_pattern(&img, "qcow2", 0x01, 0, 4096);
    qemu_ok("qemu-img", &["snapshot", "-a", "s1", s(&img)]);
    qemu_read_pattern(&img, "qcow2", 0x01, 0, 2 << 20);
    check_clean(&img);
}

/// A writer that does not load an image's persistent bitmaps (the offline tool) cannot keep
/// them up to date: they are marked in use when it opens the image and stay so, and QEMU then
/// treats them as inconsistent instead of trusting stale bits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmaps_nobody_loaded_are_left_in_use() {
    let dir = tmp();
    let img = p(&dir, "b.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_ok("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    let node = open_rw(&img).await;
    node.write(0, IoVec::from(vec![1u8; 4096]), WriteFlags::default())
        .await
        .expect("write");
    node.close().await.expect("close");
    check_clean(&img);
    let info = qemu_ok("qemu-img", &["info", "--output=json", s(&img)]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("json");
    let flags = &v["format-specific"]["data"]["bitmaps"][0]["flags"];
    assert!(
        flags
            .as_array()
            .is_some_and(|f| f.contains(&serde_json::json!("in-use"))),
        "{v}"
    );
}

/// Compressed writes go through the request path: whole clusters only, recorded in the
/// node's bitmaps, refused by nodes that cannot compress; QEMU reads them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_writes_go_through_the_request_path() {
    let dir = tmp();
    let img = p(&dir, "c.qcow2");
    create_qcow2(&img, &CreateOptions::new(1 << 20)).await;
    let node = open_rw(&img).await;
    node.bitmaps()
        .push(bitmap::DirtyBitmap::new(Some("b".into()), 1 << 20, 65536).expect("bitmap"));
    let data = IoVec::from(vec![0x5au8; 131072]);
    node.write(65536, data, WriteFlags::compressed())
        .await
        .expect("compressed write");
    let misaligned = node
        .write(512, IoVec::from(vec![1u8; 65536]), WriteFlags::compressed())
        .await
        .expect_err("not a cluster boundary");
    assert_eq!(misaligned.kind(), block::ErrorKind::InvalidArgument);
    assert_eq!(
        node.bitmaps()[0].dirty_bytes(),
        131072,
        "marked like any write"
    );
    node.close().await.expect("close");
    check_clean(&img);
    qemu_read_pattern(&img, "qcow2", 0x5a, 65536, 131072);
    let map = qemu_ok("qemu-img", &["map", "--output=json", s(&img)]);
    assert!(map.contains("\"compressed\": true"), "{map}");
    let raw = p(&dir, "r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("raw");
    let node = drivers::open::open_image(
        &raw,
        Some(drivers::open::Format::Raw),
        &drivers::open::OpenOptions::default(),
    )
    .await
    .expect("open raw");
    let refused = node
        .write(0, IoVec::from(vec![1u8; 65536]), WriteFlags::compressed())
        .await
        .expect_err("raw cannot compress");
    assert!(
        refused
            .to_string()
            .starts_with("Compression is not supported for this drive"),
        "{refused}"
    );
}

/// Write-zeroes and discard leave the same clusters as QEMU's: write-zeroes marks unallocated
/// clusters zero (present in `qemu-img map`) with or without unmap, a discard leaves them
/// alone, and an allocated cluster discarded becomes a zero cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroed_and_discarded_clusters_map_as_qemus() {
    let dir = tmp();
    let (ours, theirs) = (p(&dir, "ours.qcow2"), p(&dir, "theirs.qcow2"));
    for img in [&ours, &theirs] {
        create_qcow2(img, &CreateOptions::new(8 << 20)).await;
    }
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 4M 1M",
            "-c",
            "write -z 0 1M",
            "-c",
            "write -z -u 1M 1M",
            "-c",
            "discard 3M 2M",
            "-c",
            "discard 6M 1M",
            s(&theirs),
        ],
    );
    let node = open_rw(&ours).await;
    node.write(
        4 << 20,
        IoVec::from(vec![1u8; 1 << 20]),
        WriteFlags::default(),
    )
    .await
    .expect("write");
    node.write_zeroes(0, 1 << 20, ZeroFlags::default())
        .await
        .expect("zeroes");
    let unmap = ZeroFlags {
        may_unmap: true,
        ..ZeroFlags::default()
    };
    node.write_zeroes(1 << 20, 1 << 20, unmap)
        .await
        .expect("zeroes, unmap");
    node.discard(3 << 20, 2 << 20).await.expect("discard");
    node.discard(6 << 20, 1 << 20).await.expect("discard");
    node.close().await.expect("close");
    check_clean(&ours);
    // Host offsets aside, the maps are the same.
    let map = |img| {
        let v: serde_json::Value =
            serde_json::from_str(&qemu_ok("qemu-img", &["map", "--output=json", s(img)]))
                .expect("map json");
        v.as_array()
            .expect("extents")
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().expect("extent").remove("offset");
                e.to_string()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(map(&ours), map(&theirs));
}

/// Writes into fresh clusters allocate their L2 table before their data, as QEMU's do, so an
/// image written the same way by both maps to the same host offsets. (Whole clusters: the
/// zero padding of a part-written fresh cluster is left a hole here, where QEMU writes it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_clusters_sit_where_qemus_would() {
    let dir = tmp();
    let (ours, theirs) = (p(&dir, "o.qcow2"), p(&dir, "q.qcow2"));
    for img in [&ours, &theirs] {
        qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(img), "1G"]);
    }
    let writes: [(u64, usize, u8); 4] = [
        (0, 1 << 20, 0x11),
        (600 << 20, 64 << 10, 0x22),
        (5 << 20, 128 << 10, 0x33),
        (1000 << 20, 64 << 10, 0x44),
    ];
    let mut cmds = Vec::new();
    for (off, len, byte) in writes {
        cmds.push("-c".to_owned());
        cmds.push(format!("write -P {byte} {off} {len}"));
    }
    let mut args: Vec<&str> = cmds.iter().map(String::as_str).collect();
    args.push(s(&theirs));
    qemu_ok("qemu-io", &args);
    let node = open_rw(&ours).await;
    for (off, len, byte) in writes {
        node.write(off, IoVec::from(vec![byte; len]), WriteFlags::default())
            .await
            .expect("write");
    }
    node.close().await.expect("close");
    check_clean(&ours);
    let map = |img: &std::path::Path| qemu_ok("qemu-img", &["map", "--output=json", s(img)]);
    assert_eq!(map(&ours), map(&theirs));
}
