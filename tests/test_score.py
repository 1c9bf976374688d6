"""`promptad score`: Ray Data pipeline -> Parquet table (DESIGN.md, Scoring output).

Small effnet-lite0 models at input size 64 (fitted once per session) keep every run short; the
shared `ray_local` session runs the in-process tests, and the kill-and-resume tests run the job
they kill in a subprocess with a Ray of its own (the machine dies with the driver) and the other
runs in-process.
"""
from __future__ import annotations

import io
import json
import os
import re
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

from promptad import cli
from promptad.data import storage
from promptad.data.datasets import mvtec_samples
from promptad.data.images import decode_image, resize
from promptad.errors import UserError
from promptad.memory.bank import Bank
from promptad.models import artifact
from promptad.predict import predict
from promptad.score import command as score
from promptad.score.plan import human_bytes

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="session")
def models(tmp_path_factory, datasets_root) -> dict[str, str]:
    """Artifacts: 'one' (magnetic_tile) and 'two' (magnetic_tile + cookie), each 1 epoch at 64 px."""
    from promptad.fit.pipeline import fit_in_process, load_images
    from promptad.learning.training import TrainConfig
    from promptad.models.model import ModelConfig

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


def _line(folder, n: int, start: int = 0):
    """A folder of n textured PNGs named start.png, ...: a line's images."""
    folder.mkdir(exist_ok=True)
    for i in range(start, start + n):
        (folder / f"{i}.png").write_bytes(_png(_texture(i)))
    return folder


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


def test_non_finite_model_output_is_an_error_row_and_its_batch_scores(ray_local, models, datasets_root, tmp_path):
    """A model whose cookie bank holds a NaN returns a NaN score and map for every cookie image:
    that row becomes a `model:` error row; the magnetic_tile rows of the same batch score as the
    intact model scores them, and the run completes."""
    model = artifact.load_artifact(models["two"])
    entries = model.memory["cookie"].local.entries.clone()
    entries[0, 0] = float("nan")
    model.memory["cookie"].local = Bank(entries, model.memory["cookie"].local.source)
    broken = str(tmp_path / "nan_model")
    artifact.save_artifact(model, broken, finite=False)  # a broken model on purpose
    mt = [s.path for s in mvtec_samples(str(datasets_root), "magnetic_tile", "test")[:3]]
    ck = mvtec_samples(str(datasets_root), "cookie", "test")[0].path
    rows = [{"image_id": f"mt-{i}", "path": p, "category": "magnetic_tile"} for i, p in enumerate(mt)]
    rows.insert(1, {"image_id": "ck", "path": ck, "category": "cookie"})
    manifest = tmp_path / "batch.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = str(tmp_path / "scores")
    summary = score.score(broken, str(manifest), out, batch_size=4)  # all four rows in one model batch
    assert (summary.inputs, summary.scored, summary.errors_by_kind) == (4, 4, {"model": 1})

    got = {r["image_id"]: r for r in _read(out).to_pylist()}
    assert got["ck"]["error"] == "model: non-finite image score (nan)"
    assert all(got["ck"][c] is None for c in ("score", "score_norm", "is_anomalous", "threshold", "map_png",
                                              "map_height", "map_width", "defect_area"))
    with Image.open(ck) as im:  # the image was decoded: its size is known
        assert (got["ck"]["width"], got["ck"]["height"]) == im.size
    ids = [f"mt-{i}" for i in range(3)]
    assert all(got[i]["error"] is None and got[i]["map_png"] for i in ids)
    np.testing.assert_allclose([got[i]["score"] for i in ids], _reference(models["two"], mt, ["magnetic_tile"] * 3),
                               rtol=1e-4, atol=1e-5)
    again = score.score(broken, str(manifest), out)  # a versionless manifest: the error row is tried again
    assert (again.retried, again.errors_by_kind) == (1, {"model": 1}) and _read(out).num_rows == 4


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
    folder = _line(tmp_path / "few", 3)
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


# --------------------------------------------------------------------------- versions: changed, late, retried
def _rows_by_name(output: str) -> dict[str, dict]:
    return {Path(r["image_id"]).name: r for r in _read(output).to_pylist()}


