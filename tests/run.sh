#!/usr/bin/env bash
# Warren's test command: everything CI runs, from a fresh checkout.
#   1. unit and property tests (codec fuzzing, state machines, routing) and
#      the raft crate's tests (openraft's storage suite, in-process clusters)
#   2. integration tests against real `warren server` processes (lapin),
#      including 1- and 3-node clusters killed with SIGKILL and restarted
#   3. Python client tests (pika, kombu, oslo.messaging) in a venv it creates,
#      against one node and against a 3-node cluster
#   4. the chaos suite's short run (chaos/ci.sh): three fault scenarios on a
#      3-node cluster with 300 idle queues, a dead-letter chain and RPC,
#      fixed seeds; fails on any lost confirmed message or broken rule
# Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# Property tests (including the frame decoder fuzzing) run a fixed number of
# cases; PROPTEST_CASES raises it for a longer local run.
cargo build --locked --bins
cargo test --locked --workspace -- --test-threads=2
WARREN_BIN="$PWD/target/debug/warren" tests/python/run.sh "$@"
chaos/ci.sh
