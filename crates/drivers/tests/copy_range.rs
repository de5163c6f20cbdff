//! Copy offload (`use-copy-range`): raw over a file to raw over a file copies in the kernel,
//! with and without O_DIRECT, through io_uring and the thread pool, and the destination's
//! dirty bitmaps see the copy; pairs that cannot offload say so instead of copying.

use std::path::Path;
use std::sync::Arc;

use block::{BlockNode, Child, ChildRole};
use drivers::file::{Aio, FileDriver, FileOptions};
use drivers::null::NullDriver;
use drivers::raw::RawDriver;

const LEN: u64 = 4 << 20;
const SKIP: u64 = 64 << 10;

fn raw_over_file(path: &Path, direct: bool, threads: bool, offset: u64) -> Arc<BlockNode> {
    let mut o = FileOptions::new(path);
    o.direct = direct;
    o.aio = threads.then_some(Aio::Threads);
    let file = BlockNode::new("file", Arc::new(FileDriver::open(o).expect("open file")));
    let raw =
        RawDriver::new(Child::new(ChildRole::File, file), offset, Some(LEN), true).expect("raw");
    BlockNode::new("raw", Arc::new(raw))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_over_files_copies_in_the_kernel() {
    for (direct, threads) in [(false, false), (true, false), (true, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src_path, dst_path) = (dir.path().join("src"), dir.path().join("dst"));
        // The source's raw node starts SKIP bytes into its file.
        let pattern: Vec<u8> = (0..LEN + SKIP).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src_path, &pattern).expect("write source");
        std::fs::write(&dst_path, vec![0u8; LEN as usize]).expect("write target");
        let src = Child::new(
            ChildRole::Filtered,
            raw_over_file(&src_path, direct, threads, SKIP),
        );
        let dst_node = raw_over_file(&dst_path, direct, threads, 0);
        let marks = dst_node.add_internal_bitmap(65536).expect("bitmap");
        let dst = Child::new(ChildRole::Root, dst_node.clone());

        // Copy the second half first, then the first: each call may copy less than asked.
        for (start, end) in [(LEN / 2, LEN), (0, LEN / 2)] {
            let mut at = start;
            while at < end {
                let n = src
                    .copy_range_to(at, &dst, at, end - at)
                    .await
                    .expect("copy")
                    .expect("two raw files offload");
                assert!(n > 0, "no progress at {at}");
                at += n;
            }
        }
        drop(src);
        drop(dst);
        let copied = std::fs::read(&dst_path).expect("read target");
        assert!(
            copied == pattern[SKIP as usize..],
            "direct={direct} threads={threads}: the target differs"
        );
        assert_eq!(marks.with(|b| b.dirty_bytes()), Some(LEN));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_that_cannot_offload_say_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src_path, dst_path) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::write(&src_path, vec![7u8; LEN as usize]).expect("write source");
    std::fs::write(&dst_path, vec![0u8; LEN as usize]).expect("write target");
    let dst = Child::new(ChildRole::Root, raw_over_file(&dst_path, true, false, 0));
    // Not a file underneath.
    let null = Child::new(
        ChildRole::Filtered,
        BlockNode::new("null", Arc::new(NullDriver::new(LEN))),
    );
    assert_eq!(
        null.copy_range_to(0, &dst, 0, 65536).await.expect("ask"),
        None
    );
    // Not aligned for O_DIRECT.
    let src = Child::new(
        ChildRole::Filtered,
        raw_over_file(&src_path, true, false, 0),
    );
    assert_eq!(
        src.copy_range_to(100, &dst, 100, 4096).await.expect("ask"),
        None
    );
    // Past the end is an error, as a write would be.
    assert!(src.copy_range_to(0, &dst, LEN - 4096, 8192).await.is_err());
    drop(dst);
    assert!(std::fs::read(&dst_path)
        .expect("read target")
        .iter()
        .all(|&b| b == 0));
}