def test_changed_local_file_is_scored_again_and_its_old_row_dropped(ray_local, models, tmp_path):
    folder = _line(tmp_path / "line", 4)
    out = str(tmp_path / "scores")
    first = score.score(models["one"], str(folder), out, batch_size=4)
    assert (first.new, first.scored) == (4, 4)
    before = _rows_by_name(out)
    assert before["2.png"]["source_version"] == storage.file_version(str(folder / "2.png"))[1]

    (folder / "2.png").write_bytes(_png(_texture(99, 60, 70)))  # a camera reused the file name
    again = score.score(models["one"], str(folder), out, batch_size=4)
    assert (again.already_done, again.changed, again.scored, again.superseded_dropped) == (3, 1, 1, 1)
    after = _rows_by_name(out)
    assert len(_read(out)) == 4  # exactly one row each, the old row of 2.png is gone
    assert after["2.png"]["source_version"] == storage.file_version(str(folder / "2.png"))[1]
    assert (after["2.png"]["height"], after["2.png"]["width"]) == (60, 70)
    assert after["2.png"]["run_id"] == again.run_id and after["0.png"]["run_id"] == first.run_id
    np.testing.assert_allclose(after["2.png"]["score"], _reference(models["one"], [str(folder / "2.png")],
                                                                   ["magnetic_tile"])[0], rtol=1e-4, atol=1e-5)
    quiet = score.score(models["one"], str(folder), out, batch_size=4)
    assert (quiet.scored, quiet.already_done) == (0, 4)


def test_a_compacted_output_and_a_killed_compaction_stay_exactly_once(ray_local, models, tmp_path):
    """Issue 38: two nights' files merged by a compaction that is killed after its merged file is
    committed; the next night (one image changed) finishes the compaction and leaves one row per
    input, each from its current version, in the merged file and the night's own."""
    from promptad.score.compact import compact
    from promptad.score.output import listing

    folder = _line(tmp_path / "line", 3)
    out = str(tmp_path / "scores")
    score.score(models["one"], str(folder), out, batch_size=4)
    for i in range(3, 5):
        (folder / f"{i}.png").write_bytes(_png(_texture(i)))
    assert score.score(models["one"], str(folder), out, batch_size=4).new == 2
    assert len(listing(out)[0]) == 2

    def killed(step: str) -> None:
        if step == "target 0":
            raise KeyboardInterrupt(step)

    with pytest.raises(KeyboardInterrupt):
        compact(out, fault=killed)
    assert len(listing(out)[0]) == 3 and len(listing(out)[1]) == 1  # two sources, the target, the journal
    (folder / "0.png").write_bytes(_png(_texture(50, 60, 70)))
    night = score.score(models["one"], str(folder), out, batch_size=4)
    assert (night.already_done, night.changed, night.scored, night.superseded_dropped) == (4, 1, 1, 1)
    files, journals = listing(out)
    assert len(files) == 2 and any(f.startswith("part-c") for f in files) and journals == []
    rows = _rows_by_name(out)
    assert len(_read(out)) == 5 and len(rows) == 5
    assert all(rows[f"{i}.png"]["source_version"] == storage.file_version(str(folder / f"{i}.png"))[1]
               for i in range(5))
    assert rows["0.png"]["height"] == 60


def test_changed_s3_object_is_scored_again_also_when_only_its_version_changed(ray_local, models, s3_bucket,
                                                                             s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    bucket = s3_bucket[len("s3://"):]
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"cam/{i}.png", Body=_png(_texture(i)))
    out = f"{s3_bucket}/scores"
    assert score.score(models["one"], f"{s3_bucket}/cam", out, batch_size=4).scored == 3
    s3.put_object(Bucket=bucket, Key="cam/1.png", Body=_png(_texture(41)))  # overwritten: a new ETag
    again = score.score(models["one"], f"{s3_bucket}/cam", out, batch_size=4)
    assert (again.changed, again.scored, again.superseded_dropped) == (1, 1, 1)
    rows = _rows_by_name(out)
    etag = s3.head_object(Bucket=bucket, Key="cam/1.png")["ETag"].strip('"')
    assert len(rows) == 3 and _read(out).num_rows == 3 and rows["1.png"]["source_version"] == etag

    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    third = score.score(models["one"], f"{s3_bucket}/cam", out, batch_size=4)
    assert third.changed == 0 and third.scored == 0  # versioning on, objects not rewritten: no version ids yet
    s3.put_object(Bucket=bucket, Key="cam/0.png", Body=_png(_texture(0)))  # same bytes, a new version id
    fourth = score.score(models["one"], f"{s3_bucket}/cam", out, batch_size=4)
    version_id = s3.head_object(Bucket=bucket, Key="cam/0.png")["VersionId"]
    assert (fourth.changed, fourth.scored) == (1, 1)
    assert _rows_by_name(out)["0.png"]["source_version"].endswith(f":{version_id}") and _read(out).num_rows == 3


