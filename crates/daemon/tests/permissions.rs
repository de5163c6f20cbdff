//! Permissions and image locking, differentially: the same scenarios on qemu-storage-daemon
//! and blockjobd, with qemu-io and qemu-img as the other processes. Replies (class and text)
//! and what the other processes are allowed to do must match step for step.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{canon, qemu_img, Daemon};
use serde_json::{json, Value};

enum Step {
    /// A QMP command; its reply goes into the transcript.
    Qmp(Value),
    /// A shell command run in the daemon's directory; its exit status and error text go
    /// into the transcript (not its timing output).
    Sh(&'static str),
    /// Starts `qemu-io` holding the image open (read-write) until [`Step::Release`].
    Hold(&'static str),
    /// Ends the holder.
    Release,
}

fn qmp(cmd: &str, args: Value) -> Step {
    Step::Qmp(json!({"execute": cmd, "arguments": args}))
}

fn add(args: Value) -> Step {
    qmp("blockdev-add", args)
}

fn del(name: &str) -> Step {
    qmp("blockdev-del", json!({"node-name": name}))
}

fn prepare(dir: &Path) {
    qemu_img(&["create", "-f", "qcow2", "a.qcow2", "16M"], dir);
    qemu_img(&["create", "-f", "qcow2", "h.qcow2", "16M"], dir);
    for top in ["top.qcow2", "top2.qcow2"] {
        qemu_img(
            &["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", top],
            dir,
        );
    }
    qemu_img(&["create", "-f", "raw", "b.raw", "1M"], dir);
    qemu_img(&["create", "-f", "raw", "c.raw", "1M"], dir);
}

fn run(program: &Path, steps: &[Step]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut holder: Option<std::process::Child> = None;
    let mut out = Vec::new();
    for step in steps {
        match step {
            Step::Qmp(request) => {
                c.send(request);
                let r = c.reply();
                out.push(format!("{request} -> {}", canon(&r)));
            }
            Step::Sh(cmd) => {
                let o = Command::new("sh")
                    .args(["-c", cmd])
                    .current_dir(d.dir.path())
                    .output()
                    .expect("sh");
                out.push(format!(
                    "{cmd} -> {} {}",
                    o.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            Step::Hold(image) => {
                let child = Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", "sleep 60000", image])
                    .current_dir(d.dir.path())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("qemu-io");
                holder = Some(child);
                // Until it holds its locks (a probe with qemu-io could race its open).
                let path = d.dir.path().join(image);
                for _ in 0..500 {
                    if holds_locks(&path) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                out.push(format!("hold {image}"));
            }
            Step::Release => {
                if let Some(mut h) = holder.take() {
                    let _ = h.kill();
                    let _ = h.wait();
                }
                out.push("release".into());
            }
        }
    }
    if let Some(mut h) = holder {
        let _ = h.kill();
        let _ = h.wait();
    }
    out
}

/// True when some process holds an OFD lock on `path` (/proc/locks lists them by inode).
fn holds_locks(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).expect("stat").ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|l| {
        l.contains("OFDLCK")
            && l.split_whitespace()
                .any(|f| f.rsplit(':').next() == Some(&ino.to_string()))
    })
}

fn same_on_both(steps: &[Step]) {
    let theirs = run(Path::new("qemu-storage-daemon"), steps);
    let ours = run(&common::blockjobd(), steps);
    common::assert_same_transcript(&ours, &theirs);
}

/// Formats take what they need of their files; a second format on a file, a writer on a
/// read-only node, or an export under a format conflicts with QEMU's message.
#[test]
fn conflicting_parents_are_refused_as_qemu_refuses_them() {
    same_on_both(&[
        add(json!({"driver": "file", "node-name": "f0", "filename": "a.qcow2"})),
        add(json!({"driver": "qcow2", "node-name": "d0", "file": "f0"})),
        // Two allocators on one file.
        add(json!({"driver": "qcow2", "node-name": "d1", "file": "f0"})),
        add(json!({"driver": "qcow2", "node-name": "d1", "file": "f0", "read-only": true})),
        // raw passes through only what its users need: nobody yet.
        add(json!({"driver": "raw", "node-name": "r1", "file": "f0"})),
        add(json!({"driver": "raw", "node-name": "r2", "file": "f0", "read-only": true})),
        qmp(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
        ),
        // Under a format, neither a writer nor a reader that forbids resizing.
        qmp(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "f0", "writable": true}),
        ),
        qmp(
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "f0"}),
        ),
        qmp(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "d0", "writable": true}),
        ),
        // A raw node writes its file only for a writer; a read-only file refuses it then.
        add(json!({"driver": "file", "node-name": "fb", "filename": "b.raw", "read-only": true})),
        add(json!({"driver": "raw", "node-name": "rb", "file": "fb"})),
        qmp(
            "block-export-add",
            json!({"type": "nbd", "id": "e4", "node-name": "rb", "writable": true}),
        ),
        add(json!({"driver": "qcow2", "node-name": "dq", "file": "fb"})),
        // raw with an offset holds data: nobody may resize the file under it.
        add(json!({"driver": "file", "node-name": "fc", "filename": "c.raw"})),
        add(
            json!({"driver": "raw", "node-name": "rc1", "file": "fc", "offset": 4096, "size": 65536}),
        ),
        qmp(
            "block-export-add",
            json!({"type": "nbd", "id": "e5", "node-name": "rc1", "writable": true}),
        ),
        add(json!({"driver": "qcow2", "node-name": "dc", "file": "fc"})),
        // A filter passes its users' needs through.
        add(json!({"driver": "blkdebug", "node-name": "bd", "image": "d0"})),
        // Backing files are shared between overlays, and busy while one uses them.
        add(json!({"driver": "file", "node-name": "fa", "filename": "a.qcow2", "read-only": true})),
        add(json!({"driver": "file", "node-name": "ft", "filename": "top.qcow2"})),
        add(json!({"driver": "file", "node-name": "ft2", "filename": "top2.qcow2"})),
        add(json!({"driver": "qcow2", "node-name": "t1", "file": "ft", "backing": null})),
        add(json!({"driver": "qcow2", "node-name": "t2", "file": "ft2", "backing": "t1"})),
        del("t1"),
        del("bd"),
        del("rc1"),
        qmp("block-export-del", json!({"id": "e5"})),
        del("t2"),
        del("t1"),
        del("rc1"),
        qmp("block-export-del", json!({"id": "e3"})),
        del("d0"),
        add(json!({"driver": "qcow2", "node-name": "d1", "file": "f0"})),
    ]);
}

