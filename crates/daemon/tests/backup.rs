//! `blockdev-backup` through the real daemon: a throttled full backup while `qemu-io` writes
//! through the NBD export (the target is the disk as it was when the command ran), and the
//! refusals of QEMU's checks compared with qemu-storage-daemon's, events included.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{canon, Client, Daemon};
use serde_json::{json, Value};

fn qemu_io(args: &[&str], dir: &Path) {
    let out = Command::new("qemu-io")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "qemu-io {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn images(dir: &Path) {
    common::qemu_img(&["create", "-f", "qcow2", "a.qcow2", "16M"], dir);
    common::qemu_img(&["create", "-f", "qcow2", "t.qcow2", "16M"], dir);
    common::qemu_img(&["create", "-f", "qcow2", "small.qcow2", "8M"], dir);
    qemu_io(
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 6M",
            "-c",
            "write -P 0x22 9M 1M",
            "-c",
            "write -z 12M 1M",
            "a.qcow2",
        ],
        dir,
    );
}

/// Saves the source disk as `before.raw`: what a backup taken from now on must equal.
fn save_before(dir: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw", "a.qcow2", "before.raw"])
        .current_dir(dir)
        .status()
        .expect("convert");
    assert!(st.success());
}

/// `qemu-img compare ARGS` in `dir` says the images are identical.
fn assert_identical(dir: &Path, args: &[&str], what: &str) {
    let cmp = Command::new("qemu-img")
        .arg("compare")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("compare");
    assert!(
        cmp.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

/// Quits the daemon and hands back its directory.
fn quit(c: &mut Client, mut d: Daemon) -> tempfile::TempDir {
    c.execute("quit", json!({}));
    d.wait();
    std::mem::replace(&mut d.dir, tempfile::tempdir().expect("tempdir"))
}

/// Starts a backup and records its reply and its BLOCK_JOB_COMPLETED data, progress included
/// (unlike [`step`], which zeroes a job's offset).
fn backup_to_completion(c: &mut Client, out: &mut Vec<String>, backup: Value) {
    out.push(canon(&c.cmd("blockdev-backup", backup)));
    let mut seen = Vec::new();
    let done = wait_event(c, "BLOCK_JOB_COMPLETED", &mut seen);
    out.push(format!("  {}", canon(&done["data"])));
}

/// Waits for `event` (with its data), collecting the events seen meanwhile.
fn wait_event(client: &mut Client, name: &str, seen: &mut Vec<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no {name}: {seen:?}");
        let v = client.read().expect("event");
        if v.get("event").is_some() {
            seen.push(v.clone());
            if v["event"] == name {
                return v;
            }
        }
    }
}

/// `nbdinfo --map=CONTEXT URI`, as a transcript line.
fn nbd_map(uri: &str, context: &str) -> String {
    let map = Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(uri)
        .output()
        .expect("nbdinfo");
    assert!(map.status.success(), "nbdinfo: {map:?}");
    format!("map {context}: {}", String::from_utf8_lossy(&map.stdout))
}

/// Waits for the next `BLOCK_JOB_COMPLETED` and shows it as a transcript line, without its
/// offset (progress depends on timing).
fn completed(c: &mut Client) -> String {
    let mut seen = Vec::new();
    let done = wait_event(c, "BLOCK_JOB_COMPLETED", &mut seen);
    let mut data = done["data"].clone();
    data["offset"] = json!(0);
    format!("  completed {}", canon(&data))
}

#[test]
fn a_throttled_backup_under_guest_writes_is_the_disk_at_the_command() {
    // The default (one I/O thread), one thread for everything, and several.
    for threads in [None, Some("0"), Some("2")] {
        throttled_backup_under_guest_writes(threads);
    }
}

fn throttled_backup_under_guest_writes(threads: Option<&str>) {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    save_before(dir.path());
    let env: Vec<(&str, &str)> = threads
        .map(|t| ("BLOCKJOB_THREADS", t))
        .into_iter()
        .collect();
    let mut d = Daemon::start_with_env(&common::blockjobd(), &[], dir, &env);
    let mut c = d.client();
    for (cmd, args) in [
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "src",
                   "file": {"driver": "file", "filename": "a.qcow2"}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "tgt",
                   "file": {"driver": "file", "filename": "t.qcow2"}}),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "src", "writable": true}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                   "speed": 4 << 20, "filter-node-name": "cbw"}),
        ),
    ] {
        let r = c.cmd(cmd, args);
        assert_eq!(r, json!({"return": {}}), "{cmd}");
    }
    let exports = c.cmd("query-block-exports", json!({}));
    assert_eq!(exports["return"][0]["node-name"], "cbw", "{exports}");
    // The guest writes while the backup runs, over what was copied and what was not.
    let url = format!("nbd+unix:///src?socket={}", d.path("nbd.sock").display());
    qemu_io(
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 5M 2M",
            "-c",
            "write -P 0xef 12M 64k",
            "-c",
            "write -z 9M 64k",
            &url,
        ],
        d.dir.path(),
    );
    let mut seen = Vec::new();
    let done = wait_event(&mut c, "BLOCK_JOB_COMPLETED", &mut seen);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["len"], 16 << 20);
    assert_eq!(done["data"]["offset"], 16 << 20);
    let exports = c.cmd("query-block-exports", json!({}));
    assert_eq!(exports["return"][0]["node-name"], "src", "filter gone");
    let nodes = c.cmd("query-named-block-nodes", json!({"flat": true}));
    assert!(!canon(&nodes).contains("copy-before-write"), "{nodes}");
    c.execute("quit", json!({}));
    d.wait();
    let dir = d.dir.path();
    assert_identical(
        dir,
        &["-f", "raw", "-F", "qcow2", "before.raw", "t.qcow2"],
        "target differs from the disk at the command",
    );
    let (ok, report) = common::qemu_img_check(&dir.join("t.qcow2"));
    assert!(ok, "{report}");
    qemu_io(
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 5M 2M",
            "-c",
            "read -P 0 9M 64k",
            "a.qcow2",
        ],
        dir,
    );
}

/// Every refusal of QEMU's checks, in QEMU's order, with its events.
fn refusals() -> Vec<(&'static str, Value)> {
    let b = |extra: Value| {
        let mut args = json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"});
        if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                a.insert(k.clone(), v.clone());
            }
        }
        ("blockdev-backup", args)
    };
    vec![
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "src",
                   "file": {"driver": "file", "filename": "a.qcow2"}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "tgt",
                   "file": {"driver": "file", "filename": "t.qcow2"}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "small",
                   "file": {"driver": "file", "filename": "small.qcow2"}}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0"}),
        ),
        b(json!({"device": "nope"})),
        b(json!({"target": "nope"})),
        b(json!({"sync": "incremental"})),
        b(json!({"sync": "bitmap"})),
        b(json!({"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"})),
        b(json!({"bitmap": "nope", "bitmap-mode": "always"})),
        b(json!({"bitmap": "b0"})),
        b(json!({"sync": "none", "bitmap": "b0", "bitmap-mode": "always"})),
        b(json!({"bitmap": "b0", "bitmap-mode": "never"})),
        b(json!({"bitmap-mode": "never"})),
        b(json!({"target": "src"})),
        b(json!({"x-perf": {"max-workers": 0}})),
        b(json!({"x-perf": {"max-chunk": -1}})),
        b(json!({"target": "small"})),
        b(json!({"x-perf": {"max-chunk": 4096}})),
        b(json!({"x-perf": {"min-cluster-size": 3000}})),
        b(json!({"filter-node-name": "src"})),
        b(json!({"filter-node-name": "1bad"})),
        b(json!({"job-id": "1bad"})),
        b(json!({"speed": -1})),
        (
            "blockdev-backup",
            json!({"device": "src", "target": "tgt", "sync": "full"}),
        ),
        (
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b1"}},
                {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}}
            ], "properties": {"completion-mode": "grouped"}}),
        ),
        (
            "transaction",
            json!({"actions": [
                {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": "tgt",
                 "sync": "incremental", "bitmap": "b0"}},
                {"type": "abort", "data": {}}
            ]}),
        ),
        ("query-named-block-nodes", json!({"flat": true})),
        ("query-jobs", json!({})),
    ]
}

fn run_refusals(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    for (cmd, args) in refusals() {
        c.execute(cmd, args.clone());
        let mut events = Vec::new();
        let reply = loop {
            let v = c.read().expect("reply");
            if v.get("event").is_some() {
                events.push(format!("  event {} {}", v["event"], canon(&v["data"])));
            } else {
                break v;
            }
        };
        let shown = if cmd == "query-named-block-nodes" {
            // Node names of implicit nodes differ; what matters is what is there.
            let mut drv: Vec<String> = reply["return"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| format!("{}{}", n["drv"], canon(&n["dirty-bitmaps"])))
                .collect();
            drv.sort();
            drv.join(" ")
        } else {
            canon(&reply)
        };
        out.push(format!("{cmd} {} -> {shown}", canon(&args)));
        out.extend(events);
    }
    out
}

#[test]
fn refusals_are_qemu_storage_daemons() {
    common::assert_same_as_qsd(run_refusals);
}

/// Sends a command and returns its reply, recording the reply and the events up to `until`
/// (a JOB_STATUS_CHANGE to `null` of that job id), without the paused/running pairs qsd emits
/// when a drained section pauses a job (blockjobd's internal pauses are not shown).
fn step(c: &mut Client, out: &mut Vec<String>, cmd: &str, args: Value, until: Option<&str>) {
    c.execute(cmd, args.clone());
    let mut events: Vec<String> = Vec::new();
    let mut reply = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "{cmd}: no end: {events:?}");
        let v = c.read().expect("message");
        if let Some(e) = v.get("event") {
            let mut data = v["data"].clone();
            if e == "BLOCK_JOB_COMPLETED" || e == "BLOCK_JOB_CANCELLED" {
                // Progress at a cancel depends on timing.
                data["offset"] = json!(0);
            }
            events.push(format!("  event {e} {}", canon(&data)));
            let ended = e == "JOB_STATUS_CHANGE"
                && v["data"]["status"] == "null"
                && until.is_some_and(|id| v["data"]["id"] == id);
            if ended && reply.is_some() {
                break;
            }
            if ended {
                reply = reply.or(Some(Value::Null));
            }
            continue;
        }
        let done = until.is_none()
            || events.iter().any(|e| {
                e.contains("\"status\":\"null\"")
                    && e.contains(&format!("\"id\":\"{}\"", until.unwrap_or("")))
            });
        reply = Some(v);
        if done {
            break;
        }
    }
    let mut shown = Vec::new();
    for e in events {
        if e.contains("\"status\":\"running\"")
            && shown
                .last()
                .is_some_and(|l: &String| l.contains("\"status\":\"paused\""))
            && !e.contains("\"status\":\"paused\"")
        {
            shown.pop();
            continue;
        }
        shown.push(e);
    }
    let reply = reply.unwrap_or(Value::Null);
    let text = if cmd == "query-named-block-nodes" {
        let mut maps: Vec<String> = reply["return"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| !n["dirty-bitmaps"].is_null())
            .map(|n| {
                // Implicit nodes' names are counters (QEMU adds random digits).
                let name = match n["node-name"].as_str() {
                    Some(s) if s.starts_with("#block") => "#block".to_owned(),
                    _ => n["node-name"].to_string(),
                };
                format!("{name} {}", canon(&n["dirty-bitmaps"]))
            })
            .collect();
        maps.sort();
        maps.join(" ")
    } else {
        canon(&reply)
    };
    out.push(format!("{cmd} {} -> {text}", canon(&args)));
    out.extend(shown);
}

fn qcow2(name: &str, file: &str) -> Value {
    json!({"driver": "qcow2", "node-name": name, "backing": null,
           "file": {"driver": "file", "filename": file}})
}

