"""datasets.py: MVTec layouts (local and s3), manifests, every UserError, and the real datasets."""
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from promptad.data import storage
from promptad.data.datasets import Sample, load_samples, manifest_samples, mvtec_categories, mvtec_samples
from promptad.errors import UserError

LAYOUT = [
    "widget/train/good/000.png",
    "widget/train/good/001.png",
    "widget/train/good/._001.png",  # macOS resource fork: skipped
    "widget/test/good/000.png",
    "widget/test/scratch/000.png",
    "widget/test/scratch/001.png",  # its mask is missing: kept with mask_path None
    "widget/test/scratch/notes.txt",
    "widget/ground_truth/scratch/000_mask.png",
    "gadget/test/good/000.png",  # no train/good
    "README.md",
]


def build_mvtec(root: Path) -> Path:
    for rel in LAYOUT:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"img")
    return root


def upload(local_root: Path, s3_uri: str) -> str:
    bucket, _, prefix = s3_uri[len("s3://"):].partition("/")
    client = boto3.client("s3")
    for path in local_root.rglob("*"):
        if path.is_file():
            key = "/".join(p for p in [prefix, path.relative_to(local_root).as_posix()] if p)
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return s3_uri


def check_layout(root: str) -> None:
    assert mvtec_categories(root) == ["gadget", "widget"]
    train = mvtec_samples(root, "widget", "train")
    assert [s.image_id for s in train] == ["widget/train/good/000.png", "widget/train/good/001.png"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)
    test = {s.image_id: s for s in mvtec_samples(root, "widget", "test")}
    assert list(test) == ["widget/test/good/000.png", "widget/test/scratch/000.png", "widget/test/scratch/001.png"]
    assert test["widget/test/good/000.png"].label == 0
    with_mask, without_mask = test["widget/test/scratch/000.png"], test["widget/test/scratch/001.png"]
    assert (with_mask.label, with_mask.defect, with_mask.category) == (1, "scratch", "widget")
    assert with_mask.mask_path == storage.join(root, "widget/ground_truth/scratch/000_mask.png")
    assert storage.read_bytes(with_mask.path) == b"img"
    assert without_mask.label == 1 and without_mask.mask_path is None
    assert mvtec_samples(root, "gadget", "train") == []
    assert len(load_samples(root, None, "test")) == 4
    assert [s.image_id for s in load_samples(root, ["widget"], "train")] == [s.image_id for s in train]


def test_mvtec_local(tmp_path):
    root = build_mvtec(tmp_path / "data")
    check_layout(str(root))
    assert mvtec_samples(str(root), "widget", "train")[0].path == str(root / "widget/train/good/000.png")


def test_mvtec_relative_root_gives_absolute_paths_and_same_ids(tmp_path, monkeypatch):
    build_mvtec(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    sample = mvtec_samples("data", "widget", "test")[1]
    assert sample.path == str(tmp_path / "data/widget/test/scratch/000.png")
    assert sample.image_id == "widget/test/scratch/000.png"
    assert sample.mask_path == str(tmp_path / "data/widget/ground_truth/scratch/000_mask.png")


def test_mvtec_s3(tmp_path, s3_bucket):
    root = upload(build_mvtec(tmp_path / "data"), f"{s3_bucket}/sets/mvtec")
    check_layout(root)
    assert all(s.path.startswith(root + "/") for s in load_samples(root, None, "test"))


def write_images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"img")


def test_csv_manifest_relative_paths_and_label_words(tmp_path):
    write_images(tmp_path, ["img/a.png", "img/b.png", "img/c.png", "masks/b.png"])
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets/list.csv").write_text(
        "path,image_id,category,label,mask_path,split\n"
        "../img/a.png,007,screw,good,,train\n"
        "../img/b.png,008,screw,anomalous,../masks/b.png,test\n"
        f"{tmp_path}/img/c.png,,nut,OK,,test\n"
    )
    samples = manifest_samples(str(tmp_path / "sets/list.csv"))
    assert samples[0] == Sample(str(tmp_path / "img/a.png"), "007", "screw", 0, None, None)
    assert samples[1] == Sample(
        str(tmp_path / "img/b.png"), "008", "screw", 1, None, str(tmp_path / "masks/b.png")
    )
    assert (samples[2].image_id, samples[2].label) == (str(tmp_path / "img/c.png"), 0)
    test = load_samples(str(tmp_path / "sets/list.csv"), ["screw"], "test")
    assert [s.image_id for s in test] == ["008"]