/// Image locks: what blockjobd opens, qemu-io and qemu-img may not write (or read without
/// -U, under a writable format); what they hold, blockjobd refuses; `locking=off` opts out.
#[test]
fn image_locks_work_both_ways_with_qemu_tools() {
    same_on_both(&[
        add(json!({"driver": "file", "node-name": "f0", "filename": "a.qcow2"})),
        add(json!({"driver": "qcow2", "node-name": "d0", "file": "f0"})),
        Step::Sh("qemu-io -c 'write 0 4k' a.qcow2"),
        Step::Sh("qemu-io -r -c 'read 0 4k' a.qcow2"),
        Step::Sh("qemu-io -U -r -c 'read 0 4k' a.qcow2"),
        Step::Sh("qemu-img info a.qcow2 >/dev/null"),
        Step::Sh("qemu-img info -U a.qcow2 >/dev/null"),
        // A second file node is a second open file description: locks apply within one
        // daemon too.
        add(json!({"driver": "file", "node-name": "f1", "filename": "a.qcow2", "read-only": true})),
        add(json!({"driver": "qcow2", "node-name": "d1", "file": "f1", "read-only": true})),
        add(json!({"driver": "qcow2", "node-name": "t0",
                    "file": {"driver": "file", "filename": "top.qcow2"}})),
        // Deleting the format releases the file's locks.
        del("d0"),
        Step::Sh("qemu-io -c 'write 0 4k' a.qcow2"),
        // A read-only format: others may read, not write.
        add(json!({"driver": "qcow2", "node-name": "d0", "file": "f0", "read-only": true})),
        Step::Sh("qemu-io -c 'write 0 4k' a.qcow2"),
        Step::Sh("qemu-io -r -c 'read 0 4k' a.qcow2"),
        del("d0"),
        // A raw export passes its needs down to the file, and stops others resizing it.
        add(json!({"driver": "raw", "node-name": "r1", "file": "f0"})),
        qmp(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
        ),
        qmp(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "r1", "writable": true}),
        ),
        Step::Sh("qemu-io -f raw -c 'write -z 0x2f000 4k' a.qcow2"),
        Step::Sh("qemu-io -f qcow2 -c 'write 0 4k' a.qcow2"),
        qmp("block-export-del", json!({"id": "e1"})),
        del("r1"),
        // What another process holds, we refuse.
        Step::Hold("h.qcow2"),
        add(json!({"driver": "file", "node-name": "fh", "filename": "h.qcow2"})),
        add(json!({"driver": "qcow2", "node-name": "dh", "file": "fh"})),
        add(json!({"driver": "qcow2", "node-name": "dh", "file": "fh", "read-only": true})),
        add(json!({"driver": "raw", "node-name": "rh", "file": "fh"})),
        qmp(
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "rh"}),
        ),
        qmp("block-export-del", json!({"id": "e2"})),
        del("rh"),
        Step::Release,
        add(json!({"driver": "qcow2", "node-name": "dh", "file": "fh"})),
        Step::Sh("qemu-io -r -c 'read 0 4k' h.qcow2"),
        // locking=off neither takes nor checks locks.
        add(json!({"driver": "file", "node-name": "fl", "filename": "h.qcow2", "locking": "off"})),
        add(json!({"driver": "qcow2", "node-name": "dl", "file": "fl", "read-only": true})),
        add(json!({"driver": "file", "node-name": "fm", "filename": "b.raw", "locking": "bad"})),
    ]);
}

/// A create job on a file node a format writes fails with the conflict as its error.
#[test]
fn a_create_job_on_a_file_in_use_fails_with_the_conflict() {
    fn steps() -> Vec<Step> {
        vec![
            add(json!({"driver": "file", "node-name": "f0", "filename": "a.qcow2"})),
            add(json!({"driver": "qcow2", "node-name": "d0", "file": "f0"})),
            qmp(
                "blockdev-create",
                json!({"job-id": "c1", "options": {"driver": "qcow2", "file": "f0", "size": 1048576}}),
            ),
        ]
    }
    let concluded = |program: &Path| {
        let dir = tempfile::tempdir().expect("tempdir");
        prepare(dir.path());
        let d = Daemon::start(program, &[], dir);
        let mut c = d.client();
        for s in steps() {
            if let Step::Qmp(r) = s {
                c.send(&r);
                c.reply();
            }
        }
        for _ in 0..500 {
            let jobs = c.cmd("query-jobs", json!({}));
            if jobs["return"][0]["status"] == "concluded" {
                return canon(&jobs);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("job did not conclude");
    };
    assert_eq!(
        concluded(&common::blockjobd()),
        concluded(Path::new("qemu-storage-daemon"))
    );
}