/// Adds `t2`, a qcow2 target whose every write fails with EIO, and exports `src` writable
/// over NBD as the guest's disk.
fn failing_target_and_export(c: &mut Client, o: &mut Vec<String>) {
    step(
        c,
        o,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "t2",
               "file": {"driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 5}],
                        "image": {"driver": "file", "filename": "t2.qcow2"}}}),
        None,
    );
    step(
        c,
        o,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
        None,
    );
    step(
        c,
        o,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "src", "writable": true}),
        None,
    );
}

/// The guest runs qemu-io `cmds` on the exported disk.
fn guest_write(d: &Daemon, cmds: &[&str]) {
    let url = format!("nbd+unix:///src?socket={}", d.path("nbd.sock").display());
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(&url);
    qemu_io(&args, d.dir.path());
}

fn run_chain(program: &Path) -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    for t in ["t1", "t2", "t3", "t4"] {
        common::qemu_img(
            &["create", "-f", "qcow2", &format!("{t}.qcow2"), "16M"],
            dir.path(),
        );
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let q = json!({"flat": true});
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    for t in ["t", "t1", "t3", "t4"] {
        step(
            &mut c,
            o,
            "blockdev-add",
            qcow2(t, &format!("{t}.qcow2")),
            None,
        );
    }
    failing_target_and_export(&mut c, o);
    // A full backup and a new bitmap share one point in time.
    step(
        &mut c,
        o,
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"job-id": "full", "device": "src", "target": "t", "sync": "full"}}
        ]}),
        Some("full"),
    );
    guest_write(&d, &["write -P 0x33 1M 128k", "write -P 0x44 10M 64k"]);
    step(&mut c, o, "query-named-block-nodes", q.clone(), None);
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "inc1", "device": "src", "target": "t1", "sync": "incremental", "bitmap": "b0"}),
        Some("inc1"),
    );
    step(&mut c, o, "query-named-block-nodes", q.clone(), None);
    guest_write(&d, &["write -P 0x55 3M 64k"]);
    // A failing target: on-success keeps the bits.
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "inc2", "device": "src", "target": "t2", "sync": "incremental", "bitmap": "b0"}),
        Some("inc2"),
    );
    step(&mut c, o, "query-named-block-nodes", q.clone(), None);
    // never: copied, bits unchanged.
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "nev", "device": "src", "target": "t3", "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "never"}),
        Some("nev"),
    );
    step(&mut c, o, "query-named-block-nodes", q.clone(), None);
    // full with the bitmap, on-success: cleared.
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "full2", "device": "src", "target": "t4", "sync": "full", "bitmap": "b0", "bitmap-mode": "on-success"}),
        Some("full2"),
    );
    step(&mut c, o, "query-named-block-nodes", q, None);
    let dir = quit(&mut c, d);
    (out, dir)
}

#[test]
fn an_incremental_chain_and_bitmap_outcomes_are_qemu_storage_daemons() {
    let (ours, dir) = run_chain(&common::blockjobd());
    let (theirs, _) = run_chain(Path::new("qemu-storage-daemon"));
    common::assert_same_transcript(&ours, &theirs);
    let dir = dir.path();
    // t1 over t: the disk at the incremental; t4: the disk at the end.
    common::qemu_img(
        &["rebase", "-u", "-b", "t.qcow2", "-F", "qcow2", "t1.qcow2"],
        dir,
    );
    qemu_io(
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0x33 1M 128k",
            "-c",
            "read -P 0x44 10M 64k",
            "-c",
            "read -P 0x11 3M 64k",
            "t1.qcow2",
        ],
        dir,
    );
    assert_identical(dir, &["a.qcow2", "t4.qcow2"], "t4 differs from the disk");
    for t in ["t.qcow2", "t1.qcow2", "t3.qcow2", "t4.qcow2"] {
        let (ok, report) = common::qemu_img_check(&dir.join(t));
        assert!(ok, "{t}: {report}");
    }
}

/// The events of each step ordered by job (each job's own order kept): which job of a
/// group ends first is a race, in QEMU too.
fn by_job(lines: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut block: Vec<String> = Vec::new();
    let job_of = |l: &str| {
        ["\"id\":\"", "\"device\":\""]
            .iter()
            .find_map(|k| {
                l.find(k)
                    .map(|i| l[i + k.len()..].split('"').next().unwrap_or("").to_owned())
            })
            .unwrap_or_default()
    };
    let flush = |block: &mut Vec<String>, out: &mut Vec<String>| {
        block.sort_by_key(|l| job_of(l));
        out.append(block);
    };
    for l in lines {
        if l.starts_with("  event") {
            block.push(l);
        } else {
            flush(&mut block, &mut out);
            out.push(l);
        }
    }
    flush(&mut block, &mut out);
    out
}

fn run_grouped(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    for f in ["b.qcow2", "tb.qcow2", "ta2.qcow2", "tb2.qcow2"] {
        common::qemu_img(&["create", "-f", "qcow2", f, "16M"], dir.path());
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("a", "a.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("b", "b.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("tb", "tb.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("ta2", "ta2.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("tb2", "tb2.qcow2"), None);
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ta",
               "file": {"driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 28}],
                        "image": {"driver": "file", "filename": "t.qcow2"}}}),
        None,
    );
    // One job fails: the other, slow, is cancelled with it.
    step(
        &mut c,
        o,
        "transaction",
        json!({"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "ja", "device": "a", "target": "ta", "sync": "full"}},
            {"type": "blockdev-backup", "data": {"job-id": "jb", "device": "b", "target": "tb", "sync": "full", "speed": 65536}}
        ], "properties": {"completion-mode": "grouped"}}),
        // Both daemons finalize the newest member first, so the failed `ja` is the last to
        // reach `null`: wait for it, or its events fall into the next step's reads.
        Some("ja"),
    );
    // Both succeed, and wait for one job-finalize.
    step(
        &mut c,
        o,
        "transaction",
        json!({"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "ja2", "device": "a", "target": "ta2", "sync": "full", "auto-finalize": false}},
            {"type": "blockdev-backup", "data": {"job-id": "jb2", "device": "b", "target": "tb2", "sync": "full", "auto-finalize": false}}
        ], "properties": {"completion-mode": "grouped"}}),
        None,
    );
    // How far a fast job gets before the reply is timing: record every event up to the point
    // where both jobs wait in `pending` (by_job keeps each job's own order).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending = 0;
    while pending < 2 {
        assert!(Instant::now() < deadline, "no pending: {o:?}");
        let v = c.read().expect("message");
        if let Some(e) = v.get("event") {
            pending += usize::from(v["data"]["status"] == "pending");
            o.push(format!("  event {e} {}", canon(&v["data"])));
        }
    }
    step(&mut c, o, "job-finalize", json!({"id": "jb2"}), Some("jb2"));
    step(&mut c, o, "query-jobs", json!({}), None);
    by_job(out)
}

#[test]
fn grouped_backups_succeed_or_fail_together_as_in_qemu_storage_daemon() {
    common::assert_same_as_qsd(run_grouped);
}

fn run_pull_fleecing(program: &Path) -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    common::qemu_img(&["create", "-f", "qcow2", "fl.qcow2", "16M"], dir.path());
    save_before(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("fl", "fl.qcow2"), None);
    step(
        &mut c,
        o,
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "inc", "disabled": true}),
        None,
    );
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "fl",
               "on-cbw-error": "break-snapshot", "cbw-timeout": 30}),
        None,
    );
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
        None,
    );
    step(
        &mut c,
        o,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
        None,
    );
    step(
        &mut c,
        o,
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "cbw", "writable": true}),
        None,
    );
    step(
        &mut c,
        o,
        "block-export-add",
        json!({"type": "nbd", "id": "snap", "node-name": "acc",
               "bitmaps": [{"node": "src", "name": "inc"}], "allocation-depth": true}),
        None,
    );
    // A writer beside the filter is refused.
    step(
        &mut c,
        o,
        "block-export-add",
        json!({"type": "nbd", "id": "bypass", "node-name": "src", "writable": true}),
        None,
    );
    let sock = d.path("nbd.sock");
    let guest = format!("nbd+unix:///cbw?socket={}", sock.display());
    qemu_io(
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 9M 128k",
            &guest,
        ],
        d.dir.path(),
    );
    let snap = format!("nbd+unix:///acc?socket={}", sock.display());
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &snap, "pulled.raw"])
        .current_dir(d.dir.path())
        .status()
        .expect("convert");
    assert!(st.success());
    // What a client sees of the snapshot: zeroes and data, the whole snapshot as the export's
    // own layer, and the bitmap.
    for context in [
        "base:allocation",
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:inc",
    ] {
        o.push(nbd_map(&snap, context));
    }
    step(
        &mut c,
        o,
        "query-named-block-nodes",
        json!({"flat": true}),
        None,
    );
    for id in ["snap", "guest"] {
        step(&mut c, o, "block-export-del", json!({"id": id}), None);
    }
    step(&mut c, o, "blockdev-del", json!({"node-name": "acc"}), None);
    step(&mut c, o, "blockdev-del", json!({"node-name": "cbw"}), None);
    let dir = quit(&mut c, d);
    (out, dir)
}

#[test]
fn pull_fleecing_reads_the_point_in_time_as_qemu_storage_daemon() {
    let (ours, dir) = run_pull_fleecing(&common::blockjobd());
    let (theirs, _) = run_pull_fleecing(Path::new("qemu-storage-daemon"));
    common::assert_same_transcript(&ours, &theirs);
    assert_identical(
        dir.path(),
        &["-f", "raw", "-F", "raw", "before.raw", "pulled.raw"],
        "the snapshot export is not the disk at the filter",
    );
    qemu_io(
        &["-f", "qcow2", "-c", "read -P 0xab 0 1M", "a.qcow2"],
        dir.path(),
    );
}

/// A copy-before-write filter given a `bitmap` keeps only the bitmap's clusters: the snapshot
/// reads them as they were and refuses the rest with "Invalid argument" (EACCES in QEMU's
/// block layer, which its NBD server sends as NBD_EINVAL).
fn run_filter_bitmap(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    let nbd = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    let export = |id: &str, node: &str, writable: bool| json!({"type": "nbd", "id": id, "node-name": node, "writable": writable});
    for (cmd, args) in [
        ("blockdev-add", qcow2("src", "a.qcow2")),
        ("blockdev-add", qcow2("tgt", "t.qcow2")),
        (
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0"}),
        ),
        ("nbd-server-start", nbd),
        ("block-export-add", export("guest", "src", true)),
    ] {
        step(&mut c, o, cmd, args, None);
    }
    guest_write(&d, &["write -P 0x33 1M 128k"]);
    for (cmd, args) in [
        ("block-export-del", json!({"id": "guest"})),
        (
            "blockdev-add",
            json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                   "target": "tgt", "bitmap": {"node": "src", "name": "b0"}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
        ),
        ("block-export-add", export("cbw", "cbw", true)),
        ("block-export-add", export("acc", "acc", false)),
    ] {
        step(&mut c, o, cmd, args, None);
    }
    let sock = d.path("nbd.sock");
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", sock.display());
    qemu_io(
        &["-f", "raw", "-c", "write -P 0x44 0 2M", &uri("cbw")],
        d.dir.path(),
    );
    for at in ["0", "1M", "1088k", "2M"] {
        let read = Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", &format!("read -v {at} 16")])
            .arg(uri("acc"))
            .current_dir(d.dir.path())
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&read.stdout);
        o.push(format!("read {at}: {}", text.lines().next().unwrap_or("")));
    }
    let map = Command::new("nbdinfo")
        .args(["--map", &uri("acc")])
        .output()
        .expect("nbdinfo");
    o.push(format!("map: {}", String::from_utf8_lossy(&map.stderr)));
    out
}

