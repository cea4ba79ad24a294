#!/usr/bin/env bash
# Compare Warren with RabbitMQ using `warren perf` with identical settings.
#
# Starts a throwaway Warren node (target/release/warren server) and a
# throwaway Debian rabbitmq-server, each on free loopback ports with a
# temporary data directory, runs the same scenarios against both, prints a
# table, and stops both brokers on exit.
#
# Scenarios: 1 and 10 queues, producers = consumers = queues, 1 KiB bodies,
# confirm window 256, prefetch 256, durable queues (quorum on Warren; classic
# on RabbitMQ unless --rabbit-queue-type quorum). Each run lasts $DURATION
# seconds (default 20).
#
# Usage: bench/compare.sh [--rabbit-queue-type classic|quorum]
#                         [--skip-warren] [--skip-rabbit]
# Environment: DURATION (seconds), CARGO_TARGET_DIR (where the release build
# lives), BENCH_OUT (where run logs are kept; default a new /tmp directory).
#
# Only loopback addresses are used, for the brokers' listeners and the Erlang
# distribution alike.
set -euo pipefail

DURATION=${DURATION:-20}
RABBIT_QUEUE_TYPE=classic
RUN_WARREN=1
RUN_RABBIT=1

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --rabbit-queue-type)
            RABBIT_QUEUE_TYPE=${2:-}
            shift 2 || { echo "--rabbit-queue-type needs a value" >&2; exit 2; }
            ;;
        --rabbit-queue-type=*) RABBIT_QUEUE_TYPE=${1#*=}; shift ;;
        --skip-warren) RUN_WARREN=0; shift ;;
        --skip-rabbit) RUN_RABBIT=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$RABBIT_QUEUE_TYPE" in
    classic|quorum) ;;
    *) echo "--rabbit-queue-type must be classic or quorum" >&2; exit 2 ;;
esac
case "$DURATION" in
    ''|*[!0-9]*|0) echo "DURATION must be a positive number of seconds" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
WARREN=$TARGET_DIR/release/warren

command -v python3 >/dev/null || { echo "python3 is needed to read the JSON results" >&2; exit 1; }

if [ ! -x "$WARREN" ]; then
    echo "building $WARREN" >&2
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release)
fi

WORK=$(mktemp -d /tmp/warren-compare.XXXXXX)
OUT=${BENCH_OUT:-$(mktemp -d /tmp/warren-bench.XXXXXX)}
mkdir -p "$OUT"
WARREN_PID=
RABBIT_NODE=
RABBIT_PID=
EPMD_OURS=0

# Environment shared by every rabbitmq-server/rabbitmqctl call, so that the
# CLI finds the node (same cookie via HOME) and nothing outside $WORK is used.
rabbit_env() {
    env HOME="$WORK/rabbit/home" \
        RABBITMQ_NODENAME="$RABBIT_NODE" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$RABBIT_PORT" \
        RABBITMQ_DIST_PORT="$RABBIT_DIST_PORT" \
        RABBITMQ_MNESIA_BASE="$WORK/rabbit/mnesia" \
        RABBITMQ_LOG_BASE="$WORK/rabbit/log" \
        RABBITMQ_PID_FILE="$WORK/rabbit/rabbit.pid" \
        RABBITMQ_CONFIG_FILE="$WORK/rabbit/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$WORK/rabbit/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$WORK/rabbit/enabled_plugins" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        "$@"
}

