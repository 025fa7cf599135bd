#!/usr/bin/env bash
# System packages some tests drive (installed once; the tests skip with a reason if this fails).
set -u
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "test-deps: cannot install ${need[*]} (not root, no sudo); the tests that need them will skip" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
echo "test-deps: installing ${need[*]} with apt-get" >&2
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/tmp/test-deps-apt.log 2>&1; then
  echo "test-deps: apt-get failed (see /tmp/test-deps-apt.log); the tests that need ${need[*]} will skip" >&2
fi
exit 0
