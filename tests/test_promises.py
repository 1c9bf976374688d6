"""Fault tests for what the README promises (issue 34, item 4), each failing if the promise breaks:
transient S3 errors are retried and a scoring job still writes every row (a permanent failure is
an error row); an s3:// weight file is downloaded once per node; the newest two training
checkpoints are kept; a format-1 artifact is refused in one line; `score --dry-run` starts no Ray
and reads no images. (A Train worker killed mid-fit is in test_fit.py, beside the run it is
compared with.) Faults come from tests/conftest.py's S3Faults, in front of the session's moto.
"""
from __future__ import annotations

import io
import json
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from promptad.cli import main
from promptad.data import storage

SIZE = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A real (untrained, 64 px) one-category artifact: seconds to make."""
    from promptad.fit.pipeline import fit_in_process
    from promptad.learning.training import TrainConfig
    from promptad.models.artifact import save_artifact
    from promptad.models.model import ModelConfig

    rng = np.random.default_rng(0)
    fitted = fit_in_process({"tile": rng.integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)},
                            ModelConfig(backbone="effnet-lite0", input_size=SIZE), TrainConfig(epochs=0), log=None)
    uri = str(tmp_path_factory.mktemp("model") / "m")
    save_artifact(fitted, uri)
    return uri


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.normal(128, 20, (48, 56, 3)).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _key(uri: str) -> str:
    """The request path of an s3:// URI on the (path-style) endpoint."""
    return "/" + uri[len("s3://"):]


# --------------------------------------------------------------------------- S3 faults
def test_transient_s3_faults_are_retried_by_every_read(s3_bucket, s3_faults):
    """storage's S3 client retries throttling, 500s, resets and waits out a slow object; a denied
    object is an OSError at once (not retried: it is not transient)."""
    uri = storage.join(s3_bucket, "obj.bin")
    storage.write_bytes(uri, b"x" * 1000)
    s3_faults.inject(_key(uri), "503", "500", "reset", 1.0)
    t0 = time.monotonic()
    assert storage.read_bytes(uri) == b"x" * 1000
    assert [f for _, _, f in s3_faults.fired] == ["503", "500", "reset", 1.0]
    denied = storage.join(s3_bucket, "denied.bin")
    storage.write_bytes(denied, b"y")
    s3_faults.inject(_key(denied), forever="403")
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        storage.read_bytes(denied)
    assert time.monotonic() - t0 < 15  # the SDK's backoff: under 1 s per retry here
    assert [p for _, p, _ in s3_faults.fired].count(_key(denied)) == 1  # not retried


@pytest.mark.slow
def test_score_job_survives_s3_faults_with_every_row(ray_local, model, s3_bucket, s3_faults, capsys):
    """A score job from S3 to S3 through throttling, 500s, connection resets, a slow object and a
    failed output write finishes with one row per input, each with the score of the fault-free
    bytes; an object that stays denied is a `read:` error row, and the job still succeeds."""
    from promptad.models.artifact import load_artifact
    from promptad.data.images import decode_image, resize
    from promptad.predict import predict
    from promptad.score import command as score

    names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    data = {n: _png(i) for i, n in enumerate(names)}
    for n in names:
        storage.write_bytes(f"{s3_bucket}/in/{n}", data[n])
    faults = {"a.png": ("503", "503"), "b.png": ("500",), "c.png": ("reset", "reset"), "d.png": (2.0,)}
    for n, f in faults.items():
        s3_faults.inject(_key(f"{s3_bucket}/in/{n}"), *f)
    s3_faults.inject(_key(f"{s3_bucket}/in/e.png"), forever="403")
    s3_faults.inject(_key(s3_bucket), "503")  # the listing (and the preflight) are S3 requests too
    out = f"{s3_bucket}/scores"
    # The first Parquet file the job commits fails once (its name is known only by its prefix).
    s3_faults.inject(_key(out) + "/", "500", prefix=True, method="PUT")
    summary = score.score(model, f"{s3_bucket}/in", out, batch_size=4)
    fired = {(p.rsplit("/", 1)[-1], f) for _, p, f in s3_faults.fired}
    for n, f in faults.items():  # every fault was met: none was skipped or hidden by a cache
        assert {(n, x) for x in f} <= fired, (n, s3_faults.fired)
    assert any(m == "PUT" and p.startswith(_key(out) + "/") for m, p, _ in s3_faults.fired)
    assert any(p == _key(s3_bucket) for _, p, _ in s3_faults.fired)
    assert (summary.inputs, summary.scored, summary.errors) == (6, 6, 1), summary
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in pq.read_table(
        storage.filesystem(out)[1], filesystem=storage.filesystem(out)[0]).to_pylist()}
    assert sorted(rows) == names  # every input has its row, and only one
    assert rows["e.png"]["error"].startswith("read: ") and rows["e.png"]["score"] is None
    fitted = load_artifact(model)
    ok = [n for n in names if n != "e.png"]
    expect = predict(fitted, np.stack([resize(decode_image(data[n]), SIZE) for n in ok]), ["tile"] * len(ok)).scores
    for n, s in zip(ok, expect):
        assert rows[n]["error"] is None and rows[n]["score"] == pytest.approx(float(s), rel=1e-4, abs=1e-5), n


