"""What a new user found on the command line (issue 34): no --version, Ray's hint for a dashboard
--address cut mid-word, score's plan line printed before the bad --address was reported, and
demo --epochs whose help said "default: fit's" instead of the number."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from promptad.cli import TRAIN_EPOCHS, build_parser, main


def _one_line(argv: list[str], capsys) -> str:
    status = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in captured.err, (status, captured.err)
    assert lines[0].startswith("promptad: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def model(tiny_artifact) -> str:
    return tiny_artifact


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"promptad {version('promptad')}"


def test_demo_epochs_help_states_the_number():
    demo = next(a for a in build_parser()._actions if a.dest == "command").choices["demo"]
    text = " ".join(demo.format_help().split())
    assert f"(default: {TRAIN_EPOCHS}, `promptad fit`'s)" in text


def test_a_dashboard_address_is_one_whole_line(model, tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    line = _one_line(["score", "--model", model, "--input", str(tmp_path), "--output",
                      str(tmp_path / "o"), "--address", "http://127.0.0.1:8265"], capsys)
    assert "--address http://127.0.0.1:8265 is a dashboard (Jobs API) address" in line, line
    assert line.endswith("leave --address out to start a local Ray"), line


def test_ray_hints_are_cut_at_a_word():
    from promptad.raycluster import _shorten

    text = "Can't find a `node_ip_address.json` file from /tmp/ray/session_latest. " * 10
    short = _shorten(text, 100)
    assert short.endswith(" ...") and len(short) <= 104 and text.startswith(short[:-4])
    assert text[len(short) - 4] == " "  # the cut falls between words


def test_score_reports_a_bad_address_before_its_plan_line(model, tmp_path, capsys):
    """Before, `score: 1 inputs: ... scoring 1 with model ...` came first, then the error."""
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _one_line(["score", "--model", model, "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                      "--address", f"127.0.0.1:{port}"], capsys)
    assert f"no Ray cluster answers at --address 127.0.0.1:{port}" in line