#[test]
fn a_filter_bitmap_limits_the_snapshot_as_in_qemu_storage_daemon() {
    common::assert_same_as_qsd(run_filter_bitmap);
}

/// Replies and events in the order they arrive. A job a command wakes from its speed-limit
/// sleep (pause, resume, cancel) or starts with nothing to copy does its part before the
/// reply. QEMU's paused/running pairs around drained sections are left out (we do not send
/// them).
fn run_reply_order(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    common::qemu_img(
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "ov.qcow2",
        ],
        dir.path(),
    );
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out: Vec<String> = Vec::new();
    let steps = [
        ("blockdev-add", qcow2("src", "a.qcow2")),
        ("blockdev-add", qcow2("tgt", "t.qcow2")),
        (
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b0"}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                   "speed": 1}),
        ),
        ("job-pause", json!({"id": "j"})),
        // A backup has nothing to change, whatever type the options name.
        (
            "block-job-change",
            json!({"id": "j", "type": "mirror", "copy-mode": "write-blocking"}),
        ),
        ("job-resume", json!({"id": "j"})),
        ("block-job-set-speed", json!({"device": "j", "speed": 1})),
        ("block-job-cancel", json!({"device": "j"})),
        (
            "blockdev-backup",
            json!({"job-id": "k", "device": "src", "target": "tgt", "sync": "bitmap",
                   "bitmap": "b0"}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "none"}),
        ),
        ("job-cancel", json!({"id": "m"})),
        // sync=top of an empty overlay: the allocation scan waits, so the end comes after.
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "ov", "backing": "src",
                   "file": {"driver": "file", "filename": "ov.qcow2"}}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "n", "device": "ov", "target": "tgt", "sync": "top",
                   "speed": 1}),
        ),
    ];
    for (cmd, args) in steps {
        out.push(format!("> {cmd}"));
        c.execute(cmd, args);
        let mut replied = false;
        // Up to the reply, then whatever follows within a moment.
        loop {
            let v = if replied {
                match c.read_within(Duration::from_millis(300)) {
                    Some(v) => v,
                    None => break,
                }
            } else {
                c.read().expect("message")
            };
            match v.get("event") {
                Some(e) => {
                    let mut data = v["data"].clone();
                    if data.get("offset").is_some() {
                        data["offset"] = json!(0);
                    }
                    out.push(format!("  {e} {}", canon(&data)));
                }
                None => {
                    out.push(format!("< {}", canon(&v)));
                    replied = true;
                }
            }
        }
    }
    let mut shown: Vec<String> = Vec::new();
    for line in out {
        let running = line.contains("\"status\":\"running\"");
        if running
            && shown
                .last()
                .is_some_and(|l| l.contains("\"status\":\"paused\""))
        {
            shown.pop();
            continue;
        }
        shown.push(line);
    }
    shown
}

#[test]
fn replies_follow_the_events_of_the_jobs_they_wake_as_in_qemu_storage_daemon() {
    common::assert_same_as_qsd(run_reply_order);
}

/// `detect-zeroes`: refused as `unmap` without `discard: unmap`; zero writes reaching a qcow2
/// node become zero clusters (a part-cluster one widened to its cluster when the rest reads
/// as zero); `drive-backup` opens its target with `unmap`.
fn run_detect_zeroes(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    // Zero bytes stored as data: the backup reads them as data.
    qemu_io(
        &["-f", "qcow2", "-c", "write -P 0 6M 1M", "a.qcow2"],
        dir.path(),
    );
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    let file = |f: &str| json!({"driver": "file", "filename": f});
    for args in [
        json!({"driver": "qcow2", "node-name": "x", "detect-zeroes": "unmap", "file": file("t.qcow2")}),
        json!({"driver": "qcow2", "node-name": "x", "detect-zeroes": "yes", "file": file("t.qcow2")}),
        json!({"driver": "qcow2", "node-name": "src", "detect-zeroes": "unmap", "discard": "unmap",
               "file": file("t.qcow2")}),
        json!({"driver": "qcow2", "node-name": "disk", "detect-zeroes": "on", "file": file("a.qcow2")}),
    ] {
        step(&mut c, o, "blockdev-add", args, None);
    }
    let nbd = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    step(&mut c, o, "nbd-server-start", nbd, None);
    let export = json!({"type": "nbd", "id": "src", "node-name": "src", "writable": true});
    step(&mut c, o, "block-export-add", export, None);
    guest_write(
        &d,
        &[
            "write -P 0 0 128k",
            "write -P 1 128k 64k",
            "write -P 0 192k 4k",
        ],
    );
    step(
        &mut c,
        o,
        "drive-backup",
        json!({"job-id": "j", "device": "disk", "target": "b.qcow2", "format": "qcow2",
               "sync": "full", "auto-dismiss": false}),
        None,
    );
    let nodes = c.cmd("query-named-block-nodes", json!({"flat": true}));
    let mut zeroes: Vec<String> = nodes["return"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| format!("{} {} {}", n["drv"], n["file"], n["detect_zeroes"]))
        .collect();
    zeroes.sort();
    o.push(format!("detect_zeroes: {}", zeroes.join(", ")));
    loop {
        let jobs = c.cmd("query-jobs", json!({}));
        if jobs["return"][0]["status"] == "concluded" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c.cmd("job-dismiss", json!({"id": "j"}));
    let dir = quit(&mut c, d);
    for image in ["t.qcow2", "b.qcow2"] {
        let map = Command::new("qemu-img")
            .args(["map", "--output=json", image])
            .current_dir(dir.path())
            .output()
            .expect("qemu-img map");
        let extents: Value = serde_json::from_slice(&map.stdout).expect("map json");
        // Host offsets follow the order parallel chunks land in: not compared, and
        // neighbours alike apart from them are one extent.
        let mut merged: Vec<(u64, u64, String)> = Vec::new();
        for e in extents.as_array().into_iter().flatten() {
            let kind = format!("data {} zero {}", e["data"], e["zero"]);
            let (start, len) = (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            );
            match merged.last_mut() {
                Some(last) if last.2 == kind && last.0 + last.1 == start => last.1 += len,
                _ => merged.push((start, len, kind)),
            }
        }
        let shown: Vec<String> = merged
            .iter()
            .map(|(start, len, kind)| format!("{start}+{len} {kind}"))
            .collect();
        o.push(format!("map {image}: {}", shown.join(", ")));
    }
    out
}

#[test]
fn detect_zeroes_is_qemu_storage_daemons() {
    common::assert_same_as_qsd(run_detect_zeroes);
}

/// Guest discards and write-zeroes during a backup: the job's filter drops discards (QEMU
/// opens it without `discard=unmap`) and its write-zeroes do not deallocate; the target is the
/// disk at the command.
fn run_discards_during_backup(program: &Path) -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    save_before(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    let src = json!({"driver": "qcow2", "node-name": "src", "discard": "unmap",
                     "file": {"driver": "file", "filename": "a.qcow2"}});
    let nbd = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    let export = json!({"type": "nbd", "id": "src", "node-name": "src", "writable": true});
    for (cmd, args) in [
        ("blockdev-add", src),
        ("blockdev-add", qcow2("tgt", "t.qcow2")),
        ("nbd-server-start", nbd),
        ("block-export-add", export),
        (
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                   "speed": 65536}),
        ),
    ] {
        step(&mut c, o, cmd, args, None);
    }
    guest_write(
        &d,
        &[
            "write -z 1M 256k",
            "discard 3M 192k",
            "write -z -u 5M 128k",
            "write -P 9 9M 4k",
        ],
    );
    step(
        &mut c,
        o,
        "block-job-set-speed",
        json!({"device": "j", "speed": 0}),
        Some("j"),
    );
    let dir = quit(&mut c, d);
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "a.qcow2"])
        .current_dir(dir.path())
        .output()
        .expect("qemu-img map");
    let extents: Value = serde_json::from_slice(&map.stdout).expect("map json");
    for e in extents.as_array().into_iter().flatten() {
        o.push(format!(
            "source {}+{} data {} zero {}",
            e["start"], e["length"], e["data"], e["zero"]
        ));
    }
    (out, dir)
}

#[test]
fn guest_discards_during_a_backup_are_qemu_storage_daemons() {
    let (ours, dir) = run_discards_during_backup(&common::blockjobd());
    let (theirs, _) = run_discards_during_backup(Path::new("qemu-storage-daemon"));
    common::assert_same_transcript(&ours, &theirs);
    assert_identical(
        dir.path(),
        &["-f", "raw", "-F", "qcow2", "before.raw", "t.qcow2"],
        "the target is not the disk at the command",
    );
}

/// A copy-before-write filter of `blockdev-add` whose target fails every write: with
/// `break-snapshot` the guest write goes on and the snapshot is broken (even its untouched
/// ranges read "Invalid argument"); with `break-guest-write` the guest write fails.
fn run_filter_target_failure(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    for t in ["t1.raw", "t2.raw"] {
        common::qemu_img(&["create", "-f", "raw", t, "16M"], dir.path());
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    let failing = |name: &str, file: &str| {
        json!({"driver": "raw", "node-name": name, "file": {"driver": "blkdebug",
               "inject-error": [{"event": "write_aio", "errno": 5}],
               "image": {"driver": "file", "filename": file}}})
    };
    let nbd = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    let export = |id: &str, writable: bool| json!({"type": "nbd", "id": id, "node-name": id, "writable": writable});
    for (cmd, args) in [
        ("blockdev-add", qcow2("src", "a.qcow2")),
        ("blockdev-add", failing("t1", "t1.raw")),
        ("blockdev-add", failing("t2", "t2.raw")),
        (
            "blockdev-add",
            json!({"driver": "copy-before-write", "node-name": "snap", "file": "src",
                   "target": "t1", "on-cbw-error": "break-snapshot", "cbw-timeout": 30}),
        ),
        (
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "acc", "file": "snap"}),
        ),
        ("nbd-server-start", nbd),
        ("block-export-add", export("snap", true)),
        ("block-export-add", export("acc", false)),
    ] {
        step(&mut c, o, cmd, args, None);
    }
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", d.path("nbd.sock").display());
    let io = |args: &[&str], name: &str| {
        let out = Command::new("qemu-io")
            .args(args)
            .arg(uri(name))
            .current_dir(d.dir.path())
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        text.lines()
            .filter(|l| !l.contains("ops/sec"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    o.push(io(&["-r", "-f", "raw", "-c", "read -P 0x11 0 64k"], "acc"));
    o.push(io(&["-f", "raw", "-c", "write -P 0x33 0 64k"], "snap"));
    o.push(io(&["-r", "-f", "raw", "-c", "read -P 0x11 1M 64k"], "acc"));
    for (cmd, args) in [
        ("block-export-del", json!({"id": "acc"})),
        ("block-export-del", json!({"id": "snap"})),
        ("blockdev-del", json!({"node-name": "acc"})),
        ("blockdev-del", json!({"node-name": "snap"})),
        (
            "blockdev-add",
            json!({"driver": "copy-before-write", "node-name": "guard", "file": "src",
                   "target": "t2"}),
        ),
        ("block-export-add", export("guard", true)),
    ] {
        step(&mut c, o, cmd, args, None);
    }
    o.push(io(&["-f", "raw", "-c", "write -P 0x44 2M 64k"], "guard"));
    o.push(io(
        &["-r", "-f", "raw", "-c", "read -P 0x11 2M 64k"],
        "guard",
    ));
    out
}

#[test]
fn a_filter_whose_target_fails_breaks_the_snapshot_or_the_guest_write_as_in_qsd() {
    common::assert_same_as_qsd(run_filter_target_failure);
}

/// Persistent bitmaps after an incremental backup: the bitmap the job used ranks as new as
/// the job (QEMU's successor takes its place), which decides the order of the image's bitmap
/// directory and of the list after a reopen; an open image shows its stored bitmaps, in use.
fn run_bitmap_order(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    common::qemu_img(&["create", "-f", "qcow2", "t2.qcow2", "16M"], dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    let nbd = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    let export = json!({"type": "nbd", "id": "src", "node-name": "src", "writable": true});
    let b0 = json!({"node": "src", "name": "b0", "persistent": true, "granularity": 131072});
    for (cmd, args) in [
        ("blockdev-add", qcow2("src", "a.qcow2")),
        ("blockdev-add", qcow2("tgt", "t.qcow2")),
        ("blockdev-add", qcow2("tgt2", "t2.qcow2")),
        (
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": b0},
                {"type": "blockdev-backup", "data": {"job-id": "full", "device": "src",
                 "target": "tgt", "sync": "full"}}]}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "b1", "persistent": true, "disabled": true}),
        ),
        ("nbd-server-start", nbd),
        ("block-export-add", export),
    ] {
        let until = (cmd == "transaction").then_some("full");
        step(&mut c, o, cmd, args, until);
    }
    guest_write(&d, &["write -P 2 1M 64k", "write -P 3 3M 300k"]);
    let inc = json!({"job-id": "inc", "device": "src", "target": "tgt2", "sync": "incremental",
                     "bitmap": "b0"});
    step(&mut c, o, "blockdev-backup", inc, Some("inc"));
    step(&mut c, o, "query-named-block-nodes", json!({}), None);
    step(&mut c, o, "block-export-del", json!({"id": "src"}), None);
    step(&mut c, o, "blockdev-del", json!({"node-name": "src"}), None);
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "a.qcow2"])
        .current_dir(d.dir.path())
        .output()
        .expect("qemu-img info");
    let info: Value = serde_json::from_slice(&info.stdout).expect("info json");
    o.push(format!(
        "stored: {}",
        canon(&info["format-specific"]["data"]["bitmaps"])
    ));
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    step(&mut c, o, "query-named-block-nodes", json!({}), None);
    let nodes = c.cmd("query-named-block-nodes", json!({"flat": true}));
    for n in nodes["return"].as_array().into_iter().flatten() {
        if n["node-name"] == "src" {
            let bitmaps = &n["image"]["format-specific"]["data"]["bitmaps"];
            o.push(format!("open: {}", canon(bitmaps)));
        }
    }
    out
}