def test_late_file_is_retried_and_a_decode_error_waits_for_a_new_version(ray_local, models, tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "ok.png").write_bytes(_png(_texture(1)))
    (folder / "half.png").write_bytes(_png(_texture(2))[:300])  # an upload still being written
    manifest = tmp_path / "tonight.csv"
    manifest.write_text("path,image_id\ninbox/ok.png,ok\ninbox/late.png,late\n")
    out = str(tmp_path / "from-manifest")
    first = score.score(models["one"], str(manifest), out, batch_size=4)
    assert first.errors_by_kind == {"read": 1}
    (folder / "late.png").write_bytes(_png(_texture(3)))  # the file arrives the next day
    second = score.score(models["one"], str(manifest), out, batch_size=4)
    assert (second.retried, second.scored, second.errors, second.already_done) == (1, 1, 0, 1)
    got = {r["image_id"]: r for r in _read(out).to_pylist()}
    assert len(got) == 2 and got["late"]["error"] is None and np.isfinite(got["late"]["score"])

    listed = str(tmp_path / "from-folder")
    assert score.score(models["one"], str(folder), listed, batch_size=4).errors_by_kind == {"decode": 1}
    unchanged = score.score(models["one"], str(folder), listed, batch_size=4)
    assert unchanged.scored == 0  # the same broken bytes: not retried
    (folder / "half.png").write_bytes(_png(_texture(2)))  # the upload completes: a new version
    fixed = score.score(models["one"], str(folder), listed, batch_size=4)
    assert (fixed.changed, fixed.scored, fixed.errors) == (1, 1, 0)
    rows = _rows_by_name(listed)
    assert len(rows) == 3 and rows["half.png"]["error"] is None


