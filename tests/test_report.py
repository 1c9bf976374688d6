"""The audit report: JSON, the HTML page (parsed back and checked against the dict, and
rendered alone in headless Chromium), the matplotlib plots and the labelled visualizations."""
import base64
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
from browser import probe_page
from PIL import Image

from promptad.audit.verdict import Targets, decision_summary, overall_verdict, percent
from promptad.data.images import encode_png
from promptad.metrics.image import image_summary, per_defect
from promptad.report.page import THUMB_WIDTH, write_html_report
from promptad.report.plots import (
    COLORMAP,
    VisualizationLayout,
    histogram_svg,
    map_norm,
    pr_svg,
    roc_svg,
    visualization,
)
from promptad.report.summary import (
    CategoryCurves,
    Example,
    WorstCases,
    overall_summary,
    with_drop,
    worst_indices,
    write_report_json,
)
from promptad.report.tables import fmt, signed

VOID = {"meta", "img", "br", "hr", "input", "link"}
SHIFT_ORDER = ["noise", "blur"]  # not alphabetical: every table must keep this order
SHIFT_INFO = {"noise": {"group": "sensor", "description": "Gaussian noise sigma 8/255", "tolerated_by_model": True},
              "blur": {"group": "camera", "description": "Gaussian blur sigma 1.5 px", "tolerated_by_model": False}}


