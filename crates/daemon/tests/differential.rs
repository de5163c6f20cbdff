//! Differential tests: the same QMP scenario against qemu-storage-daemon and blockjobd.
//! Reply kinds and error classes must match at every step; where QEMU's text is part of the
//! contract the descriptions must match too. Deliberate differences are listed in the README
//! and kept out of these scenarios.

mod common;

use std::path::PathBuf;

use common::{qemu_img, Client, Daemon};
use serde_json::{json, Value};

/// One step: a raw request and whether the description must match word for word.
struct Step {
    request: Value,
    same_text: bool,
}

fn step(request: Value, same_text: bool) -> Step {
    Step { request, same_text }
}

fn qsd() -> PathBuf {
    PathBuf::from("qemu-storage-daemon")
}

fn prepare(dir: &std::path::Path) {
    qemu_img(&["create", "-f", "qcow2", "a.qcow2", "16M"], dir);
    qemu_img(&["create", "-f", "raw", "b.raw", "1M"], dir);
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        dir,
    );
}

fn scenario() -> Vec<Step> {
    let add = |args: Value| json!({"execute": "blockdev-add", "arguments": args});
    let del = |name: &str| json!({"execute": "blockdev-del", "arguments": {"node-name": name}});
    vec![
        step(json!({"execute": "qmp_capabilities"}), true),
        step(json!({"execute": "qmp_capabilities"}), true),
        step(json!({"execute": "nosuch"}), true),
        step(
            json!({"execute": "query-version", "arguments": {"x": 1}}),
            true,
        ),
        step(json!({"foo": 1}), true),
        step(json!([1]), true),
        step(json!({"execute": 1}), true),
        step(json!({"execute": "query-version", "arguments": []}), true),
        step(json!({"execute": "query-block"}), true),
        step(
            add(json!({"driver": "file", "node-name": "f0", "filename": "a.qcow2"})),
            true,
        ),
        step(
            add(json!({"driver": "qcow2", "node-name": "d0", "file": "f0"})),
            true,
        ),
        step(
            add(json!({"driver": "file", "node-name": "f0", "filename": "b.raw"})),
            true,
        ),
        step(
            add(json!({"driver": "file", "node-name": "x", "filename": "missing"})),
            true,
        ),
        step(add(json!({"driver": "file", "node-name": "x"})), true),
        step(
            add(json!({"driver": "file", "node-name": "x", "filename": 5})),
            true,
        ),
        step(
            add(json!({"driver": "file", "node-name": "x", "filename": "b.raw", "bogus": 1})),
            true,
        ),
        step(add(json!({"driver": "nope", "node-name": "x"})), true),
        step(add(json!({"node-name": "x"})), true),
        step(add(json!({"driver": "null-co"})), true),
        step(add(json!({"driver": "null-co", "node-name": "1bad"})), true),
        step(
            add(json!({"driver": "null-co", "node-name": "n23456789012345678901234567890123"})),
            true,
        ),
        step(
            add(json!({"driver": "null-co", "node-name": "n0", "size": "1"})),
            true,
        ),
        step(
            add(json!({"driver": "null-co", "node-name": "n0", "read-only": "yes"})),
            true,
        ),
        step(
            add(json!({"driver": "qcow2", "node-name": "x", "file": {"driver": "file"}})),
            true,
        ),
        step(
            add(json!({"driver": "qcow2", "node-name": "x", "file": 5})),
            false,
        ),
        step(
            add(json!({"driver": "qcow2", "node-name": "x",
                        "file": {"driver": "file", "filename": "b.raw"}})),
            true,
        ),
        step(
            add(json!({"driver": "raw", "node-name": "x", "file": "nosuch"})),
            true,
        ),
        // An alternate that fits no branch is named by its member name alone, a list
        // element by 'null', as QEMU's visitor names them.
        step(
            add(json!({"driver": "qcow2", "node-name": "x",
                        "file": {"driver": "raw", "file": 5}})),
            true,
        ),
        step(
            json!({"execute": "block-export-add", "arguments":
                {"type": "nbd", "id": "e", "node-name": "x", "bitmaps": [5]}}),
            true,
        ),
        step(
            add(
                json!({"driver": "blkdebug", "node-name": "x", "image": "f0",
                        "inject-error": [{"event": "read_aio"}, {"errno": 5}]}),
            ),
            true,
        ),
        step(
            add(json!({"driver": "null-co", "node-name": "a-b.c_d", "size": 4096})),
            true,
        ),
        step(
            add(json!({"driver": "raw", "node-name": "r0",
                        "file": {"driver": "file", "filename": "b.raw"}})),
            true,
        ),
        step(
            add(json!({"driver": "raw", "node-name": "r1", "file": "f0", "read-only": true})),
            true,
        ),
        step(del("f0"), true),
        step(del("nosuch"), true),
        step(del("d0"), true),
        step(del("r1"), true),
        // Opened once nothing writes a.qcow2 any more (image locks refuse it earlier:
        // permissions.rs).
        step(
            add(json!({"driver": "qcow2", "node-name": "top",
                        "file": {"driver": "file", "filename": "top.qcow2"}, "read-only": true})),
            true,
        ),
        step(del("f0"), true),
        step(del("r0"), true),
        step(del("top"), true),
        step(del("a-b.c_d"), true),
        step(
            json!({"execute": "query-named-block-nodes", "arguments": {"flat": "yes"}}),
            true,
        ),
    ]
}

