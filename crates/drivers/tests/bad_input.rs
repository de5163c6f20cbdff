//! Bad images: a clear error, no panic, and the file is left exactly as it was.

mod common;

use common::*;
use drivers::{open_image, OpenOptions};
use std::path::Path;

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.write_all_at(bytes, at).expect("patch");
}

async fn expect_refused(path: &Path, needle: &str) {
    let before = std::fs::read(path).expect("read");
    let r = open_image(path, None, &OpenOptions::default()).await;
    let err = r.expect_err("a bad image must be refused");
    assert!(
        err.to_string().contains(needle),
        "error for {}: {err}",
        path.display()
    );
    assert_eq!(
        before,
        std::fs::read(path).expect("read"),
        "nothing written to {}",
        path.display()
    );
}

fn fresh(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    let img = p(dir, name);
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_ok("qemu-io", &["-c", "write -P 1 0 64k", s(&img)]);
    img
}

#[tokio::test]
async fn corrupt_images_are_refused_cleanly() {
    let dir = tmp();
    let img = fresh(&dir, "trunc.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open")
        .set_len(50)
        .expect("truncate");
    expect_refused(&img, "too short").await;

    let img = fresh(&dir, "version.qcow2");
    patch(&img, 4, &7u32.to_be_bytes());
    expect_refused(&img, "version 7").await;

    let img = fresh(&dir, "l1.qcow2");
    patch(&img, 40, &(1u64 << 40).to_be_bytes());
    expect_refused(&img, "outside the file").await;

    let img = fresh(&dir, "rt.qcow2");
    patch(&img, 48, &(0x12345u64 << 16).to_be_bytes());
    expect_refused(&img, "refcount table").await;

    let img = fresh(&dir, "l1entry.qcow2");
    // L1 table at 0x30000: its first entry now points far past the end of the file.
    patch(&img, 0x30000, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    expect_refused(&img, "L1 entry 0").await;

    let img = fresh(&dir, "feature.qcow2");
    patch(&img, 72, &(1u64 << 40).to_be_bytes());
    expect_refused(&img, "Unknown incompatible feature: bit 40").await;

    let img = fresh(&dir, "clusterbits.qcow2");
    patch(&img, 20, &30u32.to_be_bytes());
    expect_refused(&img, "cluster size").await;
}

#[tokio::test]
async fn l2_entry_outside_the_file_fails_the_read_only() {
    let dir = tmp();
    let img = fresh(&dir, "l2.qcow2");
    // First L2 table at 0x40000; entry 1 (guest 64k..128k) points past the end.
    patch(&img, 0x40008, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    let before = std::fs::read(&img).expect("read");
    let node = open_ro(&img).await;
    assert!(node.read(0, 4096).await.is_ok(), "cluster 0 is fine");
    let err = node
        .read(65536, 4096)
        .await
        .expect_err("entry points outside");
    assert!(err.to_string().contains("outside the file"), "{err}");
    node.close().await.expect("close");
    let node = open_rw(&img).await;
    let w = block::IoVec::from(vec![9u8; 4096]);
    assert!(node
        .write(65536, w, block::WriteFlags::default())
        .await
        .is_err());
    node.close().await.expect("close");
    assert_eq!(
        before,
        std::fs::read(&img).expect("read"),
        "nothing written"
    );
}

#[tokio::test]
async fn backing_loops_are_refused() {
    let dir = tmp();
    let (a, b) = (p(&dir, "a.qcow2"), p(&dir, "b.qcow2"));
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            s(&b),
        ],
    );
    // Point a at b: a -> b -> a.
    qemu_ok(
        "qemu-img",
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)],
    );
    expect_refused(&b, "loop").await;
}
