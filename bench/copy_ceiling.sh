#!/usr/bin/env bash
# How fast this disk can copy, without any daemon: fio reading one 2 GiB file sequentially
# while it writes another (O_DIRECT, io_uring), at several request sizes and depths each way
# (SIZE:DEPTH). A full backup reads the source and writes the target at once, equal amounts:
# half the two rates' sum is the most any backup can copy here (the two jobs do not share the
# disk fairly, so either alone says little). The bytes in flight are SIZE x DEPTH each way.
# Compare bench/backup_speed.sh's MiB/s with it.
# Usage: bench/copy_ceiling.sh [RUNS] [SECONDS]     (defaults: 2 4)
set -euo pipefail
RUNS=${1:-2}
SECS=${2:-4}
command -v fio >/dev/null 2>&1 || { echo "fio is needed: apt-get install -y fio" >&2; exit 1; }
dir=$(mktemp -d "${BENCH_DIR:-/tmp}/copy-ceiling.XXXXXX")
trap 'rm -rf "$dir"' EXIT
for f in source target; do
    fio --name=fill --filename="$dir/$f.raw" --rw=write --bs=1m --size=2G --direct=1 \
        --output=/dev/null
done
for run in $(seq "$RUNS"); do
    for cfg in 1m:1 1m:2 1m:4 1m:16 1m:64 256k:4 256k:8 256k:16 64k:16; do
        bs=${cfg%:*}; qd=${cfg#*:}
        fio --output-format=json --direct=1 --ioengine=io_uring --runtime="$SECS" \
            --time_based --size=2G --bs="$bs" --iodepth="$qd" \
            --name=read --filename="$dir/source.raw" --rw=read \
            --name=write --filename="$dir/target.raw" --rw=write > "$dir/out.json"
        python3 - "$dir/out.json" "$run" "$cfg" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
r = j["jobs"][0]["read"]["bw"] / 1024
w = j["jobs"][1]["write"]["bw"] / 1024
print(f"run {sys.argv[2]} {sys.argv[3]:>7}: read {r:6.0f} MiB/s  write {w:6.0f} MiB/s  "
      f"copy ceiling {(r + w) / 2:6.0f} MiB/s")
PY
    done
done
