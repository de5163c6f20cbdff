#!/usr/bin/env bash
# NBD export benchmark, blockjobd vs qemu-storage-daemon (see bench/nbd.py for options).
# Example: bench/nbd.sh --runs 3 --seconds 5
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null 2>&1 || { echo "fio is needed: apt-get install -y fio" >&2; exit 1; }
cargo build --release --bin blockjobd
exec python3 bench/nbd.py "$@"
