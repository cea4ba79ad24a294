#!/usr/bin/env bash
# The chaos suite's short run, for the test command: three scenarios
# (vm-loss, simultaneous-restart, partition-leader) against a 3-node
# cluster with 300 idle quorum queues besides the workload's (checked
# queues, a dead-letter chain, an RPC pair), fixed seeds, 30 s of faults
# each. Exits non-zero if any run broke a rule of the checker (a confirmed
# message lost, an unexpected one, a dead letter lost with no fault nearby,
# a dead-letter chain or RPC that did not work again after the heal,
# consumers stalled after a restart of every node) or could not run at all.
# Reports land in ${CHAOS_REPORT_DIR:-$CARGO_TARGET_DIR/chaos-ci}/<scenario>.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${CARGO_TARGET_DIR:-target}
DURATION=${CHAOS_DURATION:-30s}
OUT=${CHAOS_REPORT_DIR:-$TARGET/chaos-ci}
# Not the default 25000, so a manual run elsewhere does not collide.
BASE_PORT=${CHAOS_BASE_PORT:-26000}
# Idle queues make restarts and elections as heavy as in a deployment
# where most queues are quiet.
IDLE_QUEUES=${CHAOS_IDLE_QUEUES:-300}

cargo build --locked --bins -p warren -p warren-chaos

failed=()
for run in "vm-loss 1001" "simultaneous-restart 1002" "partition-leader 1003"; do
    read -r scenario seed <<<"$run"
    echo "== chaos: $scenario (seed $seed, $DURATION, $IDLE_QUEUES idle queues)"
    started=$SECONDS
    if ! "$TARGET/debug/warren-chaos" run \
        --nodes 3 --scenario "$scenario" --seed "$seed" --duration "$DURATION" \
        --idle-queues "$IDLE_QUEUES" \
        --base-port "$BASE_PORT" --warren "$TARGET/debug/warren" --report "$OUT/$scenario"; then
        failed+=("$scenario")
    fi
    echo "== chaos: $scenario took $((SECONDS - started)) s"
done

if ((${#failed[@]})); then
    echo "chaos: FAILED: ${failed[*]} (reports in $OUT)" >&2
    exit 1
fi
echo "chaos: all scenarios passed"
