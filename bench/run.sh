#!/usr/bin/env bash
# One command for the HTTP benchmark: install wrk when it is missing, prepare the service's bench
# venv, then run the harness (`python -m bench`; the peers' venvs are built by it on first use).
#   bash bench/run.sh [--quick] [--record] [any `python -m bench` option]
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

# The service, the naive endpoint and LitServe run in their own venv, as the Docker image installs
# the service: its own dependencies (no training extras) with a CPU build of torch. The dev venv's
# torch may be a CUDA build, whose libraries alone add hundreds of MB to every worker's RSS.
# BENCH_TORCH is the CPU build to install (the peers' venvs get the same one, bench/venvs.py):
# 2.13.0 is the one this project's offline machine has on disk; where PyTorch's CPU index is
# reachable, BENCH_TORCH='torch==2.14.1' gets 2.14.1+cpu.
SERVE_VENV="${SERVE_VENV:-.venv-serve}"
export BENCH_TORCH="${BENCH_TORCH:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
stamp="$SERVE_VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bench: preparing $SERVE_VENV (the service's dependencies, $BENCH_TORCH CPU build, LitServe)" >&2
  [ -x "$SERVE_VENV/bin/python" ] || "${PYTHON3:-python3}" -m venv "$SERVE_VENV"
  "$SERVE_VENV/bin/python" -m pip install --quiet --upgrade pip
  "$SERVE_VENV/bin/python" -m pip install --quiet --retries 1 --timeout 10 --extra-index-url "$TORCH_INDEX" "$BENCH_TORCH"
  "$SERVE_VENV/bin/python" -m pip install --quiet -e . "litserve>=0.2.10"
  touch "$stamp"
fi
if ! "$SERVE_VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  echo "bench: warning: $SERVE_VENV has a CUDA build of torch; worker memory includes its CUDA libraries" >&2
fi
exec "$PYTHON" -m bench --server-python "$SERVE_VENV/bin/python" "$@"
