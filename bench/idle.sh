#!/usr/bin/env bash
# Measure the idle cost of many quorum queues on a 3-node Warren cluster.
#
# Starts a throwaway 3-node Warren cluster (target/release/warren server
# --node-id/--cluster-listen/--peers), declares $QUEUES (default 1000)
# durable quorum queues through node 1 with `warren perf` (no message is
# published), waits $SETTLE seconds (default 10), then samples each node's
# CPU time (utime + stime from /proc/PID/stat, summed over the node's process
# tree) over a window of $WINDOW seconds (default 30) and prints, per node,
# the CPU used as % of one core and the resident memory at the end of the
# window. Target: under 5% of one core per node.
#
# With --rabbit, the same is then done on a throwaway 3-node cluster of
# Debian's rabbitmq-server (nodes 2 and 3 joined to node 1), for reference.
# The two clusters never run at the same time.
#
# Usage: bench/idle.sh [--rabbit] [--skip-warren]
# Environment: QUEUES, SETTLE and WINDOW (see above), CARGO_TARGET_DIR
# (where the release build lives), BENCH_OUT (where logs are kept; default a
# new /tmp directory).
#
# Only loopback addresses are used: AMQP, admin and cluster listeners, the
# Erlang distribution of the nodes and of rabbitmqctl, and epmd.
set -euo pipefail

QUEUES=${QUEUES:-1000}
SETTLE=${SETTLE:-10}
WINDOW=${WINDOW:-30}
TARGET_PCT=5
RUN_WARREN=1
RUN_RABBIT=0

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --rabbit) RUN_RABBIT=1; shift ;;
        --skip-warren) RUN_WARREN=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
for var in QUEUES WINDOW; do
    case "${!var}" in
        ''|*[!0-9]*|0) echo "$var must be a positive whole number" >&2; exit 2 ;;
    esac
done
case "$SETTLE" in
    ''|*[!0-9]*) echo "SETTLE must be a whole number of seconds" >&2; exit 2 ;;
esac
if [ "$RUN_WARREN" = 0 ] && [ "$RUN_RABBIT" = 0 ]; then
    echo "nothing to do: --skip-warren without --rabbit" >&2
    exit 2
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
WARREN=$TARGET_DIR/release/warren
NAME_PREFIX=idle
# shellcheck source=bench/cluster-lib.sh
. "$REPO/bench/cluster-lib.sh"

command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 1; }
[ -r /proc/self/stat ] || { echo "/proc is needed to read CPU times" >&2; exit 1; }

# `warren perf` declares the queues, so the build is needed even with
# --skip-warren.
if [ ! -x "$WARREN" ]; then
    echo "building $WARREN" >&2
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release)
fi

WORK=$(mktemp -d /tmp/warren-idle.XXXXXX)
OUT=${BENCH_OUT:-$(mktemp -d /tmp/warren-bench.XXXXXX)}
mkdir -p "$OUT"
trap cluster_cleanup EXIT
trap 'exit 130' INT TERM

# cpu_sample window pid... -> one line per pid: "<% of one core> <RSS MiB>",
# each over the pid and all its descendants. Per-process deltas are summed
# (a process that appears during the window counts in full), and the
# percentage is over the measured wall-clock time.
cpu_sample() {
    python3 - "$@" <<'EOF'
import os, sys, time

window = float(sys.argv[1])
roots = [int(p) for p in sys.argv[2:]]
tick = os.sysconf("SC_CLK_TCK")
page = os.sysconf("SC_PAGE_SIZE")

def stat_all():
    """pid -> (ppid, cpu ticks, rss pages) for every readable process."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        # Fields after the command name, which may hold spaces or parens.
        rest = text[text.rindex(")") + 2:].split()
        ppid, utime, stime, rss = int(rest[1]), int(rest[11]), int(rest[12]), int(rest[21])
        procs[int(name)] = (ppid, utime + stime, rss)
    return procs

def tree(procs, root):
    members = {root} if root in procs else set()
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, _) in procs.items():
            if pid not in members and ppid in members:
                members.add(pid)
                changed = True
    return members

before = stat_all()
t0 = time.monotonic()
time.sleep(window)
after = stat_all()
elapsed = time.monotonic() - t0
for root in roots:
    ticks = 0
    rss = 0
    for pid in tree(after, root):
        _, cpu, pages = after[pid]
        ticks += cpu - before[pid][1] if pid in before else cpu
        rss += pages
    print(f"{100.0 * ticks / tick / elapsed:.2f} {rss * page / 2**20:.0f}")
EOF
}

declare -a REPORT

# measure broker pid1 pid2 pid3 -> appends report rows
measure() {
    local broker=$1 i=1 pct rss verdict
    shift
    echo "waiting ${SETTLE}s for $broker to settle, then measuring CPU over ${WINDOW}s" >&2
    sleep "$SETTLE"
    while read -r pct rss; do
        if [ "$broker" = warren ]; then
            verdict=$(python3 -c 'import sys; print("ok" if float(sys.argv[1]) < float(sys.argv[2]) else "OVER")' \
                "$pct" "$TARGET_PCT")
        else
            verdict=reference
        fi
        REPORT+=("$(printf '%-10s %5s %14s %10s %10s' "$broker" "$i" "$pct" "$rss" "$verdict")")
        i=$((i + 1))
    done < <(cpu_sample "$WINDOW" "$@")
}

if [ "$RUN_WARREN" = 1 ]; then
    warren_cluster_start
    echo "declaring $QUEUES quorum queues on warren" >&2
    declare_queues "${WARREN_AMQP_PORTS[1]}" "$QUEUES" "idle-%d"
    # The queue count as node 1's admin API sees it, when it answers a list.
    python3 -c '
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        body = json.load(r)
    print(f"warren node 1 lists {len(body)} queues", file=sys.stderr)
except Exception:
    pass
' "http://127.0.0.1:${WARREN_ADMIN_PORTS[1]}/api/queues" || true
    measure warren "${WARREN_PIDS[1]}" "${WARREN_PIDS[2]}" "${WARREN_PIDS[3]}"
    warren_cluster_stop
fi

if [ "$RUN_RABBIT" = 1 ]; then
    rabbit_cluster_start
    echo "declaring $QUEUES quorum queues on rabbitmq" >&2
    declare_queues "${RABBIT_PORTS[1]}" "$QUEUES" "idle-%d"
    rabbit_ctl 1 list_queues -q --formatter json name type members | python3 -c '
import json, sys
queues = json.load(sys.stdin)
sizes = sorted({len(q.get("members", [])) for q in queues})
print(f"rabbitmq: {len(queues)} queues, members per queue: {sizes}", file=sys.stderr)
' || true
    measure rabbitmq "${RABBIT_PIDS[1]}" "${RABBIT_PIDS[2]}" "${RABBIT_PIDS[3]}"
    rabbit_cluster_stop
fi

echo
echo "$QUEUES idle quorum queues on a 3-node cluster; CPU over ${WINDOW}s after ${SETTLE}s settling"
echo "(% of one core, process tree of each node; target for warren: under ${TARGET_PCT}% per node)"
printf '%-10s %5s %14s %10s %10s\n' broker node "cpu % of core" "rss MiB" verdict
for row in "${REPORT[@]}"; do echo "$row"; done
echo "logs: $OUT"
