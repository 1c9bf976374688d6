"""What an audit's numbers mean for putting a model on the line: the rates at the deployed
threshold with their confidence, what the threshold was calibrated for, plain warnings where a
sample is too small to carry a claim, and the go / no-go verdict against the targets.

Verdicts are judged on 95 % confidence bounds, never on point estimates: a false-alarm target
is met when the *upper* Wilson bound of the false-alarm rate is at or below it, a recall target
when the *lower* Wilson bound of recall is at or above it. So 0 false alarms in 10 normal
images does not show a 1 % false-alarm rate (the bound is 27.8 %): it takes 381 normals.
No Ray, no torch; the statistics are in metrics/.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from promptad.metrics.image import (
    WHAT_IF_FPRS,
    bootstrap_auroc,
    image_auroc,
    rates_at_threshold,
    recall_at_fpr,
    wilson_interval,
    wilson_min_n,
)

GO, NO_GO, NOT_JUDGED = "go", "no-go", "not judged"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
MIN_PER_CLASS_FOR_AUROC_CI = 10  # below this a bootstrap interval is a rough guide only


@dataclass(frozen=True)
class Targets:
    """Per-category acceptance targets (None: not asked for)."""

    max_false_alarm: float | None = None
    min_recall: float | None = None

    def given(self) -> bool:
        return self.max_false_alarm is not None or self.min_recall is not None

    def as_dict(self) -> dict:
        return {"max_false_alarm": self.max_false_alarm, "min_recall": self.min_recall,
                "judged_on": "95 % Wilson bounds: false alarm upper bound <= target, recall "
                             "lower bound >= target"}


def percent(value: float | None) -> str:
    """A rate in percent for people: "27.8 %", "0.05 %" below 0.1 %, never "-0 %";
    "n/a" when undefined."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    value = float(value)
    digits = 1 if value >= 0.001 or value == 0 else 2
    text = f"{100 * value:.{digits}f}"
    return f"{'0' if float(text) == 0 else text} %"