#[test]
fn bitmaps_an_incremental_used_are_stored_where_qemu_storage_daemon_stores_them() {
    common::assert_same_as_qsd(run_bitmap_order);
}

/// `quit` with a throttled backup (auto-dismiss off) and an export: the export goes, the job
/// is cancelled and, concluded by the cancel, dismissed all the same, as QEMU's shutdown
/// cancels until no job is left.
fn run_quit_with_a_job(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    let nbd = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    for (cmd, args) in [
        ("blockdev-add", qcow2("src", "a.qcow2")),
        ("blockdev-add", qcow2("tgt", "t.qcow2")),
        ("blockdev-add", qcow2("other", "small.qcow2")),
        (
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                   "speed": 1, "auto-dismiss": false}),
        ),
        ("nbd-server-start", nbd),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "other", "writable": true}),
        ),
    ] {
        step(&mut c, o, cmd, args, None);
    }
    c.execute("quit", json!({}));
    // Until the daemon closes the connection (qsd may reset it).
    while let Some(v) = c.read_within(Duration::from_secs(10)) {
        match v.get("event") {
            Some(e) if e == "SHUTDOWN" => {}
            Some(e) => {
                let status = &v["data"]["status"];
                if status != "paused" && status != "running" {
                    let mut data = v["data"].clone();
                    if data.get("offset").is_some() {
                        data["offset"] = json!(0);
                    }
                    o.push(format!("  {e} {}", canon(&data)));
                }
            }
            None => o.push(format!("quit -> {}", canon(&v))),
        }
    }
    out
}

#[test]
fn quit_cancels_and_dismisses_jobs_as_qemu_storage_daemon_does() {
    common::assert_same_as_qsd(run_quit_with_a_job);
}

fn run_busy(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("tgt", "t.qcow2"), None);
    step(
        &mut c,
        o,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
        None,
    );
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
               "speed": 65536, "filter-node-name": "cbw"}),
        None,
    );
    for (cmd, args) in [
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "tgt", "writable": true}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "src", "writable": true}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "src"}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e4", "node-name": "cbw", "writable": true}),
        ),
        ("blockdev-del", json!({"node-name": "tgt"})),
        ("blockdev-del", json!({"node-name": "src"})),
        ("blockdev-del", json!({"node-name": "cbw"})),
        (
            "blockdev-backup",
            json!({"job-id": "j2", "device": "src", "target": "tgt", "sync": "full"}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "j3", "device": "cbw", "target": "tgt", "sync": "full"}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "j4", "device": "tgt", "target": "src", "sync": "full"}),
        ),
        ("query-block-exports", json!({})),
    ] {
        step(&mut c, o, cmd, args, None);
    }
    for id in ["e1", "e3", "e4"] {
        step(&mut c, o, "block-export-del", json!({"id": id}), None);
    }
    // Without its export, the target is held by the job alone: QEMU's op blocker answers.
    step(&mut c, o, "blockdev-del", json!({"node-name": "tgt"}), None);
    step(&mut c, o, "job-cancel", json!({"id": "j"}), Some("j"));
    step(&mut c, o, "blockdev-del", json!({"node-name": "tgt"}), None);
    step(
        &mut c,
        o,
        "query-named-block-nodes",
        json!({"flat": true}),
        None,
    );
    out
}

#[test]
fn a_running_backup_holds_its_nodes_as_in_qemu_storage_daemon() {
    common::assert_same_as_qsd(run_busy);
}

fn run_compressed(program: &Path) -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    common::qemu_img(&["create", "-f", "raw", "r.raw", "16M"], dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("tgt", "t.qcow2"), None);
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "r.raw"}}),
        None,
    );
    let b = |id: &str, target: &str| json!({"job-id": id, "device": "src", "target": target, "sync": "full", "compress": true});
    step(&mut c, o, "blockdev-backup", b("j0", "r"), None);
    step(&mut c, o, "blockdev-backup", b("j1", "tgt"), Some("j1"));
    // qcow2 does not overwrite clusters with compressed data: the second one fails.
    step(&mut c, o, "blockdev-backup", b("j2", "tgt"), Some("j2"));
    let dir = quit(&mut c, d);
    (out, dir)
}

#[test]
fn compressed_backups_are_qemu_storage_daemons() {
    let (ours, dir) = run_compressed(&common::blockjobd());
    let (theirs, qdir) = run_compressed(Path::new("qemu-storage-daemon"));
    common::assert_same_transcript(&ours, &theirs);
    assert_identical(
        dir.path(),
        &["a.qcow2", "t.qcow2"],
        "t differs from the disk",
    );
    let (ok, ours) = common::qemu_img_check(&dir.path().join("t.qcow2"));
    let (_, theirs) = common::qemu_img_check(&qdir.path().join("t.qcow2"));
    assert!(ok && ours.contains("100.00% compressed clusters"), "{ours}");
    let allocated = |r: &str| {
        r.lines()
            .find(|l| l.contains("allocated"))
            .map(str::to_owned)
    };
    assert_eq!(allocated(&ours), allocated(&theirs));
}

fn run_push_fleecing(program: &Path) -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    common::qemu_img(&["create", "-f", "qcow2", "fl.qcow2", "16M"], dir.path());
    save_before(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("fl", "fl.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("tgt", "t.qcow2"), None);
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "fcbw", "file": "src", "target": "fl"}),
        None,
    );
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "acc", "file": "fcbw", "discard": "unmap"}),
        None,
    );
    step(
        &mut c,
        o,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
        None,
    );
    step(
        &mut c,
        o,
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "fcbw", "writable": true}),
        None,
    );
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "push", "device": "acc", "target": "tgt", "sync": "full",
               "discard-source": true, "speed": 8 << 20,
               "x-perf": {"min-cluster-size": 65536}}),
        None,
    );
    let guest = format!("nbd+unix:///fcbw?socket={}", d.path("nbd.sock").display());
    qemu_io(
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 14M 1M",
            &guest,
        ],
        d.dir.path(),
    );
    o.push(completed(&mut c));
    let dir = quit(&mut c, d);
    (out, dir)
}

#[test]
fn push_fleecing_with_discard_source_is_qemu_storage_daemons() {
    let (ours, dir) = run_push_fleecing(&common::blockjobd());
    let (theirs, _) = run_push_fleecing(Path::new("qemu-storage-daemon"));
    common::assert_same_transcript(&ours, &theirs);
    assert_identical(
        dir.path(),
        &["-f", "raw", "-F", "qcow2", "before.raw", "t.qcow2"],
        "the pushed backup is not the disk at the filter",
    );
}

/// Push fleecing as the issue's contract has it: a `sync=none` backup into a qcow2 backed by
/// the source keeps the point in time, a snapshot-access node on that backup's filter reads
/// it, and a second backup pushes it to the real target with `discard-source`.
fn run_push_fleecing_from_a_backup(program: &Path) -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    common::qemu_img(
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "fl.qcow2",
        ],
        dir.path(),
    );
    save_before(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    let mut fl = qcow2("fl", "fl.qcow2");
    fl["backing"] = json!("src");
    step(&mut c, o, "blockdev-add", fl, None);
    step(&mut c, o, "blockdev-add", qcow2("tgt", "t.qcow2"), None);
    let addr = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    step(&mut c, o, "nbd-server-start", addr, None);
    step(
        &mut c,
        o,
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "src", "writable": true}),
        None,
    );
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "fleece", "device": "src", "target": "fl", "sync": "none",
               "filter-node-name": "flt"}),
        None,
    );
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "acc", "file": "flt"}),
        None,
    );
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "push", "device": "acc", "target": "tgt", "sync": "full",
               "discard-source": true, "speed": 8 << 20}),
        None,
    );
    let guest = format!("nbd+unix:///src?socket={}", d.path("nbd.sock").display());
    qemu_io(
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 9M 2M",
            &guest,
        ],
        d.dir.path(),
    );
    o.push(completed(&mut c));
    step(&mut c, o, "blockdev-del", json!({"node-name": "acc"}), None);
    step(
        &mut c,
        o,
        "job-cancel",
        json!({"id": "fleece"}),
        Some("fleece"),
    );
    step(&mut c, o, "query-block-exports", json!({}), None);
    let dir = quit(&mut c, d);
    (out, dir)
}

#[test]
fn push_fleecing_from_a_sync_none_backup_is_qemu_storage_daemons() {
    let (ours, dir) = run_push_fleecing_from_a_backup(&common::blockjobd());
    let (theirs, _) = run_push_fleecing_from_a_backup(Path::new("qemu-storage-daemon"));
    common::assert_same_transcript(&ours, &theirs);
    assert_identical(
        dir.path(),
        &["-f", "raw", "-F", "qcow2", "before.raw", "t.qcow2"],
        "the pushed backup is not the disk at the fleecing backup",
    );
}

