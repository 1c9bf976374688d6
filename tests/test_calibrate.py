"""Thresholds that keep their promise (calibrate.py) and one feature space for bank and queries."""
import numpy as np
import pytest
import torch
import tinyclip

from promptad.data.synthesis import procedural_texture
from promptad.fit.calibrate import conformal_threshold
from promptad.fit.pipeline import fit_in_process
from promptad.learning.training import TrainConfig
from promptad.models.model import ModelConfig, PromptAD
from promptad.predict import components_of, extract

SIZE = 64


def test_conformal_threshold_by_hand():
    scores = np.arange(1, 10, dtype=np.float32)  # n = 9 held-out normal scores 1..9
    # k = ceil(10 * 0.8) = 8: the 8th smallest; a new normal is at or above it with prob 2/10
    assert conformal_threshold(scores, 0.2) == (8.0, 0.2)
    # k = ceil(10 * 0.9) = 9: the largest, promising 1/10
    assert conformal_threshold(scores, 0.1) == (9.0, 0.1)
    # 1 % cannot be promised by 9 images: still the largest, promising 1/(n+1) = 0.1
    assert conformal_threshold(scores[::-1].copy(), 0.01) == (9.0, 0.1)
    t, p = conformal_threshold(np.linspace(0, 1, 999, dtype=np.float32), 0.01)
    assert p == pytest.approx(10 / 1000) and t == np.float32(np.linspace(0, 1, 999, dtype=np.float32)[989])
    assert isinstance(t, float) and np.float32(t) == t, "one of the float32 scores"


def _images(n, seed):
    rng = np.random.default_rng(seed)
    base = procedural_texture(SIZE, rng)
    return np.stack([np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
                     for _ in range(n)])


@pytest.fixture(scope="module")
def small_fit():
    return fit_in_process({"tile": _images(12, 0), "few": _images(3, 1)},
                          ModelConfig(backbone="effnet-lite0", input_size=SIZE), TrainConfig(epochs=1), log=None)


def test_every_normal_image_calibrates_without_its_own_entries(small_fit):
    """The training images score ~0 against their own bank; calibration scores them without
    their own entries, so even a 3-image category gets distances that are not ~0 and a threshold
    above them, with its small sample stated."""
    model = small_fit
    for cat, n in (("tile", 12), ("few", 3)):
        cal = model.calibration[cat]
        imgs = _images(n, 0 if cat == "tile" else 1)
        own = components_of(model, extract(model, imgs), [cat] * n)["memory"]
        assert float(own.max()) < 1e-3, "a bank holds its own images"
        assert cal.memory_scale > 100 * max(float(own.max()), 1e-6)
        assert cal.stats["n_normal"] == n and cal.stats["image_fpr_achievable"] == pytest.approx(1 / (n + 1))
        assert cal.stats["image_fpr_promised"] == pytest.approx(1 / (n + 1))
        assert any(f"{n} normal images cannot support a 1.0% false-alarm target" in w for w in cal.stats["warnings"])
        assert np.isfinite(cal.image_threshold) and np.isfinite(cal.pixel_threshold)


def test_clip_bank_and_queries_share_one_feature_space(tmp_path):
    """On the tiny CLIP: a normal training image scores ~0 against its own bank (the bank and the
    query both come from the frozen pass, which the trained prompts never enter)."""
    tinyclip.register()
    imgs = _images(6, 2)
    model = fit_in_process({"tile": imgs}, ModelConfig(backbone=f"clip:{tinyclip.NAME}:"), TrainConfig(epochs=1),
                           log=None)
    # Training moved the vision prompts from where the fit starts them (fit_in_process seeds, then
    # builds the model; an untrained fit leaves them there): measured 0.35 of their norm after one
    # epoch, asserted > 0.1. Still the bank below matches the queries: the prompts never enter it.
    torch.manual_seed(0)
    start = PromptAD(ModelConfig(backbone=f"clip:{tinyclip.NAME}:", categories=["tile"])).trainable.vision_prompts.detach()
    untrained = fit_in_process({"tile": imgs[:3]}, ModelConfig(backbone=f"clip:{tinyclip.NAME}:"),
                               TrainConfig(epochs=0), log=None).trainable.vision_prompts.detach()
    assert model.trainable.vision_prompts is not None
    trained = model.trainable.vision_prompts.detach()
    assert trained.shape == start.shape
    torch.testing.assert_close(untrained, start, rtol=0, atol=0)
    assert float((trained - start).norm()) > 0.1 * float(start.norm()), "training moved the vision prompts"
    comps = components_of(model, extract(model, imgs), ["tile"] * len(imgs))
    assert float(comps["memory"].max()) < 1e-4
    assert float(comps["regional"].max()) < 1e-4


def _plain(n, rng, base):
    return np.stack([np.clip(base.astype(int) + rng.integers(-4, 5, base.shape), 0, 255).astype(np.uint8)
                     for _ in range(n)])