def _number(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def calibration_record(stats: dict | None) -> dict:
    """What the deployed image threshold was calibrated for, from an artifact's calibration
    stats. Read defensively: older artifacts lack image_fpr_achievable, threshold_rule and
    warnings; where the smallest supportable target is missing it is taken as 1/(n + 1), the
    resolution of a quantile of n scores. "warnings" is None when the artifact records none
    (older artifacts), a list (maybe empty) when it does."""
    stats = stats if isinstance(stats, dict) else {}
    n = _number(stats.get("n_normal"))
    n = int(n) if n is not None and n >= 0 else None
    achievable = _number(stats.get("image_fpr_achievable"))
    if achievable is None and n is not None:
        achievable = 1.0 / (n + 1)
    rule = stats.get("threshold_rule")
    raw_warnings = stats.get("warnings")
    return {
        "image_fpr_target": _number(stats.get("image_fpr_target")),
        # what the threshold promises for new normal images (conformal; None in older artifacts)
        "image_fpr_promised": _number(stats.get("image_fpr_promised")),
        "passed_over_image": stats.get("passed_over_image"),
        "n_normal": n,
        "image_fpr_achievable": achievable,
        "threshold_rule": str(rule) if rule else None,
        "warnings": [str(w) for w in raw_warnings] if isinstance(raw_warnings, list) else None,
    }


def sample_warnings(rates: dict, calibration: dict, targets: Targets) -> list[str]:
    """Plain sentences for every claim the sample is too small to carry: the calibration
    target, the false-alarm and recall targets, and the AUROC interval."""
    out = []
    target, n_cal = calibration["image_fpr_target"], calibration["n_normal"]
    achievable = calibration["image_fpr_achievable"]
    if calibration["warnings"] is None and target is not None and n_cal is not None \
            and achievable is not None and target < achievable:
        # a newer artifact states its own calibration warnings; an older one gets this
        out.append(f"The deployed threshold was set by {n_cal} held-out normal images: they "
                   f"cannot resolve a false-alarm rate below about {percent(achievable)}, so its "
                   f"{percent(target)} target is not supported; calibrate on at least "
                   f"{math.ceil(1 / target - 1)} normal images.")
    normal, anomalous = rates["normal"], rates["anomalous"]
    claim = targets.max_false_alarm if targets.max_false_alarm is not None else target
    if normal == 0:
        out.append("No normal images were audited: the false-alarm rate is not measured.")
    elif claim is not None and claim < 1:
        need = wilson_min_n(claim)
        if need is None or normal < need:
            out.append(f"{normal} normal images can show at best a false-alarm rate below "
                       f"{percent(wilson_interval(0, normal)[1])} (95 %), even with no false alarm; "
                       f"showing {percent(claim)} needs "
                       + (f"at least {need} normal images." if need else "an infinite sample."))
    if anomalous == 0:
        out.append("No defective images were audited: recall is not measured.")
    elif targets.min_recall is not None and targets.min_recall > 0:
        need = wilson_min_n(1.0 - targets.min_recall)
        if need is None or anomalous < need:
            out.append(f"{anomalous} defective images can show at best a recall above "
                       f"{percent(wilson_interval(anomalous, anomalous)[0])} (95 %), even with none "
                       f"missed; showing {percent(targets.min_recall)} needs "
                       + (f"at least {need} defective images." if need else "an infinite sample."))
    if 0 < min(normal, anomalous) < MIN_PER_CLASS_FOR_AUROC_CI:
        out.append(f"The image AUROC interval rests on {normal} normal and {anomalous} defective "
                   "images; with fewer than 10 of a class a bootstrap interval is a rough guide.")
    return out


def judge(rates: dict, targets: Targets) -> dict:
    """One category against the targets: {"decision", "checks": [{"target", "value", "bound",
    "passed", "reason"}]}. A rate with nothing to measure it has bounds (0, 1): it fails."""
    checks = []
    if targets.max_false_alarm is not None:
        t, hi = targets.max_false_alarm, rates["false_alarm_ci"][1]
        passed = hi <= t
        checks.append({
            "target": "max_false_alarm", "value": t, "bound": hi, "passed": passed,
            "reason": f"false alarms {rates['fp']}/{rates['normal']} = "
                      f"{percent(rates['false_alarm_rate'])}, upper 95 % bound {percent(hi)} "
                      f"{'<=' if passed else '>'} target {percent(t)}"})
    if targets.min_recall is not None:
        t, lo = targets.min_recall, rates["recall_ci"][0]
        passed = lo >= t
        checks.append({
            "target": "min_recall", "value": t, "bound": lo, "passed": passed,
            "reason": f"recall {rates['tp']}/{rates['anomalous']} = {percent(rates['recall'])}, "
                      f"lower 95 % bound {percent(lo)} {'>=' if passed else '<'} target {percent(t)}"})
    decision = NOT_JUDGED if not checks else GO if all(c["passed"] for c in checks) else NO_GO
    return {"decision": decision, "checks": checks}


def decision_summary(scores: np.ndarray, labels: np.ndarray, threshold: float,
                     calibration_stats: dict | None, targets: Targets,
                     what_if: bool = True) -> dict:
    """Everything a sign-off needs for one category (or the pooled set) at its deployed
    threshold: "rates" (confusion counts, false-alarm / miss / recall rates with Wilson
    intervals, image AUROC with its bootstrap interval), "calibration", "what_if" (recall at
    each of metrics.WHAT_IF_FPRS, the threshold it needs, and whether the audited normals can
    resolve that budget at all), "warnings" and "verdict"."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    rates = rates_at_threshold(scores, labels, threshold)
    rates["image_auroc"] = image_auroc(scores, labels)
    rates["image_auroc_ci"] = list(bootstrap_auroc(scores, labels, BOOTSTRAP_RESAMPLES,
                                                   BOOTSTRAP_SEED))
    calibration = calibration_record(calibration_stats)
    warnings = (calibration["warnings"] or []) + sample_warnings(rates, calibration, targets)
    out = {"rates": rates, "calibration": calibration, "warnings": warnings,
           "verdict": judge(rates, targets)}
    if what_if:
        # a budget below 1 / (normal images) allows no false alarm at all in this sample: the
        # row is then the zero-false-alarm threshold, not a measurement at that budget
        out["what_if"] = [{**recall_at_fpr(scores, labels, f),
                           "resolvable": rates["normal"] * f >= 1.0} for f in WHAT_IF_FPRS]
    return out


def _caught(rates: dict) -> str:
    """What the deployed threshold catches, for the threshold line and the GO line alike."""
    if not rates["anomalous"]:
        return "catches nothing measurable (no defective images audited)"
    return f"catches {rates['tp']} of {rates['anomalous']} defective images ({percent(rates['recall'])})"


def promise_line(name: str, cat: dict) -> str:
    """One category's deployed threshold in one sentence: what it catches, the false alarms it
    raised, and beside them what its calibration promised (printed by audit with or without targets)."""
    r, cal = cat["rates"], cat.get("calibration") or {}
    caught = _caught(r)
    alarms = (f"flags {r['fp']} of {r['normal']} normal images ({percent(r['false_alarm_rate'])}, 95 % up to "
              f"{percent(r['false_alarm_ci'][1])})" if r["normal"] else "no normal images audited")
    promised = cal.get("image_fpr_promised")
    n = cal.get("n_normal")
    promise = (f"; calibrated on {n} normal images, it promised at most {percent(promised)} false alarms"
               if promised is not None and n is not None else "; the artifact records no promise (older format)")
    return f"{name}: at the deployed threshold it {caught} and {alarms}{promise}"


def at_threshold(categories: dict[str, dict], targets: Targets) -> str:
    """What the deployed threshold does, per category, in the GO line itself: a GO on a false-alarm
    target alone once sat above a model that caught 0 of 32 cracks (cookie, one odd normal photo
    setting the threshold), so the rate nobody targeted is said as loudly as the one that passed."""
    parts = []
    for name, cat in categories.items():
        r = cat["rates"]
        parts.append(f"{name} {_caught(r)}, {r['fp']} false alarms of {r['normal']} normal images")
    untargeted = " (recall was not a target)" if targets.min_recall is None else ""
    return "at the deployed threshold " + "; ".join(parts) + untargeted


def overall_verdict(categories: dict[str, dict], targets: Targets) -> dict:
    """The go / no-go line: "go" when every category meets every target, "no-go" when any
    misses one (those are listed), "not judged" without targets."""
    if not targets.given():
        return {"decision": NOT_JUDGED, "failed": [],
                "summary": "No targets given: pass --max-false-alarm and/or --min-recall for a "
                           "go / no-go verdict."}
    failed = [name for name, cat in categories.items()
              if cat["verdict"]["decision"] != GO]
    asked = []
    if targets.max_false_alarm is not None:
        asked.append(f"false alarms <= {percent(targets.max_false_alarm)}")
    if targets.min_recall is not None:
        asked.append(f"recall >= {percent(targets.min_recall)}")
    wanted = " and ".join(asked) + " at 95 % confidence"
    if not failed:
        return {"decision": GO, "failed": [],
                "summary": f"GO: every category shows {wanted}; {at_threshold(categories, targets)}."}
    reasons = "; ".join(
        f"{name}: " + ", ".join(c["reason"] for c in categories[name]["verdict"]["checks"]
                                if not c["passed"])
        for name in failed)
    return {"decision": NO_GO, "failed": failed,
            "summary": f"NO-GO: {len(failed)} of {len(categories)} categories do not show "
                       f"{wanted} ({reasons})."}
