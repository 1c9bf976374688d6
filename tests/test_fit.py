"""`promptad fit` on Ray Train: DDP synchronization, kill and resume, S3, several categories, and
the one-line errors. Tiny generated data (64 px inputs, a dozen images per category) keeps every
run at seconds of training; the cost is Ray Train's startup.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptad import fit, storage
from promptad.cli import build_parser, main
from promptad.synthesis import procedural_texture

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # model input size (the hidden --input-size flag): fast, and enough for effnet-lite0's stride 16


def make_category(root: Path, category: str, n: int, seed: int) -> list[Path]:
    """n normal images of one generated surface (small noise per image) in ROOT/CATEGORY/train/good."""
    rng = np.random.default_rng(seed)
    base = procedural_texture(80, rng).astype(np.int16)
    folder = root / category / "train" / "good"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two categories, 12 normal images each, and one truncated file among tile's."""
    root = tmp_path_factory.mktemp("fit_data")
    make_category(root, "tile", 12, seed=1)
    make_category(root, "wood", 12, seed=2)
    (root / "tile" / "train" / "good" / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def fit_args(data_uri: str, out: str, *extra: str, categories: str = "tile,wood"):
    return build_parser().parse_args(["fit", "--data", data_uri, "--category", categories, "--out", out,
                                      "--input-size", str(SIZE), "--batch-size", "4", *extra])


def fails(argv: list[str], capsys) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one stderr line, no traceback; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, lines
    assert lines[0].startswith("promptad: error: ")
    return lines[0]


# --------------------------------------------------------------------------- pure functions
def test_epoch_shards_are_equal_sized_disjoint_and_seeded():
    ids = np.arange(11)
    shards = [fit.epoch_shard(ids, seed=0, epoch=3, rank=r, world=3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded: DDP needs the same step count on every rank
    assert set(np.concatenate(shards)) == set(ids)  # every image is seen in the epoch
    again = [fit.epoch_shard(ids, seed=0, epoch=3, rank=r, world=3) for r in range(3)]
    assert all((a == b).all() for a, b in zip(shards, again))
    other = fit.epoch_shard(ids, seed=0, epoch=4, rank=0, world=3)
    assert not np.array_equal(other, shards[0])  # a new order every epoch


def test_default_storage_is_next_to_the_artifact():
    assert fit.default_storage("/models/screws/") == "/models/screws-checkpoints"
    assert fit.default_storage("s3://bucket/models/screws") == "s3://bucket/models/screws-checkpoints"
    assert fit.default_storage("s3://bucket") == "s3://bucket/checkpoints"


# --------------------------------------------------------------------------- errors
def test_no_normal_training_images(tmp_path, capsys):
    (tmp_path / "data" / "tile" / "train" / "crack").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "data" / "tile" / "train" / "crack" / "a.png")
    line = fails(["fit", "--data", str(tmp_path / "data"), "--category", "tile", "--out", str(tmp_path / "m")], capsys)
    assert "no normal training images" in line and "train/good" in line


def test_unknown_category(data, tmp_path, capsys):
    line = fails(["fit", "--data", str(data), "--category", "tile,carpet", "--out", str(tmp_path / "m")], capsys)
    assert "unknown category carpet" in line and "available: tile, wood" in line


def test_storage_not_writable(data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    line = fails(["fit", "--data", str(data), "--category", "tile", "--out", str(tmp_path / "m"),
                  "--storage", str(tmp_path / "a_file" / "ckpt"), "--input-size", str(SIZE)], capsys)
    assert "--storage" in line and "is not writable" in line


def test_resume_with_nothing_to_resume(data, tmp_path, capsys):
    argv = ["fit", "--data", str(data), "--category", "tile", "--out", str(tmp_path / "m"),
            "--storage", str(tmp_path / "ckpt"), "--input-size", str(SIZE), "--resume"]
    line = fails(argv, capsys)
    assert "nothing to resume" in line and "without --resume" in line
    # A run that was killed before its first checkpoint has nothing to resume either.
    run = tmp_path / "ckpt" / "fit-20260101T000000Z-abcdef"
    run.mkdir(parents=True)
    (run / fit.RUN_FILE).write_text("{}")
    line = fails(argv, capsys)
    assert "stopped before its first checkpoint" in line


def test_resume_with_other_flags(data, tmp_path, capsys):
    config = fit._run_config(fit_args(str(data), str(tmp_path / "m"), "--epochs", "3", categories="tile"))
    run = tmp_path / "ckpt" / "fit-20260101T000000Z-abcdef"
    (run / "epoch_0001").mkdir(parents=True)
    (run / "epoch_0001" / fit.STATE_FILE).write_bytes(b"")
    (run / fit.RUN_FILE).write_text(json.dumps(config))
    line = fails(["fit", "--data", str(data), "--category", "tile", "--out", str(tmp_path / "m"), "--input-size",
                  str(SIZE), "--batch-size", "4", "--storage", str(tmp_path / "ckpt"), "--epochs", "5", "--resume"],
                 capsys)
    assert "cannot resume" in line and "--epochs 5 (run has 3)" in line


def test_more_workers_than_the_machine(ray_local, data, tmp_path, capsys):
    cpus = ray_local.cluster_resources()["CPU"]
    line = fails(["fit", "--data", str(data), "--category", "tile", "--out", str(tmp_path / "m"),
                  "--input-size", str(SIZE), "--workers", str(int(cpus * 4) + 2)], capsys)
    assert "CPUs but this machine's Ray has" in line and "lower --workers" in line and "\n" not in line


# --------------------------------------------------------------------------- training runs
EPOCHS = "6"  # tiny epochs take ~1 s: a long enough run that the kill lands before its end


@pytest.fixture(scope="module")
def baseline(ray_local, data, tmp_path_factory) -> dict:
    """One uninterrupted run, the user's command with default resources (--workers 2 at 0.5 CPU each
    on this 2-CPU machine) on both categories. Several tests read it."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("fit_baseline")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = fit.run(fit_args(str(data), str(root / "model"), "--workers", "2", "--epochs", EPOCHS,
                                   "--storage", str(root / "ckpt")))
    return {"summary": summary, "stderr": err.getvalue(), "model": root / "model"}


def _images(data: Path, cats: list[str], n: int) -> tuple[np.ndarray, list[str]]:
    paths = [(c, p) for c in cats for p in sorted((data / c / "train" / "good").glob("0*.png"))[:n]]
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE))) for _, p in paths]), \
        [c for c, _ in paths]


@pytest.mark.slow
def test_ddp_keeps_workers_in_sync(baseline):
    m = baseline["summary"].metrics
    assert m["world"] == 2 and m["steps"] >= 2 and m["epoch"] == int(EPOCHS)
    assert len(set(m["shard_digests"])) == 2  # the two ranks trained on different images ...
    assert len(set(m["param_digests"])) == 1  # ... and hold identical parameters afterwards
    assert m["param_digests"][0] != m["initial_digest"]  # which did change


@pytest.mark.slow
def test_bad_training_image_is_skipped_with_a_warning(baseline):
    summary = baseline["summary"]
    assert [Path(p).name for p in summary.skipped_images] == ["zz_truncated.png"]
    assert "skipping unreadable training image" in baseline["stderr"] and "zz_truncated.png" in baseline["stderr"]
    from promptad.artifact import read_manifest

    training = read_manifest(str(baseline["model"]))["training"]
    assert training["skipped_images"] == 1
    assert sum(training["train_images"].values()) + sum(training["holdout_images"].values()) == 24


@pytest.mark.slow
def test_two_categories_share_prompts_and_head_with_a_bank_and_threshold_each(baseline, data):
    from promptad.artifact import load_artifact
    from promptad.predict import predict

    model = load_artifact(str(baseline["model"]))
    assert model.categories == ["tile", "wood"]
    assert set(model.banks) == {"tile", "wood"}
    assert model.calibration["tile"].image_threshold != model.calibration["wood"].image_threshold
    assert all(np.isfinite(model.calibration[c].image_threshold) for c in model.categories)
    training = model.manifest["training"]
    assert min(training["holdout_images"].values()) >= 2  # calibrated on held-out normals of each category
    images, cats = _images(data, ["tile", "wood"], 2)
    assert np.isfinite(predict(model, images, cats).scores).all()


def _tensors(uri: str) -> dict:
    from safetensors.numpy import load

    return load(storage.read_bytes(uri))


@pytest.mark.slow
def test_killed_and_resumed_run_matches_the_uninterrupted_one(ray_local, baseline, data, tmp_path):
    """Kill a 2-worker job's driver (its whole process group) after its first checkpoint, as a
    preempted `ray job submit` would be, resume it, and get the artifact the uninterrupted run with
    the same seed gave. The job runs on the session's Ray, which kills a dead driver's actors (the
    Ray Train controller and workers) as it would on a cluster, and is warm, which saves a start."""
    from promptad.artifact import load_artifact
    from promptad.predict import predict

    storage_dir, out = tmp_path / "ckpt", tmp_path / "resumed"
    cmd = [sys.executable, str(REPO / "jobs" / "train.py"), "--data", str(data), "--category", "tile,wood",
           "--out", str(out), "--input-size", str(SIZE), "--batch-size", "4", "--workers", "2",
           "--epochs", EPOCHS, "--storage", str(storage_dir),
           "--address", ray_local.get_runtime_context().gcs_address]
    env = dict(os.environ)
    log = tmp_path / "killed_run.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not list(storage_dir.glob(f"fit-*/epoch_0001/{fit.STATE_FILE}")):
            assert proc.poll() is None, "training exited before its first checkpoint:\n" + log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started (same process group)
        proc.wait()
    (run_dir,) = storage_dir.glob("fit-*")
    assert max(fit._checkpoint_epochs(str(run_dir))) < int(EPOCHS), "the run finished before it was killed"
    assert not (out / "promptad.json").exists()

    resumed = fit.run(fit_args(str(data), str(out), "--workers", "2", "--epochs", EPOCHS,
                               "--storage", str(storage_dir), "--resume"))
    assert resumed.run_dir == str(run_dir) and resumed.metrics["epoch"] == int(EPOCHS)

    a, b = load_artifact(str(baseline["model"])), load_artifact(str(out))
    assert b.manifest["training"]["resumed"] is True
    wa, wb = _tensors(str(baseline["model"] / "weights.safetensors")), _tensors(str(out / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5, err_msg=k)
    for cat in ("tile", "wood"):
        np.testing.assert_allclose(a.banks[cat].numpy(), b.banks[cat].numpy(), rtol=1e-4, atol=1e-4)
        assert a.calibration[cat].image_threshold == pytest.approx(b.calibration[cat].image_threshold, rel=1e-3)
    images, cats = _images(data, ["tile", "wood"], 2)
    np.testing.assert_allclose(predict(a, images, cats).scores, predict(b, images, cats).scores, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_data_checkpoints_and_artifact_on_s3(ray_local, data, s3_bucket):
    from promptad.artifact import load_artifact
    from promptad.predict import predict

    for path in sorted((data / "tile" / "train" / "good").glob("0*.png")):
        storage.write_bytes(f"{s3_bucket}/data/tile/train/good/{path.name}", path.read_bytes())
    summary = fit.run(fit_args(f"{s3_bucket}/data", f"{s3_bucket}/model", "--workers", "1", "--epochs", "1",
                               "--storage", f"{s3_bucket}/ckpt", categories="tile"))
    assert summary.run_dir.startswith(f"{s3_bucket}/ckpt/fit-")
    assert storage.exists(storage.join(summary.run_dir, "epoch_0001", fit.STATE_FILE))
    assert storage.exists(storage.join(summary.run_dir, fit.RUN_FILE))
    model = load_artifact(f"{s3_bucket}/model")
    assert model.model_id == summary.model_id and model.categories == ["tile"]
    img = np.asarray(Image.open(data / "tile" / "train" / "good" / "000.png").convert("RGB").resize((SIZE, SIZE)))
    assert np.isfinite(predict(model, img[None], ["tile"]).scores).all()