class PageParser(HTMLParser):
    """Checks that every element is closed in order, and collects what the tests look at:
    table classes, metric and field cells (with their section), condition rows per table,
    svg count, image sources, ids, the verdict."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.section = None
        self.tables: list[tuple[str, str]] = []
        self.cells: list[dict] = []
        self.conditions: list[list[str]] = []  # data-condition order, one list per metrics table
        self.svgs = 0
        self.imgs: list[str] = []
        self.ids: list[str] = []
        self.verdict: dict | None = None
        self.first_section_seen_before_verdict = False
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section":
            self.section = a.get("id")
            if self.verdict is None:
                self.first_section_seen_before_verdict = True
        elif tag == "div" and a.get("id") == "verdict":
            self.verdict = a
        elif tag == "table":
            self.tables.append((self.section, a.get("class")))
            if a.get("class") == "metrics":
                self.conditions.append([])
        elif tag == "svg":
            self.svgs += 1
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "td" and ("data-metric" in a or "data-field" in a or "data-shift" in a
                              or "data-tolerated" in a):
            self._cell = {**a, "section": self.section, "text": ""}
            cond = a.get("data-condition")
            if cond and self.tables[-1][1] == "metrics" and \
                    (not self.conditions[-1] or self.conditions[-1][-1] != cond):
                self.conditions[-1].append(cond)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None and self.stack[-1] == "td":  # value, not the drop/ci span
            self._cell["text"] += data


def parse(path) -> PageParser:
    page = PageParser()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == []
    return page


def sample_report(rng: np.random.Generator, root=None, targets: Targets = Targets(0.3, 0.5)):
    """Two categories (one with a hostile name), two shifts, one big drop; with `root`,
    visualization PNGs of the worst cases are written under it as an audit does."""
    report = {"model_id": "abc123", "data_uri": "s3://bucket/mvtec",
              "created_at": "2026-11-29T10:00:00Z", "categories": {},
              "shifts": {k: SHIFT_INFO[k] for k in SHIFT_ORDER}}
    curves, worst = {}, {}
    for name, shift_strength in (("bottle", 0.02), ("<screw & nut>", 0.3)):
        defects = np.array(["good"] * 30 + ["crack"] * 12 + ["scratch"] * 8)
        labels = defects != "good"
        scores = rng.normal(labels * 2.0, 1.0)
        threshold = 1.0
        clean = {**image_summary(scores, labels, threshold),
                 "pixel_auroc": 0.95, "aupro": 0.88, "pixel_f1": 0.5}
        shifts = {}
        for k, factor in zip(SHIFT_ORDER, (1.0, 0.5)):
            shifted = {**image_summary(scores - shift_strength * factor * 5 * labels, labels,
                                       threshold),
                       "pixel_auroc": 0.95 - shift_strength, "aupro": float("nan"),
                       "pixel_f1": 0.5 - 1e-5}  # a drop that rounds to zero
            shifts[k] = with_drop(clean, shifted)
        report["categories"][name] = {
            "counts": {"images": 50, "normal": 30, "anomalous": 20, "with_mask": 20, "errors": 0},
            "thresholds": {"image": threshold, "pixel": 0.5},
            "clean": clean,
            "shifts": shifts,
            "per_defect": per_defect(scores, defects, threshold),
            **decision_summary(scores, labels, threshold,
                               {"n_normal": 5, "image_fpr_target": 0.01}, targets),
        }
        curves[name] = CategoryCurves.from_scores(scores, labels, threshold)
        fp, fn = worst_indices(scores, labels, threshold, k=3)
        worst[name] = WorstCases(
            [Example(f"img-{i}", scores[i], f"vis/{name}/{i} a.png", "good") for i in fp],
            [Example(f"img-{i}", scores[i], f"vis/{name}/{i}.png", defects[i]) for i in fn])
        if root is not None:
            for e in worst[name].false_positives + worst[name].false_negatives:
                (root / e.png).parent.mkdir(parents=True, exist_ok=True)
                img = rng.integers(0, 255, (120, 150, 3), dtype=np.uint8)
                amap = rng.random((120, 150)).astype(np.float32)
                (root / e.png).write_bytes(encode_png(visualization(
                    img, amap, None, pixel_center=0.25, pixel_threshold=0.5, caption=e.image_id)))
    report["overall"] = overall_summary(report["categories"])
    pooled_scores = np.concatenate([np.r_[c.normal_scores, c.anomalous_scores] for c in curves.values()])
    pooled_labels = np.concatenate([np.r_[np.zeros(c.normal_scores.size), np.ones(c.anomalous_scores.size)]
                                    for c in curves.values()])
    report["pooled"] = {"rates": decision_summary(pooled_scores, pooled_labels, 1.0, None,
                                                  Targets(), what_if=False)["rates"]}
    report["targets"] = targets.as_dict()
    report["verdict"] = overall_verdict(report["categories"], targets)
    return report, curves, worst


# --------------------------------------------------------------------------- report.json


def test_report_json_is_strict_and_round_trips(tmp_path):
    report, _, _ = sample_report(np.random.default_rng(0))
    path = tmp_path / "report.json"
    write_report_json(path, report)
    loaded = json.loads(path.read_text())  # strict: NaN would be a bare token
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    cat = loaded["categories"]["bottle"]
    assert cat["shifts"]["noise"]["aupro"] is None
    expected = report["categories"]["bottle"]["clean"]["image_auroc"]
    assert cat["clean"]["image_auroc"] == pytest.approx(expected)
    assert set(cat) == {"counts", "thresholds", "clean", "shifts", "per_defect", "rates",
                        "calibration", "what_if", "warnings", "verdict"}
    assert set(cat["rates"]) >= {"tp", "fp", "tn", "fn", "false_alarm_rate", "false_alarm_ci",
                                 "miss_rate", "miss_ci", "recall", "recall_ci", "image_auroc",
                                 "image_auroc_ci"}
    assert list(cat["shifts"]) == SHIFT_ORDER
    assert set(cat["per_defect"]["crack"]) == {"count", "image_auroc_vs_good", "mean_score",
                                               "recall_at_threshold"}
    assert isinstance(cat["counts"]["images"], int)
    assert loaded["targets"]["max_false_alarm"] == 0.3 and loaded["verdict"]["decision"] in (
        "go", "no-go")
    # "threshold above every normal score" is +inf in memory, null in JSON
    assert all(r["threshold"] is None or math.isfinite(r["threshold"]) for r in cat["what_if"])


def test_drops_and_overall_macro_mean_keep_the_shift_order():
    clean = {"image_auroc": 0.9, "image_f1_max_threshold": 3.0, "aupro": 0.8}
    shifted = with_drop(clean, {"image_auroc": 0.7, "image_f1_max_threshold": 2.0, "aupro": 0.8})
    assert shifted["drop"] == {"image_auroc": pytest.approx(0.2), "aupro": 0.0}
    a = {"image_auroc": 0.9, "pixel_auroc": float("nan"), "image_f1_max_threshold": 2.0}
    b = {"image_auroc": 0.7, "pixel_auroc": 0.8}
    cats = {"a": {"clean": a, "shifts": {"noise": with_drop(a, {"image_auroc": 0.8}),
                                         "blur": with_drop(a, {"image_auroc": 0.5})}},
            "b": {"clean": b, "shifts": {"noise": with_drop(b, {"image_auroc": 0.7}),
                                         "blur": with_drop(b, {"image_auroc": 0.6})}},
            "c": {"clean": b, "shifts": {}}}
    overall = overall_summary(cats)
    assert overall["clean"]["image_auroc"] == pytest.approx(0.7667, abs=1e-4)
    assert overall["clean"]["pixel_auroc"] == pytest.approx(0.8)  # NaN ignored
    assert "image_f1_max_threshold" not in overall["clean"]
    assert list(overall["shifts"]) == ["noise", "blur"]  # as asked, not sorted
    blur = overall["shifts"]["blur"]
    assert blur["image_auroc"] == pytest.approx(0.55)
    assert blur["drop"] == {"image_auroc": pytest.approx((0.4 + 0.1) / 2)}  # per-category


# --------------------------------------------------------------------------- HTML


def _number(text: str) -> float:
    """A cell's value as a fraction: "27.8 %" -> 0.278, "0.912" -> 0.912."""
    text = text.strip()
    return float(text[:-1].strip()) / 100 if text.endswith("%") else float(text)