def _busy(n, rng, big):
    """Crops of one large texture: a kind of normal image whose maps peak high, since every crop
    shows parts no other crop covers."""
    corners = rng.integers(0, big.shape[0] - SIZE, (n, 2))
    return np.stack([big[y:y + SIZE, x:x + SIZE] for y, x in corners])


@pytest.fixture(scope="module")
def two_kinds():
    rng = np.random.default_rng(0)
    base = (np.full((SIZE, SIZE, 3), 120, np.uint8) + procedural_texture(SIZE, rng) // 16).astype(np.uint8)
    big = procedural_texture(512, np.random.default_rng(1))
    train = np.concatenate([_plain(12, rng, base), _busy(24, rng, big)])
    fits = {norm: fit_in_process({"t": train}, ModelConfig(backbone="effnet-lite0", input_size=SIZE, local_norm=norm),
                                 TrainConfig(epochs=0), log=None) for norm in ("none", "image")}
    defects = _plain(12, rng, base)
    for i, im in enumerate(defects):
        y, x = 8 + 4 * i, 24
        im[y:y + 5, x:x + 5] = np.clip(im[y:y + 5, x:x + 5].astype(int) + 30, 0, 255)
    normals = np.concatenate([_plain(12, rng, base), _busy(12, rng, big)])
    labels = np.r_[np.zeros(len(normals)), np.ones(len(defects))].astype(int)
    return fits, np.concatenate([normals, defects]), labels


def test_local_score_is_read_against_similar_normal_images(two_kinds):
    """Un-normalized local features (local_norm "none"). Two kinds of normal image in one
    category: plain surfaces, whose maps stay low, and busy crops, whose maps peak high. A faint
    blemish on a plain surface peaks no higher than a new busy crop, so one scale for all ranks
    it among them; divided by the held-out scores of its nearest normal images (plain ones) it
    stands out."""
    from promptad.metrics.image import image_auroc
    from promptad.predict import predict_components

    fits, x, labels = two_kinds
    model = fits["none"]
    cal = model.calibration["t"]
    assert cal.neighbours == 10 and len(cal.neighbour_scores) == 36
    cats = ["t"] * len(x)
    comps = predict_components(model, x, cats)
    fused = model.fuse(comps, cats)
    raw, relative = image_auroc(fused.local.numpy(), labels), image_auroc(fused.relative.numpy(), labels)
    assert raw < 0.95 and relative > 0.99, (raw, relative)
    assert image_auroc(fused.scores.numpy(), labels) == pytest.approx(relative, abs=0.02)
    # The reference is the mean held-out score of the 10 nearest training images (brute force).
    g = model.memory["t"].gaussian
    nearest = g.distances(model.pooled_features(extract(model, x)))[:, :36].argsort(1)[:, :10]
    want = torch.tensor(cal.neighbour_scores)[nearest].mean(1)
    assert torch.allclose(comps["reference"], want, rtol=1e-5)


def test_image_normalized_features_need_no_reference(two_kinds):
    """The default (local_norm "image"): each patch is measured against its own image's feature
    statistics, so a busy crop's patches are not farther from the bank than a plain surface's
    and the blemish stands out without reading the score against similar images, which the
    calibration then does not store."""
    from promptad.metrics.image import image_auroc
    from promptad.predict import predict_components

    fits, x, labels = two_kinds
    model = fits["image"]
    cal = model.calibration["t"]
    assert cal.neighbours == 0 and cal.neighbour_scores == []
    cats = ["t"] * len(x)
    comps = predict_components(model, x, cats)
    assert (comps["reference"] == 1).all()
    fused = model.fuse(comps, cats)
    assert torch.equal(fused.relative, fused.local)
    raw = image_auroc(fused.local.numpy(), labels)
    none = image_auroc(fits["none"].fuse(predict_components(fits["none"], x, cats), cats).local.numpy(), labels)
    assert raw > 0.99 and none < 0.95, (raw, none)


def test_neighbour_scores_are_the_held_out_local_scores(small_fit):
    """With un-normalized features, what calibration keeps per normal image is its local score
    without its own memory entries (the value z() sees before the reference), and a held-out
    image's reference comes from the others: a category of 3 gets 2 neighbours. With the
    default image normalization it keeps none."""
    from promptad.fit.calibrate import held_out_components

    assert all(c.neighbours == 0 and c.neighbour_scores == [] for c in small_fit.calibration.values())
    model = fit_in_process({"tile": _images(12, 0), "few": _images(3, 1)},
                           ModelConfig(backbone="effnet-lite0", input_size=SIZE, local_norm="none"),
                           TrainConfig(epochs=0), log=None)
    for cat, n in (("tile", 12), ("few", 3)):
        cal = model.calibration[cat]
        assert cal.neighbours == min(10, n - 1) and len(cal.neighbour_scores) == n
        feats = extract(model, _images(n, 0 if cat == "tile" else 1))
        comps = held_out_components(model, cat, feats)
        assert comps["neighbours"].shape == (n, cal.neighbours)
        assert not (comps["neighbours"] == torch.arange(n)[:, None]).any(), "never its own neighbour"
        comps.pop("neighbours")
        local = model.fuse(comps, [cat] * n).local
        assert torch.allclose(local, torch.tensor(cal.neighbour_scores), rtol=1e-5)


def test_lone_threshold_by_hand():
    """One image sets the threshold alone when it is the highest score and stands apart from
    the next by more than 3x the next's distance from the median."""
    from promptad.fit.calibrate import lone_threshold

    scores = np.array([0.0, 0.2, -0.1, 0.1, 1.0, 9.0, 0.3], np.float32)  # median 0.2, next 1.0
    assert lone_threshold(scores, 9.0)  # gap 8 > 3 x 0.8
    assert not lone_threshold(scores, 1.0), "not the highest: the image above it does not set it"
    close = scores.copy()
    close[5] = 3.0  # gap 2 < 3 x 0.8
    assert not lone_threshold(close, 3.0)
    assert not lone_threshold(np.array([0.0, 5.0], np.float32), 5.0), "two images: no 'rest' to compare"


def test_one_outlier_among_the_normals_does_not_set_the_threshold():
    """A defective image among 12 normals: held out, nothing in the bank is like it, so its score
    is far above the others', and with 12 images the conformal rule would make it the threshold
    (every defect less odd than it would pass). Calibration passes it over: the threshold is the
    next highest held-out score, promising 2/13 false alarms instead of 1/13, and the warning names
    the outlier. The same normals without it keep the highest score and get no such warning."""
    from promptad.fit.calibrate import _fused, calibrate_category, held_out_components

    images = _images(12, 0)
    images[7, 20:44, 20:44] = 0  # a large dark blotch
    names = [f"train/good/{i:03d}.png" for i in range(12)]
    model = fit_in_process({"tile": images}, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                           TrainConfig(epochs=0), log=None)
    # fit_in_process passes no names: the image is named by its position
    assert any("training image #7" in w for w in model.calibration["tile"].stats["warnings"])
    feats = extract(model, images)
    cal = calibrate_category(model, "tile", feats, trained=False, names=names)
    held = np.sort(_fused(model, held_out_components(model, "tile", feats), "tile")["scores"].numpy())
    assert held[-1] > 3 * held[-2], held  # the blotch's own held-out score stands apart
    assert cal.image_threshold == pytest.approx(float(held[-2]), rel=1e-6)
    assert cal.stats["image_fpr_promised"] == pytest.approx(2 / 13)
    assert cal.stats["passed_over_image"] == "train/good/007.png" and cal.stats["threshold_image"] != names[7]
    # every held-out score is kept with its image (what `promptad recalibrate` works from)
    assert cal.stats["held_out"]["images"] == names
    assert np.allclose(np.sort(cal.stats["held_out"]["scores"]), held, rtol=1e-6)
    lone = [w for w in cal.stats["warnings"] if "does not set the threshold" in w]
    assert len(lone) == 1 and "train/good/007.png" in lone[0] and "if it is defective leave it out" in lone[0]
    assert any("is their second highest score, which promises 15.4%" in w for w in cal.stats["warnings"])
    clean_model = fit_in_process({"tile": _images(12, 0)}, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                                 TrainConfig(epochs=0), log=None)
    clean = clean_model.calibration["tile"]
    assert not any("does not set the threshold" in w for w in clean.stats["warnings"]), clean.stats["warnings"]
    assert clean.stats["passed_over_image"] is None and clean.stats["image_fpr_promised"] == pytest.approx(1 / 13)
    # another target (fit --false-alarm-rate): 12 held-out scores, k = ceil(13 x 0.75) = 10, promising 3/13
    feats = extract(clean_model, _images(12, 0))
    held = np.sort(_fused(clean_model, held_out_components(clean_model, "tile", feats), "tile")["scores"].numpy())
    at_25 = calibrate_category(clean_model, "tile", feats, trained=False, image_fpr=0.25)
    assert at_25.image_threshold == pytest.approx(float(held[9]), rel=1e-6)
    assert at_25.stats["image_fpr_promised"] == pytest.approx(3 / 13) and at_25.stats["image_fpr_target"] == 0.25
    assert any("cannot support a 1.0% false-alarm target" in w for w in clean.stats["warnings"])


def test_fit_flag_default_is_the_calibration_default():
    """cli keeps its own copy of the target (it must not import torch): the two stay one number."""
    from promptad.cli import FALSE_ALARM_RATE, build_parser
    from promptad.fit.calibrate import IMAGE_FPR

    assert FALSE_ALARM_RATE == IMAGE_FPR
    args = build_parser().parse_args(["fit", "--data", "d", "--category", "c", "--out", "o"])
    assert args.false_alarm_rate == IMAGE_FPR
