#!/usr/bin/env bash
# What the disk itself allows a guest while a throttled backup runs, without any daemon: fio
# straight on a 1 GiB image file (O_DIRECT, io_uring), 4 KiB random writes at a fixed
# 2,000/s (p50/p99) and at queue depth 16 (IOPS), alone and beside a 64 MiB/s sequential read
# of the disk plus a 64 MiB/s sequential write of a target (what `bench/backup.sh`'s throttled
# backup does), with the background requests at several sizes and depths (SIZE:DEPTH).
# Usage: bench/device_floor.sh [RUNS] [SECONDS]     (defaults: 2 4)
set -euo pipefail
RUNS=${1:-2}
SECS=${2:-4}
command -v fio >/dev/null 2>&1 || { echo "fio is needed: apt-get install -y fio" >&2; exit 1; }
dir=$(mktemp -d "${BENCH_DIR:-/tmp}/device-floor.XXXXXX")
trap 'rm -rf "$dir"' EXIT
for f in disk target; do
    fio --name=fill --filename="$dir/$f.raw" --rw=write --bs=1m --size=1G --direct=1 \
        --output=/dev/null
done
for mode in rate depth; do
    if [ "$mode" = rate ]; then
        guest="--rw=randwrite --bs=4k --rate_iops=2000 --iodepth=8"
    else
        guest="--rw=randwrite --bs=4k --iodepth=16"
    fi
    for run in $(seq "$RUNS"); do
        for cfg in none 1m:4 1m:1 256k:4 256k:1 64k:4 64k:1; do
            bg=()
            if [ "$cfg" != none ]; then
                bs=${cfg%:*}; qd=${cfg#*:}
                bg=(--name=bgread --filename="$dir/disk.raw" --rw=read --bs="$bs"
                    --iodepth="$qd" --rate=64m --size=1G
                    --name=bgwrite --filename="$dir/target.raw" --rw=write --bs="$bs"
                    --iodepth="$qd" --rate=,64m --size=1G)
            fi
            # shellcheck disable=SC2086
            fio --output-format=json --direct=1 --ioengine=io_uring --runtime="$SECS" \
                --time_based --name=guest --filename="$dir/disk.raw" $guest --size=1G \
                "${bg[@]}" > "$dir/out.json"
            python3 - "$dir/out.json" "$mode" "$run" "$cfg" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
w = j["jobs"][0]["write"]
p = w["clat_ns"]["percentile"]
print(f"{sys.argv[2]:5} run {sys.argv[3]} background {sys.argv[4]:7} "
      f"guest p50 {p['50.000000'] / 1000:6.0f} us  p99 {p['99.000000'] / 1000:6.0f} us  "
      f"IOPS {w['iops']:8.0f}")
PY
        done
    done
done
