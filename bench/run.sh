#!/usr/bin/env bash
# One command for the HTTP benchmark: install wrk when it is missing, then run the harness.
#   bash bench/run.sh [--quick] [any bench/http_bench.py option]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "bench: wrk is missing and this user cannot install it (no root, no sudo)" >&2; exit 2; }
    SUDO="sudo -n"
  fi
  echo "bench: installing wrk with apt-get" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import litserve" 2>/dev/null; then
  echo "bench: LitServe is missing from $PYTHON: install the bench extra (pip install -e '.[dev,bench]' or make test)" >&2
  exit 2
fi
exec "$PYTHON" bench/http_bench.py "$@"
