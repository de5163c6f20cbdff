#!/usr/bin/env bash
# Long fuzz run of the qcow2 metadata parser (cargo fuzz, nightly toolchain). New corpus entries
# go to a scratch copy; crashes land in fuzz/artifacts/qcow2_open/.
#   bench/fuzz.sh [SECONDS=600]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
work=$(mktemp -d /var/tmp/bjfuzz.XXXX)
cp corpus/qcow2_open/* "$work/"
cargo +nightly fuzz run qcow2_open "$work" corpus/qcow2_open -- \
  -max_total_time="${1:-600}" -rss_limit_mb=4096 -max_len=262144
