"""storage.py against local folders and a moto S3 server (see the s3_server fixture)."""
import hashlib
import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from promptad.data import storage
from promptad.errors import UserError


def test_local_round_trip_creates_parents_and_leaves_no_temp_files(tmp_path):
    uri = str(tmp_path / "a" / "b" / "c.bin")
    storage.write_bytes(uri, b"\x00payload")
    assert storage.read_bytes(uri) == b"\x00payload"
    assert storage.exists(uri) and not storage.is_dir(uri)
    assert storage.is_dir(str(tmp_path / "a"))
    assert os.listdir(tmp_path / "a" / "b") == ["c.bin"]
    storage.write_bytes(uri, b"new")  # overwrite in place
    assert storage.read_bytes("file://" + uri) == b"new"


def test_local_missing_raises_file_not_found_with_uri(tmp_path):
    missing = str(tmp_path / "nope.png")
    assert not storage.exists(missing) and not storage.is_dir(missing)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match="nodir"):
        storage.list_files(str(tmp_path / "nodir"))


def test_join_never_uses_os_path_for_uris():
    assert storage.join("s3://bkt/pre/", "a", "/b/", "c.png") == "s3://bkt/pre/a/b/c.png"
    assert storage.join("s3://bkt", "a") == "s3://bkt/a"
    assert storage.join("file:///data", "x.png") == "file:///data/x.png"
    assert storage.join("/data", "a", "x.png") == os.path.join("/data", "a", "x.png")


def test_resolve_parent_relative():
    assert storage.resolve("s3://bkt/sets/m", "../img/a.png") == "s3://bkt/sets/img/a.png"
    assert storage.resolve("s3://bkt/sets", "s3://other/x.png") == "s3://other/x.png"
    assert storage.resolve("/data/sets", "img/a.png") == "/data/sets/img/a.png"
    assert storage.resolve("/data/sets", "/abs/a.png") == "/abs/a.png"
    assert storage.parent("s3://bkt/sets/m.csv") == "s3://bkt/sets"
    assert storage.parent("/data/m.csv") == "/data"
    assert storage.relative("s3://bkt/root/cat/x.png", "s3://bkt/root/") == "cat/x.png"
    with pytest.raises(ValueError):
        storage.relative("/data/a.png", "/other")


def test_unsupported_scheme_is_a_user_error():
    with pytest.raises(UserError, match="gs://"):
        storage.filesystem("gs://bucket/x")


def test_local_listing_is_recursive_sorted_absolute_and_case_insensitive(tmp_path, monkeypatch):
    for rel in ["d/b/2.PNG", "d/a.jpg", "d/b/c/1.png", "d/notes.txt"]:
        storage.write_bytes(str(tmp_path / rel), b"x")
    monkeypatch.chdir(tmp_path)
    images = storage.list_files("d", storage.IMAGE_EXTENSIONS)
    assert images == sorted(str(tmp_path / r) for r in ["d/a.jpg", "d/b/2.PNG", "d/b/c/1.png"])
    assert len(storage.list_files("d")) == 4
    assert storage.list_files(f"file://{tmp_path}/d", {".txt"}) == [f"file://{tmp_path}/d/notes.txt"]
    assert storage.list_dirs("d") == ["b"]


def test_s3_round_trip_and_missing(s3_bucket):
    uri = storage.join(s3_bucket, "x", "y.bin")
    storage.write_bytes(uri, b"hello s3")
    assert storage.read_bytes(uri) == b"hello s3"
    assert storage.exists(uri) and not storage.is_dir(uri)
    assert storage.is_dir(storage.join(s3_bucket, "x")) and storage.is_dir(s3_bucket)
    storage.makedirs(storage.join(s3_bucket, "empty"))  # no marker object on S3
    assert storage.list_files(s3_bucket) == [uri]
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/x/missing.bin"):
        storage.read_bytes(storage.join(s3_bucket, "x", "missing.bin"))
    with pytest.raises(FileNotFoundError, match="no-such-prefix"):
        storage.list_files(storage.join(s3_bucket, "no-such-prefix"))
    assert not storage.exists(storage.join(s3_bucket, "no-such-prefix"))


def test_s3_listing_paginates_past_1000_keys(s3_bucket):
    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3")  # endpoint from AWS_ENDPOINT_URL, set by the fixture
    keys = [f"root/{i % 3}/sub{i % 7}/img{i:04d}.{'PNG' if i % 5 == 0 else 'png'}" for i in range(1100)]
    for key in keys + ["root/readme.txt", "rootless/other.png"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    listed = storage.list_files(f"{s3_bucket}/root/", storage.IMAGE_EXTENSIONS)
    assert listed == sorted(f"{s3_bucket}/{k}" for k in keys)
    assert len(storage.list_files(f"{s3_bucket}/root")) == 1101
    assert storage.list_dirs(f"{s3_bucket}/root") == ["0", "1", "2"]


def test_s3_filesystem_is_cached_per_endpoint(s3_server, monkeypatch):
    fs1, path = storage.filesystem("s3://bkt/a/b.png")
    assert path == "bkt/a/b.png"
    assert storage.filesystem("s3://other/c")[0] is fs1
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    assert storage.filesystem("s3://bkt/a")[0] is not fs1


def test_pyarrow_multipart_parquet_write_to_s3(s3_bucket):
    """A >10 MB Parquet file goes through S3 multipart upload; moto must accept it."""
    fs, path = storage.filesystem(storage.join(s3_bucket, "big.parquet"))
    table = pa.table({"x": np.random.default_rng(0).random(1_600_000)})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_s3fs_reaches_moto_through_the_environment(s3_bucket):
    import s3fs

    storage.write_bytes(storage.join(s3_bucket, "k.txt"), b"via arrow")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.cat(f"{s3_bucket}/k.txt") == b"via arrow"


def test_local_copy_downloads_once_and_refetches_changed_objects(s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "weights", "model.bin")
    storage.write_bytes(uri, b"w" * 5000)
    first = storage.local_copy(uri, str(tmp_path))
    assert first.endswith("model.bin") and open(first, "rb").read() == b"w" * 5000
    stamp = os.stat(first).st_mtime_ns
    assert storage.local_copy(uri, str(tmp_path)) == first
    assert os.stat(first).st_mtime_ns == stamp
    storage.write_bytes(uri, b"v" * 10)
    assert open(storage.local_copy(uri, str(tmp_path)), "rb").read() == b"v" * 10
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.local_copy(storage.join(s3_bucket, "missing.bin"), str(tmp_path))


def test_local_copy_passes_local_paths_through(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    assert storage.local_copy(str(path)) == str(path)
    assert storage.local_copy(f"file://{path}") == str(path)
    with pytest.raises(FileNotFoundError):
        storage.local_copy(str(tmp_path / "missing.bin"))


def test_sha256_file(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert storage.sha256_file(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()
