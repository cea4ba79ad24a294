#!/usr/bin/env bash
# Compare a 3-node Warren cluster with a 3-node RabbitMQ cluster using
# `warren perf` with identical settings, on one machine.
#
# Starts a throwaway 3-node Warren cluster (target/release/warren server
# --node-id/--cluster-listen/--peers), runs the scenarios, stops it; then
# starts a throwaway 3-node cluster of Debian's rabbitmq-server (nodes 2 and
# 3 joined to node 1 with rabbitmqctl join_cluster), runs the same scenarios,
# stops it; and prints a table with the ratio Warren/RabbitMQ. The two
# clusters never run at the same time, so neither pays for the other's
# background work.
#
# Scenarios: 1 and 10 queues, producers = consumers = queues, 1 KiB bodies,
# confirm window 256, prefetch 256, durable queues with x-queue-type quorum
# (replicated on all three nodes). Each run lasts $DURATION seconds
# (default 20).
#
# `warren perf` takes one --uri, so every client connects to node 1. On
# RabbitMQ that makes node 1 the leader of every queue (client-local leader
# placement); the other two nodes replicate.
#
# Usage: bench/cluster-compare.sh [--skip-warren] [--skip-rabbit]
# Environment: DURATION (seconds), CARGO_TARGET_DIR (where the release build
# lives), BENCH_OUT (where run logs are kept; default a new /tmp directory).
#
# Only loopback addresses are used: AMQP, admin and cluster listeners, the
# Erlang distribution of the nodes and of rabbitmqctl, and epmd.
set -euo pipefail

DURATION=${DURATION:-20}
RUN_WARREN=1
RUN_RABBIT=1

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --skip-warren) RUN_WARREN=0; shift ;;
        --skip-rabbit) RUN_RABBIT=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$DURATION" in
    ''|*[!0-9]*|0) echo "DURATION must be a positive number of seconds" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
WARREN=$TARGET_DIR/release/warren
NAME_PREFIX=cluster-compare
# shellcheck source=bench/cluster-lib.sh
. "$REPO/bench/cluster-lib.sh"

command -v python3 >/dev/null || { echo "python3 is needed to read the JSON results" >&2; exit 1; }

# `warren perf` is the load generator for both brokers, so the build is
# needed even with --skip-warren.
if [ ! -x "$WARREN" ]; then
    echo "building $WARREN" >&2
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release)
fi

WORK=$(mktemp -d /tmp/warren-cluster-compare.XXXXXX)
OUT=${BENCH_OUT:-$(mktemp -d /tmp/warren-bench.XXXXXX)}
mkdir -p "$OUT"
trap cluster_cleanup EXIT
trap 'exit 130' INT TERM

SCENARIOS=(1 10)

# run_perf broker port queues -> prints the JSON summary line
run_perf() {
    local broker=$1 port=$2 queues=$3
    local log="$OUT/$broker-${queues}q.log"
    declare_queues "$port" "$queues" "cluster-${queues}q-%d" || return 1
    echo "running $broker cluster, $queues queue(s), ${DURATION}s (log: $log)" >&2
    if ! "$WARREN" perf \
        --uri "amqp://guest:guest@127.0.0.1:$port/%2f" \
        --queues "$queues" -x "$queues" -y "$queues" \
        --size 1024 --confirm 256 --qos 256 \
        --queue-type quorum --queue-pattern "cluster-${queues}q-%d" \
        --time "$DURATION" --json >"$log" 2>&1; then
        echo "warren perf against $broker failed; see $log" >&2
        tail -n 5 "$log" >&2
        return 1
    fi
    grep '^{' "$log" | tail -n 1
}

# field json path... -> value, or "-" when missing or null
field() {
    python3 -c '
import json, sys
value = json.loads(sys.argv[1]) if sys.argv[1] else None
for key in sys.argv[2:]:
    value = value.get(key) if isinstance(value, dict) else None
if value is None:
    print("-")
elif isinstance(value, float):
    print(f"{value:.0f}")
else:
    print(value)
' "$@"
}

ratio() {
    python3 -c '
import sys
try:
    a, b = float(sys.argv[1]), float(sys.argv[2])
    print(f"{a / b:.2f}" if b > 0 else "-")
except ValueError:
    print("-")
' "$1" "$2"
}

declare -A W_JSON R_JSON
for queues in "${SCENARIOS[@]}"; do W_JSON[$queues]=; R_JSON[$queues]=; done

if [ "$RUN_WARREN" = 1 ]; then
    warren_cluster_start
    for queues in "${SCENARIOS[@]}"; do
        W_JSON[$queues]=$(run_perf warren "${WARREN_AMQP_PORTS[1]}" "$queues" || true)
    done
    warren_cluster_stop
fi

if [ "$RUN_RABBIT" = 1 ]; then
    rabbit_cluster_start
    for queues in "${SCENARIOS[@]}"; do
        R_JSON[$queues]=$(run_perf rabbitmq "${RABBIT_PORTS[1]}" "$queues" || true)
    done
    rabbit_cluster_stop
fi

echo
echo "warren perf, ${DURATION}s per run, 1 KiB bodies, confirm window 256, qos 256;"
echo "3-node clusters, quorum queues, clients on node 1;"
echo "msg/s = receive rate; latency = end-to-end µs"
printf '%-12s %12s %14s %8s %18s %18s\n' scenario "warren msg/s" "rabbitmq msg/s" ratio "warren p50/p99" "rabbitmq p50/p99"
for queues in "${SCENARIOS[@]}"; do
    w_json=${W_JSON[$queues]}
    r_json=${R_JSON[$queues]}
    w_rate=$(field "$w_json" receive_rate)
    r_rate=$(field "$r_json" receive_rate)
    printf '%-12s %12s %14s %8s %18s %18s\n' \
        "${queues}q x${queues}/${queues}" \
        "$w_rate" "$r_rate" "$(ratio "$w_rate" "$r_rate")" \
        "$(field "$w_json" latency_us p50)/$(field "$w_json" latency_us p99)" \
        "$(field "$r_json" latency_us p50)/$(field "$r_json" latency_us p99)"
done
echo "logs: $OUT"