/// Runs the scenario; returns (kind, desc) per step.
fn run(program: &std::path::Path) -> (Vec<(String, String)>, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = Client::connect(&d.socket);
    c.greeting();
    let mut out = Vec::new();
    for s in scenario() {
        c.send(&s.request);
        let r = c.reply();
        let desc = r["error"]["desc"].as_str().unwrap_or("").to_owned();
        out.push((Client::kind(&r), desc));
    }
    let nodes = c.cmd("query-named-block-nodes", json!({"flat": true}));
    let mut names: Vec<String> = nodes["return"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["node-name"].as_str())
        .filter(|n| !n.starts_with('#'))
        .map(str::to_owned)
        .collect();
    names.sort();
    (out, names)
}

#[test]
fn same_replies_as_qemu_storage_daemon() {
    let (theirs, their_nodes) = run(&qsd());
    let (ours, our_nodes) = run(&common::blockjobd());
    let steps = scenario();
    let mut diffs = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let (tk, td) = &theirs[i];
        let (ok, od) = &ours[i];
        if tk != ok || (s.same_text && td != od) {
            diffs.push(format!(
                "step {i} {}:\n  qsd:  {tk} {td}\n  ours: {ok} {od}",
                s.request
            ));
        }
    }
    assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
    assert_eq!(our_nodes, their_nodes, "the same named nodes remain");
}

