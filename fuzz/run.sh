#!/usr/bin/env bash
# Fuzz one target for a given time: fuzz/run.sh ring|codec [SECONDS] [--engine hypothesis] [-- libFuzzer flags]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: fuzz/run.sh ring|codec [SECONDS] [--engine hypothesis]}
seconds=${2:-60}
shift $(( $# >= 2 ? 2 : 1 ))
exec .venv/bin/python -m fuzz "$target" --seconds "$seconds" "$@"
