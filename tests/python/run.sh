#!/usr/bin/env bash
# Run the Python client-compatibility suite.
#   tests/python/run.sh [pytest args...]
# Env: WARREN_AMQP_URL to test an already running broker (Warren or RabbitMQ;
#      comma-separated URLs for the nodes of a cluster), otherwise
#      WARREN_BIN (default target/debug/warren) is started as one node and as
#      a 3-node cluster, and every test runs against both (-k 1node / -k 3node
#      selects one).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        # Debian ships venv/ensurepip separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq "python${pyver}-venv" >/dev/null 2>&1 \
                || apt-get install -y -qq python3-venv >/dev/null
        fi
        "$python" -m venv "$venv"
    fi
fi

stamp="$venv/.requirements.sha"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi

cd "$root"
# Run the whole suite unless a test file, directory or node id was given.
target=("$here")
for arg in "$@"; do
    case "$arg" in -*) continue ;; esac
    if [ -e "${arg%%::*}" ]; then target=(); break; fi
done
set +e
"$venv/bin/python" -m pytest -c "$here/pytest.ini" --rootdir "$here" "${target[@]}" "$@"
exit $?
