"""`promptad recalibrate`: the fit's threshold rule applied again to the held-out normal scores a
model keeps, checked against the order statistics computed here by hand; the old model untouched,
the new one a different model_id with the same banks and head."""
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptad.cli import main
from promptad.models.artifact import MANIFEST, load_artifact, read_manifest


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("promptad: error: "), err
    return err[0]


def test_new_target_exclude_and_add_by_hand(tiny_artifact, tmp_path, capsys):
    before = read_manifest(tiny_artifact)
    held = before["calibration"]["tile"]["stats"]["held_out"]
    names, scores = held["images"], np.asarray(held["scores"], np.float32)
    assert len(names) == len(scores) == 4
    # a 4-image fit says what its threshold can promise: 1/5, not the 1 % target
    assert before["calibration"]["tile"]["stats"]["image_fpr_promised"] == pytest.approx(1 / 5)
    assert any(w.startswith("4 normal images cannot support a 1.0% false-alarm target: the threshold is their "
                            "highest score, which promises 20.0%") for w in before["calibration"]["tile"]["stats"]["warnings"])

    # another target: k = ceil(5 x 0.5) = 3, the third smallest of 4, promising 2/5
    out = tmp_path / "half"
    assert main(["recalibrate", "--model", tiny_artifact, "--out", str(out), "--false-alarm-rate", "0.5"]) == 0
    printed = capsys.readouterr().out
    after = read_manifest(str(out))
    cal = after["calibration"]["tile"]
    assert cal["image_threshold"] == pytest.approx(float(np.sort(scores)[2]), rel=1e-6)
    assert cal["stats"]["image_fpr_promised"] == pytest.approx(2 / 5) and cal["stats"]["image_fpr_target"] == 0.5
    assert cal["image_center"] == pytest.approx(float(np.median(scores)), rel=1e-6)
    assert "recalibrate: tile: image threshold" in printed and "promising at most 40.0% false alarms (target 50.0%)" in printed
    assert after["model_id"] != before["model_id"] and f"(model {after['model_id']}, recalibrated from " \
        f"{before['model_id']})" in printed
    assert cal["stats"]["recalibrated"] == {"from_model": before["model_id"], "excluded": [], "added": 0}
    assert read_manifest(tiny_artifact) == before  # the old model is untouched
    for f in ("weights.safetensors", "memory/tile.safetensors"):
        assert (out / f).read_bytes() == (Path(tiny_artifact) / f).read_bytes()
    assert cal["pixel_threshold"] == before["calibration"]["tile"]["pixel_threshold"]
    load_artifact(str(out))  # verifies against its new model id

    # without the image that set the threshold: 3 scores, 1 % unreachable -> the highest of the rest
    top = names[int(np.argmax(scores))]
    out2 = tmp_path / "without"
    assert main(["recalibrate", "--model", tiny_artifact, "--out", str(out2), "--exclude", top]) == 0
    cal2 = read_manifest(str(out2))["calibration"]["tile"]
    rest = np.delete(scores, int(np.argmax(scores)))
    assert cal2["image_threshold"] == pytest.approx(float(rest.max()), rel=1e-6)
    assert cal2["stats"]["n_normal"] == 3 and cal2["stats"]["recalibrated"]["excluded"] == [top]

    # with two new normal images, scored by the model: the rule over the six scores
    folder = tmp_path / "more" / "tile" / "train" / "good"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    pictures = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    for i, p in enumerate(pictures):
        Image.fromarray(p).save(folder / f"new{i}.png")
    from promptad.predict import predict

    new_scores = predict(load_artifact(tiny_artifact), pictures, ["tile", "tile"], precision="fp32").scores
    out3 = tmp_path / "added"
    assert main(["recalibrate", "--model", tiny_artifact, "--out", str(out3), "--add", str(tmp_path / "more"),
                 "--false-alarm-rate", "0.3"]) == 0
    cal3 = read_manifest(str(out3))["calibration"]["tile"]
    union = np.sort(np.r_[scores, np.float32(new_scores)])
    k = math.ceil(7 * 0.7)  # 5 of 6
    assert cal3["image_threshold"] == pytest.approx(float(union[k - 1]), rel=1e-5)
    assert cal3["stats"]["n_normal"] == 6 and cal3["stats"]["held_out"]["images"][-2:] == \
        [str(folder / "new0.png"), str(folder / "new1.png")]


def test_refusals_are_one_line(tiny_artifact, tmp_path, capsys):
    assert main(["recalibrate", "--model", tiny_artifact, "--out", str(tmp_path / "a"), "--exclude", "nope.png"]) == 2
    assert "--exclude nope.png: no normal image the model was calibrated on has that name" in _one_error_line(capsys)
    assert main(["recalibrate", "--model", tiny_artifact, "--out", tiny_artifact]) == 2
    assert "--out must differ from --model" in _one_error_line(capsys)
    # a model written before fits kept their held-out scores
    from promptad.models.artifact import save_artifact

    model = load_artifact(tiny_artifact)
    del model.calibration["tile"].stats["held_out"]
    save_artifact(model, str(tmp_path / "old"))
    assert main(["recalibrate", "--model", str(tmp_path / "old"), "--out", str(tmp_path / "b")]) == 2
    assert "was fitted before fits kept their held-out normal scores; refit it" in _one_error_line(capsys)
