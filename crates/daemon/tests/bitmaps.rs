//! Dirty bitmaps against qemu-storage-daemon: the same commands, guest writes (qemu-io over an
//! NBD export) and transactions on both; every reply, error text, event and the bitmaps'
//! contents (x-debug-block-dirty-bitmap-sha256, `nbdinfo --map=qemu:dirty-bitmap:…`) must be
//! identical.

mod common;

use std::path::Path;
use std::process::Command;

use common::{canon, qemu_img, Daemon};
use serde_json::{json, Value};

enum Step {
    /// A QMP command.
    Qmp(Value),
    /// qemu-io commands on the writable export `d`.
    Io(&'static str),
    /// `nbdinfo --map=<context>` of export `export`.
    Map(&'static str, &'static str),
    /// The `dirty-bitmaps` of every node, from query-named-block-nodes (the rest of the
    /// answer, such as image sizes, is compared elsewhere and differs with allocation).
    Query,
}

fn c(name: &str, args: Value) -> Step {
    Step::Qmp(json!({"execute": name, "arguments": args}))
}

fn bm(cmd: &str, node: &str, name: &str) -> Step {
    c(cmd, json!({"node": node, "name": name}))
}

fn sha(node: &str, name: &str) -> Step {
    bm("x-debug-block-dirty-bitmap-sha256", node, name)
}

fn action(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

fn query() -> Step {
    Step::Query
}

fn scenario() -> Vec<Step> {
    let long = "x".repeat(1024);
    let add = "block-dirty-bitmap-add";
    vec![
        c(add, json!({"node": "nope", "name": "b0"})),
        c(add, json!({"node": "nope", "name": ""})),
        bm("block-dirty-bitmap-remove", "nope", "b0"),
        bm("block-dirty-bitmap-clear", "nope", "b0"),
        bm("block-dirty-bitmap-enable", "nope", "b0"),
        bm("block-dirty-bitmap-disable", "nope", "b0"),
        c(add, json!({"node": "d", "name": "b0"})),
        c(add, json!({"node": "d", "name": "b0"})),
        c(add, json!({"node": "d", "name": ""})),
        c(add, json!({"node": "d", "name": long})),
        c(add, json!({"node": "d", "name": &long[..1023]})),
        bm("block-dirty-bitmap-remove", "d", &long[..1023]),
        c(add, json!({"node": "d", "name": "g", "granularity": 256})),
        c(add, json!({"node": "d", "name": "g", "granularity": 3000})),
        c(
            add,
            json!({"node": "d", "name": "g", "granularity": 4294967296u64}),
        ),
        c(add, json!({"node": "d", "name": "g", "granularity": -512})),
        c(
            add,
            json!({"node": "d", "name": "b1", "granularity": 4096, "disabled": true}),
        ),
        c(add, json!({"node": "w", "name": "wb"})),
        c(add, json!({"node": "r", "name": "rb"})),
        c(add, json!({"node": "r", "name": "pb", "persistent": true})),
        c(add, json!({"node": "w", "name": "pb", "persistent": true})),
        c(
            add,
            json!({"node": "d", "name": "b2", "granularity": 1073741824}),
        ),
        query(),
        Step::Io("write -P 1 0 64k; write -P 2 1M 4k; write -z 8M 4k; discard 12M 64k"),
        sha("d", "b0"),
        sha("d", "b1"),
        sha("d", "b2"),
        sha("d", "nope"),
        sha("nope", "b0"),
        query(),
        bm("block-dirty-bitmap-disable", "d", "b0"),
        bm("block-dirty-bitmap-disable", "d", "b0"),
        bm("block-dirty-bitmap-enable", "d", "b1"),
        bm("block-dirty-bitmap-enable", "d", "nope"),
        Step::Io("write -P 3 2M 512; write -P 4 15M 1M"),
        sha("d", "b0"),
        sha("d", "b1"),
        c(
            "block-dirty-bitmap-merge",
            json!({"node": "d", "target": "b0", "bitmaps": ["b1"]}),
        ),
        sha("d", "b0"),
        c(
            "block-dirty-bitmap-merge",
            json!({"node": "d", "target": "b0", "bitmaps": [{"node": "w", "name": "wb"}]}),
        ),
        c(
            "block-dirty-bitmap-merge",
            json!({"node": "d", "target": "b0", "bitmaps": [{"node": "r", "name": "rb"}]}),
        ),
        c(
            "block-dirty-bitmap-merge",
            json!({"node": "d", "target": "nope", "bitmaps": ["b1"]}),
        ),
        c(
            "block-dirty-bitmap-merge",
            json!({"node": "d", "target": "b0", "bitmaps": ["b1", "nope"]}),
        ),
        c(
            "block-dirty-bitmap-merge",
            json!({"node": "d", "target": "b0", "bitmaps": [{"node": "nope", "name": "b1"}]}),
        ),
        c(
            "block-dirty-bitmap-merge",
            json!({"node": "w", "target": "wb", "bitmaps": [{"node": "d", "name": "b2"}]}),
        ),
        sha("w", "wb"),
        bm("block-dirty-bitmap-clear", "d", "b1"),
        sha("d", "b1"),
        bm("block-dirty-bitmap-remove", "d", "b1"),
        bm("block-dirty-bitmap-remove", "d", "b1"),
        bm("block-dirty-bitmap-clear", "d", "nope"),
        // An exported bitmap is busy.
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "d", "name": "e2", "bitmaps": ["b0"]}),
        ),
        Step::Map("e2", "qemu:dirty-bitmap:b0"),
        bm("block-dirty-bitmap-enable", "d", "b0"),
        bm("block-dirty-bitmap-clear", "d", "b0"),
        bm("block-dirty-bitmap-remove", "d", "b0"),
        c(
            "block-dirty-bitmap-merge",
            json!({"node": "d", "target": "b0", "bitmaps": ["b2"]}),
        ),
        c(
            "block-dirty-bitmap-merge",
            json!({"node": "d", "target": "b2", "bitmaps": ["b0"]}),
        ),
        query(),
        // A read-only export refuses a recording bitmap; a writable one takes it.
        c(add, json!({"node": "d", "name": "c"})),
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "d", "name": "e3", "bitmaps": ["c"]}),
        ),
        // Named as a {node, name} pair, QEMU does not check that it records.
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e4", "node-name": "d", "name": "e4",
                   "bitmaps": [{"node": "d", "name": "c"}]}),
        ),
        // Busy now, but by name QEMU first finds it recording.
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e5", "node-name": "d", "name": "e5", "bitmaps": ["c"]}),
        ),
        c("block-export-del", json!({"id": "e4"})),
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "d", "name": "e3", "writable": true,
                   "bitmaps": ["c", {"node": "w", "name": "wb"}]}),
        ),
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "d", "name": "e3", "writable": true,
                   "bitmaps": ["c"]}),
        ),
        Step::Io("write -P 5 4M 70k"),
        Step::Map("e3", "qemu:dirty-bitmap:c"),
        c("block-export-del", json!({"id": "e3"})),
        c("block-export-del", json!({"id": "e2"})),
        bm("block-dirty-bitmap-remove", "d", "b0"),
        // Transactions: all or nothing.
        c(
            "transaction",
            json!({"actions": [
                action(add, json!({"node": "d", "name": "t1"})),
                action(add, json!({"node": "d", "name": "t1"})),
            ]}),
        ),
        sha("d", "t1"),
        sha("d", "c"),
        c(
            "transaction",
            json!({"actions": [
                action("block-dirty-bitmap-clear", json!({"node": "d", "name": "c"})),
                action("block-dirty-bitmap-disable", json!({"node": "d", "name": "c"})),
                action(add, json!({"node": "d", "name": "t2"})),
                action("block-dirty-bitmap-merge",
                       json!({"node": "d", "target": "t2", "bitmaps": ["b2"]})),
                action("block-dirty-bitmap-remove", json!({"node": "d", "name": "b2"})),
                action("abort", json!({})),
            ]}),
        ),
        sha("d", "c"),
        sha("d", "b2"),
        query(),
        c(
            "transaction",
            json!({"actions": [action(add, json!({"node": "d", "name": "t3"}))],
                   "properties": {"completion-mode": "grouped"}}),
        ),
        c(
            "transaction",
            json!({"actions": [action("abort", json!({}))],
                   "properties": {"completion-mode": "grouped"}}),
        ),
        c("transaction", json!({"actions": []})),
        c(
            "transaction",
            json!({"actions": [action("nope", json!({}))]}),
        ),
        c(
            "transaction",
            json!({"actions": [
                action(add, json!({"node": "d", "name": "t2", "granularity": 8192})),
                action("block-dirty-bitmap-merge",
                       json!({"node": "d", "target": "t2", "bitmaps": ["c", "b2"]})),
                action("block-dirty-bitmap-clear", json!({"node": "d", "name": "c"})),
                action("block-dirty-bitmap-disable", json!({"node": "d", "name": "t2"})),
                action("block-dirty-bitmap-remove", json!({"node": "d", "name": "b2"})),
            ]}),
        ),
        sha("d", "t2"),
        sha("d", "c"),
        Step::Io("write -P 6 5M 4k"),
        sha("d", "t2"),
        sha("d", "c"),
        query(),
        c("blockdev-del", json!({"node-name": "w"})),
        query(),
    ]
}