def test_html_report_has_the_verdict_rates_and_the_dicts_numbers(tmp_path):
    report, curves, worst = sample_report(np.random.default_rng(1), tmp_path)
    path = tmp_path / "report.html"
    write_html_report(path, report, curves, worst)
    page = parse(path)

    # the go / no-go line comes before every section
    assert page.verdict is not None and not page.first_section_seen_before_verdict
    assert page.verdict["data-decision"] == report["verdict"]["decision"]
    sections = {f"cat-{name}": cat for name, cat in report["categories"].items()}
    assert {(s, "metrics") for s in sections} | {("overall", "metrics")} <= set(page.tables)
    assert {(s, "per-defect") for s in sections} | {(s, "what-if") for s in sections} \
        <= set(page.tables)
    assert {("rates", "rates"), ("calibration", "calibration"), ("shifts", "shifts")} \
        <= set(page.tables)
    assert page.svgs == 3 * len(sections)
    assert len(page.ids) == len(set(page.ids))  # several inline SVGs, no shared id

    checked = tolerated_cells = 0
    sections["overall"] = report["overall"]
    for cell in page.cells:
        text = cell["text"].strip()
        if "data-shift" in cell:
            assert text == SHIFT_INFO[cell["data-shift"]]["description"]
            continue
        if "data-tolerated" in cell:
            assert text == ("yes" if SHIFT_INFO[cell["data-tolerated"]]["tolerated_by_model"] else "no")
            tolerated_cells += 1
            continue
        if "data-category" in cell:
            cat = report["categories"].get(cell["data-category"]) or \
                {"rates": report["pooled"]["rates"], "verdict": {"decision": "not judged"}}
            field = cell["data-field"]
            if "data-target" in cell:
                row = next(r for r in cat["what_if"]
                           if f"{r['target_fpr']:g}" == cell["data-target"])
                expected = row[field]
            elif field == "verdict":
                assert text == cat["verdict"]["decision"]
                continue
            elif field in cat["rates"]:
                expected = cat["rates"][field]
            elif field in ("image_threshold", "pixel_threshold"):
                expected = cat["thresholds"][field.split("_")[0]]
            else:
                expected = cat["calibration"][field]
            if field == "threshold_rule":
                assert text == "not recorded in the artifact"
            elif expected is None:
                assert text == "n/a", cell
            elif isinstance(expected, float) and math.isinf(expected):
                assert text.startswith("above every normal score")
            else:
                assert _number(text) == pytest.approx(expected, rel=2e-3, abs=5e-4), cell
            checked += 1
            continue
        cat = sections[cell["section"]]
        if "data-defect" in cell:
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
        if math.isnan(expected):
            assert text == "n/a"
        else:
            assert float(text) == pytest.approx(expected, rel=1e-3, abs=5e-4)
        checked += 1
    assert checked >= 3 * (10 + 10 + 8) + 9 * 3 + 2 * (10 + 6 + 9)
    assert tolerated_cells == len(SHIFT_INFO)
    assert any("large-drop" in c.get("class", "") for c in page.cells)
    # one order of rows everywhere: clean, then the shifts as asked
    assert page.conditions and all(c == ["clean", *SHIFT_ORDER] for c in page.conditions)
    html_text = path.read_text()
    rate_rows = re.findall(r'<tr><td>([^<]*)</td><td class="[^"]*" data-category', html_text)
    assert rate_rows == ["bottle", "&lt;screw &amp; nut&gt;", "pooled (all categories)"]
    assert "<screw & nut>" not in html_text and "&lt;screw &amp; nut&gt;" in html_text
    for text in ("Gaussian noise sigma 8/255", "Gaussian blur sigma 1.5 px", 'id="glossary"',
                 "set by 5 held-out normal images", "Wilson", "deployed threshold ("):
        assert text in html_text, text
    assert "-0.000" not in html_text and "-0 %" not in html_text