#[test]
fn our_schema_is_a_subset_of_qemus() {
    // Every command we implement exists in qsd with the same name; every argument member we
    // accept for blockdev-add's drivers is one QEMU has for that driver.
    let schema_of = |program: &std::path::Path| -> Vec<Value> {
        let d = Daemon::start(program, &[], tempfile::tempdir().expect("tempdir"));
        let mut c = d.client();
        c.cmd("query-qmp-schema", json!({}))["return"]
            .as_array()
            .expect("schema")
            .clone()
    };
    let theirs = schema_of(&qsd());
    let ours = schema_of(&common::blockjobd());
    let find = |items: &[Value], name: &str| -> Option<Value> {
        items.iter().find(|e| e["name"] == name).cloned()
    };
    let members = |items: &[Value], ty: &str| -> Vec<String> {
        find(items, ty)
            .and_then(|t| t["members"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect()
    };
    let variant = |union: &Value, case: &str| -> String {
        union["variants"]
            .as_array()
            .expect("variants")
            .iter()
            .find(|v| v["case"] == case)
            .and_then(|v| v["type"].as_str())
            .unwrap_or_else(|| panic!("case {case}"))
            .to_owned()
    };
    for cmd in ours.iter().filter(|e| e["meta-type"] == "command") {
        let name = cmd["name"].as_str().expect("name");
        assert!(find(&theirs, name).is_some(), "qsd has no command {name}");
    }
    let our_add = find(&ours, "blockdev-add").expect("ours");
    let their_add = find(&theirs, "blockdev-add").expect("theirs");
    let our_union = find(&ours, our_add["arg-type"].as_str().expect("t")).expect("u");
    let their_union = find(&theirs, their_add["arg-type"].as_str().expect("t")).expect("u");
    let their_base = members(&theirs, their_union["name"].as_str().expect("n"));
    for m in members(&ours, our_union["name"].as_str().expect("n")) {
        assert!(their_base.contains(&m), "base member {m} unknown to QEMU");
    }
    for case in ["file", "raw", "qcow2", "null-co", "blkdebug"] {
        let ours_m = members(&ours, &variant(&our_union, case));
        let theirs_m = members(&theirs, &variant(&their_union, case));
        for m in ours_m {
            assert!(theirs_m.contains(&m), "{case}: member {m} unknown to QEMU");
        }
    }
}

/// The NBD server and export commands, their errors, and BLOCK_EXPORT_DELETED (also at quit).
fn export_scenario() -> Vec<Value> {
    let c = |name: &str, args: Value| json!({"execute": name, "arguments": args});
    let start = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    let exp = |id: &str, node: &str| json!({"type": "nbd", "id": id, "node-name": node});
    vec![
        c("nbd-server-stop", json!({})),
        c("block-export-add", exp("e", "d")),
        c("query-block-exports", json!({})),
        c("nbd-server-start", start.clone()),
        c("nbd-server-start", start.clone()),
        c("block-export-add", exp("e", "nope")),
        c("block-export-add", exp("e", "d")),
        c("block-export-add", exp("e", "r")),
        c("block-export-add", exp("e2", "r")),
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "r", "name": "d"}),
        ),
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "r", "writable": true}),
        ),
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "d", "name": "bm", "bitmaps": ["b0"]}),
        ),
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "d", "name": "bm",
                                     "bitmaps": [{"node": "d", "name": "b0"}]}),
        ),
        c("block-export-add", exp("", "d")),
        c("block-export-add", exp("9x", "d")),
        c(
            "block-export-add",
            json!({"type": "nbd", "id": "e4", "node-name": "d", "name": "d2",
                                     "writable": true, "writethrough": true,
                                     "description": "x", "allocation-depth": true}),
        ),
        c("query-block-exports", json!({})),
        c("blockdev-del", json!({"node-name": "d"})),
        c("block-export-del", json!({"id": "nope"})),
        c("block-export-del", json!({"id": "e", "mode": "bogus"})),
        c("block-export-del", json!({"id": "e"})),
        c("block-export-del", json!({"id": "e", "mode": "hard"})),
        c("block-export-del", json!({"id": "e4", "mode": "hard"})),
        c("nbd-server-add", json!({"device": "d"})),
        c(
            "nbd-server-add",
            json!({"device": "d", "name": "x", "writable": true}),
        ),
        c("nbd-server-add", json!({"device": "nope"})),
        c("query-block-exports", json!({})),
        c("nbd-server-remove", json!({"name": "nope"})),
        c("nbd-server-remove", json!({"name": "x"})),
        c("nbd-server-remove", json!({"name": "d", "mode": "hard"})),
        c("nbd-server-stop", json!({})),
        c("query-block-exports", json!({})),
        c("nbd-server-stop", json!({})),
        c("nbd-server-remove", json!({"name": "e2"})),
        c("blockdev-del", json!({"node-name": "d"})),
        c("nbd-server-start", start),
        c("block-export-add", exp("eq", "d")),
        // Exports still present at quit end with an event that arrives before quit's reply.
        c("quit", json!({})),
    ]
}

