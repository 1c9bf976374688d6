"""`promptad score`: Ray Data pipeline -> Parquet table (DESIGN.md, Scoring output).

Small effnet-lite0 models at input size 64 (fitted once per session) keep every run short; the
shared `ray_local` session runs the in-process tests, and the kill-and-resume test starts its own
Ray in a subprocess that it kills.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from argparse import Namespace
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from promptad import artifact, cli, score, storage
from promptad.datasets import mvtec_samples
from promptad.errors import UserError
from promptad.images import decode_image, resize
from promptad.predict import predict

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="session")
def models(tmp_path_factory, datasets_root) -> dict[str, str]:
    """Artifacts: 'one' (magnetic_tile) and 'two' (magnetic_tile + cookie), each 1 epoch at 64 px."""
    from promptad.model import ModelConfig
    from promptad.pipeline import fit_in_process, load_images
    from promptad.training import TrainConfig

    root = tmp_path_factory.mktemp("models")
    images = {c: load_images(mvtec_samples(str(datasets_root), c, "train")[:12], SIZE)
              for c in ("magnetic_tile", "cookie")}
    out = {}
    for name, cats in (("one", ["magnetic_tile"]), ("two", ["magnetic_tile", "cookie"])):
        model = fit_in_process({c: images[c] for c in cats}, ModelConfig(input_size=SIZE),
                               TrainConfig(epochs=1, batch_size=8), log=None)
        out[name] = str(root / name)
        artifact.save_artifact(model, out[name])
    return out


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _texture(seed: int, h: int = 80, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(128, 20, (h, w, 3)).clip(0, 255)).astype(np.uint8)


def _bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    data = bytearray(_png(np.zeros((1, 1), np.uint8)))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def _read(output: str) -> pa.Table:
    """The output as a user reads it: plain pyarrow on the folder (or prefix)."""
    fs, path = storage.filesystem(output)
    return pq.read_table(path, filesystem=fs)


def _args(model: str, input_uri: str, output: str, **kw) -> Namespace:
    base = dict(model=model, input=input_uri, output=output, actors=1, gpus_per_actor=0.0, cpus_per_actor=0.5,
                batch_size=8, run_id=None, address=None, debug=False)
    return Namespace(**{**base, **kw})


def _reference(model_uri: str, paths: list[str], categories: list[str]) -> np.ndarray:
    """Scores from the in-process inference path, to check the pipeline changes nothing."""
    model = artifact.load_artifact(model_uri)
    images = np.stack([resize(decode_image(storage.read_bytes(p)), SIZE) for p in paths])
    return predict(model, images, categories).scores


def test_local_folder_schema_values_and_rerun_is_noop(ray_local, models, datasets_root, tmp_path, capsys):
    folder = str(datasets_root / "magnetic_tile" / "test" / "fray")  # 32 images, read in place
    out = str(tmp_path / "scores")
    summary = score.run(_args(models["one"], folder, out))
    assert (summary.inputs, summary.scored, summary.errors) == (32, 32, 0)

    table = pq.read_table(out)  # plain pyarrow on the folder: staging and run summaries are skipped
    assert table.schema == score.OUTPUT_SCHEMA
    assert not any(isinstance(f.type, pa.ExtensionType) for f in table.schema)
    rows = sorted(table.to_pylist(), key=lambda r: r["image_id"])
    paths = storage.list_files(folder, storage.IMAGE_EXTENSIONS)
    assert [r["image_id"] for r in rows] == paths and [r["path"] for r in rows] == paths
    cal = artifact.read_calibration(artifact.read_manifest(models["one"]))["magnetic_tile"]
    np.testing.assert_allclose([r["score"] for r in rows], _reference(models["one"], paths, ["magnetic_tile"] * 32),
                               rtol=1e-4, atol=1e-5)
    for r in rows:
        assert r["error"] is None and r["category"] == "magnetic_tile" and r["model_id"] == summary.model_id
        assert r["threshold"] == np.float32(cal.image_threshold)
        assert r["is_anomalous"] == (r["score"] >= r["threshold"]) and 0 <= r["score_norm"] <= 1
        assert 0 <= r["defect_area"] <= 1 and r["run_id"] == summary.run_id
        png = Image.open(io.BytesIO(r["map_png"]))
        assert png.mode == "L" and png.size == (r["map_width"], r["map_height"])
        assert abs(r["map_width"] / r["map_height"] - r["width"] / r["height"]) < 0.05
    with Image.open(paths[0]) as im:
        assert (rows[0]["width"], rows[0]["height"]) == im.size
    assert json.loads((tmp_path / "scores" / "_runs" / f"{summary.run_id}.json").read_text())["scored"] == 32
    assert "score: done: 32 inputs" in capsys.readouterr().out

    import duckdb
    import pandas as pd

    assert len(pd.read_parquet(out)) == 32
    assert duckdb.sql(f"select count(*), count(distinct image_id) from read_parquet('{out}/*.parquet')").fetchall() \
        == [(32, 32)]

    again = score.run(_args(models["one"], folder, out))  # same output, same model: resumes, nothing left
    assert (again.already_done, again.scored) == (32, 0) and _read(out).num_rows == 32


def test_s3_input_and_output(ray_local, models, s3_bucket, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    bucket = s3_bucket[len("s3://"):]
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"archive/line{i % 2}/img{i}.png", Body=_png(_texture(i)))
    s3.put_object(Bucket=bucket, Key="archive/readme.txt", Body=b"not an image extension: not listed")
    out = f"{s3_bucket}/scores/nightly"
    summary = score.score(models["one"], f"{s3_bucket}/archive", out, batch_size=4)
    assert (summary.inputs, summary.scored, summary.errors) == (5, 5, 0)
    table = _read(out)
    assert table.schema == score.OUTPUT_SCHEMA and table.num_rows == 5
    assert sorted(table["image_id"].to_pylist()) == sorted(f"{s3_bucket}/archive/line{i % 2}/img{i}.png"
                                                          for i in range(5))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="scores/")["Contents"]]
    assert all(k.endswith(".parquet") or k.startswith("scores/nightly/_runs/") for k in keys)

    manifest = "path,image_id\narchive/line0/img0.png,a\narchive/line1/gone.png,b\n"  # relative to the manifest
    s3.put_object(Bucket=bucket, Key="archive-list.csv", Body=manifest.encode())
    summary = score.score(models["one"], f"{s3_bucket}/archive-list.csv", f"{s3_bucket}/scores/listed", batch_size=4)
    got = {r["image_id"]: r for r in _read(f"{s3_bucket}/scores/listed").to_pylist()}
    assert got["a"]["error"] is None and got["b"]["error"] == "read: not found"
    assert got["b"]["path"] == f"{s3_bucket}/archive/line1/gone.png" and summary.errors_by_kind == {"read": 1}


def test_manifest_with_two_categories_uses_each_categorys_bank_and_threshold(ray_local, models, datasets_root,
                                                                            tmp_path):
    mt = [s.path for s in mvtec_samples(str(datasets_root), "magnetic_tile", "test")[:4]]
    ck = [s.path for s in mvtec_samples(str(datasets_root), "cookie", "test")[:3]]
    rows = [{"image_id": f"mt-{i}", "path": p, "category": "magnetic_tile"} for i, p in enumerate(mt)]
    rows += [{"image_id": f"ck-{i}", "path": p, "category": "cookie"} for i, p in enumerate(ck)]
    rows += [{"image_id": "odd", "path": mt[0], "category": "screw"},
             {"image_id": "unsaid", "path": mt[0], "category": None},
             {"image_id": "gone", "path": str(tmp_path / "missing.png"), "category": "cookie"}]
    manifest = tmp_path / "batch.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = str(tmp_path / "scores")
    summary = score.score(models["two"], str(manifest), out, batch_size=4)
    assert (summary.inputs, summary.errors, summary.errors_by_kind) == (10, 3, {"category": 2, "read": 1})

    got = {r["image_id"]: r for r in _read(out).to_pylist()}
    assert got["odd"]["error"] == "category: unknown 'screw'" and got["gone"]["error"] == "read: not found"
    assert got["unsaid"]["error"] == "category: none given (the model scores cookie, magnetic_tile)"
    for r in (got["odd"], got["gone"], got["unsaid"]):  # identity columns filled, results null
        assert r["path"] and r["model_id"] == summary.model_id and r["run_id"] and r["scored_at"]
        assert all(r[c] is None for c in ("score", "score_norm", "is_anomalous", "threshold", "map_png",
                                          "height", "width", "defect_area"))
    cal = artifact.read_calibration(artifact.read_manifest(models["two"]))
    assert cal["magnetic_tile"].image_threshold != cal["cookie"].image_threshold
    ref = _reference(models["two"], mt + ck, ["magnetic_tile"] * 4 + ["cookie"] * 3)
    ids = [f"mt-{i}" for i in range(4)] + [f"ck-{i}" for i in range(3)]
    np.testing.assert_allclose([got[i]["score"] for i in ids], ref, rtol=1e-4, atol=1e-5)
    for i in ids:
        cat = got[i]["category"]
        assert got[i]["threshold"] == np.float32(cal[cat].image_threshold)
        assert got[i]["score_norm"] == pytest.approx(cal[cat].normalize_score(got[i]["score"]), abs=1e-6)


def test_bad_inputs_become_error_rows_and_odd_modes_score(ray_local, models, tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    rgb = _texture(7)
    gray16 = (rgb[..., 0].astype(np.uint16) * 257)
    files = {
        "zero.png": b"",
        "truncated.png": _png(rgb)[:300],
        "text.jpg": b"this is not an image\n",
        "bomb.png": _bomb_png(),
        "rgb.png": _png(rgb),
        "gray.png": _png(rgb[..., 0], "L"),
        "rgba.png": _png(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)]), "RGBA"),
        "palette.png": b"",
        "gray16.png": b"",
    }
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, format="PNG")
    files["palette.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(gray16).save(buf, format="PNG")
    files["gray16.png"] = buf.getvalue()
    assert Image.open(io.BytesIO(files["gray16.png"])).mode.startswith("I")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = str(tmp_path / "scores")
    summary = score.score(models["one"], str(folder), out, batch_size=4)
    assert summary.inputs == len(files) and summary.errors_by_kind == {"decode": 4}

    got = {Path(r["image_id"]).name: r for r in _read(out).to_pylist()}
    assert got["zero.png"]["error"] == "decode: empty file (0 bytes)"
    assert got["truncated.png"]["error"] == "decode: truncated image data"
    assert got["text.jpg"]["error"] == "decode: not an image (cannot identify format)"
    assert got["bomb.png"]["error"].startswith("decode: image too large")
    for name in ("zero.png", "truncated.png", "text.jpg", "bomb.png"):
        r = got[name]
        assert r["score"] is None and r["height"] is None and r["map_png"] is None
        assert r["path"] == str(folder / name) and r["category"] == "magnetic_tile" and r["run_id"]
    for name in ("rgb.png", "gray.png", "rgba.png", "palette.png", "gray16.png"):
        r = got[name]
        assert r["error"] is None and np.isfinite(r["score"]) and (r["height"], r["width"]) == (80, 96)


def test_output_of_another_model_is_a_one_line_user_error(ray_local, models, tmp_path, capsys):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(_texture(i)))
    out = str(tmp_path / "scores")
    score.score(models["one"], str(folder), out, batch_size=4)
    before = sorted(os.listdir(out))
    capsys.readouterr()
    code = cli.main(["score", "--model", models["two"], "--input", str(folder), "--output", out])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("promptad")]
    assert code == 2 and len(err) == 1
    assert "already holds scores of model" in err[0] and "pass a new --output" in err[0]
    assert sorted(os.listdir(out)) == before


def test_user_errors_before_any_work(ray_local, models, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(_texture(0)))
    with pytest.raises(UserError, match="several categories"):
        score.score(models["two"], str(folder), str(tmp_path / "o1"))
    with pytest.raises(UserError, match="does not exist"):
        score.score(models["one"], str(tmp_path / "nope"), str(tmp_path / "o2"))
    (tmp_path / "dups.csv").write_text(f"path,image_id\n{folder}/a.png,x\n{folder}/a.png,x\n")
    with pytest.raises(UserError, match="duplicate image_id"):
        score.score(models["one"], str(tmp_path / "dups.csv"), str(tmp_path / "o5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        score.score(models["one"], str(tmp_path / "empty"), str(tmp_path / "o3"))
    with pytest.raises(UserError, match="cannot run one scoring actor.*GPUs"):
        score.score(models["one"], str(folder), str(tmp_path / "o4"), gpus_per_actor=1, local_ray=True)


def _session_pids(session: int) -> list[int]:
    """Processes of a session, from /proc (Ray started by this test process shares its session)."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.getsid(int(name)) == session:
                pids.append(int(name))
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def _our_processes_running(text: str) -> list[int]:
    """Our Ray's worker processes whose title contains `text` (Ray sets it to the task or actor)."""
    pids = []
    for pid in _session_pids(os.getsid(0)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text in f.read().decode(errors="replace"):
                    pids.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return pids


@pytest.mark.slow
def test_killed_actor_is_restarted_and_its_batches_redone(ray_local, models, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    data = _png(_texture(3))
    n = 400
    for i in range(n):
        (folder / f"{i:04d}.png").write_bytes(data)
    out = tmp_path / "scores"
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(s=score.score(models["one"], str(folder), str(out),
                                                                       batch_size=2)))
    run.start()
    killed = []
    deadline = time.monotonic() + 120
    while run.is_alive() and time.monotonic() < deadline and not killed:
        actors = _our_processes_running("MapBatches(Predictor)")
        if actors and list(out.glob("*.parquet")):  # the actor has done work; kill it mid-run
            os.kill(actors[0], signal.SIGKILL)
            killed.append(actors[0])
        time.sleep(0.1)
    successors = set()
    while run.is_alive() and time.monotonic() < deadline + 60:
        successors.update(pid for pid in _our_processes_running("MapBatches(Predictor)") if pid not in killed)
        time.sleep(0.1)
    run.join(timeout=10)
    assert killed, "the run ended before the actor could be killed; make it longer"
    assert successors, "no actor took over from the killed one"
    assert not run.is_alive() and result["s"].scored == n and result["s"].errors == 0
    table = _read(str(out))
    assert table.num_rows == n and len(set(table["image_id"].to_pylist())) == n


def _kill_session(proc: subprocess.Popen) -> None:
    """Kill a subprocess started with start_new_session and everything it started (its local Ray)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_killed_driver_then_rerun_scores_only_the_rest_exactly_once(models, tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    n = 600
    data = [_png(_texture(i % 7)) for i in range(7)]
    for i in range(n):
        (folder / f"{i:04d}.png").write_bytes(data[i % 7])
    out = tmp_path / "scores"
    cmd = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", models["one"], "--input", str(folder),
           "--output", str(out), "--batch-size", "1", "--address", "local", "--run-id", "first"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline and not list(out.glob("*.parquet")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        _kill_session(proc)
    first = _read(str(out))
    assert 0 < first.num_rows < n

    cmd[-1] = "second"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{first.num_rows} were already in the output, {n - first.num_rows} scored now" in done.stdout
    table = _read(str(out))
    ids = table["image_id"].to_pylist()
    assert len(ids) == n and len(set(ids)) == n
    assert set(ids) == set(storage.list_files(str(folder), storage.IMAGE_EXTENSIONS))
    assert table.filter(pa.compute.equal(table["run_id"], "first")).num_rows == first.num_rows
    assert not list((out / score.TMP_DIR).iterdir())
