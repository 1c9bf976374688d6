import inspect

import pytest
import torch

from promptad.memory.bank import bank_size, build_bank, greedy_coreset, nn_distance


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
    assert bank_size(1_000_000) == 10_000 and bank_size(50_000) == 1000 and bank_size(600) == 600
    assert bank_size(10_000_000) == 20_000
    torch.manual_seed(1)
    feats = torch.randn(3, 8, 40, 40)  # 4800 patches: 1 % is under the 1000 floor
    a = build_bank(feats, seed=3)
    b = build_bank(feats, seed=3)
    assert a.entries.shape == (1000, 8) and torch.equal(a.entries, b.entries)
    small = build_bank(torch.randn(2, 8, 10, 10))
    assert small.entries.shape == (200, 8), "never more entries than patches"


def test_bank_entries_remember_their_image():
    """Each entry is a patch of the image its source names (row i of image n at i % (h*w))."""
    torch.manual_seed(2)
    feats = torch.randn(4, 6, 5, 5)
    bank = build_bank(feats, source=torch.tensor([10, 11, 12, 13]))
    flat = feats.permute(0, 2, 3, 1).reshape(4, 25, 6)
    for entry, src in zip(bank.entries, bank.source.tolist()):
        assert (flat[src - 10] == entry).all(dim=1).any()


def test_leave_one_out_distance_ignores_the_images_own_entries():
    """Scored against a bank of all patches, an image is at distance 0 from itself; with its own
    entries excluded it is at its distance to the nearest patch of the other images (hand-made:
    1-D features at 0, 10 and 13)."""
    feats = torch.tensor([0.0, 10.0, 13.0]).view(3, 1, 1, 1)
    bank = build_bank(feats)
    assert torch.equal(nn_distance(feats, bank.entries).flatten(), torch.zeros(3))
    loo = nn_distance(feats, bank.entries, bank_source=bank.source, exclude=torch.arange(3)).flatten()
    assert loo.tolist() == [10.0, 3.0, 3.0]
    alone = build_bank(feats[:1])
    assert torch.isinf(nn_distance(feats[:1], alone.entries, bank_source=alone.source,
                                   exclude=torch.zeros(1, dtype=torch.long))).all()


# --------------------------------------------------------------------------- coreset vs exact greedy
def exact_greedy(x: torch.Tensor, size: int, first: int) -> list[int]:
    """Textbook greedy k-center (Gonzalez), in float64: each pick is the point farthest from
    the points chosen so far."""
    x = x.double()
    d = (x - x[first]).norm(dim=1)
    chosen = [first]
    while len(chosen) < size:
        j = int(d.argmax())
        chosen.append(j)
        d = torch.minimum(d, (x - x[j]).norm(dim=1))
    return chosen


def covering_radius(x: torch.Tensor, idx) -> float:
    """Largest distance of a point to its nearest chosen point."""
    return float(torch.cdist(x.double(), x[torch.as_tensor(idx)].double()).min(1).values.max())


def pick_ratios(x: torch.Tensor, idx) -> torch.Tensor:
    """For every pick after the first: its distance to the points chosen before it, over the
    largest such distance of any point at that moment (1 for an exact greedy pick)."""
    x = x.double()
    idx = [int(i) for i in idx]
    d = (x - x[idx[0]]).norm(dim=1)
    ratios = []
    for j in idx[1:]:
        ratios.append(float(d[j] / d.max()))
        d = torch.minimum(d, (x - x[j]).norm(dim=1))
    return torch.tensor(ratios)


def _first(n: int, seed: int) -> int:
    """greedy_coreset's first point when no projection applies (its generator's first draw)."""
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))


def _clusters(seed: int, dims: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, dims, generator=g) * 6
    sizes = [150] * 4 + [10] * 8
    return torch.cat([c + torch.randn(s, dims, generator=g) for c, s in zip(centers, sizes)])


@pytest.mark.parametrize("seed, n, dims, size, batch", [(0, 400, 8, 40, 4), (1, 600, 16, 60, None),
                                                         (2, 300, 3, 100, 8)])
