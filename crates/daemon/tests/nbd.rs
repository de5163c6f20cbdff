//! NBD exports and the nbd client driver, driven by clients and servers no one here wrote:
//! qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh (libnbd), qemu-nbd and qemu-storage-daemon.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{qemu_img, qemu_img_check, Daemon};
use serde_json::{json, Value};

fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Runs a command, asserts success, returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's python3, which has libnbd's `nbd` module (the pyenv one first on PATH has not).
fn debian_python() -> Command {
    Command::new("/usr/bin/python3")
}

/// nbdsh, run with Debian's python3 first on PATH.
fn nbdsh() -> Command {
    let mut c = Command::new("/usr/bin/nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:{path}"));
    c
}

fn qemu_io(target: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(c.arg(target));
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );
    out
}

/// Images with a backing chain: base has 0x22 at 8M, top has 0x11 at 0..1M and a zero
/// cluster at 2M; plus an 8M raw file and a 1M raw file.
fn make_images(dir: &Path) {
    qemu_img(&["create", "-f", "qcow2", "base.qcow2", "64M"], dir);
    run(Command::new("qemu-io")
        .current_dir(dir)
        .args(["-c", "write -P 0x22 8M 1M", "base.qcow2"]));
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        dir,
    );
    run(Command::new("qemu-io").current_dir(dir).args([
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "write -z 2M 1M",
        "top.qcow2",
    ]));
    qemu_img(&["create", "-f", "raw", "r.raw", "8M"], dir);
    qemu_img(&["create", "-f", "raw", "al.raw", "1M"], dir);
}

