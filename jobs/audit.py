"""Entrypoint for `ray job submit -- python jobs/audit.py ARGS`: the same arguments and behaviour
as `promptad audit ARGS` (inside a Ray job, RAY_ADDRESS points at the cluster), including the
exit status: 3 when a category misses --max-false-alarm / --min-recall fails the job."""
import sys
from pathlib import Path

# With `--working-dir .` the package travels as source next to this folder, maybe not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
