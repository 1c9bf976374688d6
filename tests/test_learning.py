"""Training really learns, on real images: the evidence head, taught by synthetic views of normal
training images, finds real defects in the test images it never saw, far better than it did
before training; the features head (old artifacts) still learns held-out feature-space anomalies."""
import numpy as np
import pytest
import torch

from promptad.data import storage
from promptad.data.datasets import load_samples
from promptad.data.images import decode_mask, resize_mask
from promptad.fit.pipeline import build_memory, evidence_shard, extract_all, load_images
from promptad.learning.evidence import IGNORED, category_evidence, grid_masks, view_plan
from promptad.learning.feature_anomalies import add_anomalies
from promptad.learning.training import Shard, TrainConfig, set_standardization, train_in_process
from promptad.metrics.image import image_auroc
from promptad.models.model import ModelConfig, PromptAD
from promptad.predict import predict_components

SIZE = 128


def head_pixel_auroc(model: PromptAD, z: torch.Tensor, masks: torch.Tensor) -> float:
    model.trainable.eval()
    with torch.no_grad():
        prob = torch.sigmoid(model.trainable.head(z))
    return image_auroc(prob.numpy().ravel(), masks.numpy().ravel().astype(np.int64))


def test_view_plan_spreads_views_over_at_most_that_many_images():
    chosen, sources = view_plan(31, 200, seed=0)  # a small category: two views per image
    assert list(chosen) == list(range(31)) and list(sources) == sorted(list(range(31)) * 2)
    chosen, sources = view_plan(31, 40, seed=0)
    assert list(chosen) == list(range(31)) and len(sources) == 40
    assert np.bincount(sources, minlength=31).min() == 1  # each image at least once
    chosen, sources = view_plan(761, 200, seed=0)
    assert len(chosen) == 200 and len(set(chosen)) == 200 and sorted(sources) == sorted(chosen)
    assert list(view_plan(761, 200, seed=0)[0]) == list(chosen) and list(view_plan(761, 200, seed=1)[0]) != list(chosen)
    with pytest.raises(ValueError, match="no training images"):
        view_plan(0, 10)


def test_grid_masks_mark_cells_a_defect_covers_enough_of():
    masks = np.zeros((1, 8, 8), np.float32)
    masks[0, :4, :4] = 1  # the top-left cell of a 2 x 2 grid, whole
    masks[0, 4, 4] = 1  # 1/16 of the bottom-right cell: not enough, and not normal either
    assert grid_masks(masks, (2, 2)).tolist() == [[[1.0, 0.0], [0.0, IGNORED]]]


@pytest.mark.slow
def test_evidence_head_trained_on_synthetic_views_finds_real_defects(datasets_root):
    """magnetic_tile: 60 normal images make the memory and 60 synthetic views of them; the trained head,
    scored alone on real test defects (blowholes, cracks, frays, uneven surfaces) against their
    true masks, must find them better than before training and better than the memory distances
    it reads: it has learned which shapes of that evidence are defects."""
    root = str(datasets_root)
    samples = load_samples(root, ["magnetic_tile"], "train")
    picked = [samples[i] for i in np.sort(np.random.default_rng(0).choice(len(samples), 60, replace=False))]
    test = [s for s in load_samples(root, ["magnetic_tile"], "test") if s.label == 1]
    test = [test[i] for i in np.sort(np.random.default_rng(1).choice(len(test), 24, replace=False))]
    torch.manual_seed(0)
    model = PromptAD(ModelConfig(backbone="effnet-lite0", categories=["magnetic_tile"], input_size=SIZE))
    images = load_images(picked, SIZE)
    feats = extract_all(model, images)
    model.memory = {"magnetic_tile": build_memory(model, feats)}
    evidence = category_evidence(model, "magnetic_tile", len(images), images.__getitem__,
                                 lambda idx: feats.select(torch.from_numpy(idx)), views=60, seed=0)
    assert len(evidence) == 120 and evidence.masks[:60].sum() == 0 and (evidence.masks[60:] != 0).flatten(1).any(1).all()
    assert all(s > 0 for s in evidence.scales)
    shard = evidence_shard(model, {"magnetic_tile": evidence})
    assert model.calibration["magnetic_tile"].head_scales == evidence.scales
    model.calibration["magnetic_tile"].fusion["head"] = 1.0  # so components() runs the head

    truth = np.stack([resize_mask(decode_mask(storage.read_bytes(s.mask_path)), SIZE) for s in test])
    x = load_images(test, SIZE)

    def head_auroc(part: str = "head") -> float:
        head = predict_components(model, x, ["magnetic_tile"] * len(x))[part]
        up = torch.nn.functional.interpolate(head[:, None], size=(SIZE, SIZE), mode="bilinear")[:, 0]
        return image_auroc(up.numpy().ravel(), truth.ravel().astype(np.int64))

    before = head_auroc()
    train_in_process(model, shard, TrainConfig(epochs=10, seed=0), torch.device("cpu"), log=None)
    after = head_auroc()
    memory = head_auroc("memory")
    # measured: before 0.626, memory 0.624, after 0.674 (small images and bank: all are low)
    assert after > max(before, memory) + 0.03, (before, memory, after)


@pytest.mark.slow
def test_features_head_learns_held_out_feature_anomalies(datasets_root):
    samples = load_samples(str(datasets_root), ["magnetic_tile"], "train")
    picked = [samples[i] for i in np.random.default_rng(0).choice(len(samples), 56, replace=False)]
    torch.manual_seed(0)
    model = PromptAD(ModelConfig(backbone="effnet-lite0", categories=["magnetic_tile"], input_size=SIZE,
                                 head_input="features"))
    train = extract_all(model, load_images(picked[:40], SIZE))
    held = extract_all(model, load_images(picked[40:], SIZE))
    shard = Shard(model.local_features(train), None, ["magnetic_tile"] * 40)
    set_standardization(model.trainable, shard.local)
    z, _, masks, _ = add_anomalies(model.trainable.standardize(model.local_features(held)), 1.0,
                                   torch.Generator().manual_seed(1234))
    before = head_pixel_auroc(model, z, masks)
    train_in_process(model, shard, TrainConfig(epochs=2, lr=3e-4), torch.device("cpu"), log=None)
    after = head_pixel_auroc(model, z, masks)
    assert after > before + 0.2 and after > 0.85, (before, after)
