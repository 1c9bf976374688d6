"""Mistakes a user makes on the command line end in one line that says what is wrong and how to
fix it, exit code 2 and no traceback; --debug shows the traceback for a bug report.

Tests that run a command take `ray_local`: a command that got as far as starting Ray must join
the session's Ray (started with the S3 test endpoint), not start its own.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from promptad.cli import main
from promptad.demo import make_dataset

SIZE = 64  # model input size: small and fast; these tests are about messages, not quality


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A generated MVTec layout (category "tile") and a one-epoch effnet-lite0 artifact of it."""
    from promptad.artifact import save_artifact
    from promptad.datasets import load_samples
    from promptad.model import ModelConfig
    from promptad.pipeline import fit_in_process, load_images
    from promptad.training import TrainConfig

    root = tmp_path_factory.mktemp("user_errors")
    data = make_dataset(root / "data", size=SIZE, n_train=6, n_test_good=2, n_test_defect=2)
    images = {"tile": load_images(load_samples(str(data), ["tile"], "train"), SIZE)}
    model = fit_in_process(images, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                           TrainConfig(epochs=1, batch_size=4), log=None)
    save_artifact(model, str(root / "model"))
    return {"root": root, "data": str(data), "model": str(root / "model")}


def fails(argv: list[str], capsys) -> str:
    """Run the CLI in-process; assert exit 2, no traceback and exactly one stderr line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("promptad: error: ")
    return lines[0]


# --------------------------------------------------------------------------- data
def test_missing_data_folder(ray_local, tmp_path, capsys):
    line = fails(["fit", "--data", str(tmp_path / "nope"), "--category", "tile", "--out", str(tmp_path / "m")],
                 capsys)
    assert "does not exist" in line and "pass --data" in line


def test_wrong_layout(ray_local, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"not used")
    line = fails(["fit", "--data", str(tmp_path / "photos"), "--category", "tile", "--out", str(tmp_path / "m")],
                 capsys)
    assert "not an MVTec AD layout" in line and "point --data at" in line


def test_single_category_folder_given_as_data(tiny, ray_local, tmp_path, capsys):
    line = fails(["fit", "--data", f"{tiny['data']}/tile", "--category", "tile", "--out", str(tmp_path / "m")],
                 capsys)
    assert "pass its parent as --data" in line


def test_unknown_category(tiny, ray_local, tmp_path, capsys):
    line = fails(["fit", "--data", tiny["data"], "--category", "carpet", "--out", str(tmp_path / "m")], capsys)
    assert "unknown category carpet" in line and "available: tile" in line


# --------------------------------------------------------------------------- model
def test_no_artifact(tiny, ray_local, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = fails(["score", "--model", str(tmp_path / "empty"), "--input", tiny["data"],
                  "--output", str(tmp_path / "out")], capsys)
    assert "no model artifact" in line and "--out of `promptad fit`" in line


def test_unreadable_artifact(tiny, ray_local, tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "promptad.json").write_text("{ not json")
    line = fails(["audit", "--model", str(tmp_path / "broken"), "--data", tiny["data"],
                  "--report", str(tmp_path / "report")], capsys)
    assert "unreadable model artifact" in line and "promptad fit" in line


@pytest.mark.parametrize("command", ["audit", "score"])
def test_altered_artifact(command, tiny, ray_local, tmp_path, capsys):
    import shutil

    altered = tmp_path / "altered"
    shutil.copytree(tiny["model"], altered)
    with open(altered / "weights.safetensors", "ab") as f:
        f.write(b"\0")
    tail = (["--data", tiny["data"], "--report", str(tmp_path / "report")] if command == "audit" else
            ["--input", tiny["data"], "--output", str(tmp_path / "scores")])
    line = fails([command, "--model", str(altered), *tail], capsys)
    assert "does not match its model_id" in line and "promptad fit" in line


# --------------------------------------------------------------------------- scoring output
def test_output_holding_another_models_rows(tiny, ray_local, tmp_path, capsys):
    from promptad.score import OUTPUT_SCHEMA

    out = tmp_path / "scores"
    out.mkdir()
    row = {name: [None] for name in OUTPUT_SCHEMA.names}
    row.update(image_id=["x.png"], path=["x.png"], category=["tile"], model_id=["0123456789abcdef"])
    pq.write_table(pa.table(row, schema=OUTPUT_SCHEMA), out / "part-old.parquet")
    line = fails(["score", "--model", tiny["model"], "--input", f"{tiny['data']}/tile/test",
                  "--output", str(out)], capsys)
    assert "0123456789abcdef" in line and "pass a new --output" in line


# --------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv,flag", [
    (["fit", "--workers", "0"], "--workers"),
    (["fit", "--epochs", "abc"], "--epochs"),
    (["score", "--batch-size", "-1"], "--batch-size"),
    (["score", "--gpus-per-actor", "-0.5"], "--gpus-per-actor"),
    (["fit", "--category", ","], "--category"),
])
def test_bad_flag_values(argv, flag, capsys):
    required = {"fit": ["--data", "d", "--category", "c", "--out", "o"],
                "score": ["--model", "m", "--input", "i", "--output", "o"]}[argv[0]]
    line = fails([argv[0], *required, *argv[1:]], capsys)
    assert flag in line and "see --help" in line


def test_missing_required_flag_and_unknown_command(capsys):
    assert "--out" in fails(["fit", "--data", "d", "--category", "c"], capsys)
    assert "invalid choice" in fails(["train"], capsys)


# --------------------------------------------------------------------------- console script
def _console(args: list[str]) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("promptad")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=120)


def test_console_script_one_line_and_debug_traceback(tmp_path):
    argv = ["fit", "--data", str(tmp_path / "nope"), "--category", "tile", "--out", str(tmp_path / "m")]
    plain = _console(argv)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert "Traceback" not in plain.stderr and "does not exist" in plain.stderr
    debug = _console([*argv, "--debug"])
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "UserError" in debug.stderr and "does not exist" in debug.stderr
