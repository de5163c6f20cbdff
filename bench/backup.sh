#!/usr/bin/env bash
# What a live backup costs the guest, blockjobd vs qemu-storage-daemon (see bench/backup.py).
# Example: bench/backup.sh --runs 3 --seconds 5 --direct on
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null 2>&1 || { echo "fio is needed: apt-get install -y fio" >&2; exit 1; }
cargo build --release --bin blockjobd
exec python3 bench/backup.py "$@"
