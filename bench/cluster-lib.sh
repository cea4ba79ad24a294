# Shared helpers for the cluster benchmarks (bench/cluster-compare.sh and
# bench/idle.sh): start and stop a throwaway 3-node Warren cluster and a
# throwaway 3-node cluster of Debian's rabbitmq-server on one machine, on
# free loopback ports with every file under a temporary directory.
#
# Sourced, not run. The caller sets `set -euo pipefail` and defines WORK (a
# temporary directory removed on exit), OUT (where logs are kept), WARREN
# (path of the warren binary) and NAME_PREFIX (a word used in RabbitMQ node
# names), and calls cluster_cleanup from its EXIT trap.
#
# Only loopback addresses are used: AMQP and admin listeners, Warren's
# cluster listener, the RabbitMQ nodes' Erlang distribution listeners, the
# rabbitmqctl distribution listener and epmd.
# shellcheck shell=bash

RABBIT_BIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)

WARREN_PIDS=()
WARREN_AMQP_PORTS=()
WARREN_ADMIN_PORTS=()
WARREN_CLUSTER_PORTS=()
RABBIT_NODES=()
RABBIT_PORTS=()
RABBIT_DIST_PORTS=()
RABBIT_PIDS=()
EPMD_OURS=0

# free_ports N -> N distinct free loopback TCP ports, one a line. The sockets
# are held open together so that the kernel cannot hand out a port twice.
free_ports() {
    python3 -c '
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
' "$1"
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

# descendants pid -> pid and all its descendants, one a line
descendants() {
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            keep[root] = 1
            do {
                changed = 0
                for (i in pids) {
                    p = pids[i]
                    if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
                }
            } while (changed)
            for (p in keep) print p
        }'
}

any_alive() { # pid... -> true if any of them is still running
    local p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done
    return 1
}

# stop_tree pid -> TERM the process tree, then KILL what is left after 10 s.
# Used only on processes this script started, by their ids.
stop_tree() {
    local pids
    pids=$(descendants "$1")
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do
        # shellcheck disable=SC2086
        any_alive $pids || break
        sleep 0.2
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    return 0
}

# ---------------------------------------------------------------- Warren

# warren_cluster_start: three nodes, each with its own data directory, AMQP,
# admin and cluster ports; ready when GET /api/health answers 200 on all.
warren_cluster_start() {
    local ports peers="" i secret
    mapfile -t ports < <(free_ports 9)
    for i in "${NODES[@]}"; do
        WARREN_AMQP_PORTS[i]=${ports[(i - 1) * 3]}
        WARREN_ADMIN_PORTS[i]=${ports[(i - 1) * 3 + 1]}
        WARREN_CLUSTER_PORTS[i]=${ports[(i - 1) * 3 + 2]}
        peers+="${peers:+,}$i=127.0.0.1:${WARREN_CLUSTER_PORTS[i]}"
    done
    # Passed through the environment so that it does not show in `ps`.
    secret=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    for i in "${NODES[@]}"; do
        mkdir -p "$WORK/warren/$i"
        WARREN_CLUSTER_SECRET=$secret "$WARREN" server \
            --node-id "$i" \
            --data-dir "$WORK/warren/$i" \
            --amqp-listen "127.0.0.1:${WARREN_AMQP_PORTS[i]}" \
            --admin-listen "127.0.0.1:${WARREN_ADMIN_PORTS[i]}" \
            --cluster-listen "127.0.0.1:${WARREN_CLUSTER_PORTS[i]}" \
            --peers "$peers" \
            >"$OUT/warren-node$i.log" 2>&1 &
        WARREN_PIDS[i]=$!
    done
    for i in "${NODES[@]}"; do
        warren_wait_healthy "$i"
    done
    echo "warren cluster up: AMQP on 127.0.0.1:${WARREN_AMQP_PORTS[1]}," \
        "${WARREN_AMQP_PORTS[2]}, ${WARREN_AMQP_PORTS[3]}" >&2
}

