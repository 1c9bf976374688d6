"""`promptad demo`: the whole flow on a machine that has nothing but the install.

A new user (or CI) sees every step work before pointing the tool at real data: a seeded MVTec-AD
layout of procedural textures with synthetic defects and exact masks is generated (unless --data
is given), then the same code paths as the commands run on one local Ray (or --address):
fit (Ray tasks; Ray Train for DDP) -> score (Ray Data -> Parquet) -> audit (report + visualizations).
Arguments for each step are parsed by the CLI's own parser, so flags live in one place.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from promptad import console, raycluster
from promptad.cli import TRAIN_EPOCHS, build_parser
from promptad.data import datasets
from promptad.data.synthesis import procedural_texture, synthesize_anomaly
from promptad.errors import UserError

CATEGORY = "tile"
IMAGE_SIZE = 192
N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT = 24, 8, 8
DEFECT = "synthetic"
SEED = 0
# Written into --workdir so a re-run may replace the demo's own outputs and nothing else.
MARKER = ".promptad-demo"
OUTPUTS = ("model", "checkpoints", "scores", "report", "logs", "test_images.csv")


def _crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of the category's surface with a little sensor noise: normal variation."""
    y, x = rng.integers(0, texture.shape[0] - size + 1, 2)
    crop = texture[y:y + size, x:x + size].astype(np.float32)
    crop += rng.normal(0.0, 2.0, crop.shape).astype(np.float32)
    return np.rint(np.clip(crop, 0, 255)).astype(np.uint8)


def make_dataset(root: Path, category: str = CATEGORY, size: int = IMAGE_SIZE, seed: int = SEED,
                 n_train: int = N_TRAIN, n_test_good: int = N_TEST_GOOD,
                 n_test_defect: int = N_TEST_DEFECT) -> Path:
    """Write ROOT/CATEGORY/{train/good, test/good, test/DEFECT, ground_truth/DEFECT} and return ROOT.

    Every image is a crop of one large procedural texture (the product's surface); defects come
    from synthesis.synthesize_anomaly, so each mask (0/255 PNG) is exact to the pixel. The same
    seed writes the same bytes.
    """
    texture = procedural_texture(3 * size, np.random.default_rng([seed, 0]))
    base = root / category
    folders = {"train": base / "train" / "good", "good": base / "test" / "good",
               "defect": base / "test" / DEFECT, "mask": base / "ground_truth" / DEFECT}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for split, count, stream in (("train", n_train, 1), ("good", n_test_good, 2)):
        for i in range(count):
            img = _crop(texture, size, np.random.default_rng([seed, stream, i]))
            Image.fromarray(img).save(folders[split] / f"{i:03d}.png")
    for i in range(n_test_defect):
        rng = np.random.default_rng([seed, 3, i])
        img, mask = synthesize_anomaly(_crop(texture, size, rng), rng)
        Image.fromarray(img).save(folders["defect"] / f"{i:03d}.png")
        Image.fromarray((mask > 0.5).astype(np.uint8) * 255).save(folders["mask"] / f"{i:03d}_mask.png")
    return root


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _prepare_workdir(workdir: Path) -> None:
    """Create the workdir, or clear the previous demo's outputs in it; refuse anyone else's folder.

    The generated data/ is replaced only when it is generated again, so `--data` may point at a
    previous demo's data."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; pass a folder for the demo's outputs")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise UserError(f"--workdir {workdir} is not empty and was not made by `promptad demo`; "
                        "pass a new or empty folder")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).touch()
    for name in OUTPUTS:
        _remove(workdir / name)


def write_test_manifest(path: Path, data: str, categories: list[str]) -> int:
    """CSV manifest (path, image_id, category) of the test images, the input of `score`.

    A manifest (rather than a folder) tells `score` each image's category, so a model of several
    categories scores each image with the right memory bank; ids match the audit's.
    """
    samples = datasets.load_samples(data, categories, "test")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "image_id", "category"])
        writer.writerows([s.path, s.image_id, s.category] for s in samples)
    return len(samples)


def _all_categories(data: str) -> list[str]:
    """Every category in --data; load_samples turns a wrong --data into a one-line error."""
    found = sorted({s.category for s in datasets.load_samples(data, None, "train") if s.category})
    if not found:
        raise UserError(f"--data {data} names no categories; pass --category NAME[,NAME]")
    return found


def _step(argv: list[str], common: list[str]) -> argparse.Namespace:
    return build_parser().parse_args([*argv, *common])


def run(args: argparse.Namespace) -> None:
    """Generate (or take) the data, then fit -> score -> audit, then say where everything is."""
    from promptad.audit import command as audit
    from promptad.fit import command as fit
    from promptad.score import command as score

    workdir = Path(args.workdir).expanduser().resolve()
    if args.data:  # a wrong --data or --category fails here, before anything is written
        data = args.data
        categories = args.category or _all_categories(data)
        datasets.load_samples(data, categories, "train")
        _prepare_workdir(workdir)
    else:
        _prepare_workdir(workdir)
        categories = args.category or [CATEGORY]
        print(f"[demo] generating a seeded MVTec-AD layout of {', '.join(categories)} in {workdir / 'data'}")
        _remove(workdir / "data")
        for i, category in enumerate(categories):  # one surface texture per category
            make_dataset(workdir / "data", category=category, seed=SEED + i)
        data = str(workdir / "data")
    cats = ",".join(categories)
    common = (["--address", args.address] if args.address else []) + (["--debug"] if args.debug else []) \
        + (["--verbose"] if args.verbose else [])
    console.set_log_dir(str(workdir / "logs"))
    raycluster.connect(args.address)  # one Ray for the three steps

    model, scores, report = workdir / "model", workdir / "scores", workdir / "report"
    epochs = TRAIN_EPOCHS if args.epochs is None else args.epochs
    print(f"[demo] fit: effnet-lite0 on {cats}, {console.counted(epochs, 'epoch')} (Ray)")
    fit.run(_step(["fit", "--data", data, "--category", cats, "--backbone", "effnet-lite0",
                   "--out", str(model), "--storage", str(workdir / "checkpoints"),
                   "--epochs", str(epochs)], common))

    manifest = workdir / "test_images.csv"
    n = write_test_manifest(manifest, data, categories)
    print(f"[demo] score: {n} test images -> Parquet (Ray Data)")
    score.run(_step(["score", "--model", str(model), "--input", str(manifest), "--output", str(scores)],
                    common))

    print("[demo] audit: metrics, plots and visualizations")
    audit.run(_step(["audit", "--model", str(model), "--data", data, "--category", cats,
                     "--report", str(report)], common))

    print(f"""
[demo] done.
  model artifact   {model}
  scores (Parquet) {scores}
      read it: {read_hint(scores)}
  audit report     {report / 'report.html'}  (metrics in {report / 'report.json'})
  visualizations   {report / audit.VIS_DIR}""")


def read_hint(scores: Path) -> str:
    """A shell command that prints the scores table's main columns, with this environment's Python
    (which has pandas): a bare `python` outside the venv may have none. Named columns: the whole
    frame is too wide for a terminal, and pandas then shows only its first and last columns."""
    columns = ["image_id", "score", "is_anomalous", "defect_area", "error"]
    code = f"import pandas as pd; print(pd.read_parquet({json.dumps(str(scores))})[{json.dumps(columns)}])"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"