def test_numbers_never_print_negative_zero():
    assert fmt(-0.0) == "0.000" and fmt(-1e-5) == "0.000" and fmt(-0.0006) == "-0.001"
    assert signed(-1e-5) == "0.000" and signed(0.0) == "0.000" and signed(0.0123) == "+0.012"
    assert percent(-0.0) == "0 %" and percent(0.278) == "27.8 %" and percent(0.0005) == "0.05 %"
    assert fmt(float("nan")) == "n/a" and percent(None) == "n/a"


def test_thumbnails_are_embedded_downsized(tmp_path):
    report, curves, worst = sample_report(np.random.default_rng(2), tmp_path)
    path = tmp_path / "report.html"
    write_html_report(path, report, curves, worst)
    page = parse(path)
    examples = [e for w in worst.values() for e in w.false_positives + w.false_negatives]
    assert examples and len(page.imgs) == len(examples)
    for src, e in zip(page.imgs, examples):
        assert src.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        full = Image.open(tmp_path / e.png)
        assert thumb.width == min(THUMB_WIDTH, full.width) < full.width
        assert abs(thumb.height / thumb.width - full.height / full.width) < 0.01
    html_text = path.read_text()
    assert "vis/bottle/" in html_text  # the full-size link stays, percent-encoded
    assert "%20a.png" in html_text
    # a visualization that is missing says so instead of showing a broken image
    (tmp_path / examples[0].png).unlink()
    write_html_report(path, report, curves, worst)
    assert len(parse(path).imgs) == len(examples) - 1
    assert "(visualization not available)" in path.read_text()


def test_copied_report_renders_complete_in_chromium(tmp_path):
    """The page mailed alone: Chromium loads the copy from a folder with nothing else in it,
    and the page's own probe reports every image decoded and every plot laid out."""
    report, curves, worst = sample_report(np.random.default_rng(3), tmp_path)
    write_html_report(tmp_path / "report.html", report, curves, worst)
    lines = probe_page(tmp_path / "report.html")
    images = [line for line in lines if line.startswith("IMG")]
    n_examples = sum(len(w.false_positives) + len(w.false_negatives) for w in worst.values())
    assert len(images) == n_examples > 0
    assert all(line.startswith("IMG ok ") for line in images), images
    svgs = [line for line in lines if line.startswith("SVG")]
    assert len(svgs) == 3 * len(report["categories"])
    assert all(int(line.split()[1].split("x")[0]) > 100 for line in svgs), svgs


