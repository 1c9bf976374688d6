#!/usr/bin/env bash
# The GPU check of issue 37 (benchmarks/gpu_check.py says what it runs and prints): on a machine
# with one GPU, in under 10 minutes, fit cookie on GPU and CPU, score and audit on both, compare
# the decisions against the precision contract, and time scoring throughput on the GPU.
#
#   benchmarks/gpu_check.sh [--workdir DIR] [--data DIR] [--epochs E] [--images N] [--dry-run]
#
# Exit 0: every comparison within the contract; 1: one is not; 2: it cannot run (no GPU, a step
# failed). PYTHON overrides the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$here/gpu_check.py" "$@"
