#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests use when it is missing: qemu-utils
# (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon: the reference for interop and
# differential checks), libnbd (nbdinfo, nbdcopy, nbdsh), nbdkit (a slow NBD target) and
# PyPI's qemu.qmp (the Python QMP client the daemon is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null 2>&1 || need+=(qemu-utils)
# libnbd's tools and Python module (Debian's python3 only): NBD interop tests.
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v nbdcopy >/dev/null 2>&1 || need+=(libnbd-bin)
[ -x /usr/bin/nbdsh ] || need+=(python3-libnbd)
# nbdkit (memory plugin, delay filter): a slow backup target.
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need[@]}"
fi

python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install --quiet 'qemu.qmp>=0.0.3'

# Link-time optimisation costs minutes per test binary on two cores and buys the tests nothing
# (the benchmarks in bench/ build with it).
export CARGO_PROFILE_RELEASE_LTO=off
cargo build --release --bin blockjob --bin blockjobd
# Interop tests drive the release binary and qemu-img; PROPTEST_CASES keeps CI time bounded.
export PROPTEST_CASES="${PROPTEST_CASES:-48}"
cargo test --workspace --release -- --test-threads=2