cleanup() {
    set +e
    if [ -n "$WARREN_PID" ] && kill -0 "$WARREN_PID" 2>/dev/null; then
        kill -TERM "$WARREN_PID"
        for _ in $(seq 50); do kill -0 "$WARREN_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$WARREN_PID" 2>/dev/null
        wait "$WARREN_PID" 2>/dev/null
    fi
    if [ -n "$RABBIT_PID" ]; then
        rabbit_env timeout 60 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RABBIT_NODE" stop >/dev/null 2>&1
        for _ in $(seq 50); do kill -0 "$RABBIT_PID" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$RABBIT_PID" 2>/dev/null; then
            kill -TERM "$RABBIT_PID"
            sleep 2
            kill -KILL "$RABBIT_PID" 2>/dev/null
        fi
        wait "$RABBIT_PID" 2>/dev/null
    fi
    # The Erlang port mapper outlives the node; stop it only if this script
    # started it (other Erlang nodes may rely on one that was already there).
    if [ "$EPMD_OURS" = 1 ] && command -v epmd >/dev/null; then
        ERL_EPMD_ADDRESS=127.0.0.1 epmd -kill >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() { # port pid what
    for _ in $(seq 120); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        kill -0 "$2" 2>/dev/null || { echo "$3 exited during startup" >&2; return 1; }
        sleep 0.5
    done
    echo "$3 did not listen on 127.0.0.1:$1 within 60 s" >&2
    return 1
}

start_warren() {
    WARREN_PORT=$(free_port)
    WARREN_ADMIN_PORT=$(free_port)
    mkdir -p "$WORK/warren"
    "$WARREN" server \
        --amqp-listen "127.0.0.1:$WARREN_PORT" \
        --admin-listen "127.0.0.1:$WARREN_ADMIN_PORT" \
        --data-dir "$WORK/warren" \
        >"$OUT/warren-server.log" 2>&1 &
    WARREN_PID=$!
    wait_for_port "$WARREN_PORT" "$WARREN_PID" "warren server (log: $OUT/warren-server.log)"
    echo "warren listening on 127.0.0.1:$WARREN_PORT" >&2
}

start_rabbit() {
    if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        echo "installing rabbitmq-server" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >&2
        # The package starts a system node on 0.0.0.0:5672; it is not ours.
        if command -v systemctl >/dev/null; then systemctl stop rabbitmq-server 2>/dev/null || true; fi
        if command -v service >/dev/null; then service rabbitmq-server stop 2>/dev/null || true; fi
    fi
    RABBIT_PORT=$(free_port)
    RABBIT_DIST_PORT=$(free_port)
    RABBIT_NODE="compare-$$@localhost"
    if ! (exec 3<>/dev/tcp/127.0.0.1/4369) 2>/dev/null; then EPMD_OURS=1; fi
    mkdir -p "$WORK/rabbit/home" "$WORK/rabbit/mnesia" "$WORK/rabbit/log"
    echo "[]." >"$WORK/rabbit/enabled_plugins"
    echo "[]." >"$WORK/rabbit/advanced.config"
    # An empty main config keeps /etc/rabbitmq/rabbitmq.conf out of the way.
    : >"$WORK/rabbit/rabbitmq.conf"
    # Run the real script rather than the /usr/sbin wrapper, which would
    # switch to the rabbitmq user and lose access to $WORK.
    rabbit_env /usr/lib/rabbitmq/bin/rabbitmq-server >"$OUT/rabbitmq-server.log" 2>&1 &
    RABBIT_PID=$!
    wait_for_port "$RABBIT_PORT" "$RABBIT_PID" "rabbitmq-server (log: $OUT/rabbitmq-server.log)"
    rabbit_env timeout 120 /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RABBIT_NODE" await_startup >/dev/null
    echo "rabbitmq listening on 127.0.0.1:$RABBIT_PORT" >&2
}

# run_perf broker port queues queue_type -> prints the JSON summary line
run_perf() {
    local broker=$1 port=$2 queues=$3 qtype=$4
    local log="$OUT/$broker-${queues}q.log"
    echo "running $broker, $queues queue(s), ${DURATION}s (log: $log)" >&2
    if ! "$WARREN" perf \
        --uri "amqp://guest:guest@127.0.0.1:$port/%2f" \
        --queues "$queues" -x "$queues" -y "$queues" \
        --size 1024 --confirm 256 --qos 256 \
        --queue-type "$qtype" --queue-pattern "compare-${queues}q-%d" \
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

[ "$RUN_WARREN" = 1 ] && start_warren
[ "$RUN_RABBIT" = 1 ] && start_rabbit

declare -a ROWS
for queues in 1 10; do
    w_json=
    r_json=
    [ "$RUN_WARREN" = 1 ] && w_json=$(run_perf warren "$WARREN_PORT" "$queues" quorum || true)
    [ "$RUN_RABBIT" = 1 ] && r_json=$(run_perf rabbitmq "$RABBIT_PORT" "$queues" "$RABBIT_QUEUE_TYPE" || true)
    w_rate=$(field "$w_json" receive_rate)
    r_rate=$(field "$r_json" receive_rate)
    ROWS+=("$(printf '%-12s %12s %14s %8s %18s %18s' \
        "${queues}q x${queues}/${queues}" \
        "$w_rate" "$r_rate" "$(ratio "$w_rate" "$r_rate")" \
        "$(field "$w_json" latency_us p50)/$(field "$w_json" latency_us p99)" \
        "$(field "$r_json" latency_us p50)/$(field "$r_json" latency_us p99)")")
done

echo
echo "warren perf, ${DURATION}s per run, 1 KiB bodies, confirm window 256, qos 256;"
echo "queues: warren quorum, rabbitmq $RABBIT_QUEUE_TYPE; msg/s = receive rate; latency = end-to-end µs"
printf '%-12s %12s %14s %8s %18s %18s\n' scenario "warren msg/s" "rabbitmq msg/s" ratio "warren p50/p99" "rabbitmq p50/p99"
for row in "${ROWS[@]}"; do echo "$row"; done
echo "logs: $OUT"
