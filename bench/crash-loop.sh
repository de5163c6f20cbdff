#!/usr/bin/env bash
# Long crash loop: a child writing to a qcow2 is SIGKILLed ROUNDS times per image shape;
# after each kill `qemu-img check` must find no corruption and every flushed write must be
# there. The test suite runs the same loop with 6 rounds.
#
#   bench/crash-loop.sh [ROUNDS]        (default 200; CRASH_SEED=N replays a run's kill delays)
set -euo pipefail
cd "$(dirname "$0")/.."
export CRASH_ROUNDS="${1:-200}"
cargo test --release -p drivers --test crash killed_writer -- --nocapture --test-threads 1