fn run(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_img(&["create", "-f", "qcow2", "a.qcow2", "16M"], dir.path());
    qemu_img(&["create", "-f", "raw", "b.raw", "1M"], dir.path());
    qemu_img(&["create", "-f", "raw", "c.raw", "16M"], dir.path());
    let opts: Vec<String> = [
        "--blockdev",
        "driver=file,filename=a.qcow2,node-name=fa",
        "--blockdev",
        "driver=qcow2,file=fa,node-name=d",
        "--blockdev",
        "driver=file,filename=b.raw,node-name=r,read-only=on",
        "--blockdev",
        "driver=file,filename=c.raw,node-name=w",
        "--nbd-server",
        "addr.type=unix,addr.path=nbd.sock",
        "--export",
        "type=nbd,id=ex,node-name=d,name=d,writable=on",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let d = Daemon::start(program, &opts, dir);
    let sock = d.path("nbd.sock");
    let mut client = d.client();
    let mut out = Vec::new();
    for step in scenario() {
        match step {
            Step::Qmp(request) => {
                client.send(&request);
                loop {
                    let v = client.read().expect("reply");
                    if let Some(e) = v.get("event") {
                        out.push(format!("  event {e} {}", v["data"]));
                        continue;
                    }
                    let mut shown = request.to_string();
                    if shown.len() > 200 {
                        shown.truncate(200);
                    }
                    out.push(format!("{shown} -> {}", canon(&v)));
                    break;
                }
            }
            Step::Io(cmds) => {
                let uri = format!("nbd+unix:///d?socket={}", sock.display());
                let mut args = vec!["-f".to_owned(), "raw".to_owned()];
                for cmd in cmds.split("; ") {
                    args.push("-c".into());
                    args.push(cmd.into());
                }
                args.push(uri);
                let st = Command::new("qemu-io")
                    .args(&args)
                    .output()
                    .expect("qemu-io");
                assert!(st.status.success(), "qemu-io {cmds}: {st:?}");
                out.push(format!("io {cmds}"));
            }
            Step::Query => {
                let nodes = client.cmd("query-named-block-nodes", json!({"flat": true}));
                for n in nodes["return"].as_array().expect("nodes") {
                    out.push(format!(
                        "query {}: {}",
                        n["node-name"],
                        canon(n.get("dirty-bitmaps").unwrap_or(&Value::Null))
                    ));
                }
            }
            Step::Map(export, context) => {
                out.push(format!(
                    "map {export} {context}:\n{}",
                    nbdinfo_map(&sock, export, context)
                ));
            }
        }
    }
    out
}

fn nbdinfo_map(sock: &Path, export: &str, context: &str) -> String {
    let uri = format!("nbd+unix:///{export}?socket={}", sock.display());
    let o = Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(uri)
        .output()
        .expect("nbdinfo");
    assert!(o.status.success(), "nbdinfo: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn bitmap_commands_and_transactions_answer_as_qemu_storage_daemon() {
    let theirs = run(Path::new("qemu-storage-daemon"));
    let ours = run(&common::blockjobd());
    common::assert_same_transcript(&ours, &theirs);
}

/// Prints qemu-storage-daemon's transcript of the scenario, for writing new steps:
/// `cargo test -p daemon --test bitmaps print_qsd -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_qsd() {
    println!("{}", run(Path::new("qemu-storage-daemon")).join("\n"));
}

/// The same commands on one image, through `program`, the image opened (and exported)
/// read-only when `read_only`; the transcript of replies.
fn run_on_image(
    program: &Path,
    dir: &Path,
    image: &str,
    steps: &[Value],
    read_only: bool,
) -> Vec<String> {
    let (ro, writable) = if read_only {
        (",read-only=on", "off")
    } else {
        ("", "on")
    };
    let opts: Vec<String> = [
        "--blockdev".to_owned(),
        format!("driver=file,filename={image},node-name=f{ro}"),
        "--blockdev".to_owned(),
        format!("driver=qcow2,file=f,node-name=d{ro}"),
        "--nbd-server".to_owned(),
        "addr.type=unix,addr.path=nbd.sock".to_owned(),
        "--export".to_owned(),
        format!("type=nbd,id=e,node-name=d,name=d,writable={writable}"),
    ]
    .to_vec();
    let scratch = tempfile::tempdir_in(dir).expect("tempdir");
    let mut d = Daemon::start(program, &opts, scratch);
    let mut client = d.client();
    let mut out = Vec::new();
    for step in steps {
        if let Some(io) = step.get("io").and_then(Value::as_str) {
            let uri = format!("nbd+unix:///d?socket={}", d.path("nbd.sock").display());
            let st = Command::new("qemu-io")
                .args(["-f", "raw", "-c", io, &uri])
                .output()
                .expect("qemu-io");
            assert!(st.status.success(), "{st:?}");
            continue;
        }
        let reply = client.cmd(
            step["execute"].as_str().expect("command"),
            step["arguments"].clone(),
        );
        out.push(format!("{step} -> {}", canon(&reply)));
    }
    let nodes = client.cmd("query-named-block-nodes", json!({"flat": true}));
    for n in nodes["return"].as_array().expect("nodes") {
        out.push(format!(
            "{}: {}",
            n["node-name"],
            canon(n.get("dirty-bitmaps").unwrap_or(&Value::Null))
        ));
    }
    // A clean exit stores the bitmaps (dropping the daemon would kill it).
    client.send(&json!({"execute": "quit"}));
    assert!(d.wait().success());
    out
}

fn qemu_img_bitmaps(path: &Path) -> Value {
    let o = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// Stored alike: qemu-img lists the same bitmaps with the same flags in `ours` and `theirs`,
/// and `ours` checks clean.
fn stored_alike_and_clean(ours: &Path, theirs: &Path) {
    assert_eq!(qemu_img_bitmaps(ours), qemu_img_bitmaps(theirs));
    let (clean, report) = common::qemu_img_check(ours);
    assert!(clean, "{report}");
}

/// Runs `steps` with blockjobd on `ours` and qemu-storage-daemon on `theirs` (images in
/// `dir`), opened read-only when `read_only`, and asserts that both answer alike.
fn same_on_both(dir: &Path, ours: &str, theirs: &str, steps: &[Value], read_only: bool) {
    let image = |name: &str| dir.join(name).display().to_string();
    let a = run_on_image(&common::blockjobd(), dir, &image(ours), steps, read_only);
    let b = run_on_image(
        Path::new("qemu-storage-daemon"),
        dir,
        &image(theirs),
        steps,
        read_only,
    );
    common::assert_same_transcript(&a, &b);
}

/// Persistent bitmaps in qcow2, both directions: bitmaps qemu-img and QEMU wrote are loaded
/// with the same bits; ours are stored so that qemu-img lists them and QEMU loads the same
/// bits; qemu-img's offline changes are read back; a crash leaves them in use, and both
/// daemons then treat them as inconsistent in the same way.
#[test]
fn persistent_bitmaps_interoperate_with_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |name: &str| dir.path().join(name);
    qemu_img(&["create", "-f", "qcow2", "d.qcow2", "16M"], dir.path());
    qemu_img(
        &["bitmap", "--add", "--granularity", "64k", "d.qcow2", "b1"],
        dir.path(),
    );
    let st = Command::new("qemu-io")
        .current_dir(dir.path())
        .args([
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 4k",
            "d.qcow2",
        ])
        .output()
        .expect("qemu-io");
    assert!(st.status.success(), "{st:?}");
    std::fs::copy(p("d.qcow2"), p("q.qcow2")).expect("copy");

    let steps = vec![
        json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "d", "name": "b1"}}),
        json!({"io": "write -P 3 4M 64k"}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "b2", "persistent": true, "granularity": 4096}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "b3", "persistent": true, "disabled": true}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "b4", "persistent": true}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "t"}}),
        json!({"io": "write -P 3 8M 4k"}),
        json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "d", "name": "b4"}}),
        json!({"execute": "block-dirty-bitmap-merge", "arguments": {"node": "d", "target": "b3", "bitmaps": ["b2"]}}),
        json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "d", "name": "b1"}}),
        json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "d", "name": "b2"}}),
        json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "d", "name": "b3"}}),
    ];
    same_on_both(dir.path(), "d.qcow2", "q.qcow2", &steps, false);
    stored_alike_and_clean(&p("d.qcow2"), &p("q.qcow2"));

    // QEMU loads our bits; we load QEMU's.
    let sums = vec![
        json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "d", "name": "b1"}}),
        json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "d", "name": "b2"}}),
        json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "d", "name": "b3"}}),
    ];
    same_on_both(dir.path(), "q.qcow2", "d.qcow2", &sums, false);

    // Offline changes by qemu-img are what we load.
    for img in ["d.qcow2", "q.qcow2"] {
        qemu_img(&["bitmap", "--remove", img, "b2"], dir.path());
        qemu_img(&["bitmap", "--add", img, "b5"], dir.path());
        qemu_img(&["bitmap", "--merge", "b1", img, "b5"], dir.path());
        qemu_img(&["bitmap", "--disable", img, "b1"], dir.path());
    }
    same_on_both(dir.path(), "d.qcow2", "q.qcow2", &sums, false);

    // A crash leaves the bitmaps in use; both daemons then load them as inconsistent.
    for img in ["d.qcow2", "q.qcow2"] {
        let d = Daemon::start(
            &common::blockjobd(),
            &[
                "--blockdev".to_owned(),
                format!("driver=file,filename={},node-name=f", p(img).display()),
                "--blockdev".to_owned(),
                "driver=qcow2,file=f,node-name=d".to_owned(),
            ],
            tempfile::tempdir_in(dir.path()).expect("tempdir"),
        );
        let _ = d.client();
        d.signal(libc::SIGKILL);
    }
    let flags = &qemu_img_bitmaps(&p("d.qcow2"))[0]["flags"];
    assert!(
        flags.as_array().expect("flags").contains(&json!("in-use")),
        "{flags}"
    );
    let after_crash = vec![
        json!({"execute": "block-dirty-bitmap-clear", "arguments": {"node": "d", "name": "b1"}}),
        json!({"execute": "block-dirty-bitmap-enable", "arguments": {"node": "d", "name": "b5"}}),
        json!({"execute": "block-dirty-bitmap-merge", "arguments": {"node": "d", "target": "b3", "bitmaps": ["b5"]}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "b1", "persistent": true}}),
        json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "d", "name": "b1"}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "b1", "persistent": true}}),
    ];
    same_on_both(dir.path(), "d.qcow2", "q.qcow2", &after_crash, false);
    stored_alike_and_clean(&p("d.qcow2"), &p("q.qcow2"));

    // Opened read-only, stored bitmaps are read-only: they can be used, not changed.
    let read_only = vec![
        json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "d", "name": "b3"}}),
        json!({"execute": "block-dirty-bitmap-clear", "arguments": {"node": "d", "name": "b3"}}),
        json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "d", "name": "b3"}}),
        json!({"execute": "block-dirty-bitmap-disable", "arguments": {"node": "d", "name": "b3"}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "d", "name": "m"}}),
        json!({"execute": "block-dirty-bitmap-merge", "arguments": {"node": "d", "target": "m", "bitmaps": ["b3"]}}),
        json!({"execute": "block-dirty-bitmap-merge", "arguments": {"node": "d", "target": "b3", "bitmaps": ["m"]}}),
        json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "d", "name": "m"}}),
    ];
    same_on_both(dir.path(), "d.qcow2", "q.qcow2", &read_only, true);
    assert_eq!(
        qemu_img_bitmaps(&p("d.qcow2")),
        qemu_img_bitmaps(&p("q.qcow2"))
    );
}

