#!/usr/bin/env python3
"""NBD export benchmark: the same export served by blockjobd and qemu-storage-daemon.

fio's nbd engine drives each server in turn (each workload on both back to back, in
alternating order, several runs) with:
  4 KiB random writes and reads at queue depth 16 (IOPS, mean/p50/p99 completion latency),
  1 MiB sequential reads and writes at queue depth 4 (throughput).
Prints medians and their ratios (> 1.0 means blockjobd is better), and the quartiles of the
ratios of the runs measured side by side, as a measure of the host's noise.

The host page cache decides what a 4 KiB buffered write costs the kernel. After a sequential
fill or a sequential read, the image sits in the cache as large folios (up to 2 MiB on Linux
6.x ext4), and every small write walks all the blocks of its folio under the inode lock:
about 45 us a write here, for both servers. With --page-cache drop, the image's cache is
dropped before each workload (fio's own default, invalidate=1, for files), and writes land in
small folios. For a raw image the bench also measures the kernel's ceiling in the same state:
one thread doing nothing but pwrite() on the image, 4 KiB at random offsets.

Usage: bench/nbd.py [--runs N] [--seconds S] [--size-mib M] [--format raw|qcow2]
                    [--page-cache keep|drop]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = [
    ("4k randwrite qd16", "randwrite", "4k", 16),
    ("4k randread qd16", "randread", "4k", 16),
    ("1M write qd4", "write", "1M", 4),
    ("1M read qd4", "read", "1M", 4),
]


def start(program, image, fmt, sock):
    if os.path.exists(sock):
        os.unlink(sock)
    node = "disk"
    args = [program,
            "--blockdev", f"driver=file,filename={image},node-name=file0",
            "--blockdev", f"driver={fmt},file=file0,node-name={node}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=e,node-name={node},writable=on"]
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not os.path.exists(sock):
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit(f"{program} did not start")
        time.sleep(0.01)
    time.sleep(0.1)
    return p


def settle(image, page_cache):
    # Dirty pages left by the previous workload (or the image fill) would otherwise be
    # written back during this one and charged to whichever server runs now.
    os.sync()
    if page_cache == "drop":
        fd = os.open(image, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fio_json(args):
    out = subprocess.run(["fio", "--output-format=json"] + args,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


def fio(sock, rw, bs, depth, seconds, size):
    job = fio_json(["--name=bench", "--ioengine=nbd",
                    f"--uri=nbd+unix:///disk?socket={sock}", f"--rw={rw}", f"--bs={bs}",
                    f"--iodepth={depth}", f"--runtime={seconds}", "--time_based",
                    f"--size={size}"])
    d = job["write" if "write" in rw else "read"]
    pct = d["clat_ns"]["percentile"]
    return {"iops": d["iops"], "mbps": d["bw_bytes"] / 1e6,
            "mean": d["clat_ns"]["mean"] / 1000,
            "p50": pct["50.000000"] / 1000, "p99": pct["99.000000"] / 1000}


def ceiling(image, seconds, size):
    """4 KiB random-write IOPS of one thread calling pwrite() on the raw image itself."""
    job = fio_json(["--name=ceiling", f"--filename={image}", "--ioengine=psync",
                    "--invalidate=0", "--rw=randwrite", "--bs=4k", f"--runtime={seconds}",
                    "--time_based", f"--size={size}"])
    return job["write"]["iops"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--format", default="raw", choices=["raw", "qcow2"])
    ap.add_argument("--page-cache", default="keep", choices=["keep", "drop"],
                    help="drop the image's page cache before each workload (default: keep)")
    a = ap.parse_args()
    ours = os.path.join(ROOT, "target", "release", "blockjobd")
    if not os.path.exists(ours):
        subprocess.run(["cargo", "build", "--release", "--bin", "blockjobd"], cwd=ROOT, check=True)
    for tool in ("fio", "qemu-storage-daemon", "qemu-img"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt-get install -y fio qemu-utils)")
    servers = [("blockjobd", ours), ("qsd", "qemu-storage-daemon")]
    results = {s: {w[0]: [] for w in WORKLOADS} for s, _ in servers}
    ceilings = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        image = os.path.join(d, f"disk.{a.format}")
        size = f"{a.size_mib}M"
        if a.format == "raw":
            subprocess.run(["qemu-img", "create", "-f", "raw", image, size], check=True,
                           capture_output=True)
        else:
            subprocess.run(["qemu-img", "create", "-f", "qcow2", image, size], check=True,
                           capture_output=True)
        # Fully allocate it, so reads and writes hit real data on both servers.
        subprocess.run(["qemu-io", "-f", a.format, "-c", f"write -P 0x5a 0 {size}", image],
                       check=True, capture_output=True)
        sock = os.path.join(d, "nbd.sock")
        for run in range(a.runs):
            if a.format == "raw":
                settle(image, a.page_cache)
                ceilings.append(ceiling(image, a.seconds, size))
            # The two servers take each workload back to back, each from a fresh start, in
            # alternating order: the host's noise drifts over minutes, and a workload measured
            # on both within seconds is compared under nearly the same conditions.
            for i, (label, rw, bs, depth) in enumerate(WORKLOADS):
                order = servers if (run + i) % 2 == 0 else servers[::-1]
                for name, program in order:
                    p = start(program, image, a.format, sock)
                    try:
                        settle(image, a.page_cache)
                        results[name][label].append(fio(sock, rw, bs, depth, a.seconds, size))
                    finally:
                        p.terminate()
                        p.wait()
            print(f"run {run + 1}/{a.runs} done", file=sys.stderr)

    def med(name, label, key):
        return statistics.median(r[key] for r in results[name][label])

    def ratio(o, q, higher):
        return (o / q if higher else q / o) if o and q else float("nan")

    def spread(label, key, higher):
        """The quartiles of the ratios of the runs measured side by side."""
        pairs = [ratio(o[key], q[key], higher)
                 for o, q in zip(results["blockjobd"][label], results["qsd"][label])]
        if len(pairs) < 2:
            return ""
        q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
        return f"{q1:.2f}-{q3:.2f}"

    print(f"NBD export of a {a.size_mib} MiB {a.format} image over a unix socket, fio nbd engine, "
          f"{a.seconds}s per workload, medians of {a.runs} runs, page cache {a.page_cache}")
    print(f"{'workload':20} {'metric':8} {'blockjobd':>11} {'qsd':>11} {'ratio':>7} "
          f"{'pairs q1-q3':>12}")
    for label, rw, bs, depth in WORKLOADS:
        metrics = [("IOPS", "iops", True), ("mean us", "mean", False), ("p50 us", "p50", False),
                   ("p99 us", "p99", False)] \
            if bs == "4k" else [("MB/s", "mbps", True)]
        for mname, key, higher in metrics:
            o, q = med("blockjobd", label, key), med("qsd", label, key)
            print(f"{label:20} {mname:8} {o:11.1f} {q:11.1f} {ratio(o, q, higher):6.2f}x "
                  f"{spread(label, key, higher):>12}")
    if ceilings:
        c = statistics.median(ceilings)
        print(f"kernel ceiling: one thread's 4k random pwrite() on the image, {c:.0f} IOPS; "
              f"at qd16 a server that serves writes in arrival order cannot reach a p50 much "
              f"below 16 / {c:.0f} = {16e6 / c:.0f} us")


if __name__ == "__main__":
    main()
