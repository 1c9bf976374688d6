"""`promptad audit` end to end on a tiny MVTec AD layout, every number checked against an
independent computation: scikit-learn on the per-image scores in scores.csv, and for pixel
metrics a fresh in-process prediction compared pixel by pixel (sklearn, scipy)."""
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import probe_page
from PIL import Image
from scipy import ndimage
from scipy.stats import binomtest
from sklearn import metrics as skm

from promptad.audit.command import EXIT_TARGETS_MISSED, visualization_paths
from promptad.audit.results import CategoryResults, ConditionResults, fold, to_unit
from promptad.audit.stages import CLEAN, _Scorer, caption
from promptad.cli import main
from promptad.data import storage
from promptad.data.datasets import Sample
from promptad.data.shifts import apply_shift, shift_seed
from promptad.data.synthesis import procedural_texture, synthesize_anomaly
from promptad.models.model import Calibration
from promptad.predict import Prediction
from promptad.report.plots import VisualizationLayout
from promptad.report.summary import METRICS, THRESHOLD_METRICS

H, W = 64, 80  # non-square on purpose: metrics are computed at the input's aspect ratio
SIZE = 64  # model input
SHIFTS = ["brightness", "rotation", "noise"]
CATEGORIES = ("tex", "weave")


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(buf, format="PNG")
    return buf.getvalue()


