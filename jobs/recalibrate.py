"""Entrypoint for `python jobs/recalibrate.py ARGS` (no Ray needed): the same arguments and behaviour
as `promptad recalibrate ARGS`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["recalibrate", *sys.argv[1:]]))