/// What a pull-fleecing client sees of a disk with a backing file: ranges the disk does not
/// allocate are holes that are not known to read as zeroes, ranges whose old data a guest write
/// copied are what the copy wrote (zeroes stay zeroes), and the allocation depth is the
/// snapshot's own.
fn run_snapshot_maps(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    common::qemu_img(&["create", "-f", "raw", "base.raw", "8M"], p);
    qemu_io(&["-f", "raw", "-c", "write -P 0x11 0 1M", "base.raw"], p);
    common::qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "disk.qcow2",
        ],
        p,
    );
    qemu_io(
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 2M 1M",
            "-c",
            "write -z 4M 64k",
            "disk.qcow2",
        ],
        p,
    );
    common::qemu_img(&["create", "-f", "qcow2", "tmp.qcow2", "8M"], p);
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("disk", "disk.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("tmp", "tmp.qcow2"), None);
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp"}),
        None,
    );
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
        None,
    );
    let addr = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    step(&mut c, o, "nbd-server-start", addr, None);
    for (id, node, writable) in [("cbw", "cbw", true), ("acc", "acc", false)] {
        step(
            &mut c,
            o,
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": node, "writable": writable,
                   "allocation-depth": true}),
            None,
        );
    }
    let sock = d.path("nbd.sock");
    let uri = |e: &str| format!("nbd+unix:///{e}?socket={}", sock.display());
    let maps = |o: &mut Vec<String>| {
        for context in ["base:allocation", "qemu:allocation-depth"] {
            o.push(nbd_map(&uri("acc"), context));
        }
    };
    maps(o);
    // Over old data, and over a range neither the disk nor its backing file holds.
    qemu_io(
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 64k",
            "-c",
            "write -P 0x44 6M 64k",
            &uri("cbw"),
        ],
        d.dir.path(),
    );
    maps(o);
    out
}

#[test]
fn a_snapshot_of_a_backed_disk_maps_as_in_qemu_storage_daemon() {
    common::assert_same_as_qsd(run_snapshot_maps);
}

/// An NBD server whose holes are not known to read as zeroes (nbdkit's sh plugin: 1 MiB of
/// data, then 3 MiB of holes without the zero flag).
fn holey_nbd_server(dir: &Path) -> (common::KillOnDrop, std::path::PathBuf) {
    let script = dir.join("holes.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         case \"$1\" in\n\
         get_size) echo 4194304 ;;\n\
         can_extents) exit 0 ;;\n\
         pread) if [ \"$4\" -lt 1048576 ]; then head -c \"$3\" /dev/zero | tr '\\0' A; \
         else head -c \"$3\" /dev/zero; fi ;;\n\
         extents) echo 0 1048576 0; echo 1048576 3145728 hole ;;\n\
         *) exit 2 ;;\n\
         esac\n",
    )
    .expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sock = dir.join("holes.sock");
    let child = Command::new("nbdkit")
        .args(["--exit-with-parent", "-f", "-U"])
        .arg(&sock)
        .arg("sh")
        .arg(&script)
        .spawn()
        .expect("nbdkit (apt-get install -y nbdkit)");
    let guard = common::KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (guard, sock)
}

/// A disk on an NBD server whose holes are not known to be zero: a writable open of a
/// read-only export is refused with QEMU's message; the snapshot, the disk's own export and
/// what a backup (full: read and written as data; top: skipped) leaves in its target keep
/// the holes as holes, as in QEMU (only a format that could have a backing file, and has
/// none, reads its unallocated ranges as zeroes).
fn run_nbd_source_holes(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    let (_server, _) = holey_nbd_server(p);
    for name in ["t1.qcow2", "t2.qcow2", "t3.qcow2"] {
        common::qemu_img(&["create", "-f", "qcow2", name, "4M"], p);
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    // Relative to the daemon's directory, so both transcripts name the same path.
    let server = json!({"type": "unix", "path": "holes.sock"});
    let nbd = json!({"driver": "nbd", "node-name": "rw", "server": server.clone()});
    step(&mut c, o, "blockdev-add", nbd, None);
    let src = json!({"driver": "raw", "node-name": "src", "read-only": true,
                     "file": {"driver": "nbd", "node-name": "n", "read-only": true,
                              "server": server}});
    step(&mut c, o, "blockdev-add", src, None);
    for (node, file) in [("t1", "t1.qcow2"), ("t2", "t2.qcow2"), ("t3", "t3.qcow2")] {
        step(&mut c, o, "blockdev-add", qcow2(node, file), None);
    }
    let cbw = json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                     "target": "t1"});
    step(&mut c, o, "blockdev-add", cbw, None);
    let acc = json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"});
    step(&mut c, o, "blockdev-add", acc, None);
    let addr = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    step(&mut c, o, "nbd-server-start", addr, None);
    for node in ["acc", "src"] {
        let export = json!({"type": "nbd", "id": node, "node-name": node,
                            "allocation-depth": true});
        step(&mut c, o, "block-export-add", export, None);
    }
    let sock = d.path("nbd.sock");
    for export in ["acc", "src"] {
        for context in ["base:allocation", "qemu:allocation-depth"] {
            let uri = format!("nbd+unix:///{export}?socket={}", sock.display());
            o.push(nbd_map(&uri, context));
        }
    }
    for (job, target, sync) in [("full", "t2", "full"), ("top", "t3", "top")] {
        let backup = json!({"job-id": job, "device": "src", "target": target, "sync": sync});
        step(&mut c, o, "blockdev-backup", backup, Some(job));
    }
    for node in ["t2", "t3"] {
        step(&mut c, o, "blockdev-del", json!({"node-name": node}), None);
    }
    for image in ["t2.qcow2", "t3.qcow2"] {
        let map = Command::new("qemu-img")
            .args(["map", "--output=json", image])
            .current_dir(d.dir.path())
            .output()
            .expect("qemu-img map");
        o.push(format!("{image}: {}", String::from_utf8_lossy(&map.stdout)));
    }
    out
}

#[test]
fn holes_of_an_nbd_source_stay_holes_as_in_qemu_storage_daemon() {
    common::assert_same_as_qsd(run_nbd_source_holes);
}

/// An export added on a backup's filter node while the job runs moves down to the source
/// with the others when the job ends, as QEMU's filter removal moves every parent but the
/// job's own.
fn run_filter_exports(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    step(&mut c, o, "blockdev-add", qcow2("tgt", "t.qcow2"), None);
    let addr = json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}});
    step(&mut c, o, "nbd-server-start", addr, None);
    let export = |id: &str, node: &str, writable: bool| json!({"type": "nbd", "id": id, "node-name": node, "writable": writable});
    step(
        &mut c,
        o,
        "block-export-add",
        export("e1", "src", true),
        None,
    );
    let backup = json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                        "speed": 65536, "filter-node-name": "flt"});
    step(&mut c, o, "blockdev-backup", backup, None);
    step(
        &mut c,
        o,
        "block-export-add",
        export("e2", "flt", false),
        None,
    );
    step(&mut c, o, "query-block-exports", json!({}), None);
    step(&mut c, o, "job-cancel", json!({"id": "j"}), Some("j"));
    step(&mut c, o, "query-block-exports", json!({}), None);
    step(&mut c, o, "blockdev-del", json!({"node-name": "tgt"}), None);
    out
}

#[test]
fn exports_of_the_filter_move_down_when_the_backup_ends_as_in_qemu_storage_daemon() {
    common::assert_same_as_qsd(run_filter_exports);
}

