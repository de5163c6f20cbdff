//! The `blockjob` tool against QEMU's: `map --json` prints what `qemu-img map --output=json`
//! prints, `copy` produces images QEMU agrees with, `bench` behaves like `qemu-img bench`.

use std::path::Path;
use std::process::Command;

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().expect("runnable");
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn bj(args: &[&str]) -> String {
    run(env!("CARGO_BIN_EXE_blockjob"), args)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

#[test]
fn map_equals_qemu_img_map() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&d("b.qcow2")), "4M"],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 2 0 128k",
            "-c",
            "write -z 1M 64k",
            s(&d("b.qcow2")),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&d("t.qcow2")),
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 3 64k 64k",
            "-c",
            "write -z 2M 64k",
            s(&d("t.qcow2")),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            s(&d("p.qcow2")),
            "3M",
        ],
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            s(&d("t.qcow2")),
            s(&d("c.qcow2")),
        ],
    );
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", s(&d("r.raw")), "4M"],
    );
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 1M 64k", s(&d("r.raw"))],
    );
    for img in ["t.qcow2", "b.qcow2", "p.qcow2", "c.qcow2", "r.raw"] {
        let ours = bj(&["map", "--json", s(&d(img))]);
        let theirs = run("qemu-img", &["map", "--output=json", s(&d(img))]);
        assert_eq!(ours.trim(), theirs.trim(), "map of {img}");
    }
}

#[test]
fn copy_keeps_content_and_sparseness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&d("b.qcow2")), "16M"],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 7 0 3M",
            "-c",
            "write -P 8 10M 100k",
            s(&d("b.qcow2")),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&d("t.qcow2")),
        ],
    );
    run("qemu-io", &["-c", "write -P 9 1M 5000", s(&d("t.qcow2"))]);
    for (fmt, extra) in [("qcow2", None), ("raw", None), ("qcow2", Some("-c"))] {
        let (src, out) = (d("t.qcow2"), d("out.img"));
        let mut args = vec!["copy", "-O", fmt, s(&src), s(&out)];
        args.extend(extra);
        bj(&args);
        run(
            "qemu-img",
            &["compare", "-F", fmt, s(&d("t.qcow2")), s(&out)],
        );
        if fmt == "qcow2" {
            run("qemu-img", &["check", s(&out)]);
        }
        let info = bj(&["info", "--json", s(&out)]);
        let v: serde_json::Value = serde_json::from_str(&info).expect("json");
        assert_eq!(v["virtual-size"], 16 << 20);
        assert!(
            v["actual-size"].as_u64().expect("actual size") < 8 << 20,
            "copy stays sparse: {info}"
        );
    }
}

/// `blockjob bench` prints what `qemu-img bench` prints, writes where `qemu-img bench` writes
/// (offsets wrap at the end of the image) and leaves a clean image.
#[test]
fn bench_writes_like_qemu_img_bench() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    for img in [&ours, &theirs] {
        run("qemu-img", &["create", "-q", "-f", "qcow2", s(img), "8M"]);
    }
    let args = [
        "bench",
        "-w",
        "--pattern",
        "7",
        "-c",
        "40",
        "-d",
        "4",
        "-s",
        "6k",
        "-S",
        "3M",
    ];
    let ours_out = bj(&[&args[..], &[s(&ours)]].concat());
    let theirs_out = run("qemu-img", &[&args[..], &[s(&theirs)]].concat());
    let first = |t: &str| t.lines().next().unwrap_or_default().to_string();
    assert_eq!(first(&ours_out), first(&theirs_out));
    assert!(ours_out.contains("Run completed in "), "{ours_out}");
    let check = run("qemu-img", &["check", s(&ours)]);
    assert!(check.contains("No errors were found"), "{check}");
    let cmp = run("qemu-img", &["compare", s(&ours), s(&theirs)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

/// Bad bench options are refused with a message naming the problem.
#[test]
fn bench_refuses_bad_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("b.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let out = Command::new(env!("CARGO_BIN_EXE_blockjob"))
        .args(["bench", "-o", "2M", s(&img)])
        .output()
        .expect("runnable");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("past the end of the image"), "{err}");
}

#[test]
fn the_live_demo_verifies_both_backups() {
    let out = bj(&["demo", "--size", "32M"]);
    assert!(
        out.contains("verified: full.qcow2 equals the disk after write #")
            && out.contains("verified: inc.qcow2 (over full.qcow2) equals the disk after write #"),
        "{out}"
    );
}

#[test]
fn create_writes_the_bytes_qemu_img_create_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", s(&d("base.raw")), "8M"],
    );
    let cases: [(&[&str], &str); 11] = [
        (&[], "8M"),
        (&["-o", "cluster_size=512"], "8M"),
        (&["-o", "cluster_size=4k"], "8M"),
        (&["-o", "cluster_size=8k"], "8M"),
        (&[], "0"),
        (&[], "10G"),
        (&[], "1T"),
        (&["-o", "cluster_size=2M"], "64M"),
        (&["-o", "refcount_bits=64,lazy_refcounts=on"], "64M"),
        (&["-o", "compat=0.10"], "64M"),
        (&["-b", "base.raw", "-F", "raw"], "8M"),
    ];
    for (i, (opts, size)) in cases.iter().enumerate() {
        let (ours, theirs) = (d(&format!("o{i}.qcow2")), d(&format!("q{i}.qcow2")));
        let mut a = vec!["create", "-f", "qcow2"];
        a.extend_from_slice(opts);
        let mut b = a.clone();
        a.extend([s(&ours), size]);
        b.extend(["-q", s(&theirs), size]);
        let status = Command::new(env!("CARGO_BIN_EXE_blockjob"))
            .args(&a)
            .current_dir(dir.path())
            .output()
            .expect("blockjob");
        assert!(status.status.success(), "{a:?}: {status:?}");
        let status = Command::new("qemu-img")
            .args(&b)
            .current_dir(dir.path())
            .output()
            .expect("qemu-img");
        assert!(status.status.success(), "{b:?}: {status:?}");
        let (x, y) = (
            std::fs::read(&ours).expect("ours"),
            std::fs::read(&theirs).expect("qemu's"),
        );
        assert_eq!(x.len(), y.len(), "file length, {opts:?} {size}");
        assert!(x == y, "bytes differ, {opts:?} {size}");
    }
}
