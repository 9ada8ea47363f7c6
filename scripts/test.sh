#!/usr/bin/env bash
# The test command (README): the unit suite, then the suites that need real
# peers when those peers are installed (scripts/setup.sh --peers):
#   dpdk  - DPDK 22.11 testpmd (virtio-user frontend, net_vhost backend)
#   guest - QEMU 7.2 + Linux 6.1 guests
# When the ring engine is compiled (mypyc, see setup.py), the unit suite runs
# twice: on the compiled engine, then on pure Python (PYVIRTIO_PURE=1); the
# peer suites run once, compiled.
# Extra arguments go to every pytest run (e.g. scripts/test.sh -k split -x).
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || { echo "test.sh: run scripts/setup.sh first" >&2; exit 1; }

failed=0
run() {  # run SUITE-NAME PYTEST-ARGS...
  local name=$1; shift
  echo "=== $name ==="
  "$py" -m pytest -q "$@"
  local rc=$?
  case $rc in
    0) ;;
    5) echo "test.sh: $name collected no tests" >&2; failed=1 ;;
    *) failed=1 ;;
  esac
}

engine=$("$py" -c 'from pyvirtio import _engine; print(_engine.name())')
echo "test.sh: ring engine: $engine"
run unit "$@"
case $engine in
  pure*) echo "test.sh: the engine is not compiled: the unit suite ran on pure Python only" ;;
  *) PYVIRTIO_PURE=1 run "unit (PYVIRTIO_PURE=1)" "$@" ;;
esac
if command -v dpdk-testpmd >/dev/null; then
  run dpdk -m dpdk "$@"
else
  echo "test.sh: dpdk-testpmd not installed: DPDK suite skipped (scripts/setup.sh --peers)"
fi
if command -v qemu-system-x86_64 >/dev/null && ls /boot/vmlinuz-* >/dev/null 2>&1; then
  run guest -m guest "$@"
else
  echo "test.sh: QEMU or a kernel is missing: guest suite skipped (scripts/setup.sh --peers)"
fi
exit $failed