/// Where a blkdebug node sits decides whether its rules fire, as in QEMU: as the target
/// itself nothing announces `write_aio` to it and the backup succeeds; under a raw format
/// the rule fires (`once`: the job stops, is resumed and completes); an `iotype` that the
/// target never sees injects nothing.
fn run_blkdebug_placement(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    for name in ["t1.raw", "t2.raw", "t3.raw"] {
        common::qemu_img(&["create", "-f", "raw", name, "16M"], dir.path());
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    let debug = |name: &str, file: &str, rule: Value| {
        json!({"driver": "blkdebug", "node-name": name, "inject-error": [rule],
               "image": {"driver": "file", "filename": file}})
    };
    let backup = |id: &str, target: &str| {
        json!({"job-id": id, "device": "src", "target": target, "sync": "full",
               "on-target-error": "stop"})
    };
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    let top = debug("top", "t1.raw", json!({"event": "write_aio", "errno": 5}));
    step(&mut c, o, "blockdev-add", top, None);
    step(
        &mut c,
        o,
        "blockdev-backup",
        backup("j1", "top"),
        Some("j1"),
    );
    let once = json!({"event": "write_aio", "errno": 28, "sector": 4096, "once": true});
    step(&mut c, o, "blockdev-add", debug("d2", "t2.raw", once), None);
    let raw = |name: &str, file: &str| json!({"driver": "raw", "node-name": name, "file": file});
    step(&mut c, o, "blockdev-add", raw("r2", "d2"), None);
    c.execute("blockdev-backup", backup("j2", "r2"));
    let mut seen = Vec::new();
    let error = wait_event(&mut c, "BLOCK_JOB_ERROR", &mut seen);
    o.push(format!("j2 error {}", canon(&error["data"])));
    // The job stops at its next pause point; resume it once it is paused.
    loop {
        let jobs = c.cmd("query-jobs", json!({}));
        if jobs["return"][0]["status"] == "paused" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    step(&mut c, o, "job-resume", json!({"id": "j2"}), Some("j2"));
    let reads = json!({"event": "write_aio", "iotype": "read", "errno": 5});
    step(
        &mut c,
        o,
        "blockdev-add",
        debug("d3", "t3.raw", reads),
        None,
    );
    step(&mut c, o, "blockdev-add", raw("r3", "d3"), None);
    step(&mut c, o, "blockdev-backup", backup("j3", "r3"), Some("j3"));
    drop(c);
    for t in ["t1.raw", "t2.raw", "t3.raw"] {
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw", "a.qcow2", t])
            .current_dir(d.dir.path())
            .output()
            .expect("qemu-img compare");
        o.push(format!("{t} equals the source: {}", cmp.status.success()));
    }
    out
}

#[test]
fn blkdebug_rules_fire_where_qemus_do() {
    common::assert_same_as_qsd(run_blkdebug_placement);
}

/// Rules on the events QEMU's block layer and qcow2 announce besides `write_aio`: a backup
/// into a qcow2 target over blkdebug fails (or not) where and when qsd's does.
fn run_blkdebug_events(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    common::qemu_img(&["create", "-f", "raw", "s.raw", "4M"], dir.path());
    qemu_io(&["-f", "raw", "-c", "write -P 1 0 4M", "s.raw"], dir.path());
    let events = [
        ("l1_update", true),
        ("l2_update", true),
        ("l2_update", false),
        ("l2_load", false),
        ("refblock_update_part", false),
        ("cluster_alloc", true),
        ("pwritev", false),
        ("pwritev_zero", false),
        ("flush_to_disk", false),
        ("cow_read", false),
    ];
    for i in 0..events.len() {
        let name = format!("t{i}.qcow2");
        common::qemu_img(&["create", "-f", "qcow2", &name, "4M"], dir.path());
    }
    common::qemu_img(&["create", "-f", "raw", "sm.raw", "4M"], dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let src = json!({"driver": "raw", "node-name": "s",
                     "file": {"driver": "file", "filename": "s.raw"}});
    out.push(canon(&c.cmd("blockdev-add", src)));
    for (i, (event, once)) in events.iter().enumerate() {
        let rule = json!({"event": event, "errno": 5, "once": once});
        let target = json!({"driver": "qcow2", "node-name": format!("t{i}"),
            "file": {"driver": "blkdebug", "inject-error": [rule],
                     "image": {"driver": "file", "filename": format!("t{i}.qcow2")}}});
        out.push(format!("{event} {}", canon(&c.cmd("blockdev-add", target))));
        let backup = json!({"job-id": format!("j{i}"), "device": "s",
                            "target": format!("t{i}"), "sync": "full"});
        backup_to_completion(&mut c, &mut out, backup);
    }
    // A state machine: the third write of the target's raw node fails, named by its options.
    let machine = json!({"driver": "raw", "node-name": "sm", "file": {"driver": "blkdebug",
        "inject-error": [{"event": "write_aio", "errno": 5, "state": 3}],
        "set-state": [{"event": "write_aio", "state": 1, "new_state": 2},
                      {"event": "write_aio", "state": 2, "new_state": 3}],
        "image": {"driver": "file", "filename": "sm.raw"}}});
    out.push(canon(&c.cmd("blockdev-add", machine)));
    let nodes = c.cmd("query-named-block-nodes", json!({"flat": true}));
    let names = nodes["return"].as_array().into_iter().flatten();
    out.extend(
        names
            .filter(|n| n["node-name"] == "sm")
            .map(|n| n["file"].to_string()),
    );
    let backup = json!({"job-id": "sm", "device": "s", "target": "sm", "sync": "full",
                        "x-perf": {"max-workers": 1}});
    backup_to_completion(&mut c, &mut out, backup);
    out
}

#[test]
fn blkdebug_events_fire_where_qemus_do() {
    common::assert_same_as_qsd(run_blkdebug_events);
}

/// blkdebug's request limits as in QEMU: negative values and unmeetable constraints refused
/// with its messages, the node named by its options, and backups whose zero writes meet
/// `opt-write-zero` (a shorter piece becomes a write) and `max-transfer` (the copy's tasks
/// shrink to it, so a failed one leaves QEMU's progress).
fn run_blkdebug_limits(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    common::qemu_img(&["create", "-f", "raw", "s.raw", "4M"], p);
    // Holes at 1088k (64 KiB, not 128 KiB-aligned) and at 2M (256 KiB).
    qemu_io(
        &[
            "-f",
            "raw",
            "-c",
            "write -P 3 0 1088k",
            "-c",
            "write -P 3 1152k 896k",
            "-c",
            "write -P 3 2304k 1792k",
            "s.raw",
        ],
        p,
    );
    for t in ["t.raw", "t1.raw", "t2.raw", "t3.raw"] {
        common::qemu_img(&["create", "-f", "raw", t, "4M"], p);
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    let debug = |name: &str, file: &str, extra: Value| {
        let mut v = json!({"driver": "blkdebug", "node-name": name,
                           "image": {"driver": "file", "filename": file}});
        if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        v
    };
    for extra in [
        json!({"align": -1}),
        json!({"max-transfer": -512}),
        json!({"align": 3}),
        json!({"align": 4096, "max-transfer": 1000}),
        json!({"max-transfer": 2147483647}),
        json!({"align": 4096, "opt-write-zero": 512}),
        json!({"align": 4096, "max-write-zero": 8192, "opt-write-zero": 16384}),
        json!({"opt-discard": 1024, "max-discard": 1536}),
        json!({"max-discard": 3000000000u64}),
    ] {
        step(
            &mut c,
            o,
            "blockdev-add",
            debug("bad", "t.raw", extra),
            None,
        );
    }
    let all = json!({"align": 512, "max-transfer": 4096, "opt-write-zero": 1024,
                     "max-write-zero": 8192, "opt-discard": 2048, "max-discard": 65536});
    step(&mut c, o, "blockdev-add", debug("all", "t.raw", all), None);
    let raw = |name: &str, file: Value| json!({"driver": "raw", "node-name": name, "file": file});
    let src = raw("s", json!({"driver": "file", "filename": "s.raw"}));
    step(&mut c, o, "blockdev-add", src, None);
    let rule = |iotype: &str, sector: Option<u64>| {
        let mut r = json!({"event": "pwritev_zero", "iotype": iotype});
        if let Some(s) = sector {
            r["sector"] = json!(s);
        }
        json!([r])
    };
    let targets = [
        (
            "t1",
            json!({"opt-write-zero": 131072, "inject-error": rule("write-zeroes", None)}),
        ),
        (
            "t2",
            json!({"opt-write-zero": 131072, "inject-error": rule("write", Some(2176))}),
        ),
        (
            "t3",
            json!({"align": 4096, "max-transfer": 65536, "max-write-zero": 65536,
                      "inject-error": rule("write-zeroes", Some(4352))}),
        ),
    ];
    for (name, extra) in targets {
        let file = debug(&format!("d{name}"), &format!("{name}.raw"), extra);
        step(&mut c, o, "blockdev-add", raw(name, file), None);
    }
    step(
        &mut c,
        o,
        "query-named-block-nodes",
        json!({"flat": true}),
        None,
    );
    for (job, target) in [("j1", "t1"), ("j2", "t2"), ("j3", "t3")] {
        let backup = json!({"job-id": job, "device": "s", "target": target, "sync": "full"});
        // Every chunk but the failed one lands: the progress tells how the copy was cut.
        backup_to_completion(&mut c, o, backup);
    }
    out
}

#[test]
fn blkdebug_limits_are_qemus() {
    common::assert_same_as_qsd(run_blkdebug_limits);
}

/// A slow target: a `throttle` node whose `throttle-group` limits writes to 4 MiB/s. The
/// object commands answer as qsd's, and a backup of 4 MiB through the node takes most of a
/// second on both daemons and copies the disk.
fn run_throttled_target(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    common::qemu_img(&["create", "-f", "raw", "s.raw", "4M"], dir.path());
    common::qemu_img(&["create", "-f", "raw", "t.raw", "4M"], dir.path());
    qemu_io(&["-f", "raw", "-c", "write -P 7 0 4M", "s.raw"], dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let say = |c: &mut Client, out: &mut Vec<String>, cmd: &str, args: Value| {
        let r = c.cmd(cmd, args.clone());
        out.push(format!("{cmd} {} -> {}", canon(&args), canon(&r)));
    };
    let group =
        |id: &str, limits: Value| json!({"qom-type": "throttle-group", "id": id, "limits": limits});
    say(
        &mut c,
        &mut out,
        "object-add",
        group("tg", json!({"bps-write": 4 << 20, "iops-total": 1000})),
    );
    say(&mut c, &mut out, "object-add", group("tg", json!({})));
    say(
        &mut c,
        &mut out,
        "object-add",
        group("t2", json!({"bps-total": 1000, "bps-read": 10})),
    );
    say(
        &mut c,
        &mut out,
        "object-add",
        group("t3", json!({"bps-total": -5})),
    );
    say(
        &mut c,
        &mut out,
        "object-add",
        group("t4", json!({"bps-total-max": 100})),
    );
    say(
        &mut c,
        &mut out,
        "object-add",
        group("t5", json!({"iops-size": 4096})),
    );
    say(&mut c, &mut out, "object-add", group("9bad", json!({})));
    say(&mut c, &mut out, "object-add", group("spare", json!({})));
    let file = |f: &str| json!({"driver": "file", "filename": f});
    say(
        &mut c,
        &mut out,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "s", "file": file("s.raw")}),
    );
    say(
        &mut c,
        &mut out,
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "x",
        "throttle-group": "nope", "file": file("t.raw")}),
    );
    say(
        &mut c,
        &mut out,
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "thr",
        "throttle-group": "tg", "file": {"driver": "raw", "file": file("t.raw")}}),
    );
    say(&mut c, &mut out, "object-del", json!({"id": "tg"}));
    say(&mut c, &mut out, "object-del", json!({"id": "nope"}));
    say(&mut c, &mut out, "object-del", json!({"id": "spare"}));
    // The legacy `x-` properties, set after `limits` (they win); negative ones are refused.
    let legacy = json!({"qom-type": "throttle-group", "id": "old", "x-bps-total": 4096,
                        "limits": {"bps-total": 8192, "iops-total": 5}});
    say(&mut c, &mut out, "object-add", legacy);
    let old = json!({"path": "old", "property": "limits"});
    say(&mut c, &mut out, "qom-get", old);
    let negative = json!({"qom-type": "throttle-group", "id": "neg", "x-bps-total": -1});
    say(&mut c, &mut out, "object-add", negative);
    let limits = json!({"path": "tg", "property": "limits"});
    say(&mut c, &mut out, "qom-get", limits.clone());
    let unknown = json!({"path": "nope", "property": "limits"});
    say(&mut c, &mut out, "qom-get", unknown);
    let started = Instant::now();
    say(
        &mut c,
        &mut out,
        "blockdev-backup",
        json!({"job-id": "j", "device": "s", "target": "thr",
        "sync": "full"}),
    );
    let mut seen = Vec::new();
    let done = wait_event(&mut c, "BLOCK_JOB_COMPLETED", &mut seen);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(500), "{program:?}: {took:?}");
    out.push(format!("completed {}", canon(&done["data"])));
    say(
        &mut c,
        &mut out,
        "qom-set",
        json!({"path": "tg", "property": "limits",
        "value": {"bps-write": 8 << 20}}),
    );
    say(&mut c, &mut out, "qom-get", limits);
    say(
        &mut c,
        &mut out,
        "blockdev-del",
        json!({"node-name": "thr"}),
    );
    say(&mut c, &mut out, "object-del", json!({"id": "tg"}));
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", "s.raw", "t.raw"])
        .current_dir(d.dir.path())
        .output()
        .expect("qemu-img");
    out.push(format!("compare {}", cmp.status));
    out
}

#[test]
fn a_throttled_target_slows_the_backup_as_in_qemu_storage_daemon() {
    common::assert_same_as_qsd(run_throttled_target);
}

/// A cancel on a slow target: QEMU's copy call had launched every chunk of a 16 MiB disk, and
/// they all finish before the job ends, so the cancel reports the whole disk done. Ours keeps
/// fewer in flight and copies the rest of QEMU's launched chunks before it ends.
fn run_cancel_on_a_slow_target(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    common::qemu_img(&["create", "-f", "raw", "s.raw", "16M"], dir.path());
    common::qemu_img(&["create", "-f", "raw", "t.raw", "16M"], dir.path());
    qemu_io(
        &["-f", "raw", "-c", "write -P 7 0 16M", "s.raw"],
        dir.path(),
    );
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let file = |f: &str| json!({"driver": "file", "filename": f});
    let group = json!({"qom-type": "throttle-group", "id": "tg",
                       "limits": {"bps-write": 8 << 20}});
    let mut out = vec![canon(&c.cmd("object-add", group))];
    let src = json!({"driver": "raw", "node-name": "s", "file": file("s.raw")});
    out.push(canon(&c.cmd("blockdev-add", src)));
    let thr = json!({"driver": "throttle", "node-name": "thr", "throttle-group": "tg",
                     "file": {"driver": "raw", "file": file("t.raw")}});
    out.push(canon(&c.cmd("blockdev-add", thr)));
    let backup = json!({"job-id": "j", "device": "s", "target": "thr", "sync": "full"});
    out.push(canon(&c.cmd("blockdev-backup", backup)));
    std::thread::sleep(Duration::from_millis(300));
    out.push(canon(&c.cmd("block-job-cancel", json!({"device": "j"}))));
    let mut seen = Vec::new();
    let done = wait_event(&mut c, "BLOCK_JOB_CANCELLED", &mut seen);
    out.push(format!("cancelled {}", canon(&done["data"])));
    out
}

#[test]
fn a_cancel_on_a_slow_target_lets_qemus_launched_chunks_finish() {
    common::assert_same_as_qsd(run_cancel_on_a_slow_target);
}

