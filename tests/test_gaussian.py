"""The global branch's Gaussian against scikit-learn's Ledoit-Wolf and closed-form distances."""
import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from promptad.memory.gaussian import fit_gaussian, held_out_scores, ledoit_wolf


def test_ledoit_wolf_equals_sklearn():
    rng = np.random.default_rng(0)
    for n, p in [(31, 152), (200, 20)]:
        x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) * 0.1
        ours = ledoit_wolf(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours, LedoitWolf().fit(x).covariance_, rtol=1e-8, atol=1e-10)


def test_mahalanobis_distance_to_nearest_normal_by_hand():
    """Isotropic data: the shrunk covariance is the identity scaled by the variance (0.5), so a
    distance is the Euclidean one over sqrt(0.5), to the nearest of the normal images."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    g = fit_gaussian([x])
    d = g.score([torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])])
    assert torch.allclose(d, torch.tensor([1.0, 1.0, 0.0]) / 0.5 ** 0.5, atol=1e-5)
    # Two layers: the distances to the same normal image add up (covariance of 3x: 4.5 I).
    two = fit_gaussian([x, 3 * x]).score([torch.tensor([[2.0, 0.0]]), torch.tensor([[6.0, 0.0]])])
    assert torch.allclose(two, torch.tensor([2 * 1.0 / 0.5 ** 0.5]), atol=1e-4)


def test_a_rare_normal_mode_is_near_its_image_not_far_from_the_mean():
    """Cookie's case: most normal images in one mode, one in another; a new image of the rare mode
    is close to that image, while a shift away from both modes stays far."""
    torch.manual_seed(0)
    x = torch.randn(30, 3)
    x[29] += torch.tensor([8.0, 0.0, 0.0])  # the rare mode, seen once
    g = fit_gaussian([x])
    rare, shifted = x[29:] + 0.1, torch.tensor([[0.0, 8.0, 0.0]])
    mean_distance = float(((rare[0] - g.means[0]) @ g.precisions[0] @ (rare[0] - g.means[0])).sqrt())
    assert float(g.score([rare])) < 0.5 < 2.0 < mean_distance
    assert float(g.score([shifted])) > 3 * float(g.score([rare]))


def test_held_out_scores_leave_each_fold_out():
    torch.manual_seed(0)
    x = torch.randn(30, 4)
    x[7] += 20.0  # an outlier scored by a Gaussian that never saw it
    held = held_out_scores([x], folds=10)
    inside = fit_gaussian([x]).score([x])
    assert held.shape == (30,) and int(held.argmax()) == 7
    assert float(inside.abs().max()) < 1e-4, "in sample each image is its own nearest normal: hence held out"
    assert held.min() > 0.1
    fold = torch.arange(30) % 10 == 7 % 10
    ref = fit_gaussian([x[~fold]]).score([x[fold]])
    assert torch.allclose(held[fold], ref)


def test_tolerated_copies_join_the_normals_and_leave_with_their_image():
    """`extra` (N, T, C): each image's tolerated views are normals of the Gaussian (a view scores 0,
    the metric is fitted on all of them), and a held-out fold loses its images' views too."""
    torch.manual_seed(1)
    x = torch.randn(20, 3)
    extra = x[:, None] + torch.tensor([5.0, 0.0, 0.0]) + 0.1 * torch.randn(20, 2, 3)  # 2 shifted views each
    g = fit_gaussian([x], [extra])
    assert g.normals[0].shape == (60, 3)
    assert torch.allclose(g.normals[0], torch.cat([x, extra.reshape(-1, 3)]).double())
    assert float(g.score([extra[:, 0]]).abs().max()) < 1e-4
    plain = fit_gaussian([x]).score([extra[:, 0] + 0.05])
    assert float(g.score([extra[:, 0] + 0.05]).max()) < float(plain.min()), "the shift is normal now"
    held = held_out_scores([x], folds=5, extra=[extra])
    fold = torch.arange(20) % 5 == 2
    ref = fit_gaussian([x[~fold]], [extra[~fold]]).score([x[fold]])
    assert torch.allclose(held[fold], ref)
    assert torch.allclose(held_out_scores([x], folds=5, extra=[extra[:, :0]]), held_out_scores([x], folds=5))


def test_nearest_normals_by_brute_force():
    """Gaussian.nearest: the k smallest of the closed-form distances, among the first `among`
    normals only (the images, not their tolerated views), itself excluded when asked, the same
    in any chunking."""
    torch.manual_seed(2)
    x, views = torch.randn(40, 5), torch.randn(40, 2, 5)
    g = fit_gaussian([x, 2 * x], [views, 2 * views])
    pooled = [x, 2 * x]
    d = g.distances(pooled)
    assert d.shape == (40, 120)
    full = d[:, :40].clone()
    assert torch.allclose(full.diagonal(), torch.zeros(40, dtype=full.dtype), atol=1e-4)
    full.fill_diagonal_(float("inf"))
    want = full.argsort(1)[:, :7]
    for chunk in (256, 7):
        got = g.nearest(pooled, 7, images=40, exclude_self=True, chunk=chunk)
        assert torch.equal(got.sort(1).values, want.sort(1).values)
    q = [torch.randn(3, 5)]
    q.append(2 * q[0])
    want = g.distances(q)[:, :40].argsort(1)[:, :4]
    assert torch.equal(g.nearest(q, 4, images=40).sort(1).values, want.sort(1).values)


def test_nearest_with_views_takes_distinct_images_in_their_nearest_version():
    """With tolerated views (2 per image, image-major after the images), the neighbours are k
    different images ranked by their nearest version and returned as that version's index; a
    calibration image is neighbour to itself in no version."""
    torch.manual_seed(3)
    n, t = 30, 2
    x = torch.randn(n, 4)
    views = x[:, None] + torch.tensor([3.0, -3.0, 0, 0]) * torch.tensor([1.0, -1.0])[:, None]  # shifted copies
    g = fit_gaussian([x], [views])
    owner = torch.cat([torch.arange(n), torch.arange(n).repeat_interleave(t)])
    for q, self_ in ((x, True), (views[:, 0], False), (torch.randn(5, 4), False)):
        got = g.nearest([q], 5, images=n, views=t, exclude_self=self_)
        d = g.distances([q])
        per_image = torch.stack([d[:, :n], d[:, n::2], d[:, n + 1::2]], -1)  # (N, n, 3) versions
        if self_:
            per_image[torch.arange(n), torch.arange(n)] = float("inf")
        best, version = per_image.min(-1)
        top = best.argsort(1)[:, :5]
        v = version.gather(1, top)
        want = torch.where(v == 0, top, n + top * t + v - 1)
        assert torch.equal(got.sort(1).values, want.sort(1).values)
        assert all(len(set(owner[row].tolist())) == 5 for row in got), "five different images"
        if self_:
            assert not (owner[got] == torch.arange(n)[:, None]).any()
    # a query that is image 7's first view has that view (distance 0) among its neighbours
    assert n + 7 * t in g.nearest([views[7:8, 0]], 5, images=n, views=t)[0].tolist()
