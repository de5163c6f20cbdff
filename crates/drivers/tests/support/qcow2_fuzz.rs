//! What the qcow2 fuzzers do with an input: open it as a qcow2 image read-only and read-write
//! over an in-memory file, load its persistent bitmaps, then read, query, write, zero,
//! discard, flush and close (which stores the bitmaps, one more among them). Errors are
//! expected; panics, hangs and runaway allocations are the bugs. Shared by the cargo-fuzz
//! target (fuzz/) and the short stable-Rust run in tests/qcow2_fuzz.rs.

use std::sync::Arc;

use block::{BlockNode, Child, ChildRole, IoVec, WriteFlags, ZeroFlags};
use drivers::mem::MemDriver;
use drivers::qcow2::Qcow2Driver;

/// How much of the guest disk one input may make us touch.
const SPAN: u64 = 4 << 20;

/// Returns how many of the two opens (read-only, read-write) succeeded.
pub async fn exercise(image: &[u8]) -> usize {
    let mut opened = 0;
    for writable in [false, true] {
        let mem = Arc::new(MemDriver::new(image.to_vec()));
        let file = Child::new(ChildRole::File, BlockNode::new("mem", mem));
        let Ok(driver) = Qcow2Driver::open(file, writable, None).await else {
            continue;
        };
        opened += 1;
        let node = BlockNode::new("fuzz", Arc::new(driver));
        // Stored bitmaps are loaded (and, writable, marked in use); bad ones are an error.
        let _ = node.load_persistent_bitmaps().await;
        if writable {
            if let Ok(mut b) = bitmap::DirtyBitmap::new(Some("fz".into()), node.len(), 65536) {
                b.set_persistent(true);
                node.bitmaps().push(b);
            }
        }
        let len = node.len().min(SPAN);
        let mut off = 0;
        while off < len {
            let n = (len - off).min(256 << 10);
            if node.read(off, n as usize).await.is_err() {
                break;
            }
            off += n;
        }
        let mut off = 0;
        for _ in 0..256 {
            match node.block_status(off, len.saturating_sub(off)).await {
                Ok(st) if off + st.len < len => off += st.len,
                _ => break,
            }
        }
        if writable && len > 0 {
            let n = len.min(70_000);
            let _ = node
                .write(
                    len - n,
                    IoVec::from(vec![0x5a; n as usize]),
                    WriteFlags::default(),
                )
                .await;
            let _ = node
                .write_zeroes(0, len.min(1 << 20), ZeroFlags::default())
                .await;
            let _ = node.discard(len / 2, len / 4).await;
            let _ = node
                .write(0, IoVec::from(vec![1; 512]), WriteFlags::default())
                .await;
            let _ = node.read(0, len.min(1 << 20) as usize).await;
            let _ = node.flush().await;
        }
        let _ = node.close().await;
    }
    opened
}
