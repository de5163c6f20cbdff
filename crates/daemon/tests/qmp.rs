//! Integration tests: the real blockjobd binary driven over raw QMP sockets.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{qemu_img, qemu_img_check, Client, Daemon};
use serde_json::{json, Value};

#[test]
fn greeting_negotiation_and_introspection() {
    let d = Daemon::ours(&[]);
    let mut c = Client::connect(&d.socket);
    let g = c.greeting();
    assert_eq!(
        g["QMP"]["version"]["qemu"],
        json!({"micro": 0, "minor": 0, "major": 10})
    );
    assert!(g["QMP"]["version"]["package"]
        .as_str()
        .expect("package")
        .starts_with("blockjob "));
    assert_eq!(g["QMP"]["capabilities"], json!(["oob"]));
    let r = c.cmd("query-version", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    c.send(&json!({"execute": "qmp_capabilities", "id": {"x": [1, "y"]}}));
    assert_eq!(c.reply(), json!({"return": {}, "id": {"x": [1, "y"]}}));
    let r = c.cmd("qmp_capabilities", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound");

    let cmds = c.cmd("query-commands", json!({}));
    let names: Vec<&str> = cmds["return"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for n in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-qmp-schema",
        "quit",
        "blockdev-add",
        "blockdev-del",
        "query-named-block-nodes",
        "query-block",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }

    // Feature probing the way libvirt does it: follow blockdev-add's argument type to the
    // driver union and read the cases.
    let schema = c.cmd("query-qmp-schema", json!({}))["return"].clone();
    let items = schema.as_array().expect("schema");
    let find = |name: &str| -> Value {
        items
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in schema"))
    };
    let add = find("blockdev-add");
    let opts = find(add["arg-type"].as_str().expect("arg-type"));
    assert_eq!(opts["tag"], "driver");
    let mut cases: Vec<&str> = opts["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .filter_map(|v| v["case"].as_str())
        .collect();
    cases.sort_unstable();
    assert_eq!(
        cases,
        [
            "blkdebug",
            "copy-before-write",
            "file",
            "nbd",
            "null-aio",
            "null-co",
            "qcow2",
            "raw",
            "snapshot-access",
            "throttle"
        ]
    );
    let file = opts["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .find(|v| v["case"] == "file")
        .expect("file")["type"]
        .as_str()
        .expect("type")
        .to_owned();
    let file = find(&file);
    let members: Vec<&str> = file["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(members.contains(&"filename"));
    assert!(
        !members.contains(&"pr-manager"),
        "unsupported members are absent"
    );
}

#[test]
fn blockdevs_from_the_command_line_and_qmp() {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_img(&["create", "-f", "qcow2", "base.qcow2", "4M"], dir.path());
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "a,b.qcow2",
        ],
        dir.path(),
    );
    let extra: Vec<String> = [
        "--blockdev",
        "driver=qcow2,node-name=disk0,file.driver=file,file.filename=a,,b.qcow2,file.node-name=f0",
        "--blockdev",
        r#"{"driver": "null-co", "node-name": "n0", "size": 1048576}"#,
        "--blockdev",
        "driver=null-co,node-name=n1,size=64M,read-zeroes=on,read-only=on",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let d = Daemon::start(&common::blockjobd(), &extra, dir);
    let mut c = d.client();
    let nodes = c.cmd("query-named-block-nodes", json!({"flat": true}))["return"].clone();
    let by_name = |n: &str| -> Value {
        nodes
            .as_array()
            .expect("list")
            .iter()
            .find(|e| e["node-name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} not listed: {nodes}"))
    };
    let disk = by_name("disk0");
    assert_eq!(disk["drv"], "qcow2");
    assert_eq!(disk["file"], "a,b.qcow2", ",, is a literal comma");
    assert_eq!(
        disk["backing_file"], "base.qcow2",
        "backing opened from the header"
    );
    // As in QEMU, only the chained (not flat) answer counts the chain.
    assert_eq!(disk["backing_file_depth"], 0);
    let chained = c.cmd("query-named-block-nodes", json!({}))["return"].clone();
    let disk_chained = chained
        .as_array()
        .expect("list")
        .iter()
        .find(|e| e["node-name"] == "disk0")
        .cloned()
        .expect("disk0 listed");
    assert_eq!(disk_chained["backing_file_depth"], 1);
    assert_eq!(disk["image"]["virtual-size"], 4 << 20);
    assert_eq!(by_name("n0")["image"]["virtual-size"], 1 << 20);
    let n1 = by_name("n1");
    assert_eq!(n1["image"]["virtual-size"], 64 << 20, "size=64M converted");
    assert_eq!(n1["ro"], true);
    let implicit = nodes
        .as_array()
        .expect("list")
        .iter()
        .filter(|e| {
            e["node-name"]
                .as_str()
                .is_some_and(|n| n.starts_with("#block"))
        })
        .count();
    assert_eq!(
        implicit, 2,
        "the backing image and its file are implicit nodes"
    );
    let nested = c.cmd("query-named-block-nodes", json!({}))["return"].clone();
    let disk = nested
        .as_array()
        .expect("list")
        .iter()
        .find(|e| e["node-name"] == "disk0")
        .expect("disk0")
        .clone();
    assert_eq!(disk["image"]["backing-image"]["filename"], "base.qcow2");

    assert_eq!(
        c.cmd("blockdev-del", json!({"node-name": "f0"}))["error"]["desc"],
        "Node f0 is not owned by the monitor"
    );
    let r = c.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r0", "file": "f0", "read-only": true}),
    );
    assert_eq!(r, json!({"return": {}}), "a named child is shared");
    assert_eq!(
        c.cmd("blockdev-del", json!({"node-name": "disk0"})),
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd("blockdev-del", json!({"node-name": "r0"})),
        json!({"return": {}})
    );
    let left: Vec<String> = c.cmd("query-named-block-nodes", json!({}))["return"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["node-name"].as_str().map(str::to_owned))
        .collect();
    let mut left_sorted = left.clone();
    left_sorted.sort();
    assert_eq!(
        left_sorted,
        ["n0", "n1"],
        "implicit children went with their parents"
    );
    assert_eq!(c.cmd("query-block", json!({})), json!({"return": []}));
}

fn corrupt_header(path: &std::path::Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.seek(SeekFrom::Start(20)).expect("seek");
    f.write_all(&99u32.to_be_bytes())
        .expect("cluster_bits = 99");
}

#[test]
fn bad_input_gets_clear_errors_and_the_daemon_keeps_serving() {
    let d = Daemon::ours(&["--blockdev", "driver=null-co,node-name=n0"]);
    qemu_img(&["create", "-f", "raw", "plain.raw", "1M"], d.dir.path());
    qemu_img(&["create", "-f", "qcow2", "bad.qcow2", "1M"], d.dir.path());
    corrupt_header(&d.path("bad.qcow2"));
    let before = std::fs::read(d.path("bad.qcow2")).expect("read");
    let mut c = d.client();

    // Truncated JSON, completed later: one message.
    c.send_raw(br#"{"execute": "query-version", "id": "#);
    std::thread::sleep(Duration::from_millis(50));
    c.send_raw(br#"1}"#);
    assert_eq!(c.reply()["id"], 1);
    // Malformed JSON: an error, then the stream goes on.
    c.send_raw(br#"{"execute": "query-version" ]"#);
    assert_eq!(c.reply()["error"]["class"], "GenericError");
    // Deep nesting: exactly one error.
    let deep = format!(
        r#"{{"execute": "query-version", "id": {}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    c.send_raw(deep.as_bytes());
    c.send(&json!({"execute": "query-version", "id": "after-deep"}));
    assert_eq!(
        c.reply()["error"]["desc"],
        "JSON nesting depth limit exceeded"
    );
    assert_eq!(c.reply()["id"], "after-deep", "one error only, then served");
    // A 10 MB message is accepted (QEMU needs ~36 s for it).
    let big = "x".repeat(10 << 20);
    let t = Instant::now();
    c.send(&json!({"execute": "query-version", "id": big}));
    assert_eq!(c.reply()["id"].as_str().map(str::len), Some(10 << 20));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    // A control character resets the parser (the QMP spec's recovery).
    c.send_raw(b"{\"execute\": \x04");
    assert_eq!(c.reply()["error"]["class"], "GenericError");

    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "size": "big"}}),
            "Invalid parameter type for 'size', expected: integer",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "size": -1}}),
            "Parameter 'size' expects a non-negative number below 2^64",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "bogus": 1}}),
            "Parameter 'bogus' is unexpected",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x", "filename": "plain.raw", "pr-manager": "pr0"}}),
            "Parameter 'pr-manager' is unexpected",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0"}}),
            "Duplicate nodes with node-name='n0'",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "x", "file": "nosuch"}}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            json!({"execute": "blockdev-del", "arguments": {"node-name": "nosuch"}}),
            "Failed to find node with node-name='nosuch'",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x", "filename": "missing.img"}}),
            "Could not open 'missing.img': No such file or directory",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x", "file": {"driver": "file", "filename": "plain.raw"}}}),
            "Image is not in qcow2 format",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "blkdebug", "node-name": "x", "image": "n0", "inject-error": [{"event": "l1_updates"}]}}),
            "Parameter 'event' does not accept value 'l1_updates'",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x", "filename": "plain.raw", "detect-zeroes": "unmap"}}),
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ),
        (
            json!({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x", "filename": "plain.raw", "detect-zeroes": "bogus"}}),
            "Parameter 'detect-zeroes' does not accept value 'bogus'",
        ),
    ];
    for (req, desc) in cases {
        c.send(&req);
        let r = c.reply();
        assert_eq!(r["error"]["class"], "GenericError", "{req}: {r}");
        assert_eq!(r["error"]["desc"], desc, "{req}");
    }
    let r = c.cmd(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "x", "file": {"driver": "file", "filename": "bad.qcow2"}}),
    );
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert_eq!(
        std::fs::read(d.path("bad.qcow2")).expect("read"),
        before,
        "a refused image is not modified"
    );
    let nodes = c.cmd("query-named-block-nodes", json!({}))["return"].clone();
    assert_eq!(
        nodes.as_array().map(Vec::len),
        Some(1),
        "failed adds leave no node behind: {nodes}"
    );
    assert_eq!(
        Client::kind(&c.cmd("query-version", json!({}))),
        "return",
        "still serving"
    );
}