/// Runs the export scenario; returns each step's reply (without timestamps) and the events
/// that came before it.
fn run_exports(program: &std::path::Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let opts: Vec<String> = [
        "--blockdev",
        "driver=file,filename=b.raw,node-name=r,read-only=on",
        "--blockdev",
        "driver=file,filename=a.qcow2,node-name=fa",
        "--blockdev",
        "driver=qcow2,file=fa,node-name=d",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let d = Daemon::start(program, &opts, dir);
    let mut c = d.client();
    let mut out = Vec::new();
    for request in export_scenario() {
        c.send(&request);
        loop {
            let v = c.read().expect("reply");
            if let Some(e) = v.get("event") {
                out.push(format!("  event {e} {}", v["data"]));
                continue;
            }
            out.push(format!("{request} -> {v}"));
            break;
        }
    }
    // Nothing is read after quit's reply: qsd sometimes resets the connection there.
    out
}

#[test]
fn export_commands_answer_as_qemu_storage_daemon() {
    let theirs = run_exports(&qsd());
    let ours = run_exports(&common::blockjobd());
    assert_eq!(
        ours,
        theirs,
        "\nours:\n{}\n\nqsd:\n{}",
        ours.join("\n"),
        theirs.join("\n")
    );
}

/// What `query-named-block-nodes` says of each named node: driver, file name and image
/// information (sizes, cluster size, dirty flag), with the test directory left out.
fn node_infos(program: &std::path::Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    qemu_img(&["create", "-f", "raw", "t.raw", "16M"], dir.path());
    for name in [
        "t2.raw",
        "n1.raw",
        "n2.raw",
        "t3.raw",
        "t4 é.raw",
        "b5.raw",
        "b6.raw",
        "b7.raw",
        "t5.raw",
    ] {
        qemu_img(&["create", "-f", "raw", name, "1M"], dir.path());
    }
    qemu_img(&["create", "-f", "qcow2", "base2.qcow2", "1M"], dir.path());
    qemu_img(&["create", "-f", "qcow2", "fl.qcow2", "1M"], dir.path());
    for (image, backing, format) in [
        ("ov.qcow2", "base2.qcow2", "qcow2"),
        ("same.qcow2", "b5.raw", "raw"),
    ] {
        qemu_img(
            &["create", "-f", "qcow2", "-b", backing, "-F", format, image],
            dir.path(),
        );
    }
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base2.qcow2",
            "-F",
            "qcow2",
            "top2.qcow2",
        ],
        dir.path(),
    );
    let root = dir.path().display().to_string();
    // An NBD server of its own: nbd nodes without an export name, on a unix socket and over
    // TCP, show QEMU's URIs.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = listener.local_addr().expect("addr").port().to_string();
    drop(listener);
    let serve = |args: &[&str], image: &str| {
        let child = std::process::Command::new("qemu-nbd")
            .args(["-f", "raw", "-t"])
            .args(args)
            .arg(image)
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        common::KillOnDrop(child)
    };
    let sock = dir.path().join("q.sock").display().to_string();
    let _unix = serve(&["-k", &sock], "n1.raw");
    let _tcp = serve(&["-b", "127.0.0.1", "-p", &port], "n2.raw");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !dir.path().join("q.sock").exists()
        || std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap_or(0))).is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let file = |name: &str| json!({"driver": "file", "filename": name});
    for args in [
        json!({"driver": "null-co", "node-name": "n"}),
        json!({"driver": "null-co", "node-name": "nz", "read-zeroes": true}),
        json!({"driver": "null-aio", "node-name": "na", "size": 1048576}),
        json!({"driver": "qcow2", "node-name": "q", "file": file("a.qcow2")}),
        json!({"driver": "raw", "node-name": "t", "file": file("t.raw")}),
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "q", "target": "t"}),
        json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
        json!({"driver": "blkdebug", "node-name": "dbg", "image": file("t2.raw")}),
        json!({"driver": "nbd", "node-name": "nu",
               "server": {"type": "unix", "path": sock}}),
        json!({"driver": "nbd", "node-name": "nt",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port}}),
        json!({"driver": "raw", "node-name": "rn", "file": "nu"}),
        // A filter over a format with a backing file: the chain goes on through the filter.
        json!({"driver": "qcow2", "node-name": "tq", "file": file("top2.qcow2")}),
        json!({"driver": "copy-before-write", "node-name": "cbw2", "file": "tq",
               "target": "dbg"}),
        // Nodes their file's name would not open again as they are: QEMU names them by their
        // options, as JSON in its dictionary's order.
        json!({"driver": "blkdebug", "node-name": "rules", "image": file("t3.raw"),
               "inject-error": [{"event": "write_aio", "errno": 5, "sector": 8, "once": true}]}),
        json!({"driver": "raw", "node-name": "rr", "file": "rules"}),
        // Given inline, the same rules come out with their tied keys the other way round.
        json!({"driver": "raw", "node-name": "ri", "file": {"driver": "blkdebug",
               "image": file("t5.raw"),
               "inject-error": [{"event": "write_aio", "errno": 5, "sector": 8}]}}),
        json!({"driver": "raw", "node-name": "part", "offset": 4096, "size": 65536,
               "file": file("t4 é.raw")}),
        json!({"driver": "raw", "node-name": "rna", "file": "na"}),
        json!({"driver": "raw", "node-name": "rt", "file": "t"}),
        // A backing file other than the header's, or none where the header names one; the
        // image information still shows the header's.
        json!({"driver": "qcow2", "node-name": "nob", "backing": null, "file": file("ov.qcow2")}),
        json!({"driver": "qcow2", "node-name": "fl", "backing": "q", "file": file("fl.qcow2")}),
        json!({"driver": "raw", "node-name": "b5", "file": file("b5.raw")}),
        json!({"driver": "qcow2", "node-name": "same", "backing": "b5",
               "file": file("same.qcow2")}),
        json!({"driver": "file", "node-name": "bf", "filename": "b6.raw"}),
        json!({"driver": "raw", "node-name": "bd", "file": "bf"}),
        json!({"driver": "file", "node-name": "bt", "filename": "b7.raw"}),
    ] {
        let r = c.cmd("blockdev-add", args.clone());
        assert!(r.get("return").is_some(), "{args}: {r}");
    }
    // A backup of a file node under a format: while its filter sits between them, the
    // format node is named by its options, the filter's included. (sync=none copies nothing
    // by itself, so the target's size does not depend on when the query comes.)
    let r = c.cmd(
        "blockdev-backup",
        json!({"job-id": "bj", "device": "bf", "target": "bt", "sync": "none"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    // Both forms, in QEMU's order (newest first; a format before its backing chain, after
    // its file); implicit nodes' names are counters, left out.
    let mut out = Vec::new();
    for flat in [true, false] {
        let nodes = c.cmd("query-named-block-nodes", json!({"flat": flat}));
        out.extend(nodes["return"].as_array().expect("list").iter().map(|n| {
            let name = match n["node-name"].as_str() {
                Some(s) if s.starts_with('#') => "#".to_owned(),
                _ => n["node-name"].to_string(),
            };
            let text = format!(
                "flat={flat} {name} {} {} depth={} {}",
                n["drv"],
                n["file"],
                n["backing_file_depth"],
                common::canon(&n["image"])
            );
            text.replace(&root, "D").replace(&port, "PORT")
        }));
    }
    out
}

/// A helper process, stopped when the test ends or fails.
#[test]
fn filter_null_and_nbd_nodes_describe_themselves_as_in_qemu_storage_daemon() {
    let theirs = node_infos(&qsd());
    let ours = node_infos(&common::blockjobd());
    common::assert_same_transcript(&ours, &theirs);
}
