"""Training really learns: on cached features of real images, a short training makes the head find
feature-space anomalies in held-out images (new images, new noise draws) that it could not find
before training."""
import numpy as np
import pytest
import torch

from promptad.data.datasets import load_samples
from promptad.fit.pipeline import extract_all, load_images
from promptad.learning.feature_anomalies import add_anomalies
from promptad.learning.training import Shard, TrainConfig, set_standardization, train_in_process
from promptad.metrics.image import image_auroc
from promptad.models.model import ModelConfig, PromptAD

SIZE = 128


def head_pixel_auroc(model: PromptAD, z: torch.Tensor, masks: torch.Tensor) -> float:
    model.trainable.eval()
    with torch.no_grad():
        prob = torch.sigmoid(model.trainable.head(z))
    return image_auroc(prob.numpy().ravel(), masks.numpy().ravel().astype(np.int64))


@pytest.mark.slow
def test_short_training_finds_held_out_feature_anomalies(datasets_root):
    samples = load_samples(str(datasets_root), ["magnetic_tile"], "train")
    picked = [samples[i] for i in np.random.default_rng(0).choice(len(samples), 56, replace=False)]
    torch.manual_seed(0)
    model = PromptAD(ModelConfig(backbone="effnet-lite0", categories=["magnetic_tile"], input_size=SIZE))
    train = extract_all(model, load_images(picked[:40], SIZE))
    held = extract_all(model, load_images(picked[40:], SIZE))
    shard = Shard(model.local_features(train), None, ["magnetic_tile"] * 40)
    set_standardization(model.trainable, shard.local)
    z, _, masks, _ = add_anomalies(model.trainable.standardize(model.local_features(held)), 1.0,
                                   torch.Generator().manual_seed(1234))
    before = head_pixel_auroc(model, z, masks)
    train_in_process(model, shard, TrainConfig(epochs=2), torch.device("cpu"), log=None)
    after = head_pixel_auroc(model, z, masks)
    assert after > before + 0.2 and after > 0.85, (before, after)