def test_html_report_without_curves_or_worst_cases(tmp_path):
    report, _, _ = sample_report(np.random.default_rng(4))
    path = tmp_path / "report.html"
    write_html_report(path, report, curves={}, worst={})
    page = parse(path)
    assert page.svgs == 0 and page.imgs == []


# --------------------------------------------------------------------------- plots


def _svg_root(svg: str) -> ET.Element:
    assert svg.startswith("<svg")
    return ET.fromstring(svg)


def test_plots_are_svg_with_legends_and_the_operating_point():
    fpr, tpr = np.array([0, 0.1, 0.5, 1.0]), np.array([0, 0.6, 0.9, 1.0])
    ns = "{http://www.w3.org/2000/svg}"
    for svg in (roc_svg(fpr, tpr, "ROC <a>", (0.1, 0.6)),
                pr_svg(tpr[::-1], np.array([0.5, 0.7, 0.8, 1.0]), "PR", (0.6, 0.8)),
                histogram_svg(np.random.default_rng(3).normal(size=200),
                              np.random.default_rng(4).normal(3, 1, 40), 1.5, "hist")):
        root = _svg_root(svg)
        assert root.tag == f"{ns}svg"
        texts = " ".join(t.text or "" for t in root.iter(f"{ns}text"))
        assert texts.strip()  # text stays text (searchable), not glyph paths
    roc = roc_svg(fpr, tpr, "x", (0.1, 0.6))
    assert "AUROC 0.805" in roc and "deployed threshold (FPR 0.100, TPR 0.600)" in roc
    assert re.search(r'id="roc-[0-9a-f]+-operating-point"', roc)
    assert "ROC &lt;a&gt;" in roc_svg(fpr, tpr, "ROC <a>")
    assert "operating-point" not in roc_svg(fpr, tpr, "x")  # none given, none drawn
    pr = pr_svg(tpr[::-1], np.array([0.5, 0.7, 0.8, 1.0]), "PR", (0.6, 0.8))
    assert "deployed threshold (recall 0.600, precision 0.800)" in pr
    one_class = roc_svg(np.full(3, np.nan), np.array([0, 0.5, 1.0]), "single")
    _svg_root(one_class)
    assert "n/a" in one_class
    assert "threshold 1.5" in histogram_svg(np.ones(5), np.array([2.0]), 1.5, "h")
    _svg_root(histogram_svg(np.array([]), np.array([]), float("nan"), "empty"))
    _svg_root(histogram_svg(np.ones(5), np.array([]), 1.0, "constant"))
    # ids differ between plots of one page, so inline SVGs never collide
    ids = lambda svg: set(re.findall(r'id="([^"]+)"', svg))  # noqa: E731
    assert not ids(roc_svg(fpr, tpr, "a")) & ids(roc_svg(fpr, tpr, "b"))


def test_category_curves_mark_the_deployed_operating_point():
    # 4 normals (one >= 0.5), 4 defectives (three >= 0.5): FPR 1/4, TPR 3/4, precision 3/4
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.9])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    c = CategoryCurves.from_scores(scores, labels, 0.5)
    assert c.roc_point == (0.25, 0.75) and c.pr_point == (0.75, 0.75)
    assert CategoryCurves.from_scores(scores, np.zeros(8), 0.5).roc_point is None


