"""The tables of report.html, and the number formatting they share with the rest of the page
(page.py). Each table is a function of the report dict (report/summary.py) returning an HTML
string; an absent or non-finite value shows as "n/a", never as "nan".
"""
from __future__ import annotations

import html
import math

import numpy as np

from promptad.audit.verdict import percent
from promptad.report.summary import METRICS, THRESHOLD_METRICS


def finite(value) -> bool:
    return value is not None and not isinstance(value, str) and math.isfinite(float(value))


def fmt(value) -> str:
    """Metrics: 3 decimals; never "-0.000"; "n/a" when undefined."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if not finite(value):
        return "n/a"
    return f"{round(float(value), 3) + 0.0:.3f}"  # + 0.0 turns -0.0 into 0.0


def signed(value: float) -> str:
    """A change: "+0.012", "-0.034", and "0.000" for what rounds to zero (never "-0.000")."""
    r = round(float(value), 3)
    return "0.000" if r == 0 else f"{r:+.3f}"


def fmt_threshold(value) -> str:
    """Thresholds are raw scores of any magnitude: significant digits, not decimals."""
    if not finite(value):
        return "n/a"
    text = f"{float(value):.4g}"
    return "0" if float(text) == 0 else text


def interval_text(interval, fmt=percent) -> str:
    if not interval or not all(finite(v) for v in interval):
        return ""
    return f'<span class="ci">[{fmt(interval[0])}, {fmt(interval[1])}]</span>'


def esc(text) -> str:
    return html.escape(str(text))


# --------------------------------------------------------------------------- top of the page


def verdict_banner(verdict: dict) -> str:
    decision = verdict.get("decision", "not judged")
    word = {"go": "GO", "no-go": "NO-GO"}.get(decision, "NOT JUDGED")
    summary = verdict.get("summary", "")
    # the summary of a judged report starts with its GO / NO-GO word already
    text = summary if summary.startswith(word) else f"{word}: {summary}"
    return (f'<div id="verdict" class="verdict {decision.replace(" ", "-")}" '
            f'data-decision="{esc(decision)}">{esc(text)}</div>')


def warnings_list(report: dict) -> str:
    items = [(name, w) for name, cat in report.get("categories", {}).items()
             for w in cat.get("warnings", [])]
    if not items:
        return ""
    lis = "".join(f"<li><b>{esc(name)}</b>: {esc(w)}</li>" for name, w in items)
    return (f'<section id="warnings"><h2>Warnings: samples too small for a claim</h2>'
            f'<ul class="warnings">{lis}</ul></section>')


_RATE_COLUMNS = (("normal", "normal images"), ("anomalous", "defective images"), ("tp", "TP"),
                 ("fp", "FP"), ("tn", "TN"), ("fn", "FN"))


def _rates_row(name: str, rates: dict, decision: str) -> str:
    cell = lambda field, text: (f'<td data-category="{esc(name)}" data-field="{field}">'  # noqa: E731
                                f"{text}</td>")
    cells = [cell(k, fmt(rates.get(k))) for k, _ in _RATE_COLUMNS]
    for k, ci in (("false_alarm_rate", "false_alarm_ci"), ("miss_rate", "miss_ci"),
                  ("recall", "recall_ci")):
        cells.append(cell(k, percent(rates.get(k)) + interval_text(rates.get(ci))))
    cells.append(cell("image_auroc", fmt(rates.get("image_auroc"))
                      + interval_text(rates.get("image_auroc_ci"), fmt)))
    css = decision.replace(" ", "-")
    return (f"<tr><td>{esc(name)}</td><td class=\"{css}\" data-category=\"{esc(name)}\" "
            f'data-field="verdict">{esc(decision)}</td>' + "".join(cells) + "</tr>")


def rates_table(report: dict) -> str:
    head = "".join(f"<th>{label}</th>" for _, label in _RATE_COLUMNS)
    rows = [_rates_row(name, cat["rates"], cat.get("verdict", {}).get("decision", "not judged"))
            for name, cat in report.get("categories", {}).items() if "rates" in cat]
    pooled = report.get("pooled", {}).get("rates")
    if pooled:
        rows.append(_rates_row("pooled (all categories)", pooled, "not judged"))
    reasons = [f"<li><b>{esc(name)}</b>: {esc(c['reason'])}</li>"
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


def calibration_table(report: dict) -> str:
    rows = []
    for name, cat in report.get("categories", {}).items():
        cal = cat.get("calibration")
        if cal is None:
            continue
        th = cat.get("thresholds", {})
        n = cal.get("n_normal")
        rates = cat.get("rates") or {}
        measured = percent(rates["false_alarm_rate"]) if rates.get("normal") else "n/a"
        cells = [fmt_threshold(th.get("image")), fmt_threshold(th.get("pixel")),
                 percent(cal.get("image_fpr_target")), "n/a" if n is None else str(n),
                 percent(cal.get("image_fpr_achievable")), percent(cal.get("image_fpr_promised")), measured,
                 esc(cal.get("threshold_rule") or "not recorded in the artifact")]
        fields = ("image_threshold", "pixel_threshold", "image_fpr_target", "n_normal",
                  "image_fpr_achievable", "image_fpr_promised", "false_alarm_rate", "threshold_rule")
        rows.append(f"<tr><td>{esc(name)}</td>" + "".join(
            f'<td data-category="{esc(name)}" data-field="{f}">{c}</td>'
            for f, c in zip(fields, cells)) + "</tr>")
    if not rows:
        return ""
    return ('<section id="calibration"><h2>What the deployed thresholds were calibrated for'
            '</h2><table class="calibration"><tr><th>category</th><th>image threshold</th>'
            "<th>pixel threshold</th><th>target false-alarm rate</th><th>calibration normals</th>"
            "<th>smallest supportable rate</th><th>promised false-alarm rate</th>"
            "<th>measured here</th><th>rule</th></tr>" + "".join(rows)
            + "</table></section>")


def shifts_table(shifts: dict) -> str:
    if not shifts:
        return ""
    rows = "".join(f'<tr><td>{esc(name)}</td><td>{esc(s.get("group", ""))}</td>'
                   f'<td data-shift="{esc(name)}">{esc(s.get("description", ""))}</td>'
                   f'<td data-tolerated="{esc(name)}">{"yes" if s.get("tolerated_by_model") else "no"}</td></tr>'
                   for name, s in shifts.items())
    return ('<section id="shifts"><h2>Shifts</h2><p>Each shift has one fixed strength, is '
            "applied at the image's original resolution and is seeded per image. A shift the model "
            "was fitted to tolerate (<code>promptad fit --tolerate</code>) is normal to its global "
            "branch; the others read as whole-image changes.</p>"
            '<table class="shifts"><tr><th>shift</th><th>group</th><th>strength</th>'
            f"<th>tolerated by the model</th></tr>{rows}</table></section>")


# --------------------------------------------------------------------------- tables


def _cell(metric: str, value, condition: str, drop=None, large_drop: float = 0.05) -> str:
    text = fmt_threshold(value) if metric in THRESHOLD_METRICS else fmt(value)
    attrs = f' data-metric="{metric}" data-condition="{esc(condition)}"'
    if not finite(drop):
        return f"<td{attrs}>{text}</td>"
    cls = ' class="large-drop"' if round(float(drop), 3) >= large_drop else ""  # as displayed
    return (f'<td{cls}{attrs} data-drop="{float(drop):.6g}">{text}'
            f'<span class="drop">{signed(-float(drop))}</span></td>')


def metrics_table(clean: dict, shifts: dict, large_drop: float, strengths: dict) -> str:
    metrics = [m for m in METRICS if m in clean or any(m in s for s in shifts.values())]
    head = "".join(f"<th>{m}</th>" for m in metrics)
    rows = ["<tr><td>clean</td>" + "".join(
        _cell(m, clean.get(m), "clean") for m in metrics) + "</tr>"]
    for name, values in shifts.items():
        drops = values.get("drop", {})
        strength = strengths.get(name, {}).get("description")
        label = esc(name) + (f'<span class="strength">{esc(strength)}</span>' if strength else "")
        rows.append(f"<tr><td>{label}</td>" + "".join(
            _cell(m, values.get(m), name, drops.get(m), large_drop) for m in metrics) + "</tr>")
    return (f'<table class="metrics"><tr><th>condition</th>{head}</tr>' + "".join(rows)
            + "</table>")


def what_if_table(name: str, cat: dict) -> str:
    rows = cat.get("what_if")
    if not rows:
        return ""
    normal = cat.get("rates", {}).get("normal", 0)
    body = "".join(
        f"<tr><td>{percent(r['target_fpr'])}</td>"
        + "".join(f'<td data-category="{esc(name)}" data-target="{r["target_fpr"]:g}" '
                  f'data-field="{k}">{fmt(r.get(k))}</td>'
                  for k, fmt in (("threshold", _what_if_threshold), ("fpr", percent),
                                 ("recall", percent)))
        + ("<td>measured</td>" if r.get("resolvable") else
           f"<td>{normal} normals allow no false alarm here: zero-false-alarm threshold</td>")
        + "</tr>"
        for r in rows)
    rates = cat.get("rates", {})
    deployed = (f"<p>Deployed threshold {fmt_threshold(cat.get('thresholds', {}).get('image'))}:"
                f" false-alarm rate {percent(rates.get('false_alarm_rate'))}, recall "
                f"{percent(rates.get('recall'))} on these images. Thresholds below are read off "
                "these normal images, so they are only as good as their number.</p>")
    return ("<h3>What if: recall at a false-alarm budget</h3>" + deployed
            + '<table class="what-if"><tr><th>false-alarm budget</th><th>threshold needed</th>'
            "<th>false-alarm rate there</th><th>recall there</th><th>sample</th></tr>" + body + "</table>")


def _what_if_threshold(value) -> str:
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return "above every normal score (flags nothing)"
    return fmt_threshold(value)


def per_defect_table(per_defect: dict) -> str:
    if not per_defect:
        return "<p>No anomalous images.</p>"
    keys = ("count", "image_auroc_vs_good", "mean_score", "recall_at_threshold")
    formats = {"mean_score": fmt_threshold}  # a raw score: any magnitude
    rows = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(
            f'<td data-defect="{esc(name)}" data-field="{k}">'
            f"{formats.get(k, fmt)(stats.get(k))}</td>" for k in keys) + "</tr>"
        for name, stats in per_defect.items())
    return ('<table class="per-defect"><tr><th>defect</th>'
            + "".join(f"<th>{k}</th>" for k in keys) + "</tr>" + rows + "</table>")


# --------------------------------------------------------------------------- thumbnails