def test_parquet_manifest_numeric_labels_split_and_default_ids(tmp_path):
    table = pa.table(
        {
            "path": ["img/a.png", "img/b.png", "img/c.png"],
            "label": [0, 1, None],
            "defect": ["good", "crack", None],
            "split": ["train", "test", "test"],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    samples = manifest_samples(str(tmp_path / "m.parquet"), split="test")
    assert [(s.image_id, s.label, s.defect) for s in samples] == [("img/b.png", 1, "crack"), ("img/c.png", None, None)]
    assert samples[0].path == str(tmp_path / "img/b.png")
    # A manifest without a category column takes a single requested category.
    train = load_samples(str(tmp_path / "m.parquet"), ["screw"], "train")
    assert [(s.image_id, s.category) for s in train] == [("img/a.png", "screw")]


def test_s3_manifest_resolves_against_its_prefix(s3_bucket):
    uri = storage.join(s3_bucket, "sets", "m.csv")
    storage.write_bytes(uri, b"path,label\n../img/a.png,1\ns3://elsewhere/b.png,0\n")
    samples = load_samples(uri, None, "test")
    assert [s.path for s in samples] == [f"{s3_bucket}/img/a.png", "s3://elsewhere/b.png"]
    assert [s.label for s in samples] == [1, 0]


@pytest.mark.parametrize(
    "make, categories, split, message",
    [
        (lambda d: str(d / "nowhere"), None, "train", "data path does not exist"),
        (lambda d: str(d / "data/widget"), None, "train", "single category folder.*--category widget"),
        (lambda d: str(d / "data/widget/train"), None, "train", "not an MVTec AD layout"),
        (lambda d: str(d / "data/README.md"), None, "train", "not a manifest"),
        (lambda d: str(d / "data"), ["widget", "bolt"], "train", "unknown category bolt.*available: gadget, widget"),
        (lambda d: str(d / "data"), ["gadget"], "train", "'gadget' has no normal training images.*train/good"),
        (lambda d: str(d / "data"), None, "train", "'gadget' has no normal training images"),
    ],
)
def test_mvtec_user_errors(tmp_path, make, categories, split, message):
    build_mvtec(tmp_path / "data")
    with pytest.raises(UserError, match=message):
        load_samples(make(tmp_path), categories, split)


@pytest.mark.parametrize(
    "text, categories, message",
    [
        ("file,label\na.png,0\n", None, "no 'path' column.*columns: file, label"),
        ("path,image_id\na.png,x\nb.png,x\n", None, "1 duplicate image_id value.*'x'"),
        ("path\na.png\na.png\n", None, "duplicate path value"),
        ("path,label\na.png,2\n", None, "row 1: label 2 is not 0 or 1"),
        ("path,label\n,1\n", None, "row 1: empty 'path'"),
        ("path,category\na.png,screw\n", ["nut"], "unknown category nut.*available: screw"),
        ("path\na.png\n", ["nut", "screw"], "no 'category' values.*single --category"),
        ("path,split\na.png,train\n", None, "no rows for split 'test'"),
    ],
)
def test_manifest_user_errors(tmp_path, text, categories, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(UserError, match=message):
        load_samples(str(tmp_path / "m.csv"), categories, "test")


def test_missing_manifest_object_on_s3_is_a_user_error(s3_bucket):
    with pytest.raises(UserError, match="data path does not exist"):
        load_samples(f"{s3_bucket}/none.parquet", None, "test")


def test_real_shared_datasets(datasets_root):
    root = str(datasets_root)
    assert mvtec_categories(root) == ["cookie", "magnetic_tile", "tire"]
    counts = {
        "magnetic_tile": (761, {"good": 191, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}, 392),
        "cookie": (31, {"good": 14, "cracked": 32}, 32),
        "tire": (210, {"good": 25, "contamination": 28, "cut": 27, "hole": 27, "combined": 5}, 87),
    }
    for category, (n_train, per_defect, n_masks) in counts.items():
        train = load_samples(root, [category], "train")
        assert len(train) == n_train and {s.label for s in train} == {0}
        test = load_samples(root, [category], "test")
        found = {d: sum(s.defect == d for s in test) for d in per_defect}
        assert found == per_defect
        anomalies = [s for s in test if s.label == 1]
        assert len(anomalies) == sum(per_defect.values()) - per_defect["good"]
        assert sum(s.mask_path is not None for s in anomalies) == n_masks
        assert all(s.mask_path is None or s.mask_path.endswith("_mask.png") for s in test)
        assert len({s.image_id for s in train + test}) == len(train) + len(test)
