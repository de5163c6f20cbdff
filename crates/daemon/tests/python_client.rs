//! blockjobd driven by PyPI's `qemu.qmp` client, the library QEMU's own tests and many
//! management tools use. `scripts/test.sh` installs it; a missing module fails the test.

mod common;

use std::process::Command;

use common::{qemu_img, Daemon};

#[test]
fn qemu_qmp_python_client() {
    let d = Daemon::ours(&[]);
    qemu_img(
        &["create", "-f", "qcow2", "disk.qcow2", "16M"],
        d.dir.path(),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/qmp_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&d.socket)
        .arg(d.dir.path())
        .output()
        .expect("python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu.qmp client failed (pip install qemu.qmp if the module is missing):\n{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("qemu.qmp client: ok"));
}
