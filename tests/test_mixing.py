"""The map's regional weight is chosen per category from its synthetic views (learning/mixing.py)."""
import math

import numpy as np
import torch

from promptad.learning.mixing import CANDIDATES, candidate_maps, choice_line, choose_map


def _rows(seen_by: str, n: int = 24, grid: int = 16, seed: int = 0, missed: float = 0.0):
    """Evidence rows (inputs log(1 + d / scale), masks) of n clean images then n views, each view with a
    4x4 defect that only the `seen_by` bank's distances show; the other bank shows a halo of
    normal cells further than the defect, at random places (as a wide window does around nothing).
    `missed`: that share of the clean images' cells is labelled defect though nothing shows there
    (every weight then errs somewhat)."""
    g = torch.Generator().manual_seed(seed)
    local = torch.rand(2 * n, grid, grid, generator=g) * 0.8  # normal distances below the scale
    regional = torch.rand(2 * n, grid, grid, generator=g) * 0.8
    masks = torch.zeros(2 * n, grid, grid)
    for i in range(n, 2 * n):
        y, x = torch.randint(0, grid - 4, (2,), generator=g).tolist()
        masks[i, y:y + 4, x:x + 4] = 1.0
        masks[i, y - 1 if y else y + 4, x] = -1.0  # a grazed cell: left out
        hy, hx = torch.randint(0, grid - 6, (2,), generator=g).tolist()
        if seen_by == "local":
            local[i, y:y + 4, x:x + 4] += 2.0
            regional[i, hy:hy + 6, hx:hx + 6] += 4.0  # the regional bank's halo on normal cells
        else:
            regional[i, y:y + 4, x:x + 4] += 0.9  # found at full weight; half weight hides it
    masks[:n][torch.rand(n, grid, grid, generator=g) < missed] = 1.0
    inputs = torch.stack([torch.log1p(local), torch.log1p(regional)], 1)
    return inputs, masks


def test_views_found_by_the_local_bank_alone_weigh_the_local_bank():
    choice = choose_map(*_rows("local"))
    assert choice["regional"] == 0.0
    aurocs = {float(k): v for k, v in choice["auroc"].items()}
    assert aurocs[0.0] > 0.99 and aurocs[1.0] < aurocs[0.0] - 0.02  # the halo costs the largest weight


def test_views_found_by_the_regional_bank_alone_weigh_the_regional_bank():
    choice = choose_map(*_rows("regional"))
    assert choice["regional"] == max(CANDIDATES)
    aurocs = {float(k): v for k, v in choice["auroc"].items()}
    assert aurocs[1.0] > 0.99 and aurocs[0.5] < aurocs[1.0] - 0.01 and aurocs[0.0] < 0.7  # the local bank alone is near chance there


def test_candidate_map_is_max_of_the_scaled_distances():
    d_local, d_regional = np.array([[0.5, 2.0]]), np.array([[3.0, 1.0]])
    inputs = torch.tensor(np.stack([np.log1p(d_local), np.log1p(d_regional)], 1))
    out = candidate_maps(inputs, 0.5).numpy()
    np.testing.assert_allclose(out, [[1.5, 2.0]])  # max(0.5, 0.5*3), max(2, 0.5*1), by hand


def test_the_regional_bank_keeps_its_weight_until_it_multiplies_the_errors():
    # Identical banks: every weight scores the same, and the largest is kept.
    inputs, masks = _rows("local")
    same = choose_map(torch.stack([inputs[:, 0], inputs[:, 0]], 1), masks)
    assert len(set(same["auroc"].values())) == 1 and same["regional"] == max(CANDIDATES)
    # The rule on measured errors: the largest weight within `ratio` of the best one's error.
    rows = _rows("local", missed=0.01)
    errors = {float(k): 1 - v for k, v in choose_map(*rows)["auroc"].items()}
    best = min(errors.values())
    assert best > 0 and len(set(errors.values())) == len(errors)
    chosen = {ratio: choose_map(*rows, max_ratio=ratio)["regional"] for ratio in (1.0, 1.5, 3.0, 5.0, 1e6)}
    for ratio, w in chosen.items():
        assert w == max(v for v, e in errors.items() if e <= ratio * best + 1e-12)
    assert chosen[1.0] == 0.0 and chosen[1e6] == max(CANDIDATES) and len(set(chosen.values())) >= 3


def test_nothing_to_measure_keeps_the_fixed_weights():
    inputs, masks = _rows("local")
    choice = choose_map(inputs[:24], masks[:24])  # the clean rows only: no defect cell
    assert choice == {"regional": max(CANDIDATES), "auroc": {}, "cells": [0, 24 * 16 * 16]}
    assert "regional 1" in choice_line({}) and "fixed" in choice_line({})
    assert math.isfinite(float(choose_map(*_rows("regional"))["auroc"]["0.5"]))
