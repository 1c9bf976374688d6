"""The audit report: JSON, the HTML page (parsed back and checked against the dict), SVG
plots and side-by-side visualizations."""
import json
import math
import urllib.parse
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from promptad.metrics import image_summary, per_defect
from promptad.report import (
    CategoryCurves,
    Example,
    WorstCases,
    jet,
    overall_summary,
    side_by_side,
    svg_histogram,
    svg_pr,
    svg_roc,
    with_drop,
    worst_indices,
    write_html_report,
    write_report_json,
)

VOID = {"meta", "img", "br", "hr", "input", "link"}


class PageParser(HTMLParser):
    """Checks that every element is closed in order, and collects what the tests look at:
    table classes, metric cells (with their section), svg count, image sources."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.section = None
        self.tables: list[tuple[str, str]] = []
        self.cells: list[dict] = []
        self.svgs = 0
        self.imgs: list[str] = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
        elif tag == "table":
            self.tables.append((self.section, a.get("class")))
        elif tag == "svg":
            self.svgs += 1
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "td" and ("data-metric" in a or "data-field" in a):
            self._cell = {**a, "section": self.section, "text": ""}
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None and self.stack[-1] == "td":  # value, not the drop span
            self._cell["text"] += data


def sample_report(rng: np.random.Generator):
    """Two categories (one with a hostile name), two shifts, one big drop."""
    report = {"model_id": "abc123", "data_uri": "s3://bucket/mvtec",
              "created_at": "2026-11-29T10:00:00Z", "categories": {}}
    curves, worst = {}, {}
    for name, shift_strength in (("bottle", 0.02), ("<screw & nut>", 0.3)):
        defects = np.array(["good"] * 30 + ["crack"] * 12 + ["scratch"] * 8)
        labels = defects != "good"
        scores = rng.normal(labels * 2.0, 1.0)
        threshold = 1.0
        clean = {**image_summary(scores, labels, threshold),
                 "pixel_auroc": 0.95, "aupro": 0.88, "pixel_f1": 0.5}
        shifted = {**image_summary(scores - shift_strength * 5 * labels, labels, threshold),
                   "pixel_auroc": 0.95 - shift_strength, "aupro": float("nan"), "pixel_f1": 0.45}
        report["categories"][name] = {
            "counts": {"images": 50, "normal": 30, "anomalous": 20, "with_mask": 20, "errors": 0},
            "thresholds": {"image": threshold, "pixel": 0.5},
            "clean": clean,
            "shifts": {"lighting": with_drop(clean, shifted)},
            "per_defect": per_defect(scores, defects, threshold),
        }
        curves[name] = CategoryCurves.from_scores(scores, labels, threshold)
        fp, fn = worst_indices(scores, labels, threshold, k=3)
        worst[name] = WorstCases(
            [Example(f"img-{i}", scores[i], f"vis/{name}/{i} a.png", "good") for i in fp],
            [Example(f"img-{i}", scores[i], f"vis/{name}/{i}.png", defects[i]) for i in fn])
    report["overall"] = overall_summary(report["categories"])
    return report, curves, worst


def test_report_json_is_strict_and_round_trips(tmp_path):
    report, _, _ = sample_report(np.random.default_rng(0))
    path = tmp_path / "report.json"
    write_report_json(path, report)
    loaded = json.loads(path.read_text())  # strict: NaN would be a bare token
    assert "NaN" not in path.read_text()
    cat = loaded["categories"]["bottle"]
    assert cat["shifts"]["lighting"]["aupro"] is None
    expected = report["categories"]["bottle"]["clean"]["image_auroc"]
    assert cat["clean"]["image_auroc"] == pytest.approx(expected)
    assert set(cat) == {"counts", "thresholds", "clean", "shifts", "per_defect"}
    assert set(cat["per_defect"]["crack"]) == {"count", "image_auroc_vs_good", "mean_score",
                                               "recall_at_threshold"}
    assert isinstance(cat["counts"]["images"], int)


def test_drops_and_overall_macro_mean():
    clean = {"image_auroc": 0.9, "image_f1_max_threshold": 3.0, "aupro": 0.8}
    shifted = with_drop(clean, {"image_auroc": 0.7, "image_f1_max_threshold": 2.0, "aupro": 0.8})
    assert shifted["drop"] == {"image_auroc": pytest.approx(0.2), "aupro": 0.0}
    a = {"image_auroc": 0.9, "pixel_auroc": float("nan"), "image_f1_max_threshold": 2.0}
    b = {"image_auroc": 0.7, "pixel_auroc": 0.8}
    cats = {"a": {"clean": a, "shifts": {"blur": with_drop(a, {"image_auroc": 0.5})}},
            "b": {"clean": b, "shifts": {"blur": with_drop(b, {"image_auroc": 0.6})}},
            "c": {"clean": b, "shifts": {}}}
    overall = overall_summary(cats)
    assert overall["clean"]["image_auroc"] == pytest.approx(0.7667, abs=1e-4)
    assert overall["clean"]["pixel_auroc"] == pytest.approx(0.8)  # NaN ignored
    assert "image_f1_max_threshold" not in overall["clean"]
    blur = overall["shifts"]["blur"]
    assert blur["image_auroc"] == pytest.approx(0.55)
    assert blur["drop"] == {"image_auroc": pytest.approx((0.4 + 0.1) / 2)}  # per-category


def test_html_report_has_tables_plots_thumbnails_and_the_dicts_numbers(tmp_path):
    report, curves, worst = sample_report(np.random.default_rng(1))
    path = tmp_path / "report.html"
    write_html_report(path, report, curves, worst)
    page = PageParser()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == []

    sections = {f"cat-{name}": cat for name, cat in report["categories"].items()}
    assert {(s, "metrics") for s in sections} | {("overall", "metrics")} <= set(page.tables)
    assert {(s, "per-defect") for s in sections} <= set(page.tables)
    assert page.svgs == 3 * len(sections)
    for name, w in worst.items():
        for e in w.false_positives + w.false_negatives:
            assert e.png in [urllib.parse.unquote(src) for src in page.imgs]

    checked = 0
    sections["overall"] = report["overall"]
    for cell in page.cells:
        cat = sections[cell["section"]]
        if "data-field" in cell:
            expected = cat["per_defect"][cell["data-defect"]][cell["data-field"]]
        elif cell["data-condition"] == "clean":
            expected = cat["clean"][cell["data-metric"]]
        else:
            shift = cat["shifts"][cell["data-condition"]]
            expected = shift[cell["data-metric"]]
            drop = shift["drop"].get(cell["data-metric"], math.nan)
            if not math.isnan(drop):
                assert float(cell["data-drop"]) == pytest.approx(drop, rel=1e-5, abs=1e-9)
                assert ("large-drop" in cell.get("class", "")) == (round(drop, 3) >= 0.05)
        text = cell["text"].strip()
        if math.isnan(expected):
            assert text == "n/a"
        else:
            assert float(text) == pytest.approx(expected, rel=1e-3, abs=5e-4)
        checked += 1
    assert checked >= 2 * (10 + 10 + 8) + 9 + 9
    assert any("large-drop" in c.get("class", "") for c in page.cells)
    html_text = path.read_text()
    assert "<screw & nut>" not in html_text and "&lt;screw &amp; nut&gt;" in html_text


def test_html_report_without_curves_or_worst_cases(tmp_path):
    report, _, _ = sample_report(np.random.default_rng(2))
    path = tmp_path / "report.html"
    write_html_report(path, report, curves={}, worst={})
    page = PageParser()
    page.feed(path.read_text())
    assert page.svgs == 0 and page.imgs == [] and page.stack == []


def test_svg_plots_are_well_formed_with_axes_and_legend():
    fpr, tpr = np.array([0, 0.1, 0.5, 1.0]), np.array([0, 0.6, 0.9, 1.0])
    for svg in (svg_roc(fpr, tpr, "ROC <a>"),
                svg_pr(tpr[::-1], np.array([1.0, 0.8, 0.7, 0.5]), "PR"),
                svg_histogram(np.random.default_rng(3).normal(size=200),
                              np.random.default_rng(4).normal(3, 1, 40), 1.5, "hist")):
        root = ET.fromstring(svg)
        ns = "{http://www.w3.org/2000/svg}"
        assert root.tag == f"{ns}svg"
        assert len(root.findall(f"{ns}polyline")) >= 1
        assert len(root.findall(f"{ns}rect[@class='legend']")) == 1
        texts = [t.text for t in root.iter(f"{ns}text")]
        assert len(texts) >= 10  # title, axis labels, tick labels, legend
    assert "AUROC 0.805" in svg_roc(fpr, tpr, "x")
    assert "ROC &lt;a&gt;" in svg_roc(fpr, tpr, "ROC <a>")
    one_class = svg_roc(np.full(3, np.nan), np.array([0, 0.5, 1.0]), "single")
    ET.fromstring(one_class)
    assert "n/a" in one_class
    ET.fromstring(svg_histogram(np.array([]), np.array([]), float("nan"), "empty"))
    ET.fromstring(svg_histogram(np.ones(5), np.array([]), 1.0, "constant"))


def test_worst_indices_orders_by_how_wrong():
    scores = np.array([0.9, 0.2, 0.7, 0.1, 0.3, 0.95, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    fp, fn = worst_indices(scores, labels, threshold=0.5, k=2)
    assert fp.tolist() == [0, 6]
    assert fn.tolist() == [3, 4]


def test_side_by_side_shape_overlay_and_mask():
    h, w = 40, 60
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    amap = np.zeros((20, 30), np.float32)  # half resolution: resized to the image
    amap[5:15, 20:30] = 1.0
    mask = np.zeros((h, w), bool)
    mask[10:30, 40:60] = True
    out = side_by_side(image, amap, mask)
    assert out.shape == (h, 3 * w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :w], image)
    overlay = out[:, w:2 * w].astype(int)
    hot, cold = (slice(14, 26), slice(44, 56)), (slice(14, 26), slice(4, 16))
    red = jet(1.0).astype(int) * 0.5 + image.astype(int) * 0.5
    assert np.abs(overlay[hot] - red[hot]).max() <= 1  # high map -> red blend
    assert np.abs(overlay[cold] - (np.array(jet(0.0), int) * 0.5 + image[cold] * 0.5)).max() <= 1
    assert (overlay[hot][..., 0].mean() - overlay[cold][..., 0].mean()) > 40
    truth = out[:, 2 * w:]
    assert (truth[mask] == 255).all() and (truth[~mask] == 0).all()

    no_mask = side_by_side(image, np.zeros((h, w)), None)
    assert no_mask.shape == (h, 3 * w, 3)
    assert (no_mask[:, 2 * w:] > 0).mean() < 0.2  # black with a small note
    small_mask = side_by_side(image, amap, mask[::2, ::2])
    np.testing.assert_array_equal(small_mask[:, 2 * w:], truth)
    with pytest.raises(ValueError):
        side_by_side(image[..., 0], amap, None)


def test_jet_runs_blue_to_red():
    assert jet(0.0).tolist() == [0, 0, 128]
    assert jet(1.0).tolist() == [128, 0, 0]
    assert jet(0.5).tolist() == [128, 255, 128]
    assert jet(np.zeros((2, 3))).shape == (2, 3, 3)