/// The same options on both daemons: a writable qcow2 export with allocation depth, the same
/// disk read-only through a filter (blkdebug), a read-only raw export, and an O_DIRECT file
/// export (minimum block size > 1).
fn export_options(sock: &Path) -> Vec<String> {
    [
        "--blockdev",
        "driver=file,filename=top.qcow2,node-name=f",
        "--blockdev",
        "driver=qcow2,file=f,node-name=d",
        "--blockdev",
        "driver=blkdebug,image=d,node-name=bd",
        "--blockdev",
        "driver=file,filename=r.raw,node-name=r,read-only=on",
        "--blockdev",
        "driver=file,filename=al.raw,node-name=al,cache.direct=on",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", sock.display()),
        "--export",
        "type=nbd,id=e,node-name=d,writable=on,allocation-depth=on,description=the disk",
        "--export",
        "type=nbd,id=r,node-name=r",
        "--export",
        "type=nbd,id=bd,node-name=bd,allocation-depth=on",
        "--export",
        "type=nbd,id=a,node-name=al,writable=on",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// What clients see of the exports: export list, maps, qemu-img map, protocol edge cases.
fn observe(program: &Path) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().expect("tempdir");
    make_images(dir.path());
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start(program, &export_options(&sock), dir);
    let d_uri = uri(&sock, "d");
    let list = run(Command::new("nbdinfo").args(["--list", &uri(&sock, "")]))
        .lines()
        .filter(|l| !l.trim_start().starts_with("uri:"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut seen = vec![
        ("nbdinfo --list".to_owned(), list),
        (
            "nbdinfo --map".to_owned(),
            run(Command::new("nbdinfo").args(["--map", &d_uri])),
        ),
        (
            "nbdinfo --map=qemu:allocation-depth".to_owned(),
            run(Command::new("nbdinfo").args(["--map=qemu:allocation-depth", &d_uri])),
        ),
        (
            "qemu-img map".to_owned(),
            run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &d_uri])),
        ),
    ];
    // Through a filter: the map must still show the backing file's data (sparse copiers
    // skip what it calls a hole), and copies must equal the image.
    let bd_uri = uri(&sock, "bd");
    seen.push((
        "filter: nbdinfo --map".to_owned(),
        run(Command::new("nbdinfo").args(["--map", &bd_uri])),
    ));
    seen.push((
        "filter: nbdinfo --map=qemu:allocation-depth".to_owned(),
        run(Command::new("nbdinfo").args(["--map=qemu:allocation-depth", &bd_uri])),
    ));
    seen.push((
        "filter: qemu-img map".to_owned(),
        run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &bd_uri])),
    ));
    let copy = d.path("nbdcopy.raw");
    run(Command::new("nbdcopy").arg(&bd_uri).arg(&copy));
    let converted = d.path("convert.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &bd_uri])
        .arg(&converted));
    for (what, file) in [("nbdcopy", &copy), ("qemu-img convert", &converted)] {
        let out = Command::new("qemu-img")
            .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
            .arg(file)
            .arg(d.path("top.qcow2"))
            .output()
            .expect("qemu-img compare");
        seen.push((
            format!("filter: {what} copy vs image"),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/nbd_errnos.py");
    let edge = run(debian_python()
        .arg(script)
        .args([&d_uri, &uri(&sock, "r"), &uri(&sock, "al")]));
    for line in edge.lines() {
        let (case, result) = line.rsplit_once(' ').unwrap_or((line, ""));
        seen.push((case.to_owned(), result.to_owned()));
    }
    drop(d);
    seen
}

/// Where we answer as the NBD specification asks and QEMU 10.0 does not.
const SPEC_OVER_QEMU: &[(&str, &str, &str)] = &[
    // "The server SHOULD return NBD_ENOSPC if it receives a write request including one or
    // more sectors beyond the size of the device."
    ("write past end", "ENOSPC", "EINVAL"),
    ("zero past end", "ENOSPC", "EINVAL"),
    // "The server SHOULD return NBD_EPERM if it receives a write or trim request on a
    // read-only export."
    ("ro write", "EPERM", "EINVAL"),
    ("ro zero", "EPERM", "EINVAL"),
    ("ro trim", "EPERM", "EINVAL"),
    // We enforce the minimum block size we advertise; QEMU advertises it and accepts
    // misaligned requests anyway.
    ("misaligned read", "EINVAL", "ok"),
    ("misaligned write", "EINVAL", "ok"),
];

#[test]
fn clients_see_what_qemu_storage_daemon_shows() {
    let ours = observe(&common::blockjobd());
    let theirs = observe(Path::new("qemu-storage-daemon"));
    assert_eq!(ours.len(), theirs.len(), "{ours:#?}\n{theirs:#?}");
    for ((case, a), (case_q, b)) in ours.iter().zip(&theirs) {
        assert_eq!(case, case_q);
        match SPEC_OVER_QEMU.iter().find(|(c, _, _)| c == case) {
            Some((_, want, qemu)) => {
                assert_eq!(a, want, "{case}: ours");
                assert_eq!(b, qemu, "{case}: qemu-storage-daemon changed");
            }
            None => assert_eq!(a, b, "{case}: blockjobd vs qemu-storage-daemon"),
        }
    }
    assert!(ours.iter().any(|(c, r)| c == "done" || r == "done"));
}

#[test]
fn qemu_io_qemu_img_nbdcopy_and_nbdsh_over_our_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_images(dir.path());
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start(&common::blockjobd(), &export_options(&sock), dir);
    let target = uri(&sock, "d");

    qemu_io(
        &target,
        &[
            "read -P 0x11 0 1M",
            "read -P 0 2M 1M",
            "read -P 0x22 8M 1M",
            "write -P 0x33 16M 64k",
            "write -z 20M 1M",
            "aio_write -P 0x44 24M 64k",
            "aio_write -P 0x45 25M 64k",
            "aio_flush",
            "read -P 0x33 16M 64k",
            "read -P 0x44 24M 64k",
            "read -P 0x45 25M 64k",
        ],
    );
    let info: Value = serde_json::from_str(&run(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "-f",
        "raw",
        &target,
    ])))
    .expect("json");
    assert_eq!(info["virtual-size"], json!(64 << 20));

    let converted = d.path("converted.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &target])
        .arg(&converted));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &target])
        .arg(&converted));
    let copied = d.path("copied.raw");
    run(Command::new("nbdcopy").arg(&target).arg(&copied));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&copied)
        .arg(&converted));
    // nbdcopy also writes into the export: copy the read-only one over a range of the disk.
    let small = uri(&sock, "r");
    let out = run(nbdsh().args([
        "-u",
        &target,
        "-c",
        "assert h.get_size() == 64 << 20\n\
         assert h.can_multi_conn() and h.can_fua() and h.can_trim()\n\
         assert h.pread(4, 16 << 20) == b'\\x33' * 4\n\
         h.pwrite(b'nbdsh!', 30 << 20)\n\
         h.flush()\n\
         print('nbdsh ok')",
    ]));
    assert!(out.contains("nbdsh ok"), "{out}");
    let out = run(nbdsh().args(["-u", &small, "-c", "print(h.is_read_only())"]));
    assert_eq!(out.trim(), "True");

    let mut d = d;
    let mut c = d.client();
    assert_eq!(c.cmd("quit", json!({})), json!({"return": {}}));
    assert!(d.wait().success());
    let (ok, report) = qemu_img_check(&d.path("top.qcow2"));
    assert!(ok, "{report}");
    run(Command::new("qemu-io").current_dir(d.dir.path()).args([
        "-c",
        "read -P 0x33 16M 64k",
        "-c",
        "read -P 0x45 25M 64k",
        "-c",
        "read -P 0 20M 1M",
        "top.qcow2",
    ]));
}