#[test]
fn quit_and_signals_close_images_cleanly() {
    for how in ["quit", "term", "int"] {
        let dir = tempfile::tempdir().expect("tempdir");
        qemu_img(&["create", "-f", "qcow2", "d.qcow2", "8M"], dir.path());
        let pid = dir.path().join("pid");
        let extra: Vec<String> = [
            "--blockdev",
            "driver=qcow2,node-name=d,file.driver=file,file.filename=d.qcow2",
            "--pidfile",
            pid.to_str().expect("utf-8"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut d = Daemon::start(&common::blockjobd(), &extra, dir);
        let mode = std::fs::metadata(&d.socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode");
        let pid_text = std::fs::read_to_string(&pid).expect("pidfile");
        assert_eq!(pid_text.trim(), d.child.id().to_string());
        let mut c = d.client();
        match how {
            "quit" => assert_eq!(c.cmd("quit", json!({})), json!({"return": {}})),
            "term" => d.signal(libc::SIGTERM),
            _ => d.signal(libc::SIGINT),
        }
        assert!(c.read().is_none(), "{how}: the connection closes");
        let st = d.wait();
        assert!(st.success(), "{how}: exit status {st:?}");
        assert!(!d.socket.exists(), "{how}: socket removed");
        assert!(!pid.exists(), "{how}: pidfile removed");
        let (ok, out) = qemu_img_check(&d.path("d.qcow2"));
        assert!(ok && out.contains("No errors"), "{how}: {out}");
    }
}

#[test]
fn several_monitors_and_clients_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let second = dir.path().join("second.sock");
    let extra: Vec<String> = vec![
        "--chardev".into(),
        format!("socket,id=m1,path={},server=on,wait=off", second.display()),
        "--monitor".into(),
        "m1,pretty=on".into(),
    ];
    let d = Daemon::start(&common::blockjobd(), &extra, dir);
    let mut a = d.client();
    let mut b = d.client();
    let mut p = Client::connect(&second);
    p.greeting();
    assert_eq!(p.cmd("qmp_capabilities", json!({})), json!({"return": {}}));
    assert_eq!(
        a.cmd(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "shared"})
        ),
        json!({"return": {}})
    );
    for c in [&mut b, &mut p] {
        let nodes = c.cmd("query-named-block-nodes", json!({}));
        assert_eq!(nodes["return"][0]["node-name"], "shared");
    }
}

