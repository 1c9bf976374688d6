"""The global branch catches whole-image defects the memory banks miss, at no cost to local defects.

On real cookie photos: a warm colour cast leaves every patch close to some normal patch (the
memory banks alone rank cast cookies barely above normal ones) but moves the pooled features far
from the normal Gaussian; the local defects (cracks) rank as well with the branch as without."""
import numpy as np
import pytest
import torch

from promptad.data.datasets import load_samples
from promptad.data.shifts import colour_cast
from promptad.fit.pipeline import fit_in_process, load_images
from promptad.learning.training import TrainConfig
from promptad.memory.bank import bank_size
from promptad.metrics.image import image_auroc
from promptad.models.model import MEMORY_ONLY, ModelConfig
from promptad.predict import predict_components

SIZE = 256


@pytest.mark.slow
def test_global_branch_flags_a_colour_cast_the_memory_misses(datasets_root):
    train = load_samples(str(datasets_root), ["cookie"], "train")
    test = load_samples(str(datasets_root), ["cookie"], "test")
    model = fit_in_process({"cookie": load_images(train, SIZE)}, ModelConfig(backbone="effnet-lite0"),
                           TrainConfig(), log=None)  # the fit's defaults: no training
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


@pytest.mark.slow
def test_tolerated_noise_stops_reading_as_a_whole_image_change_a_cast_still_does(datasets_root):
    """fit --tolerate noise on real cookie photos: without it, the global distance tells noisy
    normal photos from clean ones almost perfectly (every layer's statistics move); with the noisy
    views of the training images among its normals it hardly can, while a colour cast (not
    tolerated) is still flagged by the fused score."""
    from promptad.data import storage
    from promptad.data.images import decode_image, resize
    from promptad.data.shifts import apply_shift
    from promptad.fit.pipeline import load_tolerated

    train = load_samples(str(datasets_root), ["cookie"], "train")
    normals = [s for s in load_samples(str(datasets_root), ["cookie"], "test") if s.label == 0]
    images = {"cookie": load_images(train, SIZE)}
    cfg = lambda: ModelConfig(backbone="effnet-lite0")  # noqa: E731
    plain = fit_in_process(images, cfg(), TrainConfig(epochs=0), log=None)
    tolerant = fit_in_process(images, cfg(), TrainConfig(epochs=0), log=None,
                              tolerated={"cookie": load_tolerated(train, SIZE, ["noise"])})
    raw = [decode_image(storage.read_bytes(s.path)) for s in normals]
    clean = np.stack([resize(img, SIZE) for img in raw])
    noisy = np.stack([resize(apply_shift("noise", img, None, 1000 + i)[0], SIZE) for i, img in enumerate(raw)])
    cast = np.stack([colour_cast(img) for img in clean])
    lab = np.r_[np.zeros(len(clean)), np.ones(len(clean))].astype(int)
    cats = ["cookie"] * len(clean)

    def global_auroc(model, shifted):
        g = [predict_components(model, x, cats)["global"].numpy() for x in (clean, shifted)]
        return image_auroc(np.concatenate(g), lab)

    before, after = global_auroc(plain, noisy), global_auroc(tolerant, noisy)
    assert before > 0.9 and after < 0.7, (before, after)

    fused = [tolerant.fuse(predict_components(tolerant, x, cats), cats).scores.numpy() for x in (clean, cast)]
    assert image_auroc(np.concatenate(fused), lab) > 0.97
    assert tolerant.calibration["cookie"].stats["tolerated_views"] == 1


