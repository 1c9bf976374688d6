"""`promptad` command line: fit, score, compact, audit, demo.

A mistake the user can fix (UserError, bad flag values) prints one line and exits 2; with
--debug the traceback comes first and the exit code stays 2. A command may return its own status:
`audit` returns 3 when a category misses a --max-false-alarm / --min-recall target. Every flag's
help says what it does and its default; every command's help ends with examples. Each command runs
in a console session (console.py): its own lines on the console, Ray's in a log file unless
--verbose. jobs/*.py call `main` with the same arguments and exit with its status.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import traceback
from typing import Any, Callable, Sequence

from promptad.errors import UserError

# learning.training.TrainConfig's defaults, restated so that `--help` needs no torch import
# (tests/test_user_errors.py checks they agree): what quality.py measures is what fit runs
FALSE_ALARM_RATE = 0.01  # fit's default target: calibrate.IMAGE_FPR, without importing torch here
TRAIN_EPOCHS = 20
TRAIN_BATCH = 16
COMPACT_TARGET_MB = 128  # score.compact.TARGET_MB, restated so that `--help` imports no pyarrow


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: `convert`, then `ok`; either failing is "expected <expected>, got ..."."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):  # `not` so that nan fails every range
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_float = _checked(float, lambda v: v >= 0, "a number >= 0")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a number > 0")
_rate = _checked(float, lambda v: 0.0 <= v <= 1.0, "a rate in [0, 1] (e.g. 0.01 for 1 %)")
_open_rate = _checked(float, lambda v: 0.0 < v < 1.0, "a rate between 0 and 1 (e.g. 0.01 for 1 %)")


def _categories(text: str) -> list[str]:
    cats = [c.strip() for c in text.split(",") if c.strip()]
    if not cats:
        raise argparse.ArgumentTypeError("expected one or more category names, comma-separated")
    return cats


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more image names, comma-separated")
    return names


def _shift_names(text: str) -> list[str]:
    """Shift names or groups, comma-separated (as audit --shifts takes them)."""
    from promptad.data.shifts import parse_shifts

    try:
        return parse_shifts(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _location(text: str) -> str:
    """A path or URI that must not be empty: '' would mean the current folder (`--input "$UNSET"`)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path or URI, got an empty string")
    return text.strip()


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; a little wider than argparse's default."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=100)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as UserError (one line, exit 2) instead of exiting."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