#[test]
fn a_client_leaving_mid_command_does_not_hurt() {
    let d = Daemon::ours(&[]);
    for i in 0..20 {
        let mut c = Client::connect(&d.socket);
        c.greeting();
        c.send_raw(br#"{"execute":"qmp_capabilities"}"#);
        c.send(&json!({"execute": "blockdev-add",
                       "arguments": {"driver": "null-co", "node-name": format!("n{i}")}}));
        c.send_raw(br#"{"execute": "query-named-block-no"#);
        drop(c);
    }
    // Commands of different connections are not ordered: the last ones may still be on their
    // way when a new client asks, so look until every one has been applied.
    let mut c = d.client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let nodes = c.cmd("query-named-block-nodes", json!({}));
        let n = nodes["return"].as_array().map_or(0, Vec::len);
        if n == 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} of 20 nodes added"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn run_blockjobd(args: &[&str]) -> std::process::Output {
    Command::new(common::blockjobd())
        .args(args)
        .output()
        .expect("run")
}

#[test]
fn invalid_options_stop_start_up_naming_the_option() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--blockdev", "driver=file,node-name=f"],
            "--blockdev: Parameter 'filename' is missing",
        ),
        (
            &["--blockdev", "driver=null-co,node-name=n,size=lots"],
            "--blockdev: Parameter 'size' expects",
        ),
        (
            &["--object", "secret,id=s0,data=x"],
            "--object: object type 'secret' is not supported",
        ),
        (
            &["--nbd-server", "addr.type=vsock,addr.cid=1"],
            "--nbd-server: Parameter 'type' does not accept value 'vsock'",
        ),
        (
            &["--export", "type=nbd,id=e,node-name=none"],
            "--export: Cannot find device='' nor node-name='none'",
        ),
        (
            &["--monitor", "chardev=none"],
            "--monitor: chardev 'none' not found",
        ),
        (&["--frobnicate"], "unrecognized option '--frobnicate'"),
        (
            &["--chardev", "socket,id=m,path=/tmp/x"],
            "--chardev: only server=on",
        ),
    ];
    for (args, expect) in cases {
        let out = run_blockjobd(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let v = run_blockjobd(&["-V"]);
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("blockjobd version"));
    let h = run_blockjobd(&["--help"]);
    assert!(h.status.success());
    assert!(String::from_utf8_lossy(&h.stdout).contains("--blockdev"));
}

