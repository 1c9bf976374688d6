import torch

from promptad.memory import build_bank, greedy_coreset, nn_distance, patch_features


def test_nn_distance_matches_cdist():
    torch.manual_seed(0)
    patches = torch.randn(2, 8, 5, 6)
    bank = torch.randn(50, 8)
    d = nn_distance(patches, bank, chunk=7)
    ref = torch.cdist(patches.permute(0, 2, 3, 1).reshape(-1, 8), bank).min(1).values.view(2, 5, 6)
    assert torch.allclose(d, ref, atol=1e-4)


def test_coreset_covers_clusters_far_better_than_random():
    """k-center picks every cluster, even tiny ones, where a random subset misses them."""
    torch.manual_seed(0)
    centers = torch.randn(20, 16) * 20
    sizes = [500] * 5 + [3] * 15  # 15 rare clusters
    x = torch.cat([c + torch.randn(s, 16) for c, s in zip(centers, sizes)])
    idx = greedy_coreset(x, 40, proj_dim=8)
    assert len(set(idx.tolist())) == 40
    cover = torch.cdist(x, x[idx]).min(1).values.max()
    rand = torch.randperm(len(x))[:40]
    cover_rand = torch.cdist(x, x[rand]).min(1).values.max()
    assert cover < 10 and cover < cover_rand / 2


def test_coreset_is_seeded_and_bank_size_follows_ratio():
    torch.manual_seed(1)
    feats = torch.randn(3, 8, 20, 20)
    a = build_bank(feats, ratio=0.1, min_size=10, seed=3)
    b = build_bank(feats, ratio=0.1, min_size=10, seed=3)
    assert a.shape == (120, 8) and torch.equal(a, b)
    assert build_bank(feats, ratio=0.1, min_size=5000).shape == (1200, 8)  # never more than there is


def test_patch_features_aggregate_and_reduce():
    layers = [torch.randn(2, 40, 16, 16), torch.randn(2, 112, 8, 8)]
    assert patch_features(layers).shape == (2, 152, 16, 16)
    assert patch_features(layers, max_dim=64).shape == (2, 64, 16, 16)