@pytest.mark.slow
def test_tolerated_noise_joins_the_memory_banks(datasets_root):
    """On magnetic_tile (grayscale tiles, where sensor noise moves every patch feature) the noisy
    views join the banks (fit --tolerate noise): the tiles keep their own bank and the views add
    entries. The image-normalized local evidence hardly tells noisy normal tiles from clean ones
    with or without them (the un-normalized features did: AUROC above 0.9 before the views); the
    global branch does, so the plain fit rejects noisy normals at its threshold and the tolerant
    one keeps them. 80 training tiles."""
    from promptad.data import storage
    from promptad.data.images import decode_image, resize
    from promptad.data.shifts import apply_shift
    from promptad.fit.pipeline import load_tolerated

    train = load_samples(str(datasets_root), ["magnetic_tile"], "train")[::9][:80]
    normals = [s for s in load_samples(str(datasets_root), ["magnetic_tile"], "test") if s.label == 0][::4]
    images = {"magnetic_tile": load_images(train, SIZE)}
    plain = fit_in_process(images, ModelConfig(backbone="effnet-lite0"), TrainConfig(epochs=0), log=None)
    tolerant = fit_in_process(images, ModelConfig(backbone="effnet-lite0"), TrainConfig(epochs=0), log=None,
                              tolerated={"magnetic_tile": load_tolerated(train, SIZE, ["noise"])})
    # the tiles keep their own bank; noisy views look like no clean patch, so they add entries
    mine, theirs = plain.memory["magnetic_tile"].local.entries, tolerant.memory["magnetic_tile"].local.entries
    draws = tolerant.cfg.coreset_draws  # the bank is the union of that many draws, each within bank_size
    assert len(mine) < len(theirs) <= draws * bank_size(2 * len(train) * (SIZE // 8) ** 2)  # stride-8 grid
    assert torch.equal(theirs[:len(mine)], mine)  # exactly the tiles' own bank, then the views' entries
    raw = [decode_image(storage.read_bytes(s.path)) for s in normals]
    clean = np.stack([resize(img, SIZE) for img in raw])
    noisy = np.stack([resize(apply_shift("noise", img, None, 1000 + i)[0], SIZE) for i, img in enumerate(raw)])
    lab = np.r_[np.zeros(len(clean)), np.ones(len(clean))].astype(int)
    cats = ["magnetic_tile"] * len(clean)

    def local_auroc(model):
        local = [model.fuse(predict_components(model, x, cats), cats).local.numpy() for x in (clean, noisy)]
        return image_auroc(np.concatenate(local), lab)

    before, after = local_auroc(plain), local_auroc(tolerant)
    assert before < 0.75 and after < 0.75, (before, after)
    # at each fit's deployed threshold: the plain fit rejects the noisy normals, the tolerant one
    # keeps them (no reference is needed for it)
    alarms = [float((m.fuse(predict_components(m, noisy, cats), cats).scores
                     >= m.calibration["magnetic_tile"].image_threshold).float().mean()) for m in (plain, tolerant)]
    assert alarms[0] > 0.5 and alarms[1] <= 0.05, alarms


@pytest.mark.slow
def test_a_drifted_image_is_read_against_drifted_views(datasets_root):
    """fit --tolerate noise: each noisy view's held-out local score (without its tile's entries)
    joins the normals an image's reference is drawn from (each neighbour tile in its version
    nearest to the image), so a noisy normal tile is read against noisy views of tiles like it.
    Against the clean tiles' scores alone its map's higher peak reads as anomalous and noisy
    normals cross the threshold. 80 training tiles at 128 px."""
    from dataclasses import replace

    from promptad.data import storage
    from promptad.data.images import decode_image, resize
    from promptad.data.shifts import apply_shift
    from promptad.fit.calibrate import held_out_components
    from promptad.fit.pipeline import extract_all, load_tolerated, tolerated_features
    from promptad.predict import components_of

    size, cat = 128, "magnetic_tile"
    train = load_samples(str(datasets_root), [cat], "train")[::9][:80]
    normals = [s for s in load_samples(str(datasets_root), [cat], "test") if s.label == 0][::2]
    images, views = load_images(train, size), load_tolerated(train, size, ["noise"])
    model = fit_in_process({cat: images}, ModelConfig(backbone="effnet-lite0", local_norm="none"),
                           TrainConfig(epochs=0), log=None, tolerated={cat: views})
    cal = model.calibration[cat]
    n = len(train)
    assert cal.neighbours == 10 and len(cal.neighbour_scores) == 2 * n
    # a view's kept score is its local score without its tile's memory entries (brute force)
    feats, vfeats = extract_all(model, images), tolerated_features(model, views)
    for i in (0, 41):
        comps = components_of(model, vfeats.select(slice(i, i + 1)), [cat], exclude=torch.tensor([i]))
        assert float(model.fuse(comps, [cat]).local) == pytest.approx(cal.neighbour_scores[n + i], rel=1e-5)
    nb = held_out_components(model, cat, feats, tolerated=vfeats)["neighbours"]
    owner = torch.cat([torch.arange(n), torch.arange(n)])
    assert not (owner[nb] == torch.arange(n)[:, None]).any(), "never itself or its own view"
    assert all(len(set(owner[row].tolist())) == 10 for row in nb), "ten different tiles"

    raw = [decode_image(storage.read_bytes(s.path)) for s in normals]
    noisy = np.stack([resize(apply_shift("noise", img, None, 1000 + i)[0], size) for i, img in enumerate(raw)])
    cats = [cat] * len(noisy)
    comps = predict_components(model, noisy, cats)
    with_views = model.fuse(comps, cats)
    # the same fit with the clean tiles' scores only as neighbours
    model.calibration[cat] = replace(cal, neighbour_scores=cal.neighbour_scores[:n], neighbour_views=0)
    clean_only = model.fuse(predict_components(model, noisy, cats), cats)
    model.calibration[cat] = cal
    alarms = [float((f.scores >= cal.image_threshold).float().mean()) for f in (with_views, clean_only)]
    assert alarms[0] <= 0.03 < alarms[1], alarms
    assert float(with_views.relative.median()) < float(clean_only.relative.median()) - 0.05
