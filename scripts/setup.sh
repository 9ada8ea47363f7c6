#!/usr/bin/env bash
# Set up pyvirtio on a fresh Debian 12 machine (as root): system packages,
# a virtualenv in .venv with pyvirtio installed (editable) and its test tools.
#
#   scripts/setup.sh            # the package, its compiled fence and ring engine (mypyc), test tools
#   scripts/setup.sh --peers    # also QEMU 7.2, a Linux 6.1 kernel, busybox,
#                               # iperf3, socat, DPDK 22.11 (real peers for tests/benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."

peers=0
for arg in "$@"; do
  case "$arg" in
    --peers) peers=1 ;;
    *) echo "usage: $0 [--peers]" >&2; exit 2 ;;
  esac
done

need=()
command -v gcc >/dev/null || need+=(gcc)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
python3 - <<'PY' 2>/dev/null || need+=(python3-dev)
import os, sysconfig, sys
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PY
if [ "$peers" = 1 ]; then
  for p in qemu-system-x86 qemu-system-common qemu-utils linux-image-amd64 busybox-static iperf3 \
           dpdk dpdk-dev iproute2 cpio kmod socat; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: pyvirtio needs Python >= 3.11 (found $(python3 -V))" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[dev,bench,fuzz]'
.venv/bin/python -c 'import pyvirtio.fence as f, pyvirtio._engine as e; print("setup: pyvirtio ready, fence:", f.IMPLEMENTATION, "| ring engine:", e.name())'
