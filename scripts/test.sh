#!/usr/bin/env bash
# Runs the whole test suite. Installs the system packages the tests use when they are missing
# (qemu-utils: qemu-img, qemu-io; the reference for interop checks).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need[@]}"
fi

cargo build --release --bin blockjob
# Interop tests drive the release binary and qemu-img; PROPTEST_CASES keeps CI time bounded.
export PROPTEST_CASES="${PROPTEST_CASES:-48}"
cargo test --workspace --release -- --test-threads=2
