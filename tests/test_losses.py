"""Each loss on small tensors whose value can be worked out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from promptad.learning import losses


def test_image_bce_known_value():
    # logit 0 -> p = 0.5 -> BCE = ln 2 whatever the label
    assert losses.image_bce(torch.zeros(3), torch.tensor([0.0, 1.0, 1.0])).item() == pytest.approx(math.log(2))
    big = torch.tensor([20.0, -20.0])
    assert losses.image_bce(big, torch.tensor([1.0, 0.0])).item() < 1e-6


def test_dice_perfect_disjoint_and_empty():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    perfect = torch.where(mask > 0, 50.0, -50.0)
    assert losses.dice(perfect, mask).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = torch.where(mask > 0, -50.0, 50.0)
    # intersection 0, |p| = 12, |t| = 4, eps = 1 -> 1 - 1/17
    assert losses.dice(disjoint, mask).item() == pytest.approx(1 - 1 / 17, abs=1e-6)
    # an empty mask and an all-negative prediction is perfect, not 0/0
    assert losses.dice(torch.full((1, 1, 4, 4), -50.0), torch.zeros(1, 1, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)


def test_pixel_focal_known_value():
    # logit 0 -> p_t = 0.5, BCE = ln2, focal = (0.5)^2 ln2
    assert losses.pixel_focal(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).item() == pytest.approx(0.25 * math.log(2))


def test_contrastive_prompt_prefers_right_state():
    normal = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    anomalous = F.normalize(torch.tensor([[0.0, 1.0]]), dim=-1)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    right = losses.contrastive_prompt(feats, torch.tensor([0.0, 1.0]), normal, anomalous, temperature=1.0)
    wrong = losses.contrastive_prompt(feats, torch.tensor([1.0, 0.0]), normal, anomalous, temperature=1.0)
    # cos 1 vs 0 at T=1: -log(e / (e + 1)) = log(1 + e^-1)
    assert right.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert wrong.item() == pytest.approx(math.log(1 + math.exp(1)), abs=1e-6)


def test_anomaly_margin_is_zero_beyond_margin_and_linear_inside():
    n = torch.tensor([[1.0, 0.0]])
    a = torch.tensor([[0.0, 1.0]])
    at_normal = losses.anomaly_margin(torch.tensor([[1.0, 0.0]]), n, a, margin=0.1)
    assert at_normal.item() == 0.0  # d_n = 0, d_a = 2
    at_anomaly = losses.anomaly_margin(torch.tensor([[0.0, 1.0]]), n, a, margin=0.1)
    assert at_anomaly.item() == pytest.approx(2.0 + 0.1)  # d_n = 2, d_a = 0
    middle = losses.anomaly_margin(torch.tensor([[1.0, 1.0]]), n, a, margin=0.1)
    assert middle.item() == pytest.approx(0.1, abs=1e-6)  # equidistant


def test_prompt_alignment():
    h = torch.eye(2)
    assert losses.prompt_alignment(h.clone(), h).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.prompt_alignment(h.flip(0), h).item() == pytest.approx(1.0)  # orthogonal


def test_consistency():
    x = torch.zeros(1, 1, 2, 2)
    assert losses.consistency(x, x).item() == 0.0
    # sigmoid(0) = 0.5 vs sigmoid(big) = 1 -> squared error 0.25
    assert losses.consistency(x, torch.full_like(x, 50.0)).item() == pytest.approx(0.25, abs=1e-6)
