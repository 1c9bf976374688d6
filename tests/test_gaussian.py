"""The global branch's Gaussian against scikit-learn's Ledoit-Wolf and closed-form distances."""
import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from promptad.gaussian import fit_gaussian, held_out_scores, ledoit_wolf


def test_ledoit_wolf_equals_sklearn():
    rng = np.random.default_rng(0)
    for n, p in [(31, 152), (200, 20)]:
        x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) * 0.1
        ours = ledoit_wolf(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours, LedoitWolf().fit(x).covariance_, rtol=1e-8, atol=1e-10)


def test_mahalanobis_distance_by_hand():
    """Isotropic data: the shrunk covariance is (nearly) the identity scaled by the variance."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    g = fit_gaussian([x])
    # covariance diag(0.5, 0.5) (already a scaled identity: no shrinkage changes it)
    d = g.score([torch.tensor([[2.0, 0.0], [0.0, 0.0]])])
    assert torch.allclose(d, torch.tensor([2.0 / 0.5 ** 0.5, 0.0]), atol=1e-5)
    two = fit_gaussian([x, 3 * x]).score([torch.tensor([[2.0, 0.0]]), torch.tensor([[6.0, 0.0]])])
    assert torch.allclose(two, torch.tensor([2 * 2.0 / 0.5 ** 0.5]), atol=1e-4), "layers add up"


def test_held_out_scores_leave_each_fold_out():
    torch.manual_seed(0)
    x = torch.randn(30, 4)
    x[7] += 20.0  # an outlier scored by a Gaussian that never saw it
    held = held_out_scores([x], folds=10)
    inside = fit_gaussian([x]).score([x])
    assert held.shape == (30,) and int(held.argmax()) == 7
    assert held[7] > 2 * inside[7], "in-sample the outlier inflates its own covariance"
    fold = torch.arange(30) % 10 == 7 % 10
    ref = fit_gaussian([x[~fold]]).score([x[fold]])
    assert torch.allclose(held[fold], ref)