warren_wait_healthy() { # node
    local i=$1 url="http://127.0.0.1:${WARREN_ADMIN_PORTS[$1]}/api/health"
    for _ in $(seq 240); do
        if python3 -c '
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
' "$url"; then
            return 0
        fi
        if ! kill -0 "${WARREN_PIDS[i]}" 2>/dev/null; then
            echo "warren node $i exited during startup (log: $OUT/warren-node$i.log)" >&2
            tail -n 5 "$OUT/warren-node$i.log" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "warren node $i: $url did not answer 200 within 120 s (log: $OUT/warren-node$i.log)" >&2
    return 1
}

warren_cluster_stop() {
    local i
    for i in "${NODES[@]}"; do
        if [ -n "${WARREN_PIDS[i]:-}" ]; then kill -TERM "${WARREN_PIDS[i]}" 2>/dev/null || true; fi
    done
    for i in "${NODES[@]}"; do
        [ -n "${WARREN_PIDS[i]:-}" ] || continue
        for _ in $(seq 50); do kill -0 "${WARREN_PIDS[i]}" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "${WARREN_PIDS[i]}" 2>/dev/null || true
        wait "${WARREN_PIDS[i]}" 2>/dev/null || true
        WARREN_PIDS[i]=
    done
    return 0
}

# -------------------------------------------------------------- RabbitMQ

# Environment for every rabbitmq-server/rabbitmqctl call about node N. One
# HOME holds the Erlang cookie shared by the three nodes and the CLI; nothing
# outside $WORK is read or written (no /etc/rabbitmq files, no system node).
rabbit_env() { # node command...
    local i=$1 dir="$WORK/rabbit/$1"
    shift
    env HOME="$WORK/rabbit/home" \
        RABBITMQ_CONF_ENV_FILE="$WORK/rabbit/rabbitmq-env.conf" \
        RABBITMQ_NODENAME="${RABBIT_NODES[i]}" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="${RABBIT_PORTS[i]}" \
        RABBITMQ_DIST_PORT="${RABBIT_DIST_PORTS[i]}" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_PID_FILE="$dir/rabbit.pid" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        "$@"
}

rabbit_ctl() { # node rabbitmqctl-args...
    local i=$1
    shift
    rabbit_env "$i" timeout 120 "$RABBIT_BIN/rabbitmqctl" -n "${RABBIT_NODES[i]}" "$@"
}

rabbit_install() {
    [ -x "$RABBIT_BIN/rabbitmq-server" ] && return 0
    echo "installing rabbitmq-server" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >&2
    # The package starts a system node on 0.0.0.0:5672; it is not ours.
    if command -v systemctl >/dev/null; then systemctl stop rabbitmq-server 2>/dev/null || true; fi
    if command -v service >/dev/null; then service rabbitmq-server stop 2>/dev/null || true; fi
}

# rabbit_cluster_start: three nodes started together, then nodes 2 and 3
# join node 1 (stop_app, join_cluster, start_app), and the cluster is checked
# to have three running members.
rabbit_cluster_start() {
    local ports i dir running
    rabbit_install
    mapfile -t ports < <(free_ports 6)
    for i in "${NODES[@]}"; do
        RABBIT_NODES[i]="$NAME_PREFIX-$$-$i@localhost"
        RABBIT_PORTS[i]=${ports[(i - 1) * 2]}
        RABBIT_DIST_PORTS[i]=${ports[(i - 1) * 2 + 1]}
    done
    if ! (exec 3<>/dev/tcp/127.0.0.1/4369) 2>/dev/null; then EPMD_OURS=1; fi
    mkdir -p "$WORK/rabbit/home"
    : >"$WORK/rabbit/rabbitmq-env.conf"
    # The cookie is written before any node starts, so that the nodes do
    # not race to create three different ones.
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(16).upper(), end="")' \
        >"$WORK/rabbit/home/.erlang.cookie")
    chmod 400 "$WORK/rabbit/home/.erlang.cookie"
    for i in "${NODES[@]}"; do
        dir="$WORK/rabbit/$i"
        mkdir -p "$dir/mnesia" "$dir/log"
        echo "[]." >"$dir/enabled_plugins"
        echo "[]." >"$dir/advanced.config"
        : >"$dir/rabbitmq.conf"
        # The real script rather than the /usr/sbin wrapper, which would
        # switch to the rabbitmq user and lose access to $WORK.
        rabbit_env "$i" "$RABBIT_BIN/rabbitmq-server" >"$OUT/rabbitmq-node$i.log" 2>&1 &
        RABBIT_PIDS[i]=$!
    done
    for i in "${NODES[@]}"; do
        wait_for_port "${RABBIT_PORTS[i]}" "${RABBIT_PIDS[i]}" \
            "rabbitmq node $i (log: $OUT/rabbitmq-node$i.log)"
        rabbit_ctl "$i" await_startup >/dev/null
    done
    for i in 2 3; do
        {
            rabbit_ctl "$i" stop_app &&
                rabbit_ctl "$i" join_cluster "${RABBIT_NODES[1]}" &&
                rabbit_ctl "$i" start_app &&
                rabbit_ctl "$i" await_startup
        } >>"$OUT/rabbitmq-join.log" 2>&1 || {
            echo "rabbitmq node $i could not join node 1; see $OUT/rabbitmq-join.log" >&2
            tail -n 5 "$OUT/rabbitmq-join.log" >&2
            return 1
        }
    done
    running=$(rabbit_ctl 1 cluster_status --formatter json | python3 -c '
import json, sys
print(len(json.load(sys.stdin).get("running_nodes", [])))')
    if [ "$running" != 3 ]; then
        echo "rabbitmq cluster has $running running nodes, not 3" >&2
        return 1
    fi
    echo "rabbitmq cluster up: AMQP on 127.0.0.1:${RABBIT_PORTS[1]}," \
        "${RABBIT_PORTS[2]}, ${RABBIT_PORTS[3]}" >&2
}

