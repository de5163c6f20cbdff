#!/usr/bin/env python3
"""What a live backup costs the guest: blockjobd vs qemu-storage-daemon, measured alike.

Each server exports a raw disk over NBD (cache.direct=on by default, as VMs run disks) and
fio's nbd engine plays the guest, in three phases per server and run:
  idle    no job;
  backup  a throttled full blockdev-backup into a raw target runs the whole time;
  cbw     a sync=none backup: only the copy-before-write filter works (fleecing's cost).
Two guests per phase: 4 KiB random writes at a fixed 2,000/s (p50/p99 latency), and at queue
depth 16 unthrottled (IOPS), each during a job of its own (--shared-job: one job for both, so
the deep guest finds the clusters the fixed-rate one copied). Servers alternate order run by run; the report gives medians,
the ratio of medians (> 1.0: blockjobd better) and the quartiles of the per-run ratios.

Usage: bench/backup.py [--runs N] [--seconds S] [--size-mib M] [--speed-mib B]
                       [--direct on|off] [--max-workers W] [--max-chunk-kib K]
                       [--guest-latency-budget-us U] [--shared-job] [--blockjobd PATH]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import qmpbench  # bench/, next to this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fio(sock, seconds, size, rate, depth):
    args = ["fio", "--output-format=json", "--name=guest", "--ioengine=nbd",
            f"--uri=nbd+unix:///disk?socket={sock}", "--rw=randwrite", "--bs=4k",
            f"--iodepth={depth}", f"--runtime={seconds}", "--time_based", f"--size={size}"]
    if rate:
        args.append(f"--rate_iops={rate}")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    w = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    pct = w["clat_ns"]["percentile"]
    return {"iops": w["iops"], "p50": pct["50.000000"] / 1000, "p99": pct["99.000000"] / 1000}


def phase(q, sock, kind, a, size, ours):
    """One phase: the fixed-rate guest, then the queue-depth-16 guest; each in a job of its
    own unless --shared-job (then the deep guest finds what the fixed-rate one left)."""
    if a.shared_job:
        return measure(q, sock, kind, a, size, ours, [(2000, 8), (0, 16)])
    return measure(q, sock, kind, a, size, ours, [(2000, 8)]) | \
        measure(q, sock, kind, a, size, ours, [(0, 16)])


def measure(q, sock, kind, a, size, ours, guests):
    if kind != "idle":
        sync = "full" if kind == "backup" else "none"
        perf = {}
        if a.max_workers:
            perf["max-workers"] = a.max_workers
        if a.max_chunk_kib:
            perf["max-chunk"] = a.max_chunk_kib << 10
        if a.guest_latency_budget_us and ours:
            perf["guest-latency-budget"] = a.guest_latency_budget_us
        args = {"job-id": "b", "device": "disk", "target": "tgt", "sync": sync,
                "speed": a.speed_mib << 20}
        if perf:
            args["x-perf"] = perf
        q.cmd("blockdev-backup", **args)
    out = {}
    try:
        for rate, depth in guests:
            r = fio(sock, a.seconds, size, rate, depth)
            if rate:
                out |= {"p50": r["p50"], "p99": r["p99"]}
            else:
                out["iops"] = r["iops"]
    finally:
        if kind != "idle":
            # Guest writes copy through the filter unthrottled: a full backup may be done.
            if any(j["id"] == "b" for j in q.cmd("query-jobs")):
                q.cmd("job-cancel", id="b")
            q.wait_gone("b")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--speed-mib", type=int, default=64,
                    help="speed limit of the full backup, MiB/s (default 64)")
    ap.add_argument("--direct", default="on", choices=["on", "off"])
    ap.add_argument("--max-workers", type=int, default=0, help="backup x-perf.max-workers")
    ap.add_argument("--max-chunk-kib", type=int, default=0, help="backup x-perf.max-chunk, KiB")
    ap.add_argument("--guest-latency-budget-us", type=int, default=0,
                    help="blockjobd's x-perf.guest-latency-budget, microseconds (qsd has none)")
    ap.add_argument("--blockjobd", default=os.path.join(ROOT, "target", "release", "blockjobd"),
                    help="the blockjobd binary to measure (default: this tree's release build)")
    ap.add_argument("--shared-job", action="store_true",
                    help="run the fixed-rate and the queue-depth-16 guest in one job per phase "
                         "(default: a fresh job for each)")
    a = ap.parse_args()
    ours = a.blockjobd
    for tool in ("fio", "qemu-storage-daemon", "qemu-img"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt-get install -y fio qemu-utils)")
    servers = [("blockjobd", ours), ("qsd", "qemu-storage-daemon")]
    phases = ["idle", "backup", "cbw"]
    res = {s: {p: [] for p in phases} for s, _ in servers}
    size = f"{a.size_mib}M"
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        disk = os.path.join(d, "disk.raw")
        subprocess.run(["qemu-img", "create", "-f", "raw", disk, size], check=True,
                       capture_output=True)
        fill = []
        for off in range(0, a.size_mib, 256):
            fill += ["-c", f"write -P 0x5a {off}M {min(256, a.size_mib - off)}M"]
        subprocess.run(["qemu-io", "-f", "raw"] + fill + [disk], check=True, capture_output=True)
        subprocess.run(["qemu-img", "create", "-f", "raw", os.path.join(d, "target.raw"), size],
                       check=True, capture_output=True)
        for run in range(a.runs):
            order = servers if run % 2 == 0 else servers[::-1]
            for name, program in order:
                os.sync()
                p, q, sock = qmpbench.start(program, d, a.direct == "on")
                try:
                    for ph in phases:
                        res[name][ph].append(phase(q, sock, ph, a, size, name == "blockjobd"))
                finally:
                    p.terminate()
                    p.wait()
            print(f"run {run + 1}/{a.runs} done", file=sys.stderr)

    def med(s, ph, k):
        return statistics.median(r[k] for r in res[s][ph])

    def spread(ph, k, higher):
        pairs = [(o[k] / q[k] if higher else q[k] / o[k]) if o[k] and q[k] else float("nan")
                 for o, q in zip(res["blockjobd"][ph], res["qsd"][ph])]
        if len(pairs) < 2:
            return ""
        q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
        return f"{q1:.2f}-{q3:.2f}"

    print(f"guest: 4 KiB random writes over NBD to a {a.size_mib} MiB raw disk, "
          f"cache.direct={a.direct}, {a.seconds}s per measurement, medians of {a.runs} runs; "
          f"backup: full, {a.speed_mib} MiB/s; cbw: sync=none; "
          f"{'one job per phase' if a.shared_job else 'one job per measurement'}")
    print(f"{'phase':8} {'metric':16} {'blockjobd':>10} {'qsd':>10} {'ratio':>7} {'pairs q1-q3':>12}")
    for ph in phases:
        for label, k, higher in [("p50 us @2000/s", "p50", False),
                                 ("p99 us @2000/s", "p99", False),
                                 ("IOPS @qd16", "iops", True)]:
            o, qv = med("blockjobd", ph, k), med("qsd", ph, k)
            r = (o / qv if higher else qv / o) if o and qv else float("nan")
            print(f"{ph:8} {label:16} {o:10.1f} {qv:10.1f} {r:6.2f}x {spread(ph, k, higher):>12}")
    for s, _ in servers:
        idle99, b99 = med(s, "idle", "p99"), med(s, "backup", "p99")
        idle_iops, b_iops = med(s, "idle", "iops"), med(s, "backup", "iops")
        print(f"{s}: during the backup p99 x{b99 / idle99:.1f} of idle, "
              f"IOPS at qd16 {100 * b_iops / idle_iops:.0f}% of idle")


if __name__ == "__main__":
    main()