def test_worst_indices_orders_by_how_wrong():
    scores = np.array([0.9, 0.2, 0.7, 0.1, 0.3, 0.95, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    fp, fn = worst_indices(scores, labels, threshold=0.5, k=2)
    assert fp.tolist() == [0, 6]
    assert fn.tolist() == [3, 4]


# --------------------------------------------------------------------------- visualizations


def _box(out: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return out[y0:y1, x0:x1]


def test_visualization_panels_colour_bar_and_contour():
    h, w = 40, 60
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    amap = np.zeros((h, w), np.float32)
    amap[5:15, 20:30] = 1.0  # raw values; threshold 0.5, median normal 0.25
    mask = np.zeros((h, w), bool)
    mask[10:30, 40:60] = True
    out = visualization(image, amap, mask, pixel_center=0.25, pixel_threshold=0.5, caption="c")
    lay = VisualizationLayout.of(h, w)
    assert out.shape == (lay.height, lay.width, 3) and out.dtype == np.uint8
    up = lambda a: np.repeat(np.repeat(a, lay.scale, 0), lay.scale, 1)  # noqa: E731
    np.testing.assert_array_equal(_box(out, lay.panels[0]), up(image))  # the input, untouched
    truth = _box(out, lay.panels[2])
    np.testing.assert_array_equal(truth[..., 0] > 127, up(mask))  # ground truth in white
    # overlay: half input, half colour map; the scale is 0.5 -> middle, 0 -> bottom
    cmap = matplotlib.colormaps[COLORMAP]
    overlay = _box(out, lay.panels[1]).astype(float)

    def centre(y: int, x: int) -> np.ndarray:  # the middle of a map pixel's enlarged block
        return overlay[y * lay.scale + lay.scale // 2, x * lay.scale + lay.scale // 2]

    norm = map_norm(amap, 0.25, 0.5)
    assert norm.vmin == 0.0 and norm.vmax == 1.0  # threshold at the middle of the scale
    for (y, x), value in (((10, 25), 1.0), ((30, 5), 0.0)):
        expected = 0.5 * image[y, x] + 0.5 * 255 * np.array(cmap(norm(value))[:3])
        assert np.abs(centre(y, x) - expected).max() <= 2, (y, x)
    # the threshold contour (cyan) runs along the hot square's edge, nowhere far from it
    cyan = (overlay[..., 0] < 80) & (overlay[..., 1] > 180) & (overlay[..., 2] > 200)
    ys, xs = np.nonzero(cyan)
    assert ys.size > 20
    assert ys.min() >= 4 * lay.scale and ys.max() <= 16 * lay.scale
    assert xs.min() >= 19 * lay.scale and xs.max() <= 31 * lay.scale
    # colour bar: its middle is the threshold's colour, its ends the scale's ends
    bar = _box(out, lay.colorbar)
    column = bar[:, bar.shape[1] // 2].astype(float)
    for frac in (0.5, 0.1, 0.9):
        row = int(round((1 - frac) * (len(column) - 1)))
        assert np.abs(column[row] - 255 * np.array(cmap(frac)[:3])).max() <= 6, frac


def test_visualization_without_mask_or_calibration_and_bad_input():
    h, w = 300, 200  # large: no enlargement
    image = np.full((h, w, 3), 128, np.uint8)
    lay = VisualizationLayout.of(h, w)
    assert lay.scale == 1
    # a portrait panel is too narrow for the long title on one line: it gets two, and room
    assert lay.titles[1] == "anomaly map\nover the input"
    wide = VisualizationLayout.of(h, 2 * w)
    assert wide.titles[1] == "anomaly map over the input"
    assert lay.panels[0][1] > wide.panels[0][1]
    out = visualization(image, np.zeros((h, w)), None, pixel_center=0.0,
                        pixel_threshold=float("inf"), caption="uncalibrated")
    truth = _box(out, lay.panels[2])
    assert (truth > 0).mean() < 0.05  # black with a small "no mask" note
    assert (truth > 0).any()
    with pytest.raises(ValueError):
        visualization(image[..., 0], np.zeros((h, w)), None, pixel_center=0, pixel_threshold=1,
                      caption="")
    with pytest.raises(ValueError):
        visualization(image, np.zeros((h // 2, w)), None, pixel_center=0, pixel_threshold=1,
                      caption="")
