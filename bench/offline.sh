#!/usr/bin/env bash
# Offline performance, blockjob vs QEMU's tools on the same files in one run. Medians of RUNS
# runs; ratio > 1 means blockjob is faster.
#
#  1. `blockjob copy` vs `qemu-img convert`, both -m 8 and both flushing at the end
#     (qemu-img -t writeback: its default, cache=unsafe, never flushes), for raw->raw,
#     raw->qcow2 and qcow2->qcow2 of a SIZE_MIB image with a fifth of it zero. The page cache is
#     dropped before each run when we are root.
#  2. `blockjob bench` vs `qemu-img bench`: 4 KiB writes, 16 in flight, COUNT requests spread
#     over a 4 GiB qcow2 (step 997 * 4 KiB, so consecutive writes land in different clusters):
#     once on a fresh image (every write allocates) and once on a fully allocated one.
#
#   bench/offline.sh [SIZE_MIB=2048] [RUNS=5] [COUNT=200000]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-2048}
RUNS=${2:-5}
COUNT=${3:-200000}
cargo build --release --bin blockjob >/dev/null 2>&1
BJ=$PWD/target/release/blockjob
W=$(mktemp -d /var/tmp/bjbench.XXXX)
trap 'rm -rf "$W"' EXIT

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# Source: SIZE_MIB raw, four fifths random data, one fifth zero (every fifth MiB).
python3 - "$W/src.raw" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.truncate(mib << 20)
    blk = os.urandom(1 << 20)
    for i in range(mib):
        if i % 5 != 4:
            f.seek(i << 20); f.write(blk[i % 7:] + blk[:i % 7])
PY
qemu-img convert -f raw -O qcow2 "$W/src.raw" "$W/src.qcow2"

copy_case() { # name src srcfmt dstfmt
  local name=$1 src=$2 sf=$3 df=$4 ours=() theirs=()
  for _ in $(seq "$RUNS"); do
    rm -f "$W/dst"; drop_caches
    theirs+=("$(t qemu-img convert -t writeback -m 8 -W -f "$sf" -O "$df" "$src" "$W/dst")")
    rm -f "$W/dst"; drop_caches
    ours+=("$(t "$BJ" copy -m 8 -f "$sf" -O "$df" "$src" "$W/dst")")
  done
  local o q; o=$(printf '%s\n' "${ours[@]}" | median); q=$(printf '%s\n' "${theirs[@]}" | median)
  printf '%-22s blockjob %7.2fs  qemu-img %7.2fs  ratio %.2fx\n' "$name" "$o" "$q" "$(echo "$q / $o" | bc -l)"
}

# Prints the "Run completed in X seconds" time of a bench run.
bench_time() { "$@" | awk '/Run completed/ {print $4}'; }

write_case() { # name prepare-command
  local name=$1 prep=$2 ours=() theirs=() args
  args=(bench -w -d 16 -c "$COUNT" -s 4k -S $((4096 * 997)))
  for _ in $(seq "$RUNS"); do
    $prep; drop_caches
    theirs+=("$(bench_time qemu-img "${args[@]}" "$W/w.qcow2")")
    $prep; drop_caches
    ours+=("$(bench_time "$BJ" "${args[@]}" "$W/w.qcow2")")
  done
  local o q; o=$(printf '%s\n' "${ours[@]}" | median); q=$(printf '%s\n' "${theirs[@]}" | median)
  printf '%-22s blockjob %7.0f IOPS  qemu-img %7.0f IOPS  ratio %.2fx\n' "$name" \
    "$(echo "$COUNT / $o" | bc -l)" "$(echo "$COUNT / $q" | bc -l)" "$(echo "$q / $o" | bc -l)"
}
fresh() { rm -f "$W/w.qcow2" "$W/w.qcow2.full"; qemu-img create -q -f qcow2 "$W/w.qcow2" 4G; }
allocated() { # overwrites keep every cluster allocated: make the image once
  [ -e "$W/w.qcow2.full" ] && return
  rm -f "$W/w.qcow2"
  qemu-img create -q -f qcow2 -o preallocation=falloc "$W/w.qcow2" 4G
  touch "$W/w.qcow2.full"
}

echo "copy of a ${SIZE_MIB} MiB image (1/5 zero), -m 8, flushed; medians of $RUNS runs:"
copy_case raw-to-raw "$W/src.raw" raw raw
copy_case raw-to-qcow2 "$W/src.raw" raw qcow2
copy_case qcow2-to-qcow2 "$W/src.qcow2" qcow2 qcow2
echo "4 KiB writes, 16 in flight, $COUNT requests on a 4 GiB qcow2; medians of $RUNS runs:"
write_case qcow2-allocating fresh
write_case qcow2-allocated allocated
