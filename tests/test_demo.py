"""`promptad demo`: the generated dataset, the workdir rules, and one real run of the whole flow
through the console script, as `make demo` runs it; the README's Python snippets for reading
the output are executed on that run's output."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

from promptad import demo
from promptad.cli import TRAIN_EPOCHS
from promptad.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_dataset_is_an_mvtec_layout_with_exact_masks(tmp_path):
    from promptad.data.datasets import load_samples

    root = demo.make_dataset(tmp_path / "a", size=64, n_train=5, n_test_good=3, n_test_defect=4)
    train = load_samples(str(root), ["tile"], "train")
    test = load_samples(str(root), ["tile"], "test")
    assert len(train) == 5 and {s.defect for s in train} == {"good"}
    assert sorted((s.defect, s.label) for s in test) == [("good", 0)] * 3 + [(demo.DEFECT, 1)] * 4
    for s in test:
        img = np.asarray(Image.open(s.path))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        if s.label:
            mask = np.asarray(Image.open(s.mask_path))
            assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
        else:
            assert s.mask_path is None


def test_dataset_is_seeded(tmp_path):
    kwargs = {"size": 48, "n_train": 3, "n_test_good": 2, "n_test_defect": 2}
    a = demo.make_dataset(tmp_path / "a", **kwargs)
    b = demo.make_dataset(tmp_path / "b", **kwargs)
    c = demo.make_dataset(tmp_path / "c", seed=1, **kwargs)
    assert _digest(a) == _digest(b) != _digest(c)


def test_workdir_of_someone_else_is_refused_and_a_demo_workdir_is_reset(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty and was not made by `promptad demo`"):
        demo._prepare_workdir(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"

    mine = tmp_path / "demo_output"
    demo._prepare_workdir(mine)
    (mine / "scores").mkdir()
    (mine / "scores" / "part-old.parquet").write_bytes(b"old")
    (mine / "notes.txt").write_text("kept")
    demo._prepare_workdir(mine)
    assert not (mine / "scores").exists() and (mine / "notes.txt").read_text() == "kept"


def test_missing_data_is_one_line(tmp_path, capsys):
    from promptad.cli import main

    assert main(["demo", "--data", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "w").exists()  # nothing written before the data is known to be good


def _readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "demo_output/scores" in b]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """One `promptad demo` in a fresh workdir, through the console script as `make demo` runs it."""
    cwd = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(Path(sys.executable).with_name("promptad")), "demo"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"cwd": cwd, "workdir": cwd / "demo_output", "stdout": proc.stdout, "stderr": proc.stderr}


# What Ray prints of its own when it forwards workers' output or logs to the console.
RAY_INTERNALS = re.compile(r"\(\w+ pid=\d+\)|core_worker\.cc|TrainingReport\(|PlacementGroupCleaner|"
                           r"Deprecat|Started a local Ray|streaming_executor|logging_progress|"
                           r"^\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


@pytest.mark.slow
def test_demo_console_is_short_and_free_of_ray_internals(demo_run):
    lines = (demo_run["stdout"] + demo_run["stderr"]).splitlines()
    assert len(lines) <= 80, len(lines)
    noisy = [line for line in lines if RAY_INTERNALS.search(line)]
    assert not noisy, noisy[:5]
    epochs = [line for line in lines if re.match(r"epoch \d+/\d+  loss ", line)]
    assert len(epochs) == TRAIN_EPOCHS  # fit's lines come through from the training task
    assert f"[demo] fit: effnet-lite0 on tile, {TRAIN_EPOCHS} epochs (Ray)" in lines
    assert any(re.match(rf"fit: training on \d+ evidence rows of 1 category, 1 worker, {TRAIN_EPOCHS} epochs$", line) for line in lines), lines
    assert re.search(r"  \(\d+ steps x 1 worker\)$", epochs[0]), epochs
    named = re.search(r"^promptad: Ray's logs: (\S+\.log)", demo_run["stderr"], re.M)
    assert named, demo_run["stderr"][-1000:]
    log = Path(named.group(1))
    assert log.parent == demo_run["workdir"] / "logs"
    assert "Started a local Ray instance" in log.read_text()  # Ray's own lines went there


@pytest.mark.slow
def test_demo_read_it_hint_runs_as_printed(demo_run):
    hint = re.search(r"read it: (.+)$", demo_run["stdout"], re.M).group(1)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"  # as in a new shell, without the venv activated
    proc = subprocess.run(["/bin/sh", "-c", hint], cwd=demo_run["cwd"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "image_id" in proc.stdout and "score" in proc.stdout and "is_anomalous" in proc.stdout


@pytest.mark.slow
def test_demo_runs_the_whole_flow(demo_run):
    workdir, out = demo_run["workdir"], demo_run["stdout"]
    # The closing lines say where everything is.
    for path in ("model", "scores", "report/report.html", "report/visualization_results"):
        assert str(workdir / path) in out, path
    assert "pd.read_parquet(" in out and sys.executable in out

    n_test = demo.N_TEST_GOOD + demo.N_TEST_DEFECT
    table = pads.dataset(str(workdir / "scores"), format="parquet").to_table()
    assert table.num_rows == n_test and len(set(table["image_id"].to_pylist())) == n_test
    assert table["error"].null_count == n_test
    assert table.schema.field("score").type == pa.float32()
    assert table.schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    manifest = json.loads((workdir / "model" / "promptad.json").read_text())
    assert set(table["model_id"].to_pylist()) == {manifest["model_id"]}
    assert manifest["training"]["epochs"] == TRAIN_EPOCHS

    report = json.loads((workdir / "report" / "report.json").read_text())
    tile = report["categories"][demo.CATEGORY]
    assert tile["counts"]["images"] == n_test and tile["counts"]["errors"] == 0
    # Seeded data, yet Ray Train is not bit-reproducible: a loose floor that still catches a broken flow.
    assert tile["clean"]["image_auroc"] > 0.7
    pictures = list((workdir / "report" / "visualization_results").rglob("*.png"))
    assert len(pictures) == n_test


@pytest.mark.slow
def test_readme_snippets_read_the_demo_output(demo_run):
    blocks = _readme_python_blocks()
    assert len(blocks) == 3  # pandas, the current rows with DuckDB, and DuckDB
    for code in blocks:
        proc = subprocess.run([sys.executable, "-c", code], cwd=demo_run["cwd"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip()
    assert Image.open(demo_run["cwd"] / "worst_map.png").mode == "L"
