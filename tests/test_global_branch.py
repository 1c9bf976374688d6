"""The global branch catches whole-image defects the memory banks miss, at no cost to local defects.

On real cookie photos: a warm colour cast leaves every patch close to some normal patch (the
memory banks alone rank cast cookies barely above normal ones) but moves the pooled features far
from the normal Gaussian; the local defects (cracks) rank as well with the branch as without."""
import numpy as np
import pytest

from promptad.datasets import load_samples
from promptad.metrics import image_auroc
from promptad.model import MEMORY_ONLY, ModelConfig
from promptad.pipeline import fit_in_process, load_images
from promptad.predict import predict_components
from promptad.shifts import colour_cast
from promptad.training import TrainConfig

SIZE = 256


@pytest.mark.slow
def test_global_branch_flags_a_colour_cast_the_memory_misses(datasets_root):
    train = load_samples(str(datasets_root), ["cookie"], "train")
    test = load_samples(str(datasets_root), ["cookie"], "test")
    model = fit_in_process({"cookie": load_images(train, SIZE)}, ModelConfig(backbone="effnet-lite0"),
                           TrainConfig(epochs=1), log=None)
    cal = model.calibration["cookie"]
    labels = np.array([s.label for s in test])
    x = load_images(test, SIZE)
    normals = x[labels == 0]
    cast = np.stack([colour_cast(img) for img in normals])

    def scores(images, fusion):
        comps = predict_components(model, images, ["cookie"] * len(images))
        return model.fuse(comps, ["cookie"] * len(images), {"cookie": fusion}).scores.numpy()

    lab = np.r_[np.zeros(len(normals)), np.ones(len(cast))].astype(int)
    both = np.concatenate([normals, cast])
    memory_only = image_auroc(scores(both, MEMORY_ONLY), lab)
    with_global = image_auroc(scores(both, cal.fusion), lab)
    without_global = {**cal.fusion, "global": 0.0}
    assert memory_only < 0.85 and with_global > 0.97, (memory_only, with_global)
    local_with = image_auroc(scores(x, cal.fusion), labels)
    local_without = image_auroc(scores(x, without_global), labels)
    assert local_with >= local_without - 0.01, (local_with, local_without)
