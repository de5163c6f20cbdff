#!/usr/bin/env bash
# Full-backup throughput, peak RSS and incremental cost, blockjobd vs qemu-storage-daemon
# (see bench/backup_speed.py). Example: bench/backup_speed.sh --runs 3 --size-mib 2048
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin blockjobd
exec python3 bench/backup_speed.py "$@"
