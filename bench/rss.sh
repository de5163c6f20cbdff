#!/usr/bin/env bash
# Memory under NBD load, blockjobd vs qemu-storage-daemon: 16 fio clients (nbd engine) at
# queue depth 8, 4-128 KiB random reads and writes on one export of a 1 GiB raw disk, ROUNDS
# rounds of SECONDS each, with cache.direct=on and off. Prints each daemon's peak RSS (VmHWM)
# and its RSS 2.5 s after the load stops, and the MiB/s it served meanwhile.
# Usage: bench/rss.sh [SECONDS] [ROUNDS]     (defaults: 20 3)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-20}
ROUNDS=${2:-3}
command -v fio >/dev/null 2>&1 || { echo "fio is needed: apt-get install -y fio" >&2; exit 1; }
cargo build --release --bin blockjobd >&2
OURS=$PWD/target/release/blockjobd

measure() { # PROGRAM DIRECT
    local d pid peak after
    d=$(mktemp -d)
    truncate -s 1G "$d/disk.raw"
    "$1" --chardev "socket,id=m,path=$d/q.sock,server=on,wait=off" --monitor chardev=m \
        --blockdev "driver=file,filename=$d/disk.raw,node-name=f0,cache.direct=$2" \
        --blockdev driver=raw,file=f0,node-name=disk \
        --nbd-server "addr.type=unix,addr.path=$d/n.sock" \
        --export type=nbd,id=e,node-name=disk,writable=on >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 100); do [ -S "$d/n.sock" ] && break; sleep 0.05; done
    local kib=0 r
    for _ in $(seq "$ROUNDS"); do
        # terse output: fields 6 and 47 are KiB read and written (the group's line is last)
        r=$(fio --name=g --ioengine=nbd --uri="nbd+unix:///disk?socket=$d/n.sock" --rw=randrw \
            --bsrange=4k-128k --iodepth=8 --numjobs=16 --runtime="$SECS" --time_based \
            --size=1G --group_reporting --output-format=terse 2>/dev/null | tail -1 |
            awk -F';' '{print $6 + $47}')
        kib=$((kib + ${r:-0}))
    done
    sleep 2.5
    peak=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
    after=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$d"
    printf '%-22s cache.direct=%-3s peak %6d kB   idle after %6d kB   served %5d MiB/s\n' \
        "$(basename "$1")" "$2" "$peak" "$after" "$((kib / 1024 / (SECS * ROUNDS)))"
}

for direct in on off; do
    measure "$OURS" "$direct"
    measure qemu-storage-daemon "$direct"
done
