"""report.html: one self-contained page per audit, readable when mailed alone.

Top to bottom: the go / no-go line, warnings, the decision rates at the deployed threshold
(with 95 % intervals) beside what the threshold was calibrated for, the shifts and their
strengths, the macro means, one section per category (metrics per condition, what-if
thresholds, ROC / PR / histogram plots, per-defect table, worst false positives and negatives),
and a glossary of the columns. Everything it shows is inside the file: plots are inline SVG
(plots.py) and thumbnails are downsized JPEG data URIs of the visualizations, whose full-size
files stay in visualization_results/. Every table lists categories in the report's order and
conditions as clean, then the shifts in the order they were asked for.
"""
from __future__ import annotations

import base64
import html
import io
import math
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image

from promptad.audit.verdict import percent
from promptad.report.plots import histogram_svg, pr_svg, roc_svg
from promptad.report.summary import METRICS, THRESHOLD_METRICS, CategoryCurves, Example, WorstCases

THUMB_WIDTH = 640  # px: thumbnails embedded in the page; full size in visualization_results/
THUMB_QUALITY = 85  # JPEG: a fifth of the PNG's size at this width, text still crisp enough


# --------------------------------------------------------------------------- formatting

_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1280px}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
table.shifts td{text-align:left}
th{background:#f2f2f2}
td.large-drop{background:#fbd5d5;font-weight:bold}
.drop{display:block;font-size:80%;color:#666}
td.large-drop .drop{color:#a00}
.ci{display:block;font-size:80%;color:#555}
.strength{display:block;font-size:80%;color:#666}
.plots svg{margin-right:12px;vertical-align:top}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;font-size:80%;max-width:620px}
figure img{max-width:100%;border:1px solid #ccc}
section{border-top:2px solid #ddd;margin-top:24px}
.meta{color:#555}
.verdict{font-size:120%;padding:10px 14px;border-radius:4px;margin:12px 0}
.verdict.go{background:#d8f3dc;border:2px solid #2a9d5c}
.verdict.no-go{background:#fbd5d5;border:2px solid #c0392b}
.verdict.not-judged{background:#eee;border:2px solid #999}
td.go{color:#1b7a43;font-weight:bold}
td.no-go{color:#b02a1e;font-weight:bold}
ul.warnings li{color:#8a4b00}
dl.glossary dt{font-weight:bold;margin-top:6px}
dl.glossary dd{margin-left:18px}
"""


def _finite(value) -> bool:
    return value is not None and not isinstance(value, str) and math.isfinite(float(value))


def _fmt(value) -> str:
    """Metrics: 3 decimals; never "-0.000"; "n/a" when undefined."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if not _finite(value):
        return "n/a"
    return f"{round(float(value), 3) + 0.0:.3f}"  # + 0.0 turns -0.0 into 0.0


def _signed(value: float) -> str:
    """A change: "+0.012", "-0.034", and "0.000" for what rounds to zero (never "-0.000")."""
    r = round(float(value), 3)
    return "0.000" if r == 0 else f"{r:+.3f}"


def _fmt_threshold(value) -> str:
    """Thresholds are raw scores of any magnitude: significant digits, not decimals."""
    if not _finite(value):
        return "n/a"
    text = f"{float(value):.4g}"
    return "0" if float(text) == 0 else text


def _ci(interval, fmt=percent) -> str:
    if not interval or not all(_finite(v) for v in interval):
        return ""
    return f'<span class="ci">[{fmt(interval[0])}, {fmt(interval[1])}]</span>'


def _e(text) -> str:
    return html.escape(str(text))


# --------------------------------------------------------------------------- top of the page


def _verdict_banner(verdict: dict) -> str:
    decision = verdict.get("decision", "not judged")
    word = {"go": "GO", "no-go": "NO-GO"}.get(decision, "NOT JUDGED")
    summary = verdict.get("summary", "")
    # the summary of a judged report starts with its GO / NO-GO word already
    text = summary if summary.startswith(word) else f"{word}: {summary}"
    return (f'<div id="verdict" class="verdict {decision.replace(" ", "-")}" '
            f'data-decision="{_e(decision)}">{_e(text)}</div>')


def _warnings(report: dict) -> str:
    items = [(name, w) for name, cat in report.get("categories", {}).items()
             for w in cat.get("warnings", [])]
    if not items:
        return ""
    lis = "".join(f"<li><b>{_e(name)}</b>: {_e(w)}</li>" for name, w in items)
    return (f'<section id="warnings"><h2>Warnings: samples too small for a claim</h2>'
            f'<ul class="warnings">{lis}</ul></section>')


_RATE_COLUMNS = (("normal", "normal images"), ("anomalous", "defective images"), ("tp", "TP"),
                 ("fp", "FP"), ("tn", "TN"), ("fn", "FN"))


def _rates_row(name: str, rates: dict, decision: str) -> str:
    cell = lambda field, text: (f'<td data-category="{_e(name)}" data-field="{field}">'  # noqa: E731
                                f"{text}</td>")
    cells = [cell(k, _fmt(rates.get(k))) for k, _ in _RATE_COLUMNS]
    for k, ci in (("false_alarm_rate", "false_alarm_ci"), ("miss_rate", "miss_ci"),
                  ("recall", "recall_ci")):
        cells.append(cell(k, percent(rates.get(k)) + _ci(rates.get(ci))))
    cells.append(cell("image_auroc", _fmt(rates.get("image_auroc"))
                      + _ci(rates.get("image_auroc_ci"), _fmt)))
    css = decision.replace(" ", "-")
    return (f"<tr><td>{_e(name)}</td><td class=\"{css}\" data-category=\"{_e(name)}\" "
            f'data-field="verdict">{_e(decision)}</td>' + "".join(cells) + "</tr>")


def _rates_table(report: dict) -> str:
    head = "".join(f"<th>{label}</th>" for _, label in _RATE_COLUMNS)
    rows = [_rates_row(name, cat["rates"], cat.get("verdict", {}).get("decision", "not judged"))
            for name, cat in report.get("categories", {}).items() if "rates" in cat]
    pooled = report.get("pooled", {}).get("rates")
    if pooled:
        rows.append(_rates_row("pooled (all categories)", pooled, "not judged"))
    reasons = [f"<li><b>{_e(name)}</b>: {_e(c['reason'])}</li>"
               for name, cat in report.get("categories", {}).items()
               for c in cat.get("verdict", {}).get("checks", [])]
    return ('<section id="rates"><h2>Decisions at the deployed threshold (clean images)</h2>'
            '<table class="rates"><tr><th>category</th><th>verdict</th>' + head
            + "<th>false-alarm rate</th><th>miss rate</th><th>recall</th><th>image AUROC</th>"
            "</tr>" + "".join(rows) + "</table>"
            "<p>Brackets: 95 % intervals (Wilson for rates, stratified bootstrap for AUROC). "
            "Targets are judged on the bounds, not on the point estimates; the pooled row is "
            "for information (targets apply per category).</p>"
            + (f'<ul class="checks">{"".join(reasons)}</ul>' if reasons else "") + "</section>")


def _calibration_table(report: dict) -> str:
    rows = []
    for name, cat in report.get("categories", {}).items():
        cal = cat.get("calibration")
        if cal is None:
            continue
        th = cat.get("thresholds", {})
        n = cal.get("n_normal")
        cells = [_fmt_threshold(th.get("image")), _fmt_threshold(th.get("pixel")),
                 percent(cal.get("image_fpr_target")), "n/a" if n is None else str(n),
                 percent(cal.get("image_fpr_achievable")),
                 _e(cal.get("threshold_rule") or "not recorded in the artifact")]
        fields = ("image_threshold", "pixel_threshold", "image_fpr_target", "n_normal",
                  "image_fpr_achievable", "threshold_rule")
        rows.append(f"<tr><td>{_e(name)}</td>" + "".join(
            f'<td data-category="{_e(name)}" data-field="{f}">{c}</td>'
            for f, c in zip(fields, cells)) + "</tr>")
    if not rows:
        return ""
    return ('<section id="calibration"><h2>What the deployed thresholds were calibrated for'
            '</h2><table class="calibration"><tr><th>category</th><th>image threshold</th>'
            "<th>pixel threshold</th><th>target false-alarm rate</th><th>calibration normals</th>"
            "<th>smallest supportable rate</th><th>rule</th></tr>" + "".join(rows)
            + "</table></section>")


def _shifts_table(shifts: dict) -> str:
    if not shifts:
        return ""
    rows = "".join(f'<tr><td>{_e(name)}</td><td>{_e(s.get("group", ""))}</td>'
                   f'<td data-shift="{_e(name)}">{_e(s.get("description", ""))}</td>'
                   f'<td data-tolerated="{_e(name)}">{"yes" if s.get("tolerated_by_model") else "no"}</td></tr>'
                   for name, s in shifts.items())
    return ('<section id="shifts"><h2>Shifts</h2><p>Each shift has one fixed strength, is '
            "applied at the image's original resolution and is seeded per image. A shift the model "
            "was fitted to tolerate (<code>promptad fit --tolerate</code>) is normal to its global "
            "branch; the others read as whole-image changes.</p>"
            '<table class="shifts"><tr><th>shift</th><th>group</th><th>strength</th>'
            f"<th>tolerated by the model</th></tr>{rows}</table></section>")


# --------------------------------------------------------------------------- tables


def _cell(metric: str, value, condition: str, drop=None, large_drop: float = 0.05) -> str:
    text = _fmt_threshold(value) if metric in THRESHOLD_METRICS else _fmt(value)
    attrs = f' data-metric="{metric}" data-condition="{_e(condition)}"'
    if not _finite(drop):
        return f"<td{attrs}>{text}</td>"
    cls = ' class="large-drop"' if round(float(drop), 3) >= large_drop else ""  # as displayed
    return (f'<td{cls}{attrs} data-drop="{float(drop):.6g}">{text}'
            f'<span class="drop">{_signed(-float(drop))}</span></td>')


def _metrics_table(clean: dict, shifts: dict, large_drop: float, strengths: dict) -> str:
    metrics = [m for m in METRICS if m in clean or any(m in s for s in shifts.values())]
    head = "".join(f"<th>{m}</th>" for m in metrics)
    rows = ["<tr><td>clean</td>" + "".join(
        _cell(m, clean.get(m), "clean") for m in metrics) + "</tr>"]
    for name, values in shifts.items():
        drops = values.get("drop", {})
        strength = strengths.get(name, {}).get("description")
        label = _e(name) + (f'<span class="strength">{_e(strength)}</span>' if strength else "")
        rows.append(f"<tr><td>{label}</td>" + "".join(
            _cell(m, values.get(m), name, drops.get(m), large_drop) for m in metrics) + "</tr>")
    return (f'<table class="metrics"><tr><th>condition</th>{head}</tr>' + "".join(rows)
            + "</table>")


def _what_if_table(name: str, cat: dict) -> str:
    rows = cat.get("what_if")
    if not rows:
        return ""
    normal = cat.get("rates", {}).get("normal", 0)
    body = "".join(
        f"<tr><td>{percent(r['target_fpr'])}</td>"
        + "".join(f'<td data-category="{_e(name)}" data-target="{r["target_fpr"]:g}" '
                  f'data-field="{k}">{fmt(r.get(k))}</td>'
                  for k, fmt in (("threshold", _what_if_threshold), ("fpr", percent),
                                 ("recall", percent)))
        + ("<td>measured</td>" if r.get("resolvable") else
           f"<td>{normal} normals allow no false alarm here: zero-false-alarm threshold</td>")
        + "</tr>"
        for r in rows)
    rates = cat.get("rates", {})
    deployed = (f"<p>Deployed threshold {_fmt_threshold(cat.get('thresholds', {}).get('image'))}:"
                f" false-alarm rate {percent(rates.get('false_alarm_rate'))}, recall "
                f"{percent(rates.get('recall'))} on these images. Thresholds below are read off "
                "these normal images, so they are only as good as their number.</p>")
    return ("<h3>What if: recall at a false-alarm budget</h3>" + deployed
            + '<table class="what-if"><tr><th>false-alarm budget</th><th>threshold needed</th>'
            "<th>false-alarm rate there</th><th>recall there</th><th>sample</th></tr>" + body + "</table>")


def _what_if_threshold(value) -> str:
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return "above every normal score (flags nothing)"
    return _fmt_threshold(value)


def _per_defect_table(per_defect: dict) -> str:
    if not per_defect:
        return "<p>No anomalous images.</p>"
    keys = ("count", "image_auroc_vs_good", "mean_score", "recall_at_threshold")
    fmt = {"mean_score": _fmt_threshold}  # a raw score: any magnitude
    rows = "".join(
        f"<tr><td>{_e(name)}</td>" + "".join(
            f'<td data-defect="{_e(name)}" data-field="{k}">'
            f"{fmt.get(k, _fmt)(stats.get(k))}</td>" for k in keys) + "</tr>"
        for name, stats in per_defect.items())
    return ('<table class="per-defect"><tr><th>defect</th>'
            + "".join(f"<th>{k}</th>" for k in keys) + "</tr>" + rows + "</table>")


# --------------------------------------------------------------------------- thumbnails


def thumbnail_data_uri(path: Path, max_width: int = THUMB_WIDTH) -> str | None:
    """The picture at `path` downsized to at most `max_width` pixels wide, as a JPEG data: URI,
    so the page shows it without the file beside it and stays small enough to mail (~25 KB
    a thumbnail; the lossless PNG stays in visualization_results/). None when the file is
    missing or unreadable."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.width > max_width:
                im = im.resize((max_width, max(1, round(im.height * max_width / im.width))),
                               Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=THUMB_QUALITY)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbs(kind: str, examples: list[Example], threshold: float, root: Path) -> str:
    if not examples:
        return f"<p>No {kind}.</p>"
    figures = []
    for e in examples:
        flagged = _finite(threshold) and e.score >= threshold
        outcome = ("false alarm" if flagged else "correct") if e.defect == "good" else \
            ("caught" if flagged else "missed")
        caption = (f"{_e(e.image_id)}{' (' + _e(e.defect) + ')' if e.defect else ''}: score "
                   f"{_fmt_threshold(e.score)}, threshold {_fmt_threshold(threshold)}, decision "
                   f"{'anomalous' if flagged else 'normal'} ({outcome})")
        uri = thumbnail_data_uri(root / e.png)
        picture = (f'<img src="{uri}" alt="{_e(e.image_id)}">' if uri
                   else '<p class="meta">(visualization not available)</p>')
        link = f'<a href="{_e(urllib.parse.quote(e.png))}">full size</a>'
        figures.append(f"<figure>{picture}<figcaption>{caption} | {link}</figcaption></figure>")
    return f'<div class="thumbs {kind.replace(" ", "-")}">{"".join(figures)}</div>'


# --------------------------------------------------------------------------- page


def _category_section(name: str, cat: dict, curves: CategoryCurves | None,
                      worst: WorstCases | None, large_drop: float, strengths: dict,
                      root: Path) -> str:
    counts = ", ".join(f"{k}: {_fmt(v)}" for k, v in cat.get("counts", {}).items())
    thresholds = ", ".join(f"{k} {_fmt_threshold(v)}" for k, v in cat.get("thresholds", {}).items())
    parts = [f'<section id="cat-{_e(name)}"><h2>{_e(name)}</h2>',
             f'<p class="meta">{_e(counts)}'
             f"{' | deployed thresholds: ' + _e(thresholds) if thresholds else ''}</p>",
             "<h3>Metrics (clean, and per shift with change vs clean)</h3>",
             _metrics_table(cat.get("clean", {}), cat.get("shifts", {}), large_drop, strengths),
             _what_if_table(name, cat)]
    if curves is not None:
        parts += ['<div class="plots">',
                  roc_svg(curves.fpr, curves.tpr, f"{name}: ROC (image)", curves.roc_point),
                  pr_svg(curves.recall, curves.precision, f"{name}: precision-recall (image)",
                         curves.pr_point),
                  histogram_svg(curves.normal_scores, curves.anomalous_scores, curves.threshold,
                                f"{name}: image scores"),
                  "</div>"]
    parts += ["<h3>Per defect type</h3>", _per_defect_table(cat.get("per_defect", {}))]
    worst = worst or WorstCases()
    threshold = cat.get("thresholds", {}).get("image", float("nan"))
    threshold = float("nan") if threshold is None else threshold
    parts += ["<h3>Worst false positives (normal images, highest scores)</h3>",
              _thumbs("false positives", worst.false_positives, threshold, root),
              "<h3>Worst false negatives (anomalous images, lowest scores)</h3>",
              _thumbs("false negatives", worst.false_negatives, threshold, root), "</section>"]
    return "".join(parts)


GLOSSARY = (
    ("verdict", "go when every target given (--max-false-alarm, --min-recall) is met at 95 % "
                "confidence: the upper bound of the false-alarm rate at or below its target, the "
                "lower bound of recall at or above its target; no-go otherwise."),
    ("TP / FP / TN / FN", "defective images flagged / normal images flagged (false alarms) / "
                          "normal images passed / defective images passed (misses), at the "
                          "deployed image threshold."),
    ("false-alarm rate", "FP / normal images: the share of good parts the line would reject."),
    ("miss rate", "FN / defective images: the share of defective parts the line would pass."),
    ("recall", "TP / defective images = 1 - miss rate."),
    ("[lo, hi]", "95 % confidence interval: Wilson score interval for rates (sound at 0 and "
                 "100 %), percentile interval over 2000 seeded stratified bootstrap resamples "
                 "for AUROC."),
    ("image AUROC", "probability that a defective image scores above a normal one; independent "
                    "of any threshold."),
    ("pixel AUROC, AUPRO", "the same for map pixels against the masks; AUPRO is the area under "
                           "the per-region overlap curve up to 30 % pixel false-positive rate "
                           "(normalized), which weighs small defects like large ones."),
    ("image_f1_max", "the best F1 over all thresholds as the literature reports it; its "
                     "threshold is chosen on the audited labels and is never deployed."),
    ("precision, recall, f1, accuracy", "image decisions at the deployed threshold; pixel_f1 "
                                        "at the deployed pixel threshold."),
    ("change under a shift", "shifted minus clean; drops of {large_drop:.2f} or more are "
                             "highlighted."),
    ("target false-alarm rate, calibration normals", "what the threshold was calibrated for and "
                                                  "how many normal training images (each scored "
                                                  "without its own memory entries) set it."),
    ("smallest supportable rate", "about 1 / (calibration normals + 1): a quantile of n scores "
                                  "cannot resolve a smaller false-alarm rate."),
    ("what if", "the lowest threshold whose false-alarm rate on these normal images is within "
                "the budget, and the recall it gives."),
    ("per defect", "per defect type: count, AUROC against all good images, mean score, recall "
                   "at the deployed threshold."),
    ("anomaly map colours", "inferno colour scale; its middle (the colour bar's labelled tick) "
                            "is the pixel threshold, outlined in cyan on the overlay."),
)


def _glossary(large_drop: float) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v.format(large_drop=large_drop))}</dd>"
                    for k, v in GLOSSARY)
    return f'<section id="glossary"><h2>Glossary</h2><dl class="glossary">{items}</dl></section>'


def render_html_report(report: dict, curves: dict[str, CategoryCurves],
                       worst: dict[str, WorstCases], large_drop: float = 0.05,
                       root: Path | str = ".") -> str:
    """The HTML page as a string (see write_html_report); thumbnails are read from `root`."""
    root = Path(root)
    meta = (f"model {_e(report.get('model_id', ''))} | data {_e(report.get('data_uri', ''))} | "
            f"created {_e(report.get('created_at', ''))}")
    strengths = report.get("shifts", {})
    parts = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
             f"<title>PromptAD audit {_e(report.get('model_id', ''))}</title>",
             f"<style>{_CSS}</style></head><body><h1>PromptAD audit</h1>",
             f'<p class="meta">{meta}</p>',
             _verdict_banner(report.get("verdict", {})),
             _warnings(report),
             _rates_table(report),
             _calibration_table(report),
             _shifts_table(strengths),
             f"<p>Changes under a shift are shifted minus clean; drops of {large_drop:.2f} "
             "or more are highlighted. F1-max is the literature's best case; precision, recall, "
             "F1, accuracy and pixel F1 are at the deployed thresholds. Columns are explained "
             'in the <a href="#glossary">glossary</a>.</p>']
    overall = report.get("overall")
    if overall:
        parts += ['<section id="overall"><h2>Overall (mean over categories)</h2>',
                  _metrics_table(overall.get("clean", {}), overall.get("shifts", {}),
                                 large_drop, strengths),
                  "</section>"]
    for name, cat in report.get("categories", {}).items():
        parts.append(_category_section(name, cat, curves.get(name), worst.get(name),
                                       large_drop, strengths, root))
    parts += [_glossary(large_drop), "</body></html>"]
    return "\n".join(p for p in parts if p)


def write_html_report(path: str | Path, report: dict, curves: dict[str, CategoryCurves],
                      worst: dict[str, WorstCases], large_drop: float = 0.05) -> None:
    """One self-contained page per audit (layout in the module docstring). Thumbnails are the
    PNGs at the paths in `worst`, relative to the page's folder, embedded downsized.

    curves: category -> CategoryCurves (categories without one get no plots);
    worst: category -> WorstCases."""
    path = Path(path)
    path.write_text(render_html_report(report, curves, worst, large_drop, root=path.parent),
                    encoding="utf-8")