#[test]
fn daemonize_returns_once_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("q.sock");
    let pid = dir.path().join("pid");
    let st = Command::new(common::blockjobd())
        .args([
            "--chardev",
            &format!("socket,id=m,path={},server=on,wait=off", sock.display()),
            "--monitor",
            "m",
            "--blockdev",
            "driver=null-co,node-name=n",
            "--pidfile",
            pid.to_str().expect("utf-8"),
            "--daemonize",
        ])
        .status()
        .expect("run");
    assert!(st.success());
    assert!(
        sock.exists() && pid.exists(),
        "ready when the parent returns"
    );
    let mut c = Client::connect(&sock);
    c.greeting();
    c.cmd("qmp_capabilities", json!({}));
    assert_eq!(c.cmd("quit", json!({})), json!({"return": {}}));
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid.exists() {
        assert!(Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let failed = Command::new(common::blockjobd())
        .args([
            "--blockdev",
            "driver=file,node-name=f,filename=/nonexistent",
            "--daemonize",
        ])
        .output()
        .expect("run");
    assert_eq!(
        failed.status.code(),
        Some(1),
        "a failed start-up is reported by the parent"
    );
}

/// `--trace` logs the trace points its patterns match, to the file it names: a failed
/// command's error, inside the command's span.
#[test]
fn trace_logs_matching_trace_points_to_a_file() {
    let d = Daemon::ours(&["--trace", "enable=qmp*,file=trace.log"]);
    let mut c = d.client();
    let r = c.cmd("blockdev-del", json!({"node-name": "nosuch"}));
    assert_eq!(
        r["error"]["desc"],
        "Failed to find node with node-name='nosuch'"
    );
    c.cmd("quit", json!({}));
    let mut d = d;
    d.wait();
    let log = std::fs::read_to_string(d.path("trace.log")).expect("trace file");
    assert!(
        log.contains("qmp_command{command=blockdev-del}")
            && log.contains("Failed to find node with node-name='nosuch'"),
        "{log}"
    );
    let out = std::process::Command::new(common::blockjobd())
        .args(["--trace", "help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("job_state_transition"));
}
