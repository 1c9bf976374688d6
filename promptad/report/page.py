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
import io
import urllib.parse
from pathlib import Path

from PIL import Image

from promptad.report.plots import histogram_svg, pr_svg, roc_svg
from promptad.report.summary import CategoryCurves, Example, WorstCases
from promptad.report.tables import (
    calibration_table,
    esc,
    finite,
    fmt,
    fmt_threshold,
    metrics_table,
    per_defect_table,
    rates_table,
    shifts_table,
    verdict_banner,
    warnings_list,
    what_if_table,
)

THUMB_WIDTH = 640  # px: thumbnails embedded in the page; full size in visualization_results/
THUMB_QUALITY = 85  # JPEG: a fifth of the PNG's size at this width, text still crisp enough

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
        flagged = finite(threshold) and e.score >= threshold
        outcome = ("false alarm" if flagged else "correct") if e.defect == "good" else \
            ("caught" if flagged else "missed")
        caption = (f"{esc(e.image_id)}{' (' + esc(e.defect) + ')' if e.defect else ''}: score "
                   f"{fmt_threshold(e.score)}, threshold {fmt_threshold(threshold)}, decision "
                   f"{'anomalous' if flagged else 'normal'} ({outcome})")
        uri = thumbnail_data_uri(root / e.png)
        picture = (f'<img src="{uri}" alt="{esc(e.image_id)}">' if uri
                   else '<p class="meta">(visualization not available)</p>')
        link = f'<a href="{esc(urllib.parse.quote(e.png))}">full size</a>'
        figures.append(f"<figure>{picture}<figcaption>{caption} | {link}</figcaption></figure>")
    return f'<div class="thumbs {kind.replace(" ", "-")}">{"".join(figures)}</div>'


# --------------------------------------------------------------------------- page


def _category_section(name: str, cat: dict, curves: CategoryCurves | None,
                      worst: WorstCases | None, large_drop: float, strengths: dict,
                      root: Path) -> str:
    counts = ", ".join(f"{k}: {fmt(v)}" for k, v in cat.get("counts", {}).items())
    thresholds = ", ".join(f"{k} {fmt_threshold(v)}" for k, v in cat.get("thresholds", {}).items())
    parts = [f'<section id="cat-{esc(name)}"><h2>{esc(name)}</h2>',
             f'<p class="meta">{esc(counts)}'
             f"{' | deployed thresholds: ' + esc(thresholds) if thresholds else ''}</p>",
             "<h3>Metrics (clean, and per shift with change vs clean)</h3>",
             metrics_table(cat.get("clean", {}), cat.get("shifts", {}), large_drop, strengths),
             what_if_table(name, cat)]
    if curves is not None:
        parts += ['<div class="plots">',
                  roc_svg(curves.fpr, curves.tpr, f"{name}: ROC (image)", curves.roc_point),
                  pr_svg(curves.recall, curves.precision, f"{name}: precision-recall (image)",
                         curves.pr_point),
                  histogram_svg(curves.normal_scores, curves.anomalous_scores, curves.threshold,
                                f"{name}: image scores"),
                  "</div>"]
    parts += ["<h3>Per defect type</h3>", per_defect_table(cat.get("per_defect", {}))]
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
                                        "at the deployed pixel threshold, pixel_f1_max at the best "
                                        "threshold for these masks (never deployed)."),
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
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v.format(large_drop=large_drop))}</dd>"
                    for k, v in GLOSSARY)
    return f'<section id="glossary"><h2>Glossary</h2><dl class="glossary">{items}</dl></section>'


def render_html_report(report: dict, curves: dict[str, CategoryCurves],
                       worst: dict[str, WorstCases], large_drop: float = 0.05,
                       root: Path | str = ".") -> str:
    """The HTML page as a string (see write_html_report); thumbnails are read from `root`."""
    root = Path(root)
    meta = (f"model {esc(report.get('model_id', ''))} | data {esc(report.get('data_uri', ''))} | "
            f"created {esc(report.get('created_at', ''))}")
    strengths = report.get("shifts", {})
    parts = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
             f"<title>PromptAD audit {esc(report.get('model_id', ''))}</title>",
             f"<style>{_CSS}</style></head><body><h1>PromptAD audit</h1>",
             f'<p class="meta">{meta}</p>',
             verdict_banner(report.get("verdict", {})),
             warnings_list(report),
             rates_table(report),
             calibration_table(report),
             shifts_table(strengths),
             f"<p>Changes under a shift are shifted minus clean; drops of {large_drop:.2f} "
             "or more are highlighted. F1-max is the literature's best case; precision, recall, "
             "F1, accuracy and pixel F1 are at the deployed thresholds. Columns are explained "
             'in the <a href="#glossary">glossary</a>.</p>']
    overall = report.get("overall")
    if overall:
        parts += ['<section id="overall"><h2>Overall (mean over categories)</h2>',
                  metrics_table(overall.get("clean", {}), overall.get("shifts", {}),
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
