#!/usr/bin/env bash
# Installs what `make run` / `make test` need and is missing, on Debian/Ubuntu.
#   ops/bootstrap.sh            python + whatever DATABASE_URL / REDIS_URL do not replace
#   ops/bootstrap.sh --all      python + mariadb-server + redis-server, nginx + redis-sentinel for
#                               the deployment tests, prometheus for promtool (the tests start their own)
#   ops/bootstrap.sh --python   python (3.11+ with venv) only
#   ops/bootstrap.sh --e2e      as --all, plus Debian's chromium at /usr/bin/chromium (make e2e)
set -euo pipefail

PYTHON=${PYTHON:-python3}
need=()

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

if ! have "$PYTHON"; then
    need+=(python3 python3-venv)
elif ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: $PYTHON is $("$PYTHON" -V 2>&1); Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
    exit 1
elif ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need+=(python3-venv)
fi

mode=${1:-}
all=false
if [ "$mode" = "--all" ] || [ "$mode" = "--e2e" ]; then all=true; fi
if [ "$mode" != "--python" ]; then
    if $all || [ -z "${DATABASE_URL:-}" ]; then
        have mariadbd || have mysqld || need+=(mariadb-server)
    fi
    if $all || [ -z "${REDIS_URL:-}" ]; then
        have redis-server || need+=(redis-server)
    fi
fi
# tests/test_nginx.py and tests/test_sentinel.py (issue 15) run Debian's nginx and sentinels;
# promtool (make test checks the alert rules) comes with Debian's prometheus package.
if $all; then
    have nginx || need+=(nginx)
    have redis-sentinel || need+=(redis-sentinel)
    have promtool || need+=(prometheus)
fi
# The browser test drives the distribution's build; playwright never downloads one.
if [ "$mode" = "--e2e" ] && [ ! -x /usr/bin/chromium ]; then
    need+=(chromium fonts-liberation)
fi

[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    if [[ " ${need[*]} " == *" chromium "* ]]; then
        echo "error: missing ${need[*]}: make e2e drives Debian's chromium at /usr/bin/chromium; install as root (sudo apt-get install ${need[*]})." >&2
        exit 1
    fi
    echo "error: missing ${need[*]}: install them (sudo apt-get install ${need[*]}), or set DATABASE_URL and REDIS_URL to existing servers." >&2
    exit 1
fi

echo "installing ${need[*]} from apt"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# No init system starts these here: our server runs private instances under ./var.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