/// Transactions run while a client writes through an export: each one drains the nodes it
/// names, so its actions share one point in time, and a bitmap added and one cleared in the
/// same transaction record exactly the same writes afterwards.
#[test]
fn transactions_share_a_point_in_time_under_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_img(&["create", "-f", "raw", "disk.raw", "64M"], dir.path());
    let opts: Vec<String> = [
        "--blockdev",
        "driver=file,filename=disk.raw,node-name=d",
        "--nbd-server",
        "addr.type=unix,addr.path=nbd.sock",
        "--export",
        "type=nbd,id=e,node-name=d,writable=on",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let d = Daemon::start(&common::blockjobd(), &opts, dir);
    let mut c = d.client();
    let r = c.cmd("block-dirty-bitmap-add", json!({"node": "d", "name": "b0"}));
    assert_eq!(r, json!({"return": {}}));
    let uri = format!("nbd+unix:///d?socket={}", d.path("nbd.sock").display());
    let mut args = vec!["-f".to_owned(), "raw".to_owned()];
    for i in 0..512u64 {
        args.push("-c".into());
        args.push(format!(
            "aio_write -P 7 {} 64k",
            (i * 65536 * 7) % (64 << 20)
        ));
    }
    args.push("-c".into());
    args.push("aio_flush".into());
    args.push(uri);
    let mut writer = Command::new("qemu-io")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    for i in 1..=20 {
        let r = c.cmd(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "d", "name": format!("b{i}")}},
                {"type": "block-dirty-bitmap-clear", "data": {"node": "d", "name": "b0"}},
            ]}),
        );
        assert_eq!(r, json!({"return": {}}), "transaction {i}");
        if i > 1 {
            let r = c.cmd(
                "block-dirty-bitmap-remove",
                json!({"node": "d", "name": format!("b{}", i - 1)}),
            );
            assert_eq!(r, json!({"return": {}}));
        }
    }
    assert!(writer.wait().expect("qemu-io").success());
    let sha = |c: &mut common::Client, name: &str| {
        c.cmd(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "d", "name": name}),
        )["return"]["sha256"]
            .clone()
    };
    assert_eq!(sha(&mut c, "b0"), sha(&mut c, "b20"));
}

/// qemu-storage-daemon 10.0.2 crashes (SIGSEGV) on a transaction whose
/// `block-dirty-bitmap-enable` names a bitmap that does not exist; we answer its error and undo
/// the actions before it.
#[test]
fn a_transaction_enabling_a_missing_bitmap_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_img(&["create", "-f", "raw", "d.raw", "1M"], dir.path());
    let d = Daemon::start(
        &common::blockjobd(),
        &[
            "--blockdev".to_owned(),
            "driver=file,filename=d.raw,node-name=d".to_owned(),
        ],
        dir,
    );
    let mut c = d.client();
    let ok = json!({"return": {}});
    let r = c.cmd("block-dirty-bitmap-add", json!({"node": "d", "name": "b0"}));
    assert_eq!(r, ok);
    let r = c.cmd(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-remove", "data": {"node": "d", "name": "b0"}},
            {"type": "block-dirty-bitmap-enable", "data": {"node": "d", "name": "nope"}}
        ]}),
    );
    assert_eq!(r["error"]["desc"], "Dirty bitmap 'nope' not found", "{r}");
    let r = c.cmd(
        "block-dirty-bitmap-clear",
        json!({"node": "d", "name": "b0"}),
    );
    assert_eq!(r, ok, "the removal was undone");
}
