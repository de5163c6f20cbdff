#!/usr/bin/env python3
"""How fast a full backup copies, and what it costs in memory: blockjobd vs qemu-storage-daemon.

For each target format (raw, qcow2) and each max-workers value, each server (freshly started,
alternating order run by run) runs an unthrottled full blockdev-backup of the same raw disk
(written through, no holes) into a fresh target, and the time from the command to
BLOCK_JOB_COMPLETED gives MiB/s. The daemon's peak RSS (VmHWM) over the run is recorded too.
`qemu-img convert -t writeback` of the same disk into the same format is the disk's ceiling.
Then an incremental: a full backup with a new bitmap, 1 % of the disk rewritten in 64 KiB
pieces through the NBD export, and a sync=incremental backup into a qcow2, timed the same way.

Usage: bench/backup_speed.py [--runs N] [--size-mib M] [--direct on|off]
                             [--workers 1,16,64] [--formats raw,qcow2] [--use-copy-range]
"""
import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import qmpbench  # bench/, next to this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fresh_target(d, fmt, size):
    path = os.path.join(d, "target.img")
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["qemu-img", "create", "-f", fmt, path, size], check=True,
                   capture_output=True)


def full_backup(program, d, a, fmt, workers, size):
    fresh_target(d, fmt, size)
    os.sync()
    p, q, _ = qmpbench.start(program, d, a.direct == "on", fmt, "target.img", subprocess.DEVNULL)
    try:
        t0 = time.time()
        q.cmd("blockdev-backup", **{"job-id": "b", "device": "disk", "target": "tgt",
                                    "sync": "full",
                                    "x-perf": {"max-workers": workers,
                                               "use-copy-range": a.use_copy_range}})
        q.wait_event("BLOCK_JOB_COMPLETED", "b")
        secs = time.time() - t0
        return a.size_mib / secs, peak_rss_mib(p.pid)
    finally:
        p.terminate()
        p.wait()


def incremental(program, d, a, size):
    fresh_target(d, "qcow2", size)
    p, q, sock = qmpbench.start(program, d, a.direct == "on", "qcow2", "target.img",
                                subprocess.DEVNULL)
    try:
        q.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "bm"}},
            {"type": "blockdev-backup", "data": {"job-id": "f", "device": "disk",
                                                 "target": "tgt", "sync": "full"}}])
        t0 = time.time()
        q.wait_event("BLOCK_JOB_COMPLETED", "f")
        full = time.time() - t0
        # 1 % of the disk, in 64 KiB pieces at random places.
        pieces = max(1, (a.size_mib << 20) // 100 // 65536)
        rnd = random.Random(7)
        cmds = []
        for _ in range(pieces):
            off = rnd.randrange((a.size_mib << 20) // 65536) * 65536
            cmds += ["-c", f"write -P 0x77 {off} 64k"]
        subprocess.run(["qemu-io", "-f", "raw", f"nbd+unix:///disk?socket={sock}"] + cmds,
                       check=True, capture_output=True)
        inc = os.path.join(d, "inc.qcow2")
        if os.path.exists(inc):
            os.unlink(inc)
        subprocess.run(["qemu-img", "create", "-f", "qcow2", inc, size], check=True,
                       capture_output=True)
        q.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "inc",
                                 "file": {"driver": "file", "filename": inc}})
        t0 = time.time()
        q.cmd("blockdev-backup", **{"job-id": "i", "device": "disk", "target": "inc",
                                    "sync": "incremental", "bitmap": "bm"})
        q.wait_event("BLOCK_JOB_COMPLETED", "i")
        return full, time.time() - t0
    finally:
        p.terminate()
        p.wait()


def convert(d, fmt):
    out = os.path.join(d, "convert.img")
    if os.path.exists(out):
        os.unlink(out)
    os.sync()
    t0 = time.time()
    subprocess.run(["qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", fmt,
                    os.path.join(d, "disk.raw"), out], check=True, capture_output=True)
    subprocess.run(["sync", out], check=True)
    return time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--direct", default="on", choices=["on", "off"])
    ap.add_argument("--workers", default="1,16,64")
    ap.add_argument("--formats", default="raw,qcow2")
    ap.add_argument("--use-copy-range", action="store_true",
                    help="x-perf.use-copy-range for both daemons (copy_file_range where it can)")
    a = ap.parse_args()
    ours = os.path.join(ROOT, "target", "release", "blockjobd")
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt-get install -y qemu-utils)")
    servers = [("blockjobd", ours), ("qsd", "qemu-storage-daemon")]
    workers = [int(w) for w in a.workers.split(",")]
    formats = a.formats.split(",")
    size = f"{a.size_mib}M"
    speed = {(s, f, w): [] for s, _ in servers for f in formats for w in workers}
    rss = {(s, f, w): [] for s, _ in servers for f in formats for w in workers}
    conv = {f: [] for f in formats}
    incs = {s: [] for s, _ in servers}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        disk = os.path.join(d, "disk.raw")
        subprocess.run(["qemu-img", "create", "-f", "raw", disk, size], check=True,
                       capture_output=True)
        fill = []
        for off in range(0, a.size_mib, 256):
            fill += ["-c", f"write -P 0x5a {off}M {min(256, a.size_mib - off)}M"]
        subprocess.run(["qemu-io", "-f", "raw"] + fill + [disk], check=True, capture_output=True)
        for run in range(a.runs):
            order = servers if run % 2 == 0 else servers[::-1]
            for f in formats:
                conv[f].append(a.size_mib / convert(d, f))
                for w in workers:
                    for name, program in order:
                        mib_s, peak = full_backup(program, d, a, f, w, size)
                        speed[(name, f, w)].append(mib_s)
                        rss[(name, f, w)].append(peak)
            for name, program in order:
                incs[name].append(incremental(program, d, a, size))
            print(f"run {run + 1}/{a.runs} done", file=sys.stderr)

    med = statistics.median
    print(f"full backup of a {a.size_mib} MiB raw disk, cache.direct={a.direct}, "
          f"medians of {a.runs} runs (MiB/s; ratio > 1: blockjobd better)")
    print(f"{'target':7} {'workers':>7} {'blockjobd':>10} {'qsd':>8} {'ratio':>6} "
          f"{'vs convert':>10} {'RSS MiB ours':>12} {'qsd':>6}")
    for f in formats:
        for w in workers:
            o, q = med(speed[("blockjobd", f, w)]), med(speed[("qsd", f, w)])
            ro, rq = med(rss[("blockjobd", f, w)]), med(rss[("qsd", f, w)])
            print(f"{f:7} {w:7d} {o:10.0f} {q:8.0f} {o / q:5.2f}x {o / med(conv[f]):9.0%} "
                  f"{ro:12.1f} {rq:6.1f}")
        print(f"{f:7} {'convert':>7} {med(conv[f]):10.0f}  (qemu-img convert -t writeback)")
    for name, _ in servers:
        full = med(x[0] for x in incs[name])
        inc = med(x[1] for x in incs[name])
        print(f"{name}: incremental after 1% rewritten: {inc:.2f}s, "
              f"{100 * inc / full:.1f}% of its full backup ({full:.2f}s)")


if __name__ == "__main__":
    main()
