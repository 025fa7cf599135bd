#!/usr/bin/env bash
# System packages some tests drive (installed once; the tests skip with a reason if this fails).
#  - chromium, wrk: the UI and HTTP benchmark tests;
#  - a container engine for tests/container: where ../shared/container/podman-setup.sh exists
#    (these offline VMs) it is run to make a rootful Podman usable; podman-compose then comes
#    from apt for the compose test. Elsewhere nothing container-related is installed: the suite
#    uses whatever Podman or Docker works, and skips with a one-line reason when none does.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
setup="$here/../shared/container/podman-setup.sh"
if [ -f "$setup" ] && [ "$(id -u)" -eq 0 ]; then
  if ! bash "$setup" >/tmp/test-deps-podman.log 2>&1; then
    echo "test-deps: $setup failed (see /tmp/test-deps-podman.log); the container tests will skip" >&2
  fi
fi
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if command -v podman >/dev/null 2>&1 && ! command -v podman-compose >/dev/null 2>&1; then
  need+=(podman-compose)
fi
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
