//! Helpers shared by the driver integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use block::{BlockNode, Child, ChildRole};
use drivers::file::{FileDriver, FileOptions};
use drivers::qcow2::{self, CreateOptions};
use drivers::{open_image, Format, OpenOptions};

pub fn qemu(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} not runnable: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn qemu_ok(tool: &str, args: &[&str]) -> String {
    let (ok, text) = qemu(tool, args);
    assert!(ok, "{tool} {args:?} failed:\n{text}");
    text
}

/// `qemu-img check` finds no errors and no leaks.
pub fn check_clean(path: &Path) {
    let p = path.to_str().expect("utf-8 path");
    let text = qemu_ok("qemu-img", &["check", p]);
    assert!(
        text.contains("No errors were found"),
        "qemu-img check {p}:\n{text}"
    );
    assert!(
        !text.contains("leaked"),
        "qemu-img check {p} found leaks:\n{text}"
    );
}

/// `qemu-io -c 'read -P pattern off len'` succeeds.
pub fn qemu_read_pattern(path: &Path, fmt: &str, pattern: u8, off: u64, len: u64) {
    let p = path.to_str().expect("utf-8 path");
    let cmd = format!("read -P {pattern} {off} {len}");
    let text = qemu_ok("qemu-io", &["-f", fmt, "-c", &cmd, p]);
    assert!(
        !text.contains("Pattern verification failed"),
        "{cmd} on {p}:\n{text}"
    );
}

pub async fn open_rw(path: &Path) -> Arc<BlockNode> {
    open_image(path, None, &OpenOptions::default())
        .await
        .expect("open read-write")
}

pub async fn open_ro(path: &Path) -> Arc<BlockNode> {
    open_image(
        path,
        None,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open read-only")
}

pub async fn create_qcow2(path: &Path, opts: &CreateOptions) {
    FileDriver::create(path, 0).expect("create file");
    let node = BlockNode::new(
        "f",
        Arc::new(FileDriver::open(FileOptions::new(path)).expect("open")),
    );
    let child = Child::new(ChildRole::File, node.clone());
    qcow2::create(&child, opts).await.expect("qcow2 create");
    node.close().await.expect("close");
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn p(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

pub fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

pub fn format_of(name: &str) -> Format {
    Format::parse(name).expect("format")
}
