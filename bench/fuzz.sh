#!/usr/bin/env bash
# Long fuzz runs (cargo fuzz, nightly toolchain). New corpus entries go to a scratch copy;
# crashes land in fuzz/artifacts/<target>/.
#   bench/fuzz.sh [TARGET=qcow2_open|qmp_decode] [SECONDS=600]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
target="${1:-qcow2_open}"
seconds="${2:-600}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
work=$(mktemp -d /var/tmp/bjfuzz.XXXX)
cp "corpus/$target"/* "$work/"
case "$target" in
  qcow2_open) max_len=262144 ;;
  *) max_len=65536 ;;
esac
cargo +nightly fuzz run "$target" "$work" "corpus/$target" -- \
  -max_total_time="$seconds" -rss_limit_mb=4096 -max_len="$max_len"
