"""The sign-off numbers: calibration record (old and new artifacts), sample-size warnings, and
go / no-go judged on confidence bounds, against hand-computed Wilson bounds."""
import numpy as np
import pytest

from promptad.audit.verdict import (
    GO,
    NO_GO,
    NOT_JUDGED,
    Targets,
    calibration_record,
    decision_summary,
    judge,
    overall_verdict,
    sample_warnings,
)

# 0/10 -> Wilson upper 0.27753; 10/10 -> Wilson lower 0.72247 (z = 1.96, by hand)
UPPER_0_OF_10, LOWER_10_OF_10 = 0.27753, 0.72247


def ten_and_ten(flag_normals: int = 0, catch: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """10 normals and 10 defectives; the first `flag_normals` normals and the first `catch`
    defectives score above 0.5."""
    normal = np.r_[np.full(flag_normals, 0.9), np.full(10 - flag_normals, 0.1)]
    defect = np.r_[np.full(catch, 0.8), np.full(10 - catch, 0.2)]
    return np.r_[normal, defect], np.r_[np.zeros(10), np.ones(10)].astype(int)


def test_calibration_record_reads_old_and_new_artifacts():
    old = calibration_record({"n_normal": 5, "image_fpr_target": 0.01, "synthetic_image_auroc": 0.9})
    assert old == {"image_fpr_target": 0.01, "n_normal": 5, "image_fpr_achievable": pytest.approx(1 / 6),
                   "threshold_rule": None, "warnings": None, "image_fpr_promised": None, "passed_over_image": None}
    new = calibration_record({"n_normal": 400, "image_fpr_target": 0.01, "image_fpr_promised": 0.00998,
                              "image_fpr_achievable": 0.0025, "threshold_rule": "order statistic",
                              "warnings": ["few normals"]})
    assert new["image_fpr_promised"] == 0.00998
    assert new["image_fpr_achievable"] == 0.0025 and new["threshold_rule"] == "order statistic"
    assert new["warnings"] == ["few normals"]
    junk = calibration_record({"n_normal": "many", "image_fpr_target": None, "warnings": "x"})
    assert junk["n_normal"] is None and junk["image_fpr_target"] is None
    assert junk["image_fpr_achievable"] is None and junk["warnings"] is None
    assert calibration_record(None)["n_normal"] is None


def test_warnings_say_when_the_sample_cannot_carry_the_claim():
    scores, labels = ten_and_ten()
    rates = decision_summary(scores, labels, 0.5, None, Targets())["rates"]
    # the demo's case: 5 held-out normals set a 1 % threshold (old artifact: no warnings key)
    cal = calibration_record({"n_normal": 5, "image_fpr_target": 0.01})
    text = " ".join(sample_warnings(rates, cal, Targets()))
    assert "set by 5 held-out normal images" in text and "16.7 %" in text and "99 normal" in text
    # the audit's 10 normals cannot show 1 % either: 381 are needed (0/381 -> 0.99 %)
    assert "10 normal images can show at best a false-alarm rate below 27.8 %" in text
    assert "381 normal images" in text
    # a newer artifact states its own warnings: the audit does not repeat the calibration one
    newer = calibration_record({"n_normal": 5, "image_fpr_target": 0.01, "warnings": ["from fit"]})
    assert not any("held-out" in w for w in sample_warnings(rates, newer, Targets()))
    summary = decision_summary(scores, labels, 0.5, {"n_normal": 5, "image_fpr_target": 0.01,
                                                     "warnings": ["from fit"]}, Targets())
    assert summary["warnings"][0] == "from fit"
    # recall: 10 defectives show at best 72.2 %; 95 % needs 73 (0 misses of 73 -> 5.0 %)
    recall = " ".join(sample_warnings(rates, cal, Targets(min_recall=0.95)))
    assert "10 defective images can show at best a recall above 72.2 %" in recall
    assert "73 defective images" in recall
    # enough images: no sample warning
    big_scores = np.r_[np.full(400, 0.1), np.full(100, 0.9)]
    big = decision_summary(big_scores, np.r_[np.zeros(400), np.ones(100)], 0.5, None,
                           Targets(max_false_alarm=0.01, min_recall=0.95))
    assert big["warnings"] == []


def test_judged_on_bounds_not_point_estimates():
    scores, labels = ten_and_ten(flag_normals=0, catch=10)
    rates = decision_summary(scores, labels, 0.5, None, Targets())["rates"]
    assert rates["false_alarm_rate"] == 0.0 and rates["recall"] == 1.0  # perfect points
    assert rates["false_alarm_ci"][1] == pytest.approx(UPPER_0_OF_10, abs=1e-5)
    assert rates["recall_ci"][0] == pytest.approx(LOWER_10_OF_10, abs=1e-5)
    assert judge(rates, Targets(max_false_alarm=0.28))["decision"] == GO
    assert judge(rates, Targets(max_false_alarm=0.27))["decision"] == NO_GO  # point 0 % < 27 %
    assert judge(rates, Targets(min_recall=0.72))["decision"] == GO
    assert judge(rates, Targets(min_recall=0.73))["decision"] == NO_GO  # point 100 % > 73 %
    both = judge(rates, Targets(max_false_alarm=0.28, min_recall=0.73))
    assert both["decision"] == NO_GO
    assert [c["passed"] for c in both["checks"]] == [True, False]
    assert both["checks"][1]["bound"] == pytest.approx(LOWER_10_OF_10, abs=1e-5)
    assert "lower 95 % bound 72.2 % < target 73.0 %" in both["checks"][1]["reason"]
    assert judge(rates, Targets()) == {"decision": NOT_JUDGED, "checks": []}
    # no normal images: nothing shows a false-alarm rate, so the target is missed
    only_defects = decision_summary(np.full(5, 0.9), np.ones(5), 0.5, None, Targets())["rates"]
    assert judge(only_defects, Targets(max_false_alarm=0.5))["decision"] == NO_GO


def test_overall_verdict_lists_the_categories_that_miss():
    targets = Targets(max_false_alarm=0.3)
    good = decision_summary(*ten_and_ten(0), 0.5, None, targets)  # upper bound 27.8 %
    bad = decision_summary(*ten_and_ten(2), 0.5, None, targets)  # 2/10: upper bound 51.0 %
    assert bad["rates"]["false_alarm_ci"][1] == pytest.approx(0.50984, abs=1e-5)
    go = overall_verdict({"a": good, "b": good}, targets)
    assert go["decision"] == GO and go["failed"] == [] and go["summary"].startswith("GO:")
    # a GO on false alarms alone still says, in the same line, what the threshold catches
    assert "a catches 10 of 10 defective images (100.0 %), 0 false alarms of 10 normal images" in go["summary"]
    assert go["summary"].endswith("(recall was not a target).")
    blind = decision_summary(np.r_[np.full(10, 0.1), np.full(10, 0.3)], np.r_[np.zeros(10), np.ones(10)], 0.5,
                             None, targets)
    assert overall_verdict({"a": blind}, targets)["decision"] == GO
    assert "a catches 0 of 10 defective images (0 %)" in overall_verdict({"a": blind}, targets)["summary"]
    no = overall_verdict({"a": good, "b": bad}, targets)
    assert no["decision"] == NO_GO and no["failed"] == ["b"]
    assert no["summary"].startswith("NO-GO: 1 of 2") and "b: false alarms 2/10" in no["summary"]
    assert overall_verdict({"a": good}, Targets())["decision"] == NOT_JUDGED


def test_promise_line_puts_what_the_threshold_does_beside_what_it_promised():
    """audit prints, per category, recall and false alarms at the deployed threshold next to the
    promise the calibration made, from 4 normals here: 20 %, never 'the 1 % target'."""
    from promptad.audit.verdict import promise_line

    cat = decision_summary(*ten_and_ten(flag_normals=1, catch=7), 0.5,
                           {"n_normal": 4, "image_fpr_target": 0.01, "image_fpr_promised": 0.2}, Targets())
    line = promise_line("tile", cat)
    assert line == ("tile: at the deployed threshold it catches 7 of 10 defective images (70.0 %) and flags 1 of 10 "
                    "normal images (10.0 %, 95 % up to 40.4 %); calibrated on 4 normal images, it promised at most "
                    "20.0 % false alarms"), line
    old = decision_summary(*ten_and_ten(), 0.5, None, Targets())
    assert promise_line("tile", old).endswith("the artifact records no promise (older format)")


def test_decision_summary_what_if_rows():
    scores, labels = ten_and_ten(flag_normals=1, catch=7)
    summary = decision_summary(scores, labels, 0.5, None, Targets())
    rows = {r["target_fpr"]: r for r in summary["what_if"]}
    assert set(rows) == {0.001, 0.01, 0.05}
    # 10 normals: no budget below 10 % allows a false alarm, so the threshold must clear the
    # flagged normal (0.9); nothing scores above it, so only flagging nothing meets the budget
    assert all(r["threshold"] == np.inf and r["recall"] == 0.0 for r in rows.values())
    lo, hi = summary["rates"]["image_auroc_ci"]
    assert lo <= summary["rates"]["image_auroc"] <= hi