rabbit_cluster_stop() {
    local i
    [ "${#RABBIT_PIDS[@]}" -gt 0 ] || return 0
    # Nodes 3 and 2 first, then node 1, each with `rabbitmqctl stop`; any
    # process tree still there afterwards is stopped by pid.
    for i in 3 2 1; do
        if [ -z "${RABBIT_PIDS[i]:-}" ] || ! kill -0 "${RABBIT_PIDS[i]}" 2>/dev/null; then
            continue
        fi
        rabbit_env "$i" timeout 60 "$RABBIT_BIN/rabbitmqctl" -n "${RABBIT_NODES[i]}" stop \
            >/dev/null 2>&1 || true
    done
    for i in "${NODES[@]}"; do
        [ -n "${RABBIT_PIDS[i]:-}" ] || continue
        for _ in $(seq 50); do kill -0 "${RABBIT_PIDS[i]}" 2>/dev/null || break; sleep 0.2; done
        kill -0 "${RABBIT_PIDS[i]}" 2>/dev/null && stop_tree "${RABBIT_PIDS[i]}"
        wait "${RABBIT_PIDS[i]}" 2>/dev/null || true
        RABBIT_PIDS[i]=
    done
    return 0
}

cluster_cleanup() {
    set +e
    warren_cluster_stop
    rabbit_cluster_stop
    # The Erlang port mapper outlives the nodes; stop it only if this script
    # started it (other Erlang nodes may rely on one that was already there).
    if [ "$EPMD_OURS" = 1 ] && command -v epmd >/dev/null; then
        ERL_EPMD_ADDRESS=127.0.0.1 epmd -kill >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}

# ------------------------------------------------------------------ perf

# declare_queues port count pattern -> declares `count` durable quorum queues
# named by `pattern` through node 1 with `warren perf` (one consumer for one
# second and no producer, so no message is sent). Declaring is idempotent, so
# it is retried for up to a minute while a fresh cluster settles.
declare_queues() {
    local port=$1 count=$2 pattern=$3 log="$OUT/declare-$3.log"
    log=${log//%d/N}
    for attempt in $(seq 12); do
        if "$WARREN" perf \
            --uri "amqp://guest:guest@127.0.0.1:$port/%2f" \
            --queues "$count" -x 0 -y 1 --time 1 \
            --queue-type quorum --queue-pattern "$pattern" >"$log" 2>&1; then
            return 0
        fi
        echo "declaring $count queue(s) failed (attempt $attempt); retrying" >&2
        sleep 5
    done
    echo "could not declare queues; see $log" >&2
    tail -n 5 "$log" >&2
    return 1
}
