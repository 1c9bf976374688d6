"""benchmarks/gpu_check.sh on a machine without a GPU: it refuses clearly, its dry run names only
flags the commands have, and its comparison holds runs to the precision contract."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from promptad.actors import DECISION_AGREEMENT, SCORE_TOLERANCE
from promptad.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_commands_parse_with_the_real_flags(tmp_path):
    """Every promptad step parses with promptad's own parser, and score_throughput has every flag
    the check passes it."""
    plan = gpu_check.steps(gpu_check.parse_args(["--workdir", str(tmp_path)]), tmp_path)
    assert [s.name for s in plan][:2] == ["fit on gpu", "fit on cpu"] and len(plan) == 9
    commands = {}
    for step in plan[:-1]:
        argv = step.argv[3:]  # after: python -c "...main(sys.argv[1:])"
        args = build_parser().parse_args(argv)
        commands[step.name] = args
    assert commands["fit on gpu"].gpus_per_worker == 1 and commands["fit on cpu"].gpus_per_worker == 0
    assert commands["score gpu-fitted on gpu"].gpus_per_actor == 1 and commands["audit gpu-fitted on gpu"].gpus_per_actor == 1
    assert commands["score cpu-fitted on cpu"].gpus_per_actor == 0 and commands["audit gpu-fitted on cpu"].shifts == "all"
    help_text = subprocess.run([sys.executable, plan[-1].argv[1], "--help"], capture_output=True, text=True,
                               cwd=REPO, check=True).stdout
    flags = [a for a in plan[-1].argv[2:] if a.startswith("--")]
    assert flags and all(f in help_text for f in flags), flags


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "gpu_problem", lambda: "no CUDA GPU is visible to torch")
    assert gpu_check.main(["--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "gpu_check: cannot run: no CUDA GPU is visible" in err and "--dry-run" in err
    assert not (tmp_path / "w").exists(), "nothing runs without a GPU"
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(["--epochs", "-1"])
    assert e.value.code == 2


def test_the_shell_script_dry_runs_and_refuses_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    dry = subprocess.run(["bash", script, "--dry-run", "--workdir", str(tmp_path)], env=env, capture_output=True,
                         text=True)
    assert dry.returncode == 0 and dry.stdout.count("\n# ") == 8 and "--gpus-per-worker 1" in dry.stdout
    import torch

    if not torch.cuda.is_available():
        run = subprocess.run(["bash", script, "--workdir", str(tmp_path / "w")], env=env, capture_output=True,
                             text=True)
        assert run.returncode == 2 and "cannot run: no CUDA GPU" in run.stderr


def _write_scores(folder: Path, rows: dict[str, tuple[float, bool]], errors: tuple[str, ...] = ()) -> None:
    folder.mkdir(parents=True)
    ids = list(rows) + list(errors)
    pq.write_table(pa.table({"image_id": ids,
                             "score": [rows[i][0] if i in rows else None for i in ids],
                             "is_anomalous": [rows[i][1] if i in rows else None for i in ids],
                             "error": [None if i in rows else "decode: bad" for i in ids]}), folder / "part-0.parquet")


def _write_audit(folder: Path, rows: dict[tuple[str, str], tuple[float, bool]]) -> None:
    folder.mkdir(parents=True)
    with open(folder / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "condition", "score", "is_anomalous", "error"])
        for (i, c), (s, a) in rows.items():
            w.writerow([i, c, s, a, ""])


def test_comparison_holds_runs_to_the_contract(tmp_path):
    base = {f"img{i}": (float(i), i >= 5) for i in range(10)}
    near = {k: (s + SCORE_TOLERANCE / 2, a) for k, (s, a) in base.items()}
    for name in ("gpu-gpu", "cpu-cpu", "cpu-gpu"):
        _write_scores(tmp_path / f"scores-{name}", near if name == "gpu-gpu" else base, errors=("bad",))
    flipped = dict(base, img4=(4.0, True))  # one decision of 10 differs
    _write_scores(tmp_path / "scores-gpu-cpu", flipped)
    audit = {(f"img{i}", c): (float(i), i >= 5) for i in range(4) for c in ("clean", "blur")}
    _write_audit(tmp_path / "audit-gpu", audit)
    _write_audit(tmp_path / "audit-cpu", {k: (s + 2 * SCORE_TOLERANCE, a) for k, (s, a) in audit.items()})

    rows = {r.name: r for r in gpu_check.comparisons(tmp_path)}
    gpu_fitted = rows["GPU-fitted: scored on GPU vs CPU"]
    assert gpu_fitted.images == 10 and gpu_fitted.agree == pytest.approx(0.9) and not gpu_fitted.ok
    cpu_fitted = rows["CPU-fitted: scored on GPU vs CPU"]
    assert cpu_fitted.images == 10 and cpu_fitted.agree == 1.0 and cpu_fitted.max_diff == 0 and cpu_fitted.ok
    both = rows["fitted+scored on GPU vs on CPU"]
    assert both.ok and both.max_diff == pytest.approx(SCORE_TOLERANCE / 2) and both.flagged == 0.5
    audited = rows["audit (all shifts) on GPU vs CPU"]
    assert audited.images == 8 and audited.agree == 1.0 and not audited.ok  # scores too far apart
    text = gpu_check.table(list(rows.values()), {"fit on gpu": 61.2},
                           {"images": 500, "plain_img_s": 200.0, "steady_img_s": 180.0, "steady_ratio": 0.9})
    assert "| GPU-fitted: scored on GPU vs CPU | 10 | 90.00% |" in text and "| NO |" in text
    assert f">= {DECISION_AGREEMENT:.1%}" in text and "| fit on gpu | | | | | | 61 s |" in text
    assert "ratio 0.90, target >= 0.85" in text and "180.0 img/s" in text
    assert not gpu_check.compare("nothing in common", {"a": (1.0, True)}, {"b": (1.0, True)}).ok


def test_inputs_are_the_images_not_the_masks(tmp_path, datasets_root):
    n = gpu_check.write_inputs(str(datasets_root), tmp_path / "inputs.csv")
    with open(tmp_path / "inputs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert n == len(rows) == 77 and {r["category"] for r in rows} == {"cookie"}
    assert not any("ground_truth" in r["path"] for r in rows) and len({r["image_id"] for r in rows}) == n
