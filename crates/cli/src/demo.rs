//! `blockjob demo`: needs no arguments. Creates a qcow2 disk with data, zero and unallocated
//! ranges in a temporary directory, copies it with the copy engine, verifies the copy byte for
//! byte (and with `qemu-img check`/`compare` when they are installed), and reports throughput.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use block::{BlockError, IoVec, Result, WriteFlags, ZeroFlags};
use bytes::Bytes;

use crate::copy::{copy, CopyOptions};
use crate::image;

pub async fn run(size: u64) -> Result<()> {
    let dir =
        tempfile::tempdir().map_err(|e| BlockError::io("creating a temporary directory", e))?;
    let src = dir.path().join("disk.qcow2");
    let dst = dir.path().join("copy.qcow2");
    println!(
        "demo: creating {} qcow2 disk in {}",
        image::human(size),
        dir.path().display()
    );
    image::create(&src, drivers::Format::Qcow2, size, None).await?;
    let node = image::open(&src, Some("qcow2"), false, image::Cache::default()).await?;
    fill(&node, size).await?;
    node.close().await?;
    image::create(&dst, drivers::Format::Qcow2, size, None).await?;
    let s = image::open(&src, Some("qcow2"), true, image::Cache::default()).await?;
    let d = image::open(&dst, Some("qcow2"), false, image::Cache::default()).await?;
    let stats = copy(
        s.clone(),
        d.clone(),
        &CopyOptions {
            workers: 8,
            compress: false,
            progress: false,
        },
    )
    .await?;
    d.close().await?;
    let secs = stats.elapsed.as_secs_f64().max(1e-9);
    println!(
        "demo: copied {} of data, skipped {} of zeroes in {secs:.2}s: {:.0} MiB/s of disk, {:.0} MiB/s of data",
        image::human(stats.copied),
        image::human(stats.skipped),
        size as f64 / secs / 1048576.0,
        stats.copied as f64 / secs / 1048576.0
    );
    let d = image::open(&dst, Some("qcow2"), true, image::Cache::default()).await?;
    verify(&s, &d).await?;
    println!("demo: verified: the copy reads back identical to the source");
    qemu_checks(&src, &dst);
    Ok(())
}

/// Half data (a pattern), a fifth explicit zeroes, the rest never written.
async fn fill(node: &Arc<block::BlockNode>, size: u64) -> Result<()> {
    let chunk = 1u64 << 20;
    let mut at = 0;
    while at + chunk <= size {
        let i = at / chunk;
        if i % 10 < 5 {
            let data: Vec<u8> = (0..chunk).map(|b| (b as u8) ^ (i as u8)).collect();
            node.write(at, IoVec::from(Bytes::from(data)), WriteFlags::default())
                .await?;
        } else if i % 10 < 7 {
            node.write_zeroes(at, chunk, ZeroFlags::default()).await?;
        }
        at += chunk;
    }
    node.flush().await
}

async fn verify(a: &Arc<block::BlockNode>, b: &Arc<block::BlockNode>) -> Result<()> {
    let chunk = 4u64 << 20;
    let mut at = 0;
    while at < a.len() {
        let n = chunk.min(a.len() - at) as usize;
        if a.read(at, n).await? != b.read(at, n).await? {
            return Err(BlockError::corrupt(format!(
                "demo: copy differs from the source near offset {at}"
            )));
        }
        at += n as u64;
    }
    Ok(())
}

fn qemu_checks(src: &Path, dst: &Path) {
    let check = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(dst)
        .status();
    let compare = Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(src)
        .arg(dst)
        .status();
    match (check, compare) {
        (Ok(c), Ok(m)) => println!(
            "demo: qemu-img check: {}, qemu-img compare: {}",
            if c.success() { "no errors" } else { "ERRORS" },
            if m.success() {
                "identical"
            } else {
                "DIFFERENT"
            }
        ),
        _ => println!("demo: qemu-img not installed; skipped its checks"),
    }
}