/// A target write fails in one of the 1 MiB chunks of a `mib` MiB disk (at `sector`): QEMU
/// starts up to 64 chunks at once, and those finish before the job acts on the error, so a
/// failure in the second of four reports 3 MiB done, and one in a 16 MiB disk 15 MiB. With
/// `stop`, `then` (job-resume or job-cancel) follows the pause; `once`: only the first write
/// fails. Without `sector` every write fails once the first data write has reached the rule;
/// zeroes written before it (an unwritten source, `filled` false) still land, as in QEMU.
fn run_failure_progress(
    program: &Path,
    (action, then, once): (&str, &str, bool),
    (mib, sector, filled): (u64, Option<u64>, bool),
) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = format!("{mib}M");
    common::qemu_img(&["create", "-f", "raw", "s.raw", &size], dir.path());
    common::qemu_img(&["create", "-f", "raw", "t.raw", &size], dir.path());
    if filled {
        let fill = format!("write -P 0x5a 0 {size}");
        qemu_io(&["-f", "raw", "-c", &fill, "s.raw"], dir.path());
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let file = |f: &str| json!({"driver": "file", "filename": f});
    c.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src", "file": file("s.raw")}),
    );
    let mut rule = json!({"event": "write_aio", "errno": 5, "once": once});
    if let Some(sector) = sector {
        rule["sector"] = json!(sector);
    }
    c.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "tgt", "file": {"driver": "blkdebug",
               "inject-error": [rule], "image": file("t.raw")}}),
    );
    c.execute(
        "blockdev-backup",
        json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
               "on-target-error": action}),
    );
    let mut seen = Vec::new();
    let mut out = Vec::new();
    // The reply and the error, in whichever order they come: a reply left unread would be
    // taken for a later command's.
    let (mut replied, mut error) = (false, None);
    while !(replied && error.is_some()) {
        let v = c.read().expect("message");
        match v.get("event") {
            Some(e) if e == "BLOCK_JOB_ERROR" && error.is_none() => error = Some(v),
            Some(_) => seen.push(v),
            None => replied = true,
        }
    }
    let error = error.unwrap_or_default();
    out.push(format!("error {}", canon(&error["data"])));
    if action == "stop" {
        // (Polling skips events, and none come until the job is resumed.)
        let jobs = loop {
            let jobs = c.cmd("query-block-jobs", json!({}));
            if jobs["return"][0]["status"] == "paused" {
                break jobs;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        out.push(format!(
            "offset when paused {}",
            jobs["return"][0]["offset"]
        ));
        // Replies and events in order: a cancel resumes the job inside the command (its
        // `running` comes first), its end comes after the reply.
        c.execute(then, json!({"id": "j"}));
        let (mut replied, mut ended) = (false, false);
        while !(replied && ended) {
            let v = c.read().expect("message");
            match v.get("event") {
                Some(e) => {
                    ended |= v["data"]["status"] == "null";
                    out.push(format!("  {e} {}", canon(&v["data"])));
                }
                None => {
                    replied = true;
                    out.push(format!("< {}", canon(&v)));
                }
            }
        }
        return out;
    }
    let early = seen
        .iter()
        .find(|v| v["event"] == "BLOCK_JOB_COMPLETED")
        .cloned();
    let done = match early {
        Some(v) => v,
        None => wait_event(&mut c, "BLOCK_JOB_COMPLETED", &mut seen),
    };
    out.push(format!("completed {}", canon(&done["data"])));
    out
}

#[test]
fn a_failed_chunk_lets_the_chunks_in_flight_finish_as_in_qemu_storage_daemon() {
    // A target that fails once, then works; or for good (the cancelled job's retry fails too
    // and ends it without another error event).
    for (case, disk) in [
        (("report", "", true), (4, Some(2048), true)),
        (("stop", "job-resume", true), (4, Some(2048), true)),
        (("stop", "job-cancel", true), (4, Some(2048), true)),
        (("stop", "job-cancel", false), (4, Some(2048), true)),
        // More chunks than we keep in flight, fewer than QEMU's 64 workers.
        (("report", "", true), (16, Some(2048), true)),
        (("report", "", false), (16, Some(20480), true)),
        (("stop", "job-resume", true), (16, Some(2048), true)),
        // Every write fails after the first data write; the zeroes went out before it.
        (("report", "", false), (4, None, false)),
        (("report", "", false), (16, None, false)),
    ] {
        let ours = run_failure_progress(&common::blockjobd(), case, disk);
        let theirs = run_failure_progress(Path::new("qemu-storage-daemon"), case, disk);
        common::assert_same_transcript(&ours, &theirs);
    }
}

/// QEMU 10.1's `on-cbw-error` on blockdev-backup (qsd 10.0.2 has no such argument): a guest
/// write whose old data cannot be read fails under break-guest-write and goes on under
/// break-snapshot.
fn guest_write_with_failing_copy(mode: &str) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    let d = Daemon::start(&common::blockjobd(), &[], dir);
    let mut c = d.client();
    for (cmd, args) in [
        ("blockdev-add", qcow2("disk", "a.qcow2")),
        // blkdebug acts on what a format above announces: raw over it, as in QEMU.
        (
            "blockdev-add",
            json!({"driver": "blkdebug", "node-name": "dbg", "image": "disk",
                   "inject-error": [{"event": "read_aio", "iotype": "read", "errno": 5,
                                     "sector": 30720}]}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "src", "file": "dbg"}),
        ),
        ("blockdev-add", qcow2("tgt", "t.qcow2")),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "src", "writable": true}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                   "speed": 65536, "on-cbw-error": mode}),
        ),
    ] {
        assert_eq!(c.cmd(cmd, args), json!({"return": {}}), "{cmd}");
    }
    let url = format!("nbd+unix:///src?socket={}", d.path("nbd.sock").display());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 15M 4k", &url])
        .current_dir(d.dir.path())
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success() && text.contains("wrote 4096/4096");
    c.execute("quit", json!({}));
    ok
}

#[test]
fn on_cbw_error_breaks_the_guest_write_or_the_snapshot() {
    assert!(
        !guest_write_with_failing_copy("break-guest-write"),
        "the guest write must fail when its old data cannot be saved"
    );
    assert!(
        guest_write_with_failing_copy("break-snapshot"),
        "the guest write goes on and the snapshot breaks"
    );
}

fn run_drive(program: &Path) -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    common::qemu_img(&["create", "-f", "raw", "base.raw", "16M"], dir.path());
    qemu_io(
        &["-f", "raw", "-c", "write -P 0x33 0 2M", "base.raw"],
        dir.path(),
    );
    common::qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "over.qcow2",
            "16M",
        ],
        dir.path(),
    );
    qemu_io(
        &["-f", "qcow2", "-c", "write -P 0x44 1M 1M", "over.qcow2"],
        dir.path(),
    );
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    step(
        &mut c,
        o,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "over",
               "file": {"driver": "file", "filename": "over.qcow2"}}),
        None,
    );
    let b = |id: &str, device: &str, target: &str, sync: &str| json!({"job-id": id, "device": device, "target": target, "sync": sync});
    // Refusals, in QEMU's order.
    let mut refused = |args: Value| step(&mut c, o, "drive-backup", args, None);
    refused(b("r0", "nope", "x.qcow2", "full"));
    let mut missing = b("r1", "src", "missing.qcow2", "full");
    missing["mode"] = json!("existing");
    refused(missing);
    let mut unknown = b("r2", "src", "u.img", "full");
    unknown["format"] = json!("vmdk9");
    refused(unknown);
    refused(b("r3", "src", "nb.qcow2", "incremental"));
    // A full backup into a new qcow2 (the source's format), a raw one, sync=top of an
    // overlay (backed by its backing file) and sync=none (backed by the source).
    step(
        &mut c,
        o,
        "drive-backup",
        b("j0", "src", "full.qcow2", "full"),
        Some("j0"),
    );
    let mut raw = b("j1", "src", "full.raw", "full");
    raw["format"] = json!("raw");
    step(&mut c, o, "drive-backup", raw, Some("j1"));
    step(
        &mut c,
        o,
        "drive-backup",
        b("j2", "over", "top.qcow2", "top"),
        Some("j2"),
    );
    // sync=top of a node without a backing image copies everything.
    step(
        &mut c,
        o,
        "drive-backup",
        b("j3", "src", "top-full.qcow2", "top"),
        Some("j3"),
    );
    let mut none = b("j4", "src", "none.qcow2", "none");
    none["speed"] = json!(1);
    step(&mut c, o, "drive-backup", none, None);
    step(&mut c, o, "query-jobs", json!({}), None);
    step(&mut c, o, "job-cancel", json!({"id": "j4"}), Some("j4"));
    // Into an existing image, and as a transaction action.
    let mut again = b("j5", "src", "full.qcow2", "full");
    again["mode"] = json!("existing");
    step(
        &mut c,
        o,
        "transaction",
        json!({"actions": [{"type": "drive-backup", "data": again}]}),
        Some("j5"),
    );
    step(&mut c, o, "query-jobs", json!({}), None);
    let dir = quit(&mut c, d);
    (out, dir)
}

#[test]
fn drive_backup_is_qemu_storage_daemons() {
    let (ours, dir) = run_drive(&common::blockjobd());
    let (theirs, qdir) = run_drive(Path::new("qemu-storage-daemon"));
    common::assert_same_transcript(&ours, &theirs);
    for d in [dir.path(), qdir.path()] {
        assert_identical(d, &["a.qcow2", "full.qcow2"], "full.qcow2");
        assert_identical(d, &["-F", "raw", "a.qcow2", "full.raw"], "full.raw");
        assert_identical(d, &["over.qcow2", "top.qcow2"], "top.qcow2");
        assert_identical(d, &["a.qcow2", "top-full.qcow2"], "top-full.qcow2");
        assert!(!d.join("u.img").exists() && !d.join("missing.qcow2").exists());
    }
    // What the created images are, as qemu-img sees them (the directories differ).
    let info = |d: &Path, f: &str| {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json", f])
            .current_dir(d)
            .output()
            .expect("qemu-img info");
        let v: Value = serde_json::from_slice(&out.stdout).expect("info json");
        let base = v["backing-filename"]
            .as_str()
            .map(|b| b.replace(&d.display().to_string(), "DIR"));
        json!([
            v["format"],
            v["virtual-size"],
            v["cluster-size"],
            base,
            v["backing-filename-format"]
        ])
    };
    for f in [
        "full.qcow2",
        "full.raw",
        "top.qcow2",
        "top-full.qcow2",
        "none.qcow2",
    ] {
        assert_eq!(info(dir.path(), f), info(qdir.path(), f), "{f}");
    }
}

fn run_outcomes(program: &Path) -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    for t in ["t1", "t2", "t3", "t4"] {
        common::qemu_img(
            &["create", "-f", "qcow2", &format!("{t}.qcow2"), "16M"],
            dir.path(),
        );
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let q = json!({"flat": true});
    let o = &mut out;
    step(&mut c, o, "blockdev-add", qcow2("src", "a.qcow2"), None);
    for t in ["t1", "t3", "t4"] {
        step(
            &mut c,
            o,
            "blockdev-add",
            qcow2(t, &format!("{t}.qcow2")),
            None,
        );
    }
    failing_target_and_export(&mut c, o);
    step(
        &mut c,
        o,
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0"}),
        None,
    );
    guest_write(
        &d,
        &[
            "write -P 0x61 0 128k",
            "write -P 0x62 5M 64k",
            "write -P 0x63 10M 64k",
        ],
    );
    step(&mut c, o, "query-named-block-nodes", q.clone(), None);
    let settle = || std::thread::sleep(Duration::from_millis(500));
    // Cancelled after its first chunk (the first dirty area): on-success keeps every bit…
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "c1", "device": "src", "target": "t1", "sync": "bitmap",
               "bitmap": "b0", "bitmap-mode": "on-success", "speed": 1}),
        None,
    );
    settle();
    step(&mut c, o, "job-cancel", json!({"id": "c1"}), Some("c1"));
    step(&mut c, o, "query-named-block-nodes", q.clone(), None);
    // …always clears what was copied.
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "c2", "device": "src", "target": "t3", "sync": "bitmap",
               "bitmap": "b0", "bitmap-mode": "always", "speed": 1}),
        None,
    );
    settle();
    step(&mut c, o, "job-cancel", json!({"id": "c2"}), Some("c2"));
    step(&mut c, o, "query-named-block-nodes", q.clone(), None);
    // A target that fails at once: always keeps what was not copied (all of it).
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "f1", "device": "src", "target": "t2", "sync": "bitmap",
               "bitmap": "b0", "bitmap-mode": "always", "x-perf": {"max-workers": 1}}),
        Some("f1"),
    );
    step(&mut c, o, "query-named-block-nodes", q.clone(), None);
    // Guest writes during an incremental: after it succeeds, only they are dirty.
    step(
        &mut c,
        o,
        "blockdev-backup",
        json!({"job-id": "i1", "device": "src", "target": "t4", "sync": "incremental",
               "bitmap": "b0", "speed": 1}),
        None,
    );
    settle();
    guest_write(&d, &["write -P 0x64 7M 64k"]);
    step(&mut c, o, "query-named-block-nodes", q.clone(), None);
    step(
        &mut c,
        o,
        "block-job-set-speed",
        json!({"device": "i1", "speed": 0}),
        Some("i1"),
    );
    step(&mut c, o, "query-named-block-nodes", q, None);
    let dir = quit(&mut c, d);
    (out, dir)
}

