#!/usr/bin/env bash
# blockjob copy vs qemu-img convert (same parallelism, -m 8, writeback cache, fdatasync at the end
# on both sides). Medians of RUNS runs; prints ratios (>1 means blockjob is faster).
#   bench/copy.sh [SIZE_MIB=2048] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-2048}
RUNS=${2:-3}
cargo build --release --bin blockjob >/dev/null 2>&1
BJ=$PWD/target/release/blockjob
W=$(mktemp -d /var/tmp/bjbench.XXXX)
trap 'rm -rf "$W"' EXIT

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
sync

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc -l; }

run_case() { # name src srcfmt dstfmt
  local name=$1 src=$2 sf=$3 df=$4 ours=() theirs=()
  for _ in $(seq "$RUNS"); do
    rm -f "$W/dst"; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    theirs+=("$(t qemu-img convert -m 8 -W -f "$sf" -O "$df" "$src" "$W/dst")")
    rm -f "$W/dst"; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    ours+=("$(t "$BJ" copy -m 8 -f "$sf" -O "$df" "$src" "$W/dst")")
  done
  local o q; o=$(printf '%s\n' "${ours[@]}" | median); q=$(printf '%s\n' "${theirs[@]}" | median)
  printf '%-14s blockjob %6.2fs  qemu-img %6.2fs  ratio %.2fx\n' "$name" "$o" "$q" "$(echo "$q / $o" | bc -l)"
}

echo "copy of a ${SIZE_MIB} MiB image (1/5 zero), medians of $RUNS runs:"
run_case raw-to-raw "$W/src.raw" raw raw
run_case raw-to-qcow2 "$W/src.raw" raw qcow2
run_case qcow2-to-qcow2 "$W/src.qcow2" qcow2 qcow2

