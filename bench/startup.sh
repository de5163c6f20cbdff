#!/usr/bin/env bash
# Start-up time and idle memory of blockjobd vs qemu-storage-daemon, same command line:
# a QMP socket and two blockdevs (a qcow2 over a file, and a raw file).
#   bench/startup.sh [RUNS=11]
# Start-up time: from exec until the daemon answers query-version over QMP (greeting and
# negotiation included). Idle memory: VmRSS and Pss (from /proc/PID/smaps_rollup) one second
# after that answer. Medians of RUNS runs; ratios are qsd / blockjobd (above 1: we are better).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-11}"
cargo build --release --bin blockjobd >/dev/null 2>&1
ours="$PWD/target/release/blockjobd"
work=$(mktemp -d /var/tmp/bjstart.XXXX)
trap 'rm -rf "$work"' EXIT
qemu-img create -f qcow2 "$work/disk.qcow2" 10G >/dev/null
qemu-img create -f raw "$work/data.raw" 1G >/dev/null

python3 - "$runs" "$work" "$ours" <<'PY'
import os, socket, statistics, subprocess, sys, time

runs, work, ours = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def measure(program):
    sock = os.path.join(work, "q.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    args = [program,
            "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
            "--monitor", "chardev=m",
            "--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={work}/disk.qcow2",
            "--blockdev", f"driver=raw,node-name=data,file.driver=file,file.filename={work}/data.raw"]
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    s = None
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            break
        except OSError:
            s.close()
            time.sleep(0.0005)
    f = s.makefile("rwb", buffering=0)
    f.readline()
    s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-version"}')
    f.readline(); f.readline()
    elapsed = time.perf_counter() - t0
    time.sleep(1.0)
    rss = pss = 0
    with open(f"/proc/{p.pid}/status") as st:
        for line in st:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{p.pid}/smaps_rollup") as sm:
        for line in sm:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    s.sendall(b'{"execute":"quit"}')
    f.readline()
    p.wait(timeout=20)
    return elapsed * 1000, rss, pss

results = {}
for name, prog in (("blockjobd", ours), ("qemu-storage-daemon", "qemu-storage-daemon")):
    samples = [measure(prog) for _ in range(runs)]
    results[name] = tuple(statistics.median(s[i] for s in samples) for i in range(3))

print(f"{'':22} {'start-up ms':>12} {'RSS KiB':>10} {'PSS KiB':>10}   (medians of {runs})")
for name, (ms, rss, pss) in results.items():
    print(f"{name:22} {ms:12.1f} {rss:10.0f} {pss:10.0f}")
o, q = results["blockjobd"], results["qemu-storage-daemon"]
print(f"{'ratio qsd/blockjobd':22} {q[0]/o[0]:11.2f}x {q[1]/o[1]:9.2f}x {q[2]/o[2]:9.2f}x")
PY