def test_coreset_with_slack_1_is_exact_greedy(seed, n, dims, size, batch):
    x = torch.randn(n, dims, generator=torch.Generator().manual_seed(100 + seed))
    idx = greedy_coreset(x, size, proj_dim=dims, batch=batch, seed=seed, slack=1.0)
    assert int(idx[0]) == _first(n, seed)
    assert idx.tolist() == exact_greedy(x, size, _first(n, seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coreset_keeps_the_documented_covering_guarantee(seed):
    """Default slack: every pick is at least `slack` times as far from the chosen points as the
    farthest point then was, so the covering radius is within 2 / slack of exact greedy's."""
    x = _clusters(seed)
    size, slack = 48, inspect.signature(greedy_coreset).parameters["slack"].default
    idx = greedy_coreset(x, size, proj_dim=x.shape[1], batch=8, seed=seed)
    exact = exact_greedy(x, size, _first(len(x), seed))
    assert len(set(idx.tolist())) == size
    ratios = pick_ratios(x, idx)
    assert ratios.min() >= slack * (1 - 1e-4)
    assert ratios.min() < 1 - 1e-3  # the slack was used: not every pick was exact greedy's
    assert covering_radius(x, idx) <= 2 / slack * covering_radius(x, exact)
    # both checks can fail: a random subset of the same size breaks each of them
    rand = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    assert pick_ratios(x, rand).min() < slack
    assert covering_radius(x, rand) > 2 / slack * covering_radius(x, exact)


def test_coreset_slack_applies_to_distances():
    """With slack 0.5, picks down to half the farthest distance are accepted (on squared
    distances 0.5 would only allow 0.71 of it), and never below."""
    x = _clusters(3)
    ratios = pick_ratios(x, greedy_coreset(x, 48, proj_dim=x.shape[1], batch=16, seed=3, slack=0.5))
    assert ratios.min() >= 0.5 * (1 - 1e-4)
    assert ratios.min() < 0.5 ** 0.5


# --------------------------------------------------------------------------- tolerated views in the bank
def test_views_like_their_images_add_no_entry():
    """Views that repeat their images' patches: the images keep exactly the bank they get alone."""
    x = _clusters(4)
    alone = greedy_coreset(x, 40, proj_dim=x.shape[1], batch=8, seed=4)
    both = greedy_coreset(torch.cat([x, x]), 200, proj_dim=x.shape[1], batch=8, seed=4, first=(len(x), 40))
    assert both.tolist() == alone.tolist()


def test_views_get_entries_only_beyond_the_images_covering_radius():
    x = _clusters(5)
    rows, picks = len(x), 40
    g = torch.Generator().manual_seed(5)
    shift = torch.zeros(x.shape[1])
    shift[0] = 25.0
    views = torch.cat([x[:150] + shift, x[150:] + 0.01 * torch.randn(len(x) - 150, x.shape[1], generator=g)])
    feats = torch.cat([x, views])
    alone = greedy_coreset(x, picks, proj_dim=x.shape[1], batch=8, seed=5)
    radius = covering_radius(x, alone)
    idx = greedy_coreset(feats, 400, proj_dim=x.shape[1], batch=8, seed=5, first=(rows, picks))
    assert idx[:picks].tolist() == alone.tolist()  # the images' own bank, unchanged
    extra = idx[picks:]
    assert len(extra) > 0 and bool((extra >= rows).all())  # only views join, and they do
    d = torch.cdist(feats.double(), feats[idx].double()).min(1).values
    assert float(d.max()) <= radius * (1 + 1e-5)  # every view is now as well covered as the images
    assert len(idx) < 400  # ... and it stopped there: the views near their images needed nothing
    assert int((extra >= rows + 150).sum()) == 0  # the near views added no entry
    capped = greedy_coreset(feats, picks + 3, proj_dim=x.shape[1], batch=8, seed=5, first=(rows, picks))
    assert capped.tolist() == idx[:picks + 3].tolist()  # `size` caps the bank


def test_the_images_bank_is_the_one_they_get_alone_at_default_batching():
    """Default batch sizes follow the number of picks of each phase, so a bank cap far above the
    images' own size does not change how their coreset is batched."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3000, 8, generator=g)
    views = x + 50.0
    alone = greedy_coreset(x, 1700, proj_dim=8, seed=6)
    both = greedy_coreset(torch.cat([x, views]), 5000, proj_dim=8, seed=6, first=(3000, 1700))
    assert both[:1700].tolist() == alone.tolist()
    assert 1700 < len(both) < 5000 and bool((both[1700:] >= 3000).all())  # the views needed only some


def test_a_bank_of_draws_is_the_union_of_its_coresets():
    """draws=K keeps every entry of the K single draws (seeds seed..seed+K-1) once each; its
    distances are the least of theirs, so at most each draw's and at least the full bank's."""
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(6, 12, 20, 20, generator=g)  # 2400 patches: draws of the 1000 floor
    singles = [build_bank(feats, seed=s) for s in (5, 6, 7)]
    union = build_bank(feats, seed=5, draws=3)
    as_set = lambda b: {tuple(r) for r in b.entries.tolist()}
    assert as_set(union) == set().union(*map(as_set, singles))
    assert len(as_set(union)) == len(union.entries) > len(singles[0].entries)  # no entry twice; draws differ
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 12)
    for e, s in zip(union.entries, union.source.tolist()):  # sources still name the entry's image
        assert (flat[s * 400:(s + 1) * 400] == e).all(1).any()
    queries = torch.randn(3, 12, 6, 6, generator=g)
    d = nn_distance(queries, union.entries)
    each = torch.stack([nn_distance(queries, b.entries) for b in singles])
    assert torch.allclose(d, each.min(0).values)
    assert bool((d >= nn_distance(queries, flat) - 1e-5).all())
    assert torch.equal(build_bank(feats, seed=5, draws=1).entries, singles[0].entries)
    with pytest.raises(ValueError, match="draws must be at least 1"):
        build_bank(feats, draws=0)


def test_draws_keep_the_images_bank_first_and_the_views_beyond_it():
    """With tolerated views (`plain`), each draw is made as a single bank is (its images' bank
    first, then views beyond its radius) and the bank is the union of the draws."""
    g = torch.Generator().manual_seed(8)
    plain = torch.randn(4, 6, 10, 10, generator=g)
    both = torch.cat([plain, plain + 0.001 * torch.randn(plain.shape, generator=g)])
    src = torch.arange(4).repeat(2)
    union = build_bank(both, src, seed=1, plain=4, size=200, draws=2)
    singles = [build_bank(both, src, seed=s, plain=4, size=200) for s in (1, 2)]
    as_set = lambda b: {tuple(r) for r in b.entries.tolist()}
    assert as_set(union) == as_set(singles[0]) | as_set(singles[1])