EXAMPLES = {
    "fit": """examples:
  promptad fit --data /data/mvtec_ad --category bottle --out runs/bottle-effnet
  promptad fit --data s3://promptad-data/mvtec_ad --category bottle,cable --out s3://promptad-models/mvtec-v1 \\
      --workers 4 --gpus-per-worker 1 --tolerate sensor --address ray://head:10001""",
    "score": """examples:
  promptad score --model runs/bottle-effnet --input /data/incoming/bottle --output runs/scores-bottle
  promptad score --model s3://promptad-models/mvtec-v1 --input s3://inspection-archive/images/ \\
      --output s3://inspection-results/scores/mvtec-v1/ --dry-run""",
    "compact": """examples:
  promptad compact --output runs/scores-bottle
  promptad compact --output s3://inspection-results/scores/mvtec-v1/ --target-mb 256""",
    "audit": """examples:
  promptad audit --model runs/bottle-effnet --data /data/mvtec_ad --category bottle --report runs/audit-bottle
  promptad audit --model runs/bottle-effnet --data /data/mvtec_ad --report runs/audit-shifts --shifts all""",
    "recalibrate": """examples:
  promptad recalibrate --model runs/cookie --out runs/cookie-5pct --false-alarm-rate 0.05
  promptad recalibrate --model runs/cookie --out runs/cookie-v2 --exclude cookie/train/good/030.png \\
      --add /data/cleared_false_alarms.parquet""",
    "demo": """examples:
  promptad demo
  promptad demo --data /data/mvtec_ad --category bottle --workdir runs/demo-bottle""",
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="promptad", formatter_class=_Formatter,
                description="Industrial visual anomaly detection as Ray batch jobs.",
                epilog="Run `promptad COMMAND --help` for a command's flags and examples.\n\n"
                       "examples:\n  promptad demo\n"
                       "  promptad score --model runs/m --input /data/incoming --output runs/scores --dry-run")
    p.add_argument("--version", action="store_true", help="print promptad's version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=textwrap.fill(description, 96),
                              epilog=EXAMPLES[name], formatter_class=_Formatter)

    def console_flags(sp: argparse.ArgumentParser, verbose_help: str | None) -> None:
        """--verbose and --debug, which every command's console session reads (None: --verbose hidden)."""
        sp.add_argument("--verbose", action="store_true", help=verbose_help or argparse.SUPPRESS)
        sp.add_argument("--debug", action="store_true",
                        help="show the traceback of an error, keeping its exit code (default: off)")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--address", default=None, metavar="ADDR",
                        help="Ray cluster to join: HOST:6379, ray://HOST:10001 or auto (default: RAY_ADDRESS "
                             "if set, else start a local Ray for this command)")
        console_flags(sp, "also show Ray's own logs on the console (default: off; they go to the log "
                          "file the last line names)")

    def model_actors(sp: argparse.ArgumentParser, actors_help: str) -> None:
        """The model stage's actors, shared by score and audit (one definition: actors.ModelActors)."""
        sp.add_argument("--actors", type=_positive_int, default=1, metavar="N",
                        help=actors_help + " (default: %(default)s)")
        sp.add_argument("--gpus-per-actor", type=_non_negative_float, default=0.0, metavar="G",
                        help="GPUs per actor (default: %(default)g, CPU)")
        sp.add_argument("--cpus-per-actor", type=_non_negative_float, default=0.5, metavar="C",
                        help="CPUs Ray reserves per actor; whole CPUs become torch threads (default: %(default)g)")
        sp.add_argument("--batch-size", type=_positive_int, default=16, metavar="B",
                        help="images per model batch (default: %(default)s)")

    f = command("fit", "train a model on normal images (Ray Train)",
                "Fit on the normal images of one or more categories on Ray (features, memory banks, calibration; "
                "with --epochs, Ray Train trains the localization head), then write the model artifact to --out.")
    f.add_argument("--data", required=True, type=_location, metavar="URI",
                   help="MVTec AD root (ROOT/CATEGORY/train/good/...) or a Parquet/CSV manifest, local or "
                        "s3:// (required)")
    f.add_argument("--category", required=True, type=_categories, metavar="NAME[,NAME]",
                   help="categories to train, comma-separated; one model holds them all (required)")
    f.add_argument("--backbone", default="effnet-lite0", metavar="SPEC",
                   help="effnet-lite0 | effnet-lite2 | clip:<open_clip model>:<pretrained tag or weight "
                        "file> (default: %(default)s, works offline)")
    f.add_argument("--out", required=True, type=_location, metavar="URI",
                   help="artifact folder to write, local or s3:// (required)")
    f.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="training workers: Ray Train DDP workers, or with one CPU worker a plain Ray task "
                        "(default: %(default)s)")
    f.add_argument("--gpus-per-worker", type=_non_negative_float, default=0.0, metavar="G",
                   help="GPUs per worker; > 0 trains in fp16 on GPUs (default: %(default)g, CPU)")
    f.add_argument("--cpus-per-worker", type=_non_negative_float, default=0.5, metavar="C",
                   help="CPUs Ray reserves per worker (default: %(default)g)")
    f.add_argument("--cpus-per-category", type=_positive_float, default=None, metavar="C",
                   help="CPUs Ray reserves for each category's memory-bank, evidence and calibration task, which "
                        "run torch on that many threads (default: the CPUs of the nodes that can run them, those "
                        "with GPUs if --gpus-per-worker > 0, shared among the categories, at most a node's and at "
                        "least --cpus-per-worker)")
    f.add_argument("--epochs", type=_non_negative_int, default=TRAIN_EPOCHS, metavar="E",
                   help="epochs of training for the localization head on the memory's evidence of synthetic "
                        "defects (and CLIP's prompts); 0 fits the memory banks and the global branch only "
                        "(default: %(default)s, chosen from a measured quality-per-epoch curve)")
    f.add_argument("--batch-size", type=_positive_int, default=TRAIN_BATCH, metavar="B",
                   help="images per worker and step (default: %(default)s)")
    f.add_argument("--tolerate", type=_shift_names, default=[], metavar="LIST",
                   help="imaging conditions the line must accept as normal, named as audit --shifts names them "
                        "(e.g. sensor, or noise,jpeg): shifted copies of the training images join the memory "
                        "banks and the global branch, at one more backbone pass per condition and image "
                        "and a bigger bank where the copies look new (slower scoring); "
                        "without it, sensor noise, JPEG or blur read as anomalies (default: none)")
    f.add_argument("--coreset-draws", type=_positive_int, default=3, metavar="K",
                   help="coresets whose union makes each memory bank: more draws give distances closer to "
                        "the full bank's, at K x the coreset time and about K x the bank (slower scoring); "
                        "1 is plain PatchCore (default: %(default)s)")
    f.add_argument("--false-alarm-rate", type=_open_rate, default=FALSE_ALARM_RATE, metavar="RATE",
                   help="false-alarm rate on normal images the image threshold is calibrated for (held-out "
                        "normals; with fewer than 1/RATE - 1 of them it cannot be met, and the fit says what the "
                        "threshold promises instead) (default: %(default)s)")
    f.add_argument("--exclude", type=_names, default=[], metavar="NAMES",
                   help="training images to leave out of the fit, comma-separated: image_ids, paths, or the end "
                        "of a path (e.g. cookie/train/good/030.png); a name that matches no training image is an "
                        "error (default: none)")
    f.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the data order, synthetic anomalies and initialization (default: %(default)s)")
    # Advanced: a smaller model input than the backbone's default (quick tests and benchmarks).
    f.add_argument("--input-size", type=_positive_int, default=None, help=argparse.SUPPRESS)
    # Advanced: the training precision (auto: fp16 on GPU, bf16 on CPUs with native bf16, else fp32);
    # fp32 makes a 1-worker fit comparable to pipeline.fit_in_process in tests.
    f.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help=argparse.SUPPRESS)
    # Advanced: training checkpoints at most this often, and after the last epoch (fit/train.py's
    # checkpoint_due; default train.CHECKPOINT_SECONDS); 0 checkpoints every epoch (the kill-and-resume tests).
    f.add_argument("--checkpoint-seconds", type=_non_negative_float, default=None,
                   help=argparse.SUPPRESS)
    f.add_argument("--storage", default=None, type=_location, metavar="URI",
                   help="where the run's checkpoints go (training epochs, each finished category's memory and "
                        "calibration), local or s3:// (default: <--out>-checkpoints)")
    f.add_argument("--resume", action="store_true",
                   help="continue the newest run in --storage, redoing nothing it checkpointed (default: "
                        "off, start a new run)")
    common(f)

    s = command("score", "score images to a Parquet dataset (Ray Data)",
                "Score every input image to a Parquet dataset: one row per image with an anomaly score, a "
                "decision and an anomaly map. Re-running into the same --output scores only what is new, "
                "changed (another content version) or whose read failed before.")
    s.add_argument("--model", required=True, type=_location, metavar="URI",
                   help="artifact folder written by `promptad fit`, local or s3:// (required)")
    s.add_argument("--input", required=True, type=_location, metavar="URI",
                   help="folder or s3:// prefix of images (recursive), or a Parquet/CSV manifest with a 'path' "
                        "column and optional image_id, category, version (required)")
    s.add_argument("--output", required=True, type=_location, metavar="URI",
                   help="folder or s3:// prefix of the Parquet dataset, created or resumed (required)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan (inputs, already done, changed, to retry, to score, files and bytes) "
                        "and stop: nothing is read, scored or written, Ray does not start (default: off)")
    model_actors(s, "model actors scoring in parallel")
    s.add_argument("--run-id", default=None, metavar="ID",
                   help="id written in every row of this run, e.g. the scheduler's job id (default: "
                        "generated from the time)")
    s.add_argument("--no-compact", action="store_true",
                   help="do not merge small files after the run (default: off: once 32 files are below half "
                        f"of {COMPACT_TARGET_MB} MB, the run ends with `promptad compact`)")
    common(s)

    c = command("compact", "merge a scoring output's small files (no Ray)",
                "Merge the small Parquet files of a `promptad score` output into files of about --target-mb, "
                "so that the number of files follows rows / target size, not the number of nights. Atomic "
                "and resumable: after a kill, every row is still counted once, and the next compact or score "
                "finishes the job. Also drops superseded rows a killed run left. Run it after the night's "
                "score, never beside one (score also compacts by itself, see its --no-compact).")
    c.add_argument("--output", required=True, type=_location, metavar="URI",
                   help="folder or s3:// prefix written by `promptad score` (required)")
    c.add_argument("--target-mb", type=_positive_float, default=COMPACT_TARGET_MB, metavar="MB",
                   help="size of a merged file; files below half of it are merged (default: %(default)s)")
    console_flags(c, None)

    a = command("audit", "metrics, plots and visualizations on a labelled set",
                "Run the model over a labelled set and write report.html, report.json, scores.csv and "
                "per-image visualizations to --report, optionally under lighting, camera and sensor shifts.")
    a.add_argument("--model", required=True, type=_location, metavar="URI",
                   help="artifact folder written by `promptad fit`, local or s3:// (required)")
    a.add_argument("--data", required=True, type=_location, metavar="URI",
                   help="MVTec AD root (its test split) or a manifest with label and mask_path columns "
                        "(required)")
    a.add_argument("--category", type=_categories, default=None, metavar="NAME[,NAME]",
                   help="categories to audit (default: every category of the model)")
    a.add_argument("--report", required=True, type=_location, metavar="DIR",
                   help="local folder for the report (required)")
    a.add_argument("--shifts", default="", metavar="LIST",
                   help="comma-separated shifts (brightness, contrast, gamma, rotation, translation, scale, "
                        "blur, noise, jpeg), groups (lighting, camera, sensor) or all (default: none, clean "
                        "images only)")
    model_actors(a, "model actors")
    a.add_argument("--max-false-alarm", type=_rate, default=None, metavar="RATE",
                   help="target per category: the 95%% upper bound of the false-alarm rate on normal "
                        "images must be <= RATE, else exit 3 (default: no target)")
    a.add_argument("--min-recall", type=_rate, default=None, metavar="RATE",
                   help="target per category: the 95%% lower bound of recall on defective images "
                        "must be >= RATE, else exit 3 (default: no target)")
    common(a)

    r = command("recalibrate", "re-draw a model's image thresholds without refitting",
                "Apply the fit's threshold rule again to the held-out normal scores the model keeps: at another "
                "false-alarm target, without named images, or with new normal images (scored by the model), and "
                "write a new model (new model id) to --out. Memory banks and head are unchanged: to remove a "
                "defective image's patches from the memory, refit with --exclude.")
    r.add_argument("--model", required=True, type=_location, metavar="URI",
                   help="model artifact to recalibrate, local or s3:// (required)")
    r.add_argument("--out", required=True, type=_location, metavar="URI",
                   help="artifact folder for the recalibrated model, local or s3:// (required)")
    r.add_argument("--false-alarm-rate", type=_open_rate, default=None, metavar="RATE",
                   help="new false-alarm target of the image threshold (default: the model's)")
    r.add_argument("--exclude", type=_names, default=[], metavar="NAMES",
                   help="normal images to leave out of the threshold, comma-separated: paths or their ends "
                        "(default: none)")
    r.add_argument("--add", type=_location, default=None, metavar="URI",
                   help="MVTec AD root or manifest of more normal images (rows labelled 1 are left out), "
                        "scored by the model and added to the threshold's sample (default: none)")
    r.add_argument("--category", type=_categories, default=None, metavar="NAME[,NAME]",
                   help="categories to recalibrate (default: every category of the model)")
    console_flags(r, "also show library logs on the console (default: off)")

    d = command("demo", "the whole flow on a generated dataset, locally",
                "Generate a small seeded dataset (unless --data), then fit, score and audit it on one "
                "Ray; ends by printing where the model, the scores and the report are.")
    d.add_argument("--data", default=None, type=_location, metavar="URI",
                   help="MVTec AD root to use (default: generate a seeded one in <--workdir>/data)")
    d.add_argument("--category", type=_categories, default=None, metavar="NAME[,NAME]",
                   help="categories to use (default: tile when generating, else every category in --data)")
    d.add_argument("--workdir", default="demo_output", type=_location, metavar="DIR",
                   help="where data, model, scores, report and logs go; a re-run replaces its own outputs "
                        "(default: %(default)s)")
    d.add_argument("--epochs", type=_non_negative_int, default=None, metavar="E",
                   help=f"epochs of head training in the demo's fit; 0: no training (default: {TRAIN_EPOCHS}, "
                        "`promptad fit`'s)")
    common(d)
    return p


