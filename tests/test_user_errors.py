"""Mistakes a user makes on the command line end in one line that says what is wrong and how to
fix it, exit code 2 and no traceback; --debug shows the traceback for a bug report.

Tests that run a command take `ray_local`: a command that got as far as starting Ray must join
the session's Ray (started with the S3 test endpoint), not start its own.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time
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
    from promptad.data.datasets import load_samples
    from promptad.fit.pipeline import fit_in_process, load_images
    from promptad.learning.training import TrainConfig
    from promptad.models.artifact import save_artifact
    from promptad.models.model import ModelConfig

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
    from promptad.score.command import OUTPUT_SCHEMA

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
    (["fit", "--tolerate", "noise,fog"], "--tolerate"),
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
def _console(args: list[str], **env_vars: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("promptad")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **env_vars}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=120)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `promptad: error:` line of a failed command (commands may print progress before)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("promptad: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_console_script_one_line_and_debug_traceback(tmp_path):
    argv = ["fit", "--data", str(tmp_path / "nope"), "--category", "tile", "--out", str(tmp_path / "m")]
    plain = _console(argv)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert "Traceback" not in plain.stderr and "does not exist" in plain.stderr
    debug = _console([*argv, "--debug"])
    assert debug.returncode == 2  # the exit code of the error it shows
    assert "Traceback" in debug.stderr and "UserError" in debug.stderr and "does not exist" in debug.stderr


# --------------------------------------------------------------------------- before Ray starts
def test_checks_before_ray_answer_within_seconds(tiny, tmp_path):
    """A missing or non-model --model, an --output that is a file, an empty --input: one line each,
    before Ray starts (no log file is even opened). The issue asks for under 2 s; asserted with a
    wide margin for a loaded test machine, the measured times are printed."""
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.csv").write_text("path,image_id\n")
    inputs = f"{tiny['data']}/tile/test"
    cases = [
        (["--model", str(tmp_path / "nope"), "--input", inputs, "--output", str(tmp_path / "o")], "does not exist"),
        (["--model", str(tmp_path / "not-a-model"), "--input", inputs, "--output", str(tmp_path / "o")],
         "no model artifact"),
        (["--model", tiny["model"], "--input", inputs, "--output", str(tmp_path / "a-file")], "is a file"),
        (["--model", tiny["model"], "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")],
         "is empty: no images"),
        (["--model", tiny["model"], "--input", str(tmp_path / "empty.csv"), "--output", str(tmp_path / "o")],
         "is empty: no rows"),
        (["--model", tiny["model"], "--input", "", "--output", str(tmp_path / "o")], "empty string"),
    ]
    logs = tmp_path / "logs"
    for argv, words in cases:
        start = time.monotonic()
        proc = _console(["score", *argv], PROMPTAD_LOG_DIR=str(logs))
        elapsed = time.monotonic() - start
        line = _one_error_line(proc)
        print(f"{elapsed:.2f} s: {line}")
        assert words in line
        assert elapsed < 10
    assert not logs.exists()  # Ray was never prepared


# --------------------------------------------------------------------------- a wrong --address
WRONG = "127.0.0.1:1"  # nothing listens on port 1


@pytest.mark.parametrize("command", ["fit", "score", "audit", "demo"])
def test_wrong_address_fails_fast_for_every_command(command, tiny, tmp_path):
    argv = {
        "fit": ["--data", tiny["data"], "--category", "tile", "--out", str(tmp_path / "m"), "--input-size", "64"],
        "score": ["--model", tiny["model"], "--input", f"{tiny['data']}/tile/test", "--output", str(tmp_path / "o")],
        "audit": ["--model", tiny["model"], "--data", tiny["data"], "--report", str(tmp_path / "r")],
        "demo": ["--workdir", str(tmp_path / "w")],
    }[command]
    start = time.monotonic()
    proc = _console([command, *argv, "--address", WRONG])
    elapsed = time.monotonic() - start
    line = _one_error_line(proc)
    assert f"--address {WRONG}" in line and "connection refused" in line and "ray status" in line
    assert elapsed < 30, elapsed


def test_address_that_answers_but_is_not_ray_fails_at_the_deadline(tiny, tmp_path):
    """A port that accepts connections and never speaks Ray's protocol: the TCP probe passes and
    ray.init would wait; the deadline ends the command with the same kind of line."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        start = time.monotonic()
        proc = _console(["score", "--model", tiny["model"], "--input", f"{tiny['data']}/tile/test",
                         "--output", str(tmp_path / "o"), "--address", address], PROMPTAD_CONNECT_TIMEOUT_S="4")
        elapsed = time.monotonic() - start
    finally:
        server.close()
    line = _one_error_line(proc)
    assert f"--address {address}" in line and ("within 4 s" in line or "check that the cluster is up" in line)
    assert elapsed < 30, elapsed


def test_the_default_deadline_leaves_room_under_30_s():
    from promptad import raycluster

    # what a command does before it connects (loading data, a model) gets the rest of the 30 s
    assert raycluster.PROBE_TIMEOUT_S + raycluster.CONNECT_TIMEOUT_S <= 23


# --------------------------------------------------------------------------- help
def _subparsers():
    from promptad.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_flag_says_what_it_does_and_its_default():
    _, commands = _subparsers()
    assert set(commands) == {"fit", "score", "compact", "audit", "recalibrate", "demo"}
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            flag = "/".join(action.option_strings)
            assert action.help and len(action.help) > 15, (name, flag)
            if action.required:
                assert "(required)" in action.help, (name, flag)
            else:
                assert "default" in action.help, (name, flag, action.help)


def test_each_command_help_ends_with_examples_that_parse(capsys):
    from promptad.cli import build_parser

    _, commands = _subparsers()
    for name in commands:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([name, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        examples = text.split("\nexamples:\n", 1)[1]
        commands_shown = [" ".join(shlex.split(block.replace("\\\n", " "))[1:])
                          for block in re.split(r"\n(?=  promptad )", examples.strip())]
        assert 1 <= len(commands_shown) <= 2
        for example in commands_shown:
            args = build_parser().parse_args(shlex.split(example))
            assert args.command == name


def test_bare_promptad_lists_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in ("fit", "score", "compact", "audit", "demo"):
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), out
    assert "required" not in out


def test_cli_training_defaults_are_train_configs():
    """`promptad fit` restates TrainConfig's defaults (its --help imports no torch): a fit at the
    defaults trains what benchmarks/quality.py measured."""
    from promptad.cli import TRAIN_BATCH, TRAIN_EPOCHS, build_parser
    from promptad.learning.training import TrainConfig

    args = build_parser().parse_args(["fit", "--data", "d", "--category", "c", "--out", "o"])
    assert (args.epochs, args.batch_size) == (TRAIN_EPOCHS, TRAIN_BATCH) == (TrainConfig.epochs, TrainConfig.batch_size)
