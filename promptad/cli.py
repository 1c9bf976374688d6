"""`promptad` command line: fit, score, audit, demo.

A mistake the user can fix (UserError, bad flag values) prints one line and exits 2;
a traceback only with --debug. A command may return its own status: `audit` returns 3 when a
category misses a --max-false-alarm / --min-recall target. jobs/*.py call `main` with the same
arguments and exit with its status.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import UserError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1] (e.g. 0.01 for 1 %), got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1] (e.g. 0.01 for 1 %), got {text!r}")
    return value


def _categories(text: str) -> list[str]:
    cats = [c.strip() for c in text.split(",") if c.strip()]
    if not cats:
        raise argparse.ArgumentTypeError("expected one or more category names, comma-separated")
    return cats


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as UserError (one line, exit 2) instead of exiting."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="promptad", description="Industrial visual anomaly detection on Ray.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
        sp.add_argument("--debug", action="store_true", help="show tracebacks")

    f = sub.add_parser("fit", help="train a model on normal images (Ray Train)")
    f.add_argument("--data", required=True, help="MVTec AD root or manifest (local or s3://)")
    f.add_argument("--category", required=True, type=_categories, help="NAME[,NAME...]")
    f.add_argument("--backbone", default="effnet-lite0",
                   help="effnet-lite0 | effnet-lite2 | clip:<model>:<tag or weight path>")
    f.add_argument("--out", required=True, help="artifact directory (local or s3://)")
    f.add_argument("--workers", type=_positive_int, default=1)
    f.add_argument("--gpus-per-worker", type=_non_negative_float, default=0.0)
    f.add_argument("--cpus-per-worker", type=_non_negative_float, default=0.5)
    f.add_argument("--epochs", type=_positive_int, default=30)
    f.add_argument("--batch-size", type=_positive_int, default=8)
    f.add_argument("--seed", type=int, default=0)
    # Advanced: a smaller model input than the backbone's default (quick tests and benchmarks).
    f.add_argument("--input-size", type=_positive_int, default=None, help=argparse.SUPPRESS)
    f.add_argument("--storage", default=None, help="checkpoint storage (local or s3://); default: next to --out")
    f.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --storage")
    common(f)

    s = sub.add_parser("score", help="score images to a Parquet dataset (Ray Data)")
    s.add_argument("--model", required=True, help="artifact directory (local or s3://)")
    s.add_argument("--input", required=True, help="folder/prefix (recursive) or manifest (.parquet/.csv)")
    s.add_argument("--output", required=True, help="Parquet dataset directory (local or s3://)")
    s.add_argument("--actors", type=_positive_int, default=1)
    s.add_argument("--gpus-per-actor", type=_non_negative_float, default=0.0)
    s.add_argument("--cpus-per-actor", type=_non_negative_float, default=0.5)
    s.add_argument("--batch-size", type=_positive_int, default=16)
    s.add_argument("--run-id", default=None, help="id of this scoring run (default: generated)")
    common(s)

    a = sub.add_parser("audit", help="metrics, plots and visualizations on a labelled set")
    a.add_argument("--model", required=True, help="artifact directory (local or s3://)")
    a.add_argument("--data", required=True, help="MVTec AD root or manifest with label/mask_path")
    a.add_argument("--category", type=_categories, default=None, help="NAME[,NAME...] (default: the model's)")
    a.add_argument("--report", required=True, help="report directory (local)")
    a.add_argument("--shifts", default="", help="comma-separated shifts, groups (lighting,camera,sensor) or 'all'")
    a.add_argument("--batch-size", type=_positive_int, default=16)
    a.add_argument("--actors", type=_positive_int, default=1)
    a.add_argument("--gpus-per-actor", type=_non_negative_float, default=0.0)
    a.add_argument("--max-false-alarm", type=_rate, default=None, metavar="RATE",
                   help="target per category: the 95%% upper bound of the false-alarm rate on normal "
                        "images must be <= RATE, else exit 3 (default: no target)")
    a.add_argument("--min-recall", type=_rate, default=None, metavar="RATE",
                   help="target per category: the 95%% lower bound of recall on defective images "
                        "must be >= RATE, else exit 3 (default: no target)")
    common(a)

    d = sub.add_parser("demo", help="the whole flow on a generated dataset, locally")
    d.add_argument("--data", default=None, help="use this MVTec AD root instead of generating one")
    d.add_argument("--category", type=_categories, default=None)
    d.add_argument("--workdir", default="demo_output", help="where data, model, scores and report go")
    d.add_argument("--epochs", type=_positive_int, default=None)
    common(d)
    return p


COMMANDS = {"fit": "promptad.fit", "score": "promptad.score", "audit": "promptad.audit", "demo": "promptad.demo"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        module = importlib.import_module(COMMANDS[args.command])
        status = module.run(args)
        return status if isinstance(status, int) else 0
    except UserError as e:
        if debug:
            raise
        print(f"promptad: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promptad: interrupted", file=sys.stderr)
        return 130