COMMANDS = {"fit": "promptad.fit.command", "score": "promptad.score.command",
            "compact": "promptad.score.compact", "audit": "promptad.audit.command",
            "recalibrate": "promptad.fit.recalibrate", "demo": "promptad.demo"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as e:
        return _user_error(e, debug)
    if getattr(args, "version", False):
        print(f"promptad {version()}")
        return 0
    if args.command is None:  # bare `promptad`: what it can do, not a usage error
        parser.print_help()
        return 2
    from promptad import console

    with console.session(args.command, verbose=args.verbose) as session:
        try:
            status = importlib.import_module(COMMANDS[args.command]).run(args)
        except UserError as e:
            return _user_error(e, debug)
        except KeyboardInterrupt:
            print("promptad: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            from promptad.data.storage import s3_error_reason

            reason = s3_error_reason(e)
            if reason is not None:  # an object-store failure past the preflight: still one line
                return _user_error(UserError(reason), debug)
            traceback.print_exc()
            closing = session.closing_line()
            if closing:
                print(closing, file=sys.stderr)
            return 1
        closing = session.closing_line()
        if closing:
            print(closing, file=sys.stderr)
    return status if isinstance(status, int) else 0


def version() -> str:
    """The installed package's version (pyproject.toml's), or "unknown" for an uninstalled checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("promptad")
    except PackageNotFoundError:
        return "unknown"


def _user_error(e: UserError, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"promptad: error: {e}", file=sys.stderr)
    return 2