def _normal(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same surface with a small random offset and sensor noise."""
    dy, dx = rng.integers(0, 16, 2)
    crop = base[dy:dy + H, dx:dx + W].astype(np.int16)
    return np.clip(crop + rng.integers(-6, 7, crop.shape), 0, 255).astype(np.uint8)


def build_dataset(root: Path) -> None:
    """Two categories; tex also has a corrupt image, an anomaly whose mask is missing and a
    grayscale image, as real data do."""
    for c, cat in enumerate(CATEGORIES):
        rng = np.random.default_rng(100 + c)
        base = procedural_texture(96, rng)
        files: dict[str, bytes] = {}
        for i in range(10):
            files[f"train/good/{i:03d}.png"] = _png(_normal(base, rng))
        for i in range(5):
            files[f"test/good/{i:03d}.png"] = _png(_normal(base, rng), "L" if i == 0 else None)
        for defect in ("blob", "scratch"):
            for i in range(3):
                img, mask = synthesize_anomaly(_normal(base, rng), rng)
                files[f"test/{defect}/{i:03d}.png"] = _png(img)
                if not (cat == "tex" and defect == "blob" and i == 2):  # a missing mask
                    files[f"ground_truth/{defect}/{i:03d}_mask.png"] = _png(
                        (mask > 0.5).astype(np.uint8) * 255)
        if cat == "tex":
            files["test/scratch/099.png"] = b"\x89PNG\r\n\x1a\n this is not an image"
        for rel, data in files.items():
            (root / cat / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / cat / rel).write_bytes(data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The dataset and a one-epoch effnet-lite0 model saved as an artifact."""
    from promptad.data.datasets import load_samples
    from promptad.fit.pipeline import fit_in_process, load_images
    from promptad.learning.training import TrainConfig
    from promptad.models.artifact import save_artifact
    from promptad.models.model import ModelConfig

    root = tmp_path_factory.mktemp("audit")
    data = root / "data"
    build_dataset(data)
    images = {c: load_images(load_samples(str(data), [c], "train"), SIZE) for c in CATEGORIES}
    model = fit_in_process(images, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                           TrainConfig(epochs=1, batch_size=4), log=None)
    save_artifact(model, str(root / "model"))
    return {"root": root, "data": str(data), "model": str(root / "model")}


def run_audit(tiny: dict, report: Path, *extra: str, data: str | None = None,
              expect: int = 0) -> dict:
    rc = main(["audit", "--model", tiny["model"], "--data", data or tiny["data"],
               "--report", str(report), "--batch-size", "8", *extra])
    assert rc == expect
    return json.loads((report / "report.json").read_text())


def read_scores(report: Path) -> list[dict]:
    with open(report / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


MAX_FALSE_ALARM = 0.01  # 5 normals per category can never show it: the audit must say no-go


@pytest.fixture(scope="module")
def audited(tiny, ray_local) -> dict:
    """One audit of the MVTec layout with three shifts (a lighting, a camera, a sensor one)
    and a false-alarm target that 5 normal images per category cannot show (exit 3)."""
    report_dir = tiny["root"] / "report"
    report = run_audit(tiny, report_dir, "--shifts", ",".join(SHIFTS),
                       "--max-false-alarm", str(MAX_FALSE_ALARM), expect=EXIT_TARGETS_MISSED)
    return {"dir": report_dir, "report": report, "rows": read_scores(report_dir)}


# --------------------------------------------------------------------------- unit level


def test_to_unit_is_monotone_unclipped_and_exact_at_the_threshold():
    x = np.r_[np.linspace(-50, 50, 2001), 1.2, np.nextafter(1.2, 0), np.nextafter(1.2, 2)]
    y = to_unit(x, center=0.4, threshold=1.2)
    order = np.argsort(x)
    assert np.all(np.diff(y[order]) >= 0) and np.all((y > 0) & (y < 1))
    assert len(np.unique(y)) == len(np.unique(x))  # nothing clipped together
    np.testing.assert_array_equal(y >= 0.5, x >= 1.2)
    assert to_unit(1.2, 0.4, 1.2) == 0.5 and to_unit(0.4, 0.4, 1.2) == 0.25
    assert np.all(to_unit(x, 0.4, math.inf) < 0.5)  # uncalibrated: flags nothing


def test_shift_seed_is_stable_and_distinct():
    assert shift_seed("a/b.png", "noise") == shift_seed("a/b.png", "noise")
    assert len({shift_seed(i, s) for i in ("a", "b") for s in ("noise", "jpeg")}) == 4


def test_visualization_paths_keep_stems_and_split_collisions():
    samples = [Sample("/d/a/001.png", "a/001.png", "cat", 1, "crack", None),
               Sample("/d/b/001.png", "b/001.png", "cat", 1, "crack", None),
               Sample("/d/c/002.png", "c/002.png", "cat", 1, "../x", None)]
    paths = visualization_paths(samples)
    assert paths["c/002.png"] == "visualization_results/cat/_x/002.png"
    assert len(set(paths.values())) == 3
    assert all(p.startswith("visualization_results/cat/crack/001-") for p in
               (paths["a/001.png"], paths["b/001.png"]))


# --------------------------------------------------------------------------- end to end


def sk_image_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    pred = scores >= threshold
    return {
        "image_auroc": skm.roc_auc_score(labels, scores),
        "image_f1_max": f1.max(),
        "image_f1_max_threshold": thresholds[np.argmax(f1[:-1])],
        "precision": skm.precision_score(labels, pred, zero_division=0),
        "recall": skm.recall_score(labels, pred, zero_division=0),
        "f1": skm.f1_score(labels, pred, zero_division=0),
        "accuracy": skm.accuracy_score(labels, pred),
    }


def test_counts_errors_and_scores_csv(audited):
    report, rows = audited["report"], audited["rows"]
    tex = report["categories"]["tex"]["counts"]
    assert tex == {"images": 12, "normal": 5, "anomalous": 6, "with_mask": 5,
                   "pixel_skipped": 1, "errors": 1}
    assert report["categories"]["weave"]["counts"]["with_mask"] == 6
    assert [(e["category"], e["stage"]) for e in report["errors"]] == [("tex", "image")]
    assert report["errors"][0]["path"].endswith("tex/test/scratch/099.png")
    assert report["model_id"] and report["data_uri"] == str(Path(audited["dir"]).parent / "data")
    assert report["created_at"].endswith("Z")
    assert len(rows) == (11 + 11) * (1 + len(SHIFTS)) + 1  # every scored image per condition
    assert {r["condition"] for r in rows} == {"clean", *SHIFTS}
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["score"] == "" and "not an image" in bad[0]["error"]


def test_image_metrics_equal_sklearn_on_the_per_image_scores(audited):
    report, rows = audited["report"], audited["rows"]
    for cat in CATEGORIES:
        threshold = report["categories"][cat]["thresholds"]["image"]
        for condition in ["clean", *SHIFTS]:
            sel = [r for r in rows if r["category"] == cat and r["condition"] == condition
                   and not r["error"]]
            scores = np.array([float(r["score"]) for r in sel])
            labels = np.array([int(r["label"]) for r in sel])
            got = report["categories"][cat]["clean" if condition == "clean" else "shifts"]
            got = got if condition == "clean" else got[condition]
            for name, value in sk_image_metrics(scores, labels, threshold).items():
                assert got[name] == pytest.approx(value, abs=1e-9), (cat, condition, name)
            assert all((r["is_anomalous"] == "True") == (float(r["score"]) >= threshold)
                       for r in sel)


def test_per_defect_overall_and_pooled(audited):
    report, rows = audited["report"], audited["rows"]
    clean = [r for r in rows if r["condition"] == "clean" and not r["error"]]
    for cat in CATEGORIES:
        per = report["categories"][cat]["per_defect"]
        assert set(per) == {"blob", "scratch"}
        good = [float(r["score"]) for r in clean if r["category"] == cat and r["label"] == "0"]
        for defect, stats in per.items():
            bad = [float(r["score"]) for r in clean if r["category"] == cat
                   and r["defect"] == defect]
            assert stats["count"] == len(bad)
            auroc = skm.roc_auc_score([0] * len(good) + [1] * len(bad), good + bad)
            assert stats["image_auroc_vs_good"] == pytest.approx(auroc)
    for metric in ("image_auroc", "pixel_auroc", "aupro", "f1"):
        mean = np.mean([report["categories"][c]["clean"][metric] for c in CATEGORIES])
        assert report["overall"]["clean"][metric] == pytest.approx(mean)
    # pooled: every image judged at its own category's threshold
    pred = [r["is_anomalous"] == "True" for r in clean]
    labels = [int(r["label"]) for r in clean]
    pooled = report["pooled"]["clean"]
    assert pooled["f1"] == pytest.approx(skm.f1_score(labels, pred))
    assert pooled["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert set(report["pooled"]["shifts"]) == set(SHIFTS)


def reference_maps(tiny: dict, cat: str, condition: str) -> tuple[list, list, np.ndarray]:
    """Maps and masks predicted here, in-process, without the audit's code: decode, shift at
    full resolution, resize to the model input, predict, map to the image's aspect ratio at
    long side <= 256 (here: the image size), masks by nearest neighbour."""
    import torch
    import torch.nn.functional as F

    from promptad.models.artifact import load_artifact
    from promptad.predict import predict

    model = load_artifact(tiny["model"])
    maps, masks, scores = [], [], []
    for path in sorted((Path(tiny["data"]) / cat / "test").glob("*/*.png")):
        defect = path.parent.name
        if path.name == "099.png":
            continue
        img = np.asarray(Image.open(path).convert("RGB"))
        mask_file = Path(tiny["data"]) / cat / "ground_truth" / defect / f"{path.stem}_mask.png"
        mask = (np.asarray(Image.open(mask_file)) > 0 if mask_file.exists()
                else np.zeros((H, W), bool) if defect == "good" else None)
        if condition != "clean":
            image_id = f"{cat}/test/{defect}/{path.name}"
            img, mask = apply_shift(condition, img, mask, shift_seed(image_id, condition))
        x = np.array(Image.fromarray(img).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        pred = predict(model, x[None], [cat])
        scores.append(pred.scores[0])
        if mask is None:
            continue
        amap = F.interpolate(torch.from_numpy(pred.maps)[:, None], size=(H, W),
                             mode="bilinear", align_corners=False)[0, 0].numpy()
        maps.append(amap)
        masks.append(mask)
    return maps, masks, np.array(scores)


def aupro_brute_force(maps: list, masks: list, limit: float = 0.3) -> float:
    """Every distinct map value as a threshold; regions by scipy's 8-connected labelling."""
    values = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    truth = np.concatenate([m.ravel() for m in masks])
    normal = np.sort(values[~truth])
    regions = []
    for amap, mask in zip(maps, masks):
        labels, n = ndimage.label(mask, np.ones((3, 3)))
        regions += [np.sort(amap[labels == r].astype(np.float64)) for r in range(1, n + 1)]
    thresholds = np.unique(values)[::-1]
    above = lambda v: 1.0 - np.searchsorted(v, thresholds, side="left") / v.size  # noqa: E731
    fpr = np.r_[0.0, above(normal)]
    pro = np.r_[0.0, np.mean([above(r) for r in regions], axis=0)]
    cut = np.searchsorted(fpr, limit, side="right")
    x, y = fpr[:cut], pro[:cut]
    y_at = np.interp(limit, fpr[cut - 1:cut + 1], pro[cut - 1:cut + 1])
    return float(np.trapezoid(np.r_[y, y_at], np.r_[x, limit]) / limit)


@pytest.mark.parametrize("condition", ["clean", "rotation"])
def test_pixel_metrics_equal_an_independent_in_process_computation(tiny, audited, condition):
    report, rows = audited["report"], audited["rows"]
    for cat in CATEGORIES:
        maps, masks, scores = reference_maps(tiny, cat, condition)
        got = report["categories"][cat]
        got = got["clean"] if condition == "clean" else got["shifts"][condition]
        # same predict path: the audit's scores are the in-process ones
        csv_scores = sorted(float(r["score"]) for r in rows if r["category"] == cat
                            and r["condition"] == condition and not r["error"])
        np.testing.assert_allclose(csv_scores, np.sort(scores), rtol=1e-4, atol=1e-5)
        values = np.concatenate([m.ravel() for m in maps])
        truth = np.concatenate([m.ravel() for m in masks])
        assert got["pixel_auroc"] == pytest.approx(skm.roc_auc_score(truth, values), abs=1e-3)
        threshold = report["categories"][cat]["thresholds"]["pixel"]
        assert got["pixel_f1"] == pytest.approx(
            skm.f1_score(truth, values >= threshold, zero_division=0), abs=1e-3)
        precision, recall, _ = skm.precision_recall_curve(truth, values)
        best = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
        assert got["pixel_f1"] - 1e-3 <= got["pixel_f1_max"] == pytest.approx(best, abs=2e-2)
        assert got["aupro"] == pytest.approx(aupro_brute_force(maps, masks), abs=1e-3)


def test_shifts_report_every_metric_and_its_drop(audited):
    report = audited["report"]
    assert list(report["shifts"]) == SHIFTS
    assert report["shifts"]["rotation"]["group"] == "camera"
    assert report["shifts"]["rotation"]["tolerated_by_model"] is False  # the model was fitted without --tolerate
    for cat in CATEGORIES:
        clean = report["categories"][cat]["clean"]
        for name in SHIFTS:
            shifted = report["categories"][cat]["shifts"][name]
            assert set(METRICS) <= set(shifted)
            for m in set(METRICS) - THRESHOLD_METRICS:
                assert shifted["drop"][m] == pytest.approx(clean[m] - shifted[m])
    # a seeded audit: shifted scores differ from clean ones, and not all in the same way
    rows = audited["rows"]
    key = lambda r: (r["image_id"], r["condition"])  # noqa: E731
    by = {key(r): float(r["score"]) for r in rows if not r["error"]}
    for name in SHIFTS:
        assert any(by[(i, name)] != by[(i, "clean")] for i, c in by if c == "clean")


def test_visualizations_and_html(audited):
    root, report, rows = audited["dir"], audited["report"], audited["rows"]
    lay = VisualizationLayout.of(H, W)
    for cat in CATEGORIES:
        for defect, n in (("good", 5), ("blob", 3), ("scratch", 3)):
            files = sorted((root / "visualization_results" / cat / defect).glob("*.png"))
            assert [f.name for f in files] == [f"{i:03d}.png" for i in range(n)]
            assert Image.open(files[0]).size == (lay.width, lay.height)  # full size, labelled
    # the mask panel shows the ground truth (white), at the layout's whole-pixel scale
    mask_file = root.parent / "data" / "weave" / "ground_truth" / "blob" / "000_mask.png"
    x0, y0, x1, y1 = lay.panels[2]
    panel = np.asarray(Image.open(root / "visualization_results/weave/blob/000.png"))[y0:y1, x0:x1]
    mask = np.asarray(Image.open(mask_file)) > 0
    np.testing.assert_array_equal(panel[lay.scale // 2::lay.scale, lay.scale // 2::lay.scale, 0] > 127,
                                  mask)
    html = (root / "report.html").read_text()
    assert html.count("<svg") == 3 * len(CATEGORIES)  # ROC, PR, histogram per category
    assert 'class="per-defect"' in html and 'class="metrics"' in html
    assert 'class="rates"' in html and 'class="what-if"' in html and 'id="glossary"' in html
    for name in SHIFTS:
        assert f'data-condition="{name}"' in html
        assert report["shifts"][name]["description"] in html  # its strength
    # thumbnails: embedded, one per worst case (at most 8 of each kind per category)
    srcs = [t.split('"')[0] for t in html.split('src="')[1:]]
    assert all(src.startswith("data:image/jpeg;base64,") for src in srcs)
    expected = 0
    for cat in CATEGORIES:
        thr = report["categories"][cat]["thresholds"]["image"]
        clean = [r for r in rows if r["category"] == cat and r["condition"] == "clean"
                 and not r["error"]]
        fp = sum(r["label"] == "0" and float(r["score"]) >= thr for r in clean)
        fn = sum(r["label"] == "1" and float(r["score"]) < thr for r in clean)
        expected += min(fp, 8) + min(fn, 8)
    assert len(srcs) == expected
    for href in (t.split('"')[0] for t in html.split('<a href="')[1:]):  # full-size links
        if href.startswith("visualization_results/"):
            assert (root / href).is_file()
    assert html.count("Worst false") == 2 * len(CATEGORIES)
    # the verdict line opens the page
    assert html.index('id="verdict"') < html.index("<section")
    assert 'data-decision="no-go"' in html


def test_copied_audit_report_renders_complete_in_chromium(audited):
    html = (audited["dir"] / "report.html").read_text()
    lines = probe_page(audited["dir"] / "report.html")
    images = [line for line in lines if line.startswith("IMG")]
    assert len(images) == html.count("<img ")
    assert all(line.startswith("IMG ok ") for line in images), images
    assert sum(line.startswith("SVG") for line in lines) == 3 * len(CATEGORIES)


def wilson(k: int, n: int) -> list[float]:
    """scipy's Wilson interval: the reference the report's intervals are checked against."""
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [ci.low, ci.high]


def test_rates_intervals_targets_and_verdict(tiny, audited):
    """report.json's sign-off keys, recomputed from scores.csv with sklearn and scipy."""
    report, rows = audited["report"], audited["rows"]
    manifest = json.loads((Path(tiny["model"]) / "promptad.json").read_text())
    assert report["targets"]["max_false_alarm"] == MAX_FALSE_ALARM
    assert report["targets"]["min_recall"] is None
    for cat in CATEGORIES:
        got = report["categories"][cat]
        thr = got["thresholds"]["image"]
        clean = [r for r in rows if r["category"] == cat and r["condition"] == "clean"
                 and not r["error"]]
        scores = np.array([float(r["score"]) for r in clean])
        labels = np.array([int(r["label"]) for r in clean])
        tn, fp, fn, tp = skm.confusion_matrix(labels, scores >= thr, labels=[0, 1]).ravel()
        rates = got["rates"]
        assert (rates["tp"], rates["fp"], rates["tn"], rates["fn"]) == (tp, fp, tn, fn)
        assert rates["false_alarm_rate"] == pytest.approx(fp / (fp + tn))
        assert rates["recall"] == pytest.approx(tp / (tp + fn))
        assert rates["false_alarm_ci"] == pytest.approx(wilson(fp, fp + tn), abs=1e-9)
        assert rates["miss_ci"] == pytest.approx(wilson(fn, fn + tp), abs=1e-9)
        assert rates["recall_ci"] == pytest.approx(wilson(tp, fn + tp), abs=1e-9)
        lo, hi = rates["image_auroc_ci"]
        assert lo <= skm.roc_auc_score(labels, scores) <= hi
        # what if: the best recall with at most the budget of false alarms on these normals
        fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
        for row in got["what_if"]:
            assert row["recall"] == pytest.approx(tpr[fpr <= row["target_fpr"]].max())
            if row["threshold"] is not None:
                flagged = scores >= row["threshold"]
                assert flagged[labels == 1].mean() == pytest.approx(row["recall"])
                assert flagged[labels == 0].mean() <= row["target_fpr"]
        # beside them, what the threshold was calibrated for, straight from the artifact
        recorded = manifest["calibration"][cat]["stats"]
        assert got["calibration"]["n_normal"] == recorded["n_normal"]
        assert got["calibration"]["image_fpr_target"] == recorded["image_fpr_target"]
        # 5 normals can never show 1 %: the bound is Wilson's 0/5 at best, the verdict no-go
        check = got["verdict"]["checks"][0]
        assert check["target"] == "max_false_alarm" and check["passed"] is False
        assert check["bound"] == pytest.approx(wilson(fp, fp + tn)[1])
        assert got["verdict"]["decision"] == "no-go"
        assert any("381 normal images" in w for w in got["warnings"])
    assert report["verdict"]["decision"] == "no-go"
    assert report["verdict"]["failed"] == list(CATEGORIES)
    pooled = report["pooled"]["rates"]
    assert pooled["normal"] == sum(report["categories"][c]["rates"]["normal"] for c in CATEGORIES)
    assert pooled["fp"] == sum(report["categories"][c]["rates"]["fp"] for c in CATEGORIES)


def test_met_targets_exit_0(tiny, audited, tmp_path, capsys):
    """Targets just beyond weave's 95 % Wilson bounds (scipy's, from its clean scores and image
    threshold in the first audit's scores.csv) are met: go, exit 0. Met by 1e-4 only, so a bound
    on the wrong side, of the wrong rate or from wrong counts fails it (targets of 1 and 0 could not)."""
    rows = [r for r in audited["rows"] if r["category"] == "weave" and r["condition"] == "clean" and not r["error"]]
    thr = audited["report"]["categories"]["weave"]["thresholds"]["image"]
    flagged = np.array([float(r["score"]) for r in rows]) >= thr
    anomalous = np.array([int(r["label"]) for r in rows]) == 1
    tp, fn = int(flagged[anomalous].sum()), int((~flagged[anomalous]).sum())
    fp, tn = int(flagged[~anomalous].sum()), int((~flagged[~anomalous]).sum())
    false_alarm_bound, recall_bound = wilson(fp, fp + tn)[1], wilson(tp, tp + fn)[0]
    assert 1e-3 < recall_bound and false_alarm_bound < 1 - 1e-3, (tp, fn, fp, tn)  # both targets bind
    report = run_audit(tiny, tmp_path / "r", "--category", "weave",
                       "--max-false-alarm", str(float(false_alarm_bound) + 1e-4),
                       "--min-recall", str(float(recall_bound) - 1e-4), expect=0)
    assert report["verdict"]["decision"] == "go" and report["verdict"]["failed"] == []
    checks = report["categories"]["weave"]["verdict"]["checks"]
    assert [c["target"] for c in checks] == ["max_false_alarm", "min_recall"]
    assert [c["passed"] for c in checks] == [True, True]
    assert [c["bound"] for c in checks] == pytest.approx([false_alarm_bound, recall_bound], abs=1e-9)
    assert "verdict: GO" in capsys.readouterr().out


@pytest.mark.slow
def test_manifest_input_gives_the_same_numbers(tiny, audited, tmp_path):
    """A CSV manifest (relative paths, label words, no defect column for one row) over the
    same images: the clean image metrics are identical to the MVTec run."""
    data = Path(tiny["data"])
    lines = ["path,category,label,mask_path,defect"]
    for cat in CATEGORIES:
        for path in sorted((data / cat / "test").glob("*/*.png")):
            defect = path.parent.name
            mask = data / cat / "ground_truth" / defect / f"{path.stem}_mask.png"
            label = "good" if defect == "good" else "1"
            mask_rel = os.path.relpath(mask, data) if mask.exists() else ""
            lines.append(f"{os.path.relpath(path, data)},{cat},{label},{mask_rel},{defect}")
    manifest = data / "test_manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    report = run_audit(tiny, tmp_path / "r", data=str(manifest))
    for cat in CATEGORIES:
        ref = audited["report"]["categories"][cat]
        got = report["categories"][cat]
        assert got["counts"] == ref["counts"]
        for m in ("image_auroc", "f1", "image_f1_max", "pixel_auroc", "aupro", "pixel_f1"):
            assert got["clean"][m] == pytest.approx(ref["clean"][m], abs=1e-6)
    assert report["shifts"] == {}


@pytest.mark.slow
def test_s3_input(tiny, audited, s3_bucket, tmp_path):
    data = Path(tiny["data"])
    for path in data.rglob("*.png"):
        storage.write_bytes(f"{s3_bucket}/mvtec/{path.relative_to(data).as_posix()}",
                            path.read_bytes())
    report = run_audit(tiny, tmp_path / "r", "--category", "weave", data=f"{s3_bucket}/mvtec")
    ref = audited["report"]["categories"]["weave"]
    assert list(report["categories"]) == ["weave"]
    assert report["categories"]["weave"]["counts"] == ref["counts"]
    for m in ("image_auroc", "f1", "pixel_auroc", "aupro"):
        assert report["categories"]["weave"]["clean"][m] == pytest.approx(ref["clean"][m],
                                                                          abs=1e-6)
    assert (tmp_path / "r" / "visualization_results" / "weave" / "scratch" / "002.png").is_file()


def test_an_actor_the_cluster_cannot_place_is_a_user_error(tiny, ray_local, tmp_path, capsys):
    """audit checks its scoring actor as score does (actors.ModelActors.check): a GPU or more CPUs
    than this Ray has is one line, not a pool that waits forever."""
    base = ["audit", "--model", tiny["model"], "--data", tiny["data"], "--report", str(tmp_path / "r")]
    assert main([*base, "--gpus-per-actor", "1"]) == 2
    assert main([*base, "--cpus-per-actor", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot run one audit actor" in err[0] and "--gpus-per-actor 1 needs 1 GPUs" in err[0]
    assert "--cpus-per-actor 64 plus 0.5 for reads and visualizations needs 64.5 CPUs" in err[1]


def test_user_errors_are_one_line(tiny, tmp_path, capsys):
    base = ["audit", "--model", tiny["model"], "--data", tiny["data"]]
    assert main([*base, "--report", "s3://bucket/report"]) == 2
    assert main([*base, "--report", str(tmp_path / "r"), "--category", "nope"]) == 2
    assert main([*base, "--report", str(tmp_path / "r"), "--shifts", "fog"]) == 2
    unlabelled = tmp_path / "m.csv"
    unlabelled.write_text(f"path,category\n{tiny['data']}/tex/test/good/000.png,tex\n")
    assert main(["audit", "--model", tiny["model"], "--data", str(unlabelled),
                 "--report", str(tmp_path / "r")]) == 2
    bad_rates = [("--max-false-alarm", "1.5"), ("--min-recall", "-0.1"),
                 ("--max-false-alarm", "nan"), ("--min-recall", "5%")]
    for flag, value in bad_rates:
        assert main([*base, "--report", str(tmp_path / "r"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 + len(bad_rates)
    assert all(line.startswith("promptad: error: ") for line in err)
    assert "local" in err[0] and "nope" in err[1] and "fog" in err[2] and "label" in err[3]
    for line, (flag, value) in zip(err[4:], bad_rates):
        assert flag in line and repr(value) in line and "[0, 1]" in line


@pytest.mark.slow
def test_jobs_audit_exits_with_the_audit_status(tiny, ray_local, tmp_path):
    """`ray job submit -- python jobs/audit.py ...` must fail the job when a target is missed:
    the entrypoint exits with the audit's status (here joining the session's Ray)."""
    address = ray_local.get_runtime_context().gcs_address
    base = [sys.executable, str(Path(__file__).resolve().parents[1] / "jobs" / "audit.py"),
            "--model", tiny["model"], "--data", tiny["data"], "--category", "weave",
            "--address", address, "--batch-size", "8"]
    missed = subprocess.run([*base, "--report", str(tmp_path / "a"), "--max-false-alarm", "0"],
                            capture_output=True, text=True, timeout=600)
    assert missed.returncode == EXIT_TARGETS_MISSED, missed.stderr[-2000:]
    assert "verdict: NO-GO" in missed.stdout
    bad = subprocess.run([*base, "--report", str(tmp_path / "b"), "--min-recall", "2"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--min-recall" in bad.stderr


# --------------------------------------------------------------------------- guards


def _row(**over) -> dict:
    h, w = 4, 5
    row = {"image_id": "cat/test/good/000.png", "path": "/d/000.png", "category": "cat",
           "condition": CLEAN, "label": 0, "defect": "good", "error": "", "mask_error": "",
           "height": h, "width": w, "has_mask": False, "mask": b"", "vis": "v/cat/000.png",
           "score": np.float32(0.5), "map": np.zeros((h, w), np.float32).tobytes(),
           "png": b"\x89PNG"}
    return {**row, **over}


@pytest.mark.parametrize("bad", [
    {"score": np.float32("nan")},
    {"score": np.float32("inf")},
    {"map": b""},
    {"map": np.zeros(3, np.float32).tobytes()},
    {"map": np.full((4, 5), np.nan, np.float32).tobytes()},
])
def test_unusable_predictions_become_error_entries(tmp_path, bad):
    cal = {"cat": Calibration(image_threshold=1.0, pixel_threshold=1.0)}
    accs, cats = {("cat", CLEAN): ConditionResults()}, {"cat": CategoryResults()}
    errors, lines = [], []

    class Writer:
        def writerow(self, line):
            lines.append(line)

    fold(_row(**bad), cal, accs, cats, errors, tmp_path, set(), Writer())
    assert len(errors) == 1 and errors[0]["stage"] == "predict"
    assert errors[0]["condition"] == CLEAN and cats["cat"].counts["errors"] == 1
    assert len(accs[("cat", CLEAN)].scores) == 0  # not scored
    assert lines[0][-1].startswith("predict: ") and lines[0][7] == ""
    fold(_row(), cal, accs, cats, errors, tmp_path, set(), Writer())  # a good row still folds
    assert len(accs[("cat", CLEAN)].scores) == 1 and len(errors) == 1


def test_scorer_turns_non_finite_predictions_into_error_rows(monkeypatch):
    n, size = 3, 8

    def fake_predict_rows(model, images, categories, errors, precision="auto"):
        maps = np.ones((n, size, size), np.float32)
        maps[2, 0, 0] = np.nan
        return Prediction(scores=np.array([0.5, np.nan, 0.7], np.float32), maps=maps)

    monkeypatch.setattr("promptad.audit.stages.predict_rows", fake_predict_rows)
    scorer = _Scorer.__new__(_Scorer)  # no model needed: predict_rows is replaced
    scorer.model = None
    batch = {"image_id": np.array(["a", "b", "c"], object), "category": np.array(["x"] * n, object),
             "error": np.array(["", "", ""], object), "height": np.full(n, 4, np.int32),
             "width": np.full(n, 6, np.int32), "input": np.zeros((n, size, size, 3), np.uint8)}
    out = scorer(batch)
    assert out["error"][0] == "" and len(out["map"][0]) == 4 * 4 * 6
    assert out["error"][1].startswith("predict: non-finite image score")
    assert out["error"][2] == "predict: anomaly map has non-finite values"
    assert out["map"][1] == b"" and out["map"][2] == b""
    assert "input" not in out


def test_caption_says_score_threshold_decision_and_outcome():
    assert caption("c/test/good/001.png", "good", 1.5, 1.0) == (
        "c/test/good/001.png\nscore 1.5 | threshold 1 | decision: anomalous | truth: good "
        "(false alarm)")
    assert caption("x", "crack", 0.25, 1.0).endswith("decision: normal | truth: crack (missed)")
    assert caption("x", "crack", 1.0, 1.0).endswith("(caught)")  # score >= threshold flags
    assert caption("x", "good", 0.1, float("inf")).split("\n")[1].startswith(
        "score 0.1 | threshold none (uncalibrated)")
    long_id = "s3://bucket/" + "a" * 100 + "/000.png"
    assert caption(long_id, "good", 0.1, 1.0).split("\n")[0].endswith("/000.png")
    assert len(caption(long_id, "good", 0.1, 1.0).split("\n")[0]) == 72
