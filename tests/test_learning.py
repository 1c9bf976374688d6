"""Training really learns: on synthetic anomalies over real images, a short training clearly
raises the localization head's pixel AUROC on held-out images over its value before training."""
import numpy as np
import pytest
import torch

from promptad.datasets import load_samples
from promptad.metrics import image_auroc
from promptad.model import ModelConfig, PromptAD
from promptad.pipeline import load_images
from promptad.predict import predict_components
from promptad.synthesis import synthesize_anomaly
from promptad.training import TrainConfig, iterate_batches, make_optimizer, train_epoch

SIZE = 128


def head_pixel_auroc(model: PromptAD, images: np.ndarray, masks: np.ndarray) -> float:
    head = predict_components(model, images, ["magnetic_tile"] * len(images))["head"]
    up = torch.nn.functional.interpolate(head[:, None], size=(SIZE, SIZE), mode="bilinear")[:, 0]
    return image_auroc(up.numpy().ravel(), masks.ravel().astype(np.int64))


@pytest.mark.slow
def test_short_training_raises_head_pixel_auroc(datasets_root):
    samples = load_samples(str(datasets_root), ["magnetic_tile"], "train")
    rng = np.random.default_rng(0)
    picked = [samples[i] for i in rng.choice(len(samples), 56, replace=False)]
    train = load_images(picked[:40], SIZE)
    held = load_images(picked[40:], SIZE)
    pairs = [synthesize_anomaly(im, np.random.default_rng(100 + i)) for i, im in enumerate(held)]
    test_x = np.stack([p[0] for p in pairs])
    test_m = np.stack([p[1] > 0.5 for p in pairs])

    torch.manual_seed(0)
    model = PromptAD(ModelConfig(backbone="effnet-lite0", categories=["magnetic_tile"], input_size=SIZE))
    before = head_pixel_auroc(model, test_x, test_m)
    cfg = TrainConfig(epochs=4, batch_size=8)
    opt, sched = make_optimizer(model.trainable, cfg, 5 * cfg.epochs)
    cats = ["magnetic_tile"] * len(train)
    for epoch in range(cfg.epochs):
        batches = iterate_batches(train, cats, cfg.batch_size, np.random.default_rng([0, epoch]))
        train_epoch(model.trainable, batches, opt, sched, None, cfg, epoch, 0, model.handcrafted,
                    torch.device("cpu"))
    after = head_pixel_auroc(model, test_x, test_m)
    assert after > before + 0.15 and after > 0.75, (before, after)