/// A libnbd client that connects, says so on stdout, and stays until killed.
fn held_client(target: &str) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = debian_python()
        .args([
            "-c",
            "import nbd, sys, time\n\
             h = nbd.NBD()\n\
             h.connect_uri(sys.argv[1])\n\
             print('connected', flush=True)\n\
             time.sleep(60)",
            target,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "connected");
    (child, out)
}

#[test]
fn export_deletion_safe_and_hard_with_events() {
    let d = Daemon::ours(&["--blockdev", "driver=null-co,node-name=n,size=16M"]);
    let sock = d.path("nbd.sock");
    let mut c = d.client();
    let start = json!({"addr": {"type": "unix", "data": {"path": sock}}});
    assert_eq!(c.cmd("nbd-server-start", start), json!({"return": {}}));
    let add = json!({"type": "nbd", "id": "e", "node-name": "n", "writable": true});
    assert_eq!(
        c.cmd("block-export-add", add.clone()),
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd("blockdev-del", json!({"node-name": "n"}))["error"]["desc"],
        "Node n is in use"
    );
    let (mut client, _out) = held_client(&uri(&sock, "n"));
    assert_eq!(
        c.cmd("block-export-del", json!({"id": "e"}))["error"]["desc"],
        "export 'e' still in use"
    );
    // The event may come before or after the reply, depending on how fast the client goes.
    c.send(&json!({"execute": "block-export-del", "arguments": {"id": "e", "mode": "hard"}}));
    let (mut reply, mut event) = (None, None);
    while reply.is_none() || event.is_none() {
        let v = c.read().expect("reply or event");
        if v.get("event").is_some() {
            event = Some(v);
        } else {
            reply = Some(v);
        }
    }
    assert_eq!(reply, Some(json!({"return": {}})));
    let ev = event.unwrap_or_default();
    assert_eq!(ev["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "e"}));
    assert_eq!(
        c.cmd("query-block-exports", json!({})),
        json!({"return": []})
    );
    let _ = client.kill();
    let _ = client.wait();

    // Without clients, deletion is immediate: the event precedes the reply.
    assert_eq!(c.cmd("block-export-add", add), json!({"return": {}}));
    c.send(&json!({"execute": "block-export-del", "arguments": {"id": "e"}}));
    let ev = c.read().expect("event");
    assert_eq!(ev["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(c.reply(), json!({"return": {}}));
    assert_eq!(
        c.cmd("blockdev-del", json!({"node-name": "n"})),
        json!({"return": {}})
    );
    assert_eq!(c.cmd("nbd-server-stop", json!({})), json!({"return": {}}));
    assert!(!sock.exists(), "the NBD socket is removed on stop");
}

/// blockjobd with a 16M raw disk as node `n`, plus `extra` options.
fn with_disk(extra: &[&str]) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_img(&["create", "-f", "raw", "disk.raw", "16M"], dir.path());
    let mut args = vec![
        "--blockdev".to_owned(),
        "driver=file,filename=disk.raw,node-name=n".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Daemon::start(&common::blockjobd(), &args, dir)
}

/// Reads until EOF or `limit`; true when the server closed the connection in time.
fn closed_within(mut s: &UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn garbage_and_stalled_handshakes_are_dropped_without_affecting_others() {
    let d = with_disk(&[
        "--nbd-server",
        "addr.type=unix,addr.path=nbd.sock,handshake-max-seconds=1",
        "--export",
        "nbd,id=e,node-name=n,writable=on",
    ]);
    let sock = d.path("nbd.sock");
    let garbage = UnixStream::connect(&sock).expect("connect");
    (&garbage).write_all(&[0xa5; 200]).expect("write garbage");
    assert!(closed_within(&garbage, Duration::from_secs(3)));

    let stalled = UnixStream::connect(&sock).expect("connect");
    let started = Instant::now();
    // While one client stalls, others are served.
    qemu_io(&uri(&sock, "n"), &["write -P 7 0 4k", "read -P 7 0 4k"]);
    assert!(closed_within(&stalled, Duration::from_secs(5)));
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A client that stops halfway through an option is dropped too.
    let half = UnixStream::connect(&sock).expect("connect");
    let mut greeting = [0u8; 18];
    (&half).read_exact(&mut greeting).expect("greeting");
    (&half).write_all(&[0, 0, 0, 3]).expect("flags");
    (&half)
        .write_all(b"IHAVEOPT\0\0\0\x07")
        .expect("half option");
    assert!(closed_within(&half, Duration::from_secs(5)));
    qemu_io(&uri(&sock, "n"), &["read -P 7 0 4k"]);
}

#[test]
fn max_connections_one_withholds_multi_conn() {
    let d = Daemon::ours(&[
        "--blockdev",
        "driver=null-co,node-name=n,size=16M",
        "--nbd-server",
        "addr.type=unix,addr.path=nbd.sock,max-connections=1",
        "--export",
        "nbd,id=e,node-name=n,writable=on",
    ]);
    let target = uri(&d.path("nbd.sock"), "n");
    let out = run(Command::new("nbdinfo").arg(&target));
    assert!(out.contains("can_multi_conn: false"), "{out}");
    // The one slot is taken: a second client waits until the first leaves.
    let (mut first, _out) = held_client(&target);
    let mut second = Command::new("nbdinfo")
        .arg("--size")
        .arg(&target)
        .stdout(Stdio::piped())
        .spawn()
        .expect("nbdinfo");
    std::thread::sleep(Duration::from_millis(500));
    assert!(second.try_wait().expect("try_wait").is_none());
    let _ = first.kill();
    let _ = first.wait();
    let st = second.wait().expect("wait");
    assert!(st.success());
}

fn wait_for_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Our nbd driver as a node, re-exported by our own server: qemu-io reaches the remote disk
/// through both our client and our server.
fn through_our_client(c: &mut common::Client, server: Value, export: &str, sock: &Path) {
    let add = json!({"driver": "nbd", "node-name": "remote", "server": server, "export": export,
                     "reconnect-delay": 10});
    assert_eq!(c.cmd("blockdev-add", add), json!({"return": {}}));
    let nodes = c.cmd("query-named-block-nodes", json!({}));
    assert_eq!(nodes["return"][0]["drv"], "nbd", "{nodes}");
    let start = json!({"addr": {"type": "unix", "data": {"path": sock}}});
    assert_eq!(c.cmd("nbd-server-start", start), json!({"return": {}}));
    let exp = json!({"type": "nbd", "id": "x", "node-name": "remote", "writable": true});
    assert_eq!(c.cmd("block-export-add", exp), json!({"return": {}}));
}

#[test]
fn nbd_driver_against_qemu_nbd_and_qemu_storage_daemon() {
    let d = Daemon::ours(&[]);
    let dir = d.dir.path();
    qemu_img(&["create", "-f", "qcow2", "remote.qcow2", "32M"], dir);
    run(Command::new("qemu-io").current_dir(dir).args([
        "-c",
        "write -P 0x44 0 1M",
        "remote.qcow2",
    ]));
    let qnbd_sock = dir.join("qemu-nbd.sock");
    let start_qemu_nbd = {
        let (dir, sock) = (dir.to_owned(), qnbd_sock.clone());
        move || {
            Killed(
                Command::new("qemu-nbd")
                    .current_dir(&dir)
                    .arg("-k")
                    .arg(&sock)
                    .args(["-f", "qcow2", "-x", "exp", "--persistent", "remote.qcow2"])
                    .spawn()
                    .expect("qemu-nbd"),
            )
        }
    };
    let qemu_nbd = start_qemu_nbd();
    wait_for_path(&qnbd_sock);
    let mut c = d.client();
    let bad = json!({"driver": "nbd", "node-name": "bad",
                     "server": {"type": "unix", "path": qnbd_sock}, "export": "nope"});
    let e = c.cmd("blockdev-add", bad);
    assert!(
        e["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("'nope'")),
        "{e}"
    );
    let ours = d.path("ours.sock");
    through_our_client(
        &mut c,
        json!({"type": "unix", "path": qnbd_sock}),
        "exp",
        &ours,
    );
    let target = uri(&ours, "remote");
    qemu_io(
        &target,
        &[
            "read -P 0x44 0 1M",
            "write -P 0x55 1M 64k",
            "write -z 2M 64k",
            "read -P 0x55 1M 64k",
        ],
    );
    // Block status passes through: qemu-nbd's allocation map, seen via our export.
    let map = run(Command::new("nbdinfo").args(["--map", &target]));
    assert!(
        map.lines().next().is_some_and(|l| l.contains("data")),
        "{map}"
    );
    // The server goes away and comes back within reconnect-delay: requests wait and succeed.
    drop(qemu_nbd);
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        start_qemu_nbd()
    });
    qemu_io(&target, &["read -P 0x55 1M 64k", "write -P 0x56 3M 4k"]);
    let qemu_nbd = restart.join().expect("restart");
    // qemu-io has exited, but the server may not have seen its connection close yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.cmd("block-export-del", json!({"id": "x"}));
        if r == json!({"return": {}}) {
            break;
        }
        assert!(
            r["error"]["desc"] == "export 'x' still in use" && std::time::Instant::now() < deadline,
            "{r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        c.cmd("blockdev-del", json!({"node-name": "remote"})),
        json!({"return": {}})
    );
    assert_eq!(c.cmd("nbd-server-stop", json!({})), json!({"return": {}}));
    drop(qemu_nbd);
    run(Command::new("qemu-io").current_dir(dir).args([
        "-c",
        "read -P 0x44 0 1M",
        "-c",
        "read -P 0x55 1M 64k",
        "-c",
        "read -P 0x56 3M 4k",
        "remote.qcow2",
    ]));

    // qemu-storage-daemon as the server, over TCP.
    qemu_img(&["create", "-f", "raw", "qsd.raw", "4M"], dir);
    run(Command::new("qemu-io").current_dir(dir).args([
        "-f",
        "raw",
        "-c",
        "write -P 0x66 0 4M",
        "qsd.raw",
    ]));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let qsd = Killed(
        Command::new("qemu-storage-daemon")
            .current_dir(dir)
            .args([
                "--blockdev",
                "driver=file,filename=qsd.raw,node-name=q",
                "--nbd-server",
                &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
                "--export",
                "type=nbd,id=q,node-name=q,writable=on",
            ])
            .spawn()
            .expect("qemu-storage-daemon"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "qsd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    through_our_client(
        &mut c,
        json!({"type": "inet", "host": "127.0.0.1", "port": port.to_string()}),
        "q",
        &ours,
    );
    qemu_io(
        &target,
        &[
            "read -P 0x66 0 4M",
            "write -P 0x77 1M 4k",
            "read -P 0x77 1M 4k",
        ],
    );
    let mut d = d;
    assert_eq!(c.cmd("quit", json!({})), json!({"return": {}}));
    assert!(d.wait().success());
    drop(qsd);
    run(Command::new("qemu-io").current_dir(d.dir.path()).args([
        "-f",
        "raw",
        "-c",
        "read -P 0x77 1M 4k",
        "-c",
        "read -P 0x66 0 1M",
        "qsd.raw",
    ]));
}

/// Guest writes of 4 KiB into fresh clusters of a qcow2 export, and into an image with
/// preallocated metadata: the client's maps, the image's size and allocation, and what
/// `qemu-img check` says match qemu-storage-daemon's (QEMU zeroes a new cluster on the host
/// before it writes part of it, and asks the file about zeroes only for preallocated metadata).
fn fresh_cluster_writes(program: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_img(&["create", "-f", "qcow2", "a.qcow2", "4M"], dir.path());
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "p.qcow2",
            "4M",
        ],
        dir.path(),
    );
    let d = Daemon::start(program, &[], dir);
    let mut c = d.client();
    let sock = d.path("nbd.sock");
    c.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.display().to_string()}}}),
    );
    let mut out = Vec::new();
    for name in ["a", "p"] {
        let file = format!("{name}.qcow2");
        c.cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": name,
                   "file": {"driver": "file", "filename": file}}),
        );
        c.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": name, "node-name": name, "writable": true}),
        );
        let target = uri(&sock, name);
        qemu_io(&target, &["write -P 1 0 4k", "write -P 2 200k 4k"]);
        let map = run(Command::new("nbdinfo").arg("--map").arg(&target));
        out.push(format!("{name} map: {map}"));
    }
    c.cmd("quit", json!({}));
    let mut d = d;
    d.wait();
    for name in ["a", "p"] {
        let path = d.path(&format!("{name}.qcow2"));
        let md = std::fs::metadata(&path).expect("stat");
        use std::os::unix::fs::MetadataExt;
        out.push(format!("{name} size {} blocks {}", md.len(), md.blocks()));
        let check = Command::new("qemu-img")
            .arg("check")
            .arg(&path)
            .output()
            .expect("check");
        out.push(format!(
            "{name} check: {}",
            String::from_utf8_lossy(&check.stdout)
        ));
    }
    out
}

#[test]
fn writes_into_fresh_clusters_leave_the_image_qemu_storage_daemon_leaves() {
    common::assert_same_as_qsd(fresh_cluster_writes);
}