# --------------------------------------------------------------------------- weight files
def _downloads(s3_faults, key: str) -> int:
    """GETs of an object's first byte: one per download (pyarrow reads a big object in ranges)."""
    return sum(m == "GET" and p == key and (not r or r.startswith("bytes=0-")) for m, p, r in s3_faults.requests)


def test_s3_weight_file_is_downloaded_once_per_node(s3_bucket, s3_faults, tmp_path, monkeypatch):
    """README: an s3:// weight file is downloaded once per node into $XDG_CACHE_HOME/promptad/s3/.
    Two backbones built from it download it once; so do workers that start together (a slow
    object keeps each of them waiting for the first byte, when none has it in the cache yet)."""
    import tinyclip

    from promptad.models.backbones import create_backbone

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local = tinyclip.write_weights(str(tmp_path / "tiny.safetensors"))
    uri = f"{s3_bucket}/weights/tiny.safetensors"
    storage.write_bytes(uri, open(local, "rb").read())
    spec = f"clip:{tinyclip.NAME}:{uri}"
    a = create_backbone(spec)
    b = create_backbone(spec, expected_sha256=a.weight_sha256)
    assert a.weight_sha256 == b.weight_sha256 == storage.sha256_file(local)
    assert _downloads(s3_faults, _key(uri)) == 1
    cached = list((tmp_path / "cache" / "promptad" / "s3").rglob("tiny.safetensors"))
    assert len(cached) == 1 and cached[0].read_bytes() == open(local, "rb").read()

    other = f"{s3_bucket}/weights/other.bin"
    storage.write_bytes(other, b"w" * 100_000)
    s3_faults.inject(_key(other), 1.0, method="GET")  # the first download's first byte is a second away
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(storage.local_copy(other))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(paths) == 3 and len(set(paths)) == 1 and open(paths[0], "rb").read() == b"w" * 100_000
    assert _downloads(s3_faults, _key(other)) == 1


# --------------------------------------------------------------------------- checkpoints
def test_only_the_newest_two_checkpoints_are_kept(tmp_path, s3_bucket):
    """fit keeps the newest CHECKPOINTS_KEPT (2) epoch checkpoints of a run folder, also those a
    killed run left that Ray Train never registered; a folder without its state file (an upload
    a kill cut short) is not a checkpoint and does not count. Local and S3."""
    from promptad.fit import train

    assert train.CHECKPOINTS_KEPT == 2
    for run_dir in (str(tmp_path / "run"), f"{s3_bucket}/ckpt/run"):
        for epoch in (1, 2, 3, 5, 7):
            storage.write_bytes(storage.join(train.checkpoint_dir(run_dir, epoch), train.STATE_FILE), b"s")
        storage.write_bytes(storage.join(train.checkpoint_dir(run_dir, 8), "partial"), b"")
        storage.write_bytes(storage.join(run_dir, "promptad-fit.json"), b"{}")
        train.prune_checkpoints(run_dir)
        assert train.checkpoint_epochs(run_dir) == [5, 7], run_dir
        assert storage.exists(storage.join(run_dir, "promptad-fit.json"))
        train.prune_checkpoints(run_dir)  # nothing more to drop
        assert train.checkpoint_epochs(run_dir) == [5, 7]


# --------------------------------------------------------------------------- artifacts
def test_a_format_1_artifact_is_refused_in_one_line(model, tmp_path, capsys):
    """README: an artifact of format version 1 is refused with a message to refit (score, audit
    and anything that loads a model), one line, exit 2."""
    import shutil

    from promptad.errors import UserError
    from promptad.models.artifact import load_artifact

    old = tmp_path / "old"
    shutil.copytree(model, old)
    manifest = json.loads((old / "promptad.json").read_text())
    manifest["format_version"] = 1
    (old / "promptad.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as e:
        load_artifact(str(old))
    assert "format 1" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(0))
    status = main(["score", "--model", str(old), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                   "--dry-run"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("promptad: error: ") and "format 1" in lines[0] and "promptad fit" in lines[0]


# --------------------------------------------------------------------------- dry run
def test_dry_run_needs_no_ray_and_reads_no_image(model, tmp_path, monkeypatch, capsys):
    """README: --dry-run prints the plan and stops, "nothing is read, scored or written, and Ray
    does not start". Here `import ray` fails (as where Ray cannot start) and reading or decoding
    an input image raises: the plan is still printed, exit 0, and no --output appears."""
    import promptad.data.images as images

    folder = tmp_path / "batch"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(i))
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError

    real_read = storage.read_bytes

    def read_bytes(uri: str) -> bytes:
        assert not str(uri).startswith(str(folder)), f"dry run read an input: {uri}"
        return real_read(uri)

    def no_decode(*a, **k):
        raise AssertionError("dry run decoded an image")

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    monkeypatch.setattr(images, "decode_image", no_decode)
    out = tmp_path / "scores"
    assert main(["score", "--model", model, "--input", str(folder), "--output", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "inputs                     3" in printed and "to score                   3   would read 3 files" in printed
    assert printed.rstrip().endswith("score: dry run: nothing was read, scored or written"), printed
    assert not out.exists()
