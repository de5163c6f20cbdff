//! Starting a daemon (ours or qemu-storage-daemon) and talking raw QMP to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Path of the blockjobd binary under test.
pub fn blockjobd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockjobd"))
}

/// A running daemon with one QMP socket.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `program` with a monitor socket plus `extra` options, in a fresh directory
    /// (the working directory, so relative file names work).
    pub fn start(program: &Path, extra: &[String], dir: tempfile::TempDir) -> Daemon {
        Daemon::start_with_env(program, extra, dir, &[])
    }

    /// [`Daemon::start`] with `env` added to the daemon's environment.
    pub fn start_with_env(
        program: &Path,
        extra: &[String],
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
    ) -> Daemon {
        let socket = dir.path().join("qmp.sock");
        let mut args = vec![
            "--chardev".to_owned(),
            format!("socket,id=m0,path={},server=on,wait=off", socket.display()),
            "--monitor".to_owned(),
            "chardev=m0".to_owned(),
        ];
        args.extend_from_slice(extra);
        let child = Command::new(program)
            .args(&args)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        let d = Daemon { child, socket, dir };
        d.wait_for_socket();
        d
    }

    /// Starts blockjobd in a new temporary directory.
    pub fn ours(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        Daemon::start(&blockjobd(), &extra, dir)
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "daemon did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // qemu-storage-daemon can hang when a client connects the instant the socket
        // appears; give it a moment.
        std::thread::sleep(Duration::from_millis(50));
    }

    /// A negotiated client.
    pub fn client(&self) -> Client {
        let mut c = Client::connect(&self.socket);
        c.greeting();
        let r = c.cmd("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}));
        c
    }

    /// Waits for the process to end (at most 20 s).
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(pid, sig) };
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw QMP connection.
pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    /// Reads one message (one line, or several in pretty mode); `None` at EOF.
    pub fn read(&mut self) -> Option<Value> {
        let mut text = String::new();
        loop {
            let n = self.reader.read_line(&mut text).expect("read line");
            if n == 0 {
                assert!(text.trim().is_empty(), "EOF inside a message: {text:?}");
                return None;
            }
            if let Ok(v) = serde_json::from_str(&text) {
                return Some(v);
            }
        }
    }

    /// Reads one message if one comes within `wait`.
    pub fn read_within(&mut self, wait: Duration) -> Option<Value> {
        self.stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut text = String::new();
        let got = loop {
            match self.reader.read_line(&mut text) {
                Ok(0) | Err(_) => break None,
                Ok(_) => {
                    if let Ok(v) = serde_json::from_str(&text) {
                        break Some(v);
                    }
                }
            }
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        got
    }

    /// Reads the next reply, skipping events.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.read().expect("connection closed before the reply");
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    pub fn greeting(&mut self) -> Value {
        let g = self.read().expect("greeting");
        assert!(g.get("QMP").is_some(), "greeting: {g}");
        g
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn send(&mut self, v: &Value) {
        let mut s = serde_json::to_vec(v).expect("json");
        s.push(b'\n');
        self.send_raw(&s);
    }

    /// Sends a command without waiting for its reply.
    pub fn execute(&mut self, name: &str, args: Value) {
        self.send(&json!({"execute": name, "arguments": args}));
    }

    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.execute(name, args);
        self.reply()
    }

    /// The error class of a reply, or "return".
    pub fn kind(reply: &Value) -> String {
        match reply.get("error") {
            Some(e) => e["class"].as_str().unwrap_or("?").to_owned(),
            None => "return".to_owned(),
        }
    }
}

/// Creates an image with qemu-img.
pub fn qemu_img(args: &[&str], dir: &Path) {
    let st = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img {args:?}");
}

/// `qemu-img check` output and success.
pub fn qemu_img_check(path: &Path) -> (bool, String) {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(path)
        .output()
        .expect("qemu-img check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// JSON with object members sorted, so that member order does not matter.
pub fn canon(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let sorted: std::collections::BTreeMap<&String, String> =
                m.iter().map(|(k, v)| (k, canon(v))).collect();
            let parts: Vec<String> = sorted
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::String((*k).clone())))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canon).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// Runs `scenario` on blockjobd and on qemu-storage-daemon and asserts the transcripts match.
pub fn assert_same_as_qsd(scenario: impl Fn(&Path) -> Vec<String>) {
    let ours = scenario(&blockjobd());
    let theirs = scenario(Path::new("qemu-storage-daemon"));
    assert_same_transcript(&ours, &theirs);
}

/// Asserts two transcripts (ours, qemu-storage-daemon's) are the same, showing the lines that
/// differ and both transcripts when they are not.
pub fn assert_same_transcript(ours: &[String], theirs: &[String]) {
    let diff: Vec<String> = ours
        .iter()
        .zip(theirs.iter())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("ours: {a}\nqsd:  {b}"))
        .collect();
    assert!(
        diff.is_empty() && ours.len() == theirs.len(),
        "\n{}\n\nqsd transcript:\n{}\n\nours:\n{}",
        diff.join("\n\n"),
        theirs.join("\n"),
        ours.join("\n")
    );
}

/// A helper process (an NBD server) killed and reaped when the test lets go of it.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