def test_dry_run_prints_the_plan_and_writes_nothing(ray_local, models, tmp_path, capsys):
    folder = _line(tmp_path / "batch", 3)
    out = tmp_path / "scores"
    assert cli.main(["score", "--model", models["one"], "--input", str(folder), "--output", str(out),
                     "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    size = sum(p.stat().st_size for p in folder.iterdir())
    for words in ("inputs                     3", "already done               0", "new                        3",
                  "changed                    0", "to retry                   0",
                  f"to score                   3   would read 3 files, {human_bytes(size)}", "nothing was read, scored or"):
        assert words in printed, printed
    score.score(models["one"], str(folder), str(out), batch_size=4)
    (folder / "0.png").write_bytes(_png(_texture(5)))
    (folder / "3.png").write_bytes(_png(_texture(6)))
    files = sorted(os.listdir(out))
    assert cli.main(["score", "--model", models["one"], "--input", str(folder), "--output", str(out),
                     "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == files
    for words in ("inputs                     4", "already done               2", "new                        1",
                  "changed                    1", "to score                   2   would read 2 files"):
        assert words in printed, printed


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
def test_killed_driver_then_rerun_scores_only_the_rest_exactly_once(ray_local, models, tmp_path, capsys):
    folder = tmp_path / "archive"
    folder.mkdir()
    n = 256  # output files hold 64 rows: the kill lands after the first, well before the last
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

    capsys.readouterr()
    score.run(_args(models["one"], str(folder), str(out), run_id="second"))  # the rerun, on the session's Ray
    assert f"{first.num_rows} were already in the output, {n - first.num_rows} scored now " \
           f"(new {n - first.num_rows}, changed 0, retried 0)" in capsys.readouterr().out
    table = _read(str(out))
    ids = table["image_id"].to_pylist()
    assert len(ids) == n and len(set(ids)) == n
    assert set(ids) == set(storage.list_files(str(folder), storage.IMAGE_EXTENSIONS))
    assert table.filter(pa.compute.equal(table["run_id"], "first")).num_rows == first.num_rows
    assert not list((out / score.TMP_DIR).iterdir())


@pytest.mark.slow
def test_killed_rescoring_run_never_loses_a_row_and_the_rerun_supersedes_exactly_once(ray_local, models, tmp_path,
                                                                                      capsys):
    """Every input changes; the re-scoring run is killed mid-way. While it runs and after the kill,
    every input still has a row (old or new); the next run re-scores only the rest and leaves one
    row per input, each from the current version."""
    folder = tmp_path / "archive"
    folder.mkdir()
    n = 300
    for i in range(n):
        (folder / f"{i:04d}.png").write_bytes(_png(_texture(i % 7)))
    out = tmp_path / "scores"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", models["one"], "--input", str(folder),
            "--output", str(out), "--address", "local"]
    score.run(_args(models["one"], str(folder), str(out)))  # the first run, on the session's Ray
    ids = set(storage.list_files(str(folder), storage.IMAGE_EXTENSIONS))
    for i in range(n):  # every image replaced with new content: new size/mtime
        (folder / f"{i:04d}.png").write_bytes(_png(_texture(100 + i % 7, 72, 88)))
    old_files = set(score.committed_files(str(out)))

    samples: list[tuple[int, int]] = []  # (distinct inputs, rows) as a reader sees the output mid-run
    failures: list[BaseException] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                rows = pa.concat_tables([pq.read_table(f, columns=["image_id"])
                                         for f in score.committed_files(str(out))])
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)
                return
            samples.append((len(set(rows["image_id"].to_pylist()) & ids), rows.num_rows))
            time.sleep(0.2)

    proc = subprocess.Popen([*base, "--batch-size", "1", "--run-id", "killed"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline and \
                len(set(score.committed_files(str(out))) - old_files) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        _kill_session(proc)
        stop.set()
        watcher.join()
    assert not failures and samples and all(distinct == n for distinct, _ in samples), (failures, samples[:5])
    table = _read(str(out))
    assert set(table["image_id"].to_pylist()) == ids  # after the kill: nobody lost a row
    rescored = table.filter(pa.compute.equal(table["run_id"], "killed")).num_rows
    assert 0 < rescored < n and table.num_rows == n + rescored  # old rows not dropped yet

    capsys.readouterr()
    score.run(_args(models["one"], str(folder), str(out), run_id="third"))
    again = capsys.readouterr().out
    assert f"{n} inputs, {rescored} were already in the output, {n - rescored} scored now (new 0, " \
           f"changed {n - rescored}, retried 0)" in again
    assert f"{n} superseded rows dropped" in again  # rescored + (n - rescored) old rows
    table = _read(str(out))
    assert table.num_rows == n and set(table["image_id"].to_pylist()) == ids
    current = {p: storage.file_version(p)[1] for p in ids}
    assert all(r["source_version"] == current[r["image_id"]] for r in table.to_pylist())
    assert set(table["run_id"].to_pylist()) == {"killed", "third"}
    assert all(r["height"] == 72 for r in table.to_pylist())


def test_progress_moves_during_a_slow_run_and_the_summary_names_failed_files(ray_local, models, datasets_root,
                                                                              tmp_path, monkeypatch, capsys):
    """Issue 34: the progress line stayed at `0/46 rows (0 %)` until "done" (it counted committed
    files, each a few model batches). With a slow model stage (1 s per batch of 2) and every row
    in one file, the line still moves while the model works; and the summary names the file that
    failed and says where every failed file is listed."""
    from promptad.score import progress as progress_module

    monkeypatch.setattr(progress_module, "PROGRESS_INTERVAL_S", 0.5)
    paths = sorted(storage.list_files(str(datasets_root / "magnetic_tile" / "test" / "fray")))[:9]
    bad = tmp_path / "zz_truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    manifest = tmp_path / "in.csv"
    manifest.write_text("path,category\n" + "".join(f"{p},magnetic_tile\n" for p in [*paths, str(bad)]))
    the_plan, manifest_json = score.plan(models["one"], str(manifest), str(tmp_path / "out"))
    summary = score.execute(the_plan, models["one"], manifest_json, batch_size=2, stage_delay_s=1.0)
    assert (summary.scored, summary.files, summary.errors) == (10, 1, 1)
    err = capsys.readouterr().err
    done = [int(m) for m in re.findall(r"^score: (\d+)/10 rows", err, re.M)]
    assert any(0 < d < 10 for d in done), err
    lines = summary.lines()
    assert any(f"score: failed: {bad} (decode: " in ln for ln in lines), lines
    assert any("every failed file is listed in" in ln and summary.run_id in ln for ln in lines), lines
