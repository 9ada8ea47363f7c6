#!/usr/bin/env bash
# The test command (README): the unit suite, then the suites that need real
# peers (DPDK, QEMU guests) when those peers are installed.
#   scripts/test.sh            # everything available on this machine
#   scripts/test.sh -k split   # extra pytest arguments go to every suite
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
status=0
"$py" -m pytest -q "$@" || status=$?
if [ "$status" = 5 ]; then echo "no tests collected" >&2; exit 1; fi
exit "$status"