#[test]
fn bitmap_outcomes_on_cancel_failure_and_writes_during_the_job_are_qemu_storage_daemons() {
    let (ours, dir) = run_outcomes(&common::blockjobd());
    let (theirs, _qdir) = run_outcomes(Path::new("qemu-storage-daemon"));
    common::assert_same_transcript(&ours, &theirs);
    // The incremental holds what the bitmap had, over the first two backups' images.
    let (ok, text) = common::qemu_img_check(&dir.path().join("t4.qcow2"));
    assert!(ok, "{text}");
}

/// A slow backup target: nbdkit's memory plugin behind its delay filter, 50 ms a write.
struct SlowTarget {
    child: std::process::Child,
    sock: std::path::PathBuf,
}

impl SlowTarget {
    const WRITE_DELAY_MS: u64 = 50;

    fn start(dir: &Path) -> SlowTarget {
        let sock = dir.join("slow.sock");
        let child = Command::new("nbdkit")
            .args(["--exit-with-parent", "-f", "-U"])
            .arg(&sock)
            .args(["--filter=delay", "memory", "16M"])
            .arg(format!("delay-write={}ms", Self::WRITE_DELAY_MS))
            .arg(format!("delay-zero={}ms", Self::WRITE_DELAY_MS))
            .spawn()
            .expect("nbdkit (apt-get install -y nbdkit)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        SlowTarget { child, sock }
    }

    fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

impl Drop for SlowTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a throttled backup of the disk into a slow target while the guest writes 16 clusters
/// the copy has not reached; returns how long the guest's writes took, and checks that the
/// target is the disk at the command and the disk has the guest's writes.
fn guest_writes_during_a_slow_target_backup(program: &Path) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    images(dir.path());
    save_before(dir.path());
    let slow = SlowTarget::start(dir.path());
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    for (cmd, args) in [
        ("blockdev-add", qcow2("src", "a.qcow2")),
        (
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "tgt",
                   "server": {"type": "unix", "path": slow.sock.display().to_string()}}),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "src", "writable": true}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                   "speed": 1 << 20}),
        ),
    ] {
        let r = c.cmd(cmd, args);
        assert_eq!(r, json!({"return": {}}), "{cmd}");
    }
    // 4 KiB into each of 16 clusters from 8 MiB on, which the copy has not reached.
    let url = format!("nbd+unix:///src?socket={}", d.path("nbd.sock").display());
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..16u64 {
        args.push("-c".into());
        args.push(format!("write -P 0x7e {} 4k", (8 << 20) + i * (256 << 10)));
    }
    args.push(url);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let began = Instant::now();
    qemu_io(&refs, d.dir.path());
    let guest = began.elapsed();
    let r = c.cmd("block-job-set-speed", json!({"device": "j", "speed": 0}));
    assert_eq!(r, json!({"return": {}}));
    let mut seen = Vec::new();
    let done = wait_event(&mut c, "BLOCK_JOB_COMPLETED", &mut seen);
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_identical(
        d.dir.path(),
        &["-f", "raw", "-F", "raw", "before.raw", &slow.url()],
        "the slow target differs from the disk at the command",
    );
    let dir = quit(&mut c, d);
    qemu_io(
        &["-f", "qcow2", "-c", "read -P 0x7e 8M 4k", "a.qcow2"],
        dir.path(),
    );
    guest
}

#[test]
fn a_slow_target_does_not_hold_up_the_guest_as_in_qemu_storage_daemon() {
    let writes = 16 * Duration::from_millis(SlowTarget::WRITE_DELAY_MS);
    let ours = guest_writes_during_a_slow_target_backup(&common::blockjobd());
    let theirs = guest_writes_during_a_slow_target_backup(Path::new("qemu-storage-daemon"));
    // QEMU holds each guest write until the old data is on the target: at least the delay.
    assert!(theirs >= writes, "qsd: {theirs:?}");
    // Here a guest write waits for the read of the old data only.
    assert!(ours < writes / 2, "ours {ours:?}, qsd {theirs:?}");
    eprintln!(
        "16 guest writes during a backup into a 50 ms/write target: ours {ours:?}, qsd {theirs:?}"
    );
}

/// `x-perf.use-copy-range`: between raw files (O_DIRECT) the background copy goes through
/// `copy_file_range`; into qcow2 it falls back to copying through memory. Either way, under
/// guest writes, the target is the disk at the command.
#[test]
fn use_copy_range_backups_are_the_disk_at_the_command() {
    for target in ["raw", "qcow2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        common::qemu_img(&["create", "-f", "raw", "a.raw", "16M"], p);
        common::qemu_img(&["create", "-f", target, "t.img", "16M"], p);
        qemu_io(
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x11 0 6M",
                "-c",
                "write -P 0x22 9M 3M",
                "a.raw",
            ],
            p,
        );
        std::fs::copy(p.join("a.raw"), p.join("before.raw")).expect("copy");
        let d = Daemon::start(&common::blockjobd(), &[], dir);
        let mut c = d.client();
        let file =
            |name: &str| json!({"driver": "file", "filename": name, "cache": {"direct": true}});
        for (cmd, args) in [
            (
                "blockdev-add",
                json!({"driver": "raw", "node-name": "src", "file": file("a.raw")}),
            ),
            (
                "blockdev-add",
                json!({"driver": target, "node-name": "tgt", "file": file("t.img")}),
            ),
            (
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e", "node-name": "src", "writable": true}),
            ),
            (
                "blockdev-backup",
                json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                       "speed": 8 << 20, "x-perf": {"use-copy-range": true}}),
            ),
        ] {
            let r = c.cmd(cmd, args);
            assert_eq!(r, json!({"return": {}}), "{cmd}");
        }
        let url = format!("nbd+unix:///src?socket={}", d.path("nbd.sock").display());
        qemu_io(
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "write -P 0xcd 10M 2M",
                "-c",
                "write -P 0xef 15M 64k",
                &url,
            ],
            d.dir.path(),
        );
        let mut seen = Vec::new();
        let done = wait_event(&mut c, "BLOCK_JOB_COMPLETED", &mut seen);
        assert!(done["data"].get("error").is_none(), "{target}: {done}");
        assert_eq!(done["data"]["offset"], 16 << 20, "{target}");
        let dir = quit(&mut c, d);
        assert_identical(
            dir.path(),
            &["-f", "raw", "-F", target, "before.raw", "t.img"],
            &format!("{target} target differs from the disk at the command"),
        );
    }
}

/// A backup throttled to a crawl on sources laid out in different ways: how far its first task
/// went (`query-block-jobs`, and the cancel's event) shows where QEMU's block-copy cuts its
/// tasks, at the end of the source's first block-status run.
fn run_first_tasks(program: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let layouts: [(&str, &str, &[&str]); 6] = [
        // qemu-img writes the first 4 KiB of a raw image it creates.
        ("raw", "fresh", &[]),
        ("raw", "192k of data", &["write 0 192k"]),
        ("raw", "100k of data", &["write 0 100k"]),
        ("raw", "3M of data", &["write 0 3M"]),
        ("qcow2", "fresh", &[]),
        ("qcow2", "data at 64k", &["write 64k 64k", "write -z 1M 1M"]),
    ];
    for (fmt, what, writes) in layouts {
        let dir = tempfile::tempdir().expect("tempdir");
        common::qemu_img(&["create", "-f", fmt, "disk.img", "8M"], dir.path());
        common::qemu_img(&["create", "-f", "raw", "t.raw", "8M"], dir.path());
        if !writes.is_empty() {
            let mut args = vec!["-f", fmt];
            for w in writes {
                args.extend(["-c", w]);
            }
            args.push("disk.img");
            qemu_io(&args, dir.path());
        }
        let mut d = Daemon::start(program, &[], dir);
        let mut c = d.client();
        for (cmd, args) in [
            (
                "blockdev-add",
                json!({"driver": fmt, "node-name": "disk",
                       "file": {"driver": "file", "filename": "disk.img"}}),
            ),
            (
                "blockdev-add",
                json!({"driver": "raw", "node-name": "tgt",
                       "file": {"driver": "file", "filename": "t.raw"}}),
            ),
            (
                "blockdev-backup",
                json!({"job-id": "j", "device": "disk", "target": "tgt", "sync": "full",
                       "speed": 1}),
            ),
        ] {
            assert_eq!(c.cmd(cmd, args), json!({"return": {}}), "{cmd}");
        }
        std::thread::sleep(Duration::from_millis(300));
        let jobs = c.cmd("query-block-jobs", json!({}));
        out.push(format!(
            "{fmt} {what}: offset {}",
            jobs["return"][0]["offset"]
        ));
        c.execute("block-job-cancel", json!({"device": "j"}));
        let mut seen = Vec::new();
        let e = wait_event(&mut c, "BLOCK_JOB_CANCELLED", &mut seen);
        out.push(format!(
            "{fmt} {what}: cancelled at {}",
            e["data"]["offset"]
        ));
        c.execute("quit", json!({}));
        d.wait();
    }
    out
}

#[test]
fn a_throttled_backup_cuts_its_first_task_where_qemu_storage_daemon_does() {
    common::assert_same_as_qsd(run_first_tasks);
}

/// Two backups in one transaction: created in the order of the actions, started (`running`)
/// in the reverse order, as QEMU commits a transaction last action first.
fn run_transaction_order(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["a.raw", "b.raw", "ta.raw", "tb.raw"] {
        common::qemu_img(&["create", "-f", "raw", f, "8M"], dir.path());
    }
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let mut out = Vec::new();
    let o = &mut out;
    for (node, file) in [
        ("a", "a.raw"),
        ("b", "b.raw"),
        ("ta", "ta.raw"),
        ("tb", "tb.raw"),
    ] {
        let args = json!({"driver": "raw", "node-name": node,
                          "file": {"driver": "file", "filename": file}});
        step(&mut c, o, "blockdev-add", args, None);
    }
    let backup = |job: &str, dev: &str, tgt: &str| {
        json!({"type": "blockdev-backup",
               "data": {"job-id": job, "device": dev, "target": tgt, "sync": "full",
                        "speed": 1}})
    };
    for mode in ["individual", "grouped"] {
        let actions = json!({"actions": [backup("ja", "a", "ta"), backup("jb", "b", "tb")],
                             "properties": {"completion-mode": mode}});
        step(&mut c, o, "transaction", actions, None);
        std::thread::sleep(Duration::from_millis(200));
        step(&mut c, o, "query-jobs", json!({}), None);
        step(&mut c, o, "job-cancel", json!({"id": "ja"}), Some("ja"));
        if mode == "individual" {
            step(&mut c, o, "job-cancel", json!({"id": "jb"}), Some("jb"));
        } else {
            // The group went with it.
            step(&mut c, o, "query-jobs", json!({}), None);
        }
    }
    out
}

#[test]
fn a_transaction_starts_its_jobs_as_qemu_storage_daemon_does() {
    common::assert_same_as_qsd(run_transaction_order);
}
