"""Memory banks of normal patch features and their greedy coreset (PatchCore-style).

A bank holds patch features of normal images (models/features.py: local or regional); a patch is as
anomalous as it is far from its nearest neighbour in the bank. Every entry remembers which
training image it came from (`source`), so calibration can score each normal image against the
bank without its own entries (leave-one-out): a normal image scored against a bank that holds it
would score ~0 and set a threshold far too low.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from promptad.numerics import float32_math


def greedy_coreset(features: torch.Tensor, size: int, proj_dim: int = 128, batch: int | None = None,
                   seed: int = 0, slack: float = 0.9, first: tuple[int, int] | None = None) -> torch.Tensor:
    """Indices of `size` rows chosen by greedy k-center on a random projection.

    Each round takes the `4 * batch` farthest points as candidates and picks among them as plain
    greedy would, for as long as the best candidate is at least `slack` times as far (in distance,
    not squared distance) as every point outside the pool (whose distances can only shrink), then
    updates all distances with one matrix product. So every pick is at least `slack` times as far
    from the points already chosen as the farthest point then was; slack=1 is exact greedy. The
    covering guarantee follows within that factor: the covering radius (largest distance of a
    point to its nearest chosen one, in the projected space) is at most 2 / slack times the best
    possible with `size` points (exact greedy: 2), hence at most 2 / slack times exact greedy's.
    Passes over the features, which dominate the cost, drop by ~batch (200 images' patches in
    seconds on CPU). The default 0.9 (0.81 on squared distances) makes the banks the former
    0.8-on-squared-distances default made, at the same speed.

    `first=(rows, picks)`: the first `picks` come from the first `rows` rows only (a fit's plain
    images, as if the rest were absent); the remaining rows (their tolerated views) then get
    entries, up to `size` in all, only while one of them lies farther from the chosen than the
    first rows' covering radius. So the plain images keep the bank they would have had alone and
    a view adds an entry only where it looks like no plain patch.
    """
    n = features.shape[0]
    if size >= n:
        return torch.arange(n, device=features.device)
    gen = torch.Generator().manual_seed(seed)  # on the CPU: every device draws the same projection
    x = features.float()
    if x.shape[1] > proj_dim:
        proj = torch.randn(x.shape[1], proj_dim, generator=gen) / math.sqrt(proj_dim)
        x = x @ proj.to(x.device)
    sq = (x * x).sum(1)
    rows, picks = first if first is not None else (n, size)
    rows, picks = min(rows, n), min(picks, rows, size)
    start = int(torch.randint(rows, (1,), generator=gen))
    min_d = (sq - 2 * x @ x[start] + sq[start]).clamp_(min=0)
    chosen = [start]
    # phase 1: the first rows alone (the rest never candidates); phase 2: the rest, beyond the radius.
    # About a hundred passes per phase, whatever the size; phase 1's as if it ran alone.
    _greedy(x, sq, min_d, chosen, picks, batch or max(16, picks // 100), slack, rows=rows, floor=0.0)
    if picks < size and rows < n:
        radius_sq = float(min_d[:rows].max())
        _greedy(x, sq, min_d, chosen, size, batch or max(16, (size - picks) // 100), slack, rows=n,
                floor=radius_sq)
    return torch.tensor(chosen[:size], device=x.device)


def _greedy(x: torch.Tensor, sq: torch.Tensor, min_d: torch.Tensor, chosen: list[int], size: int,
            batch: int, slack: float, rows: int, floor: float) -> None:
    """Extend `chosen` (and `min_d`, squared distances of every row to it) by greedy k-center
    picks among the first `rows` rows until `size` are chosen or no candidate is farther than
    `floor` (squared)."""
    while len(chosen) < size:
        b = min(batch, size - len(chosen))
        top = torch.topk(min_d[:rows], min(4 * b + 1, rows))
        cand = top.indices[: 4 * b]
        bound = float(top.values[-1]) if len(top.values) > 4 * b else -1.0
        cd = min_d[cand].clone()
        cx = x[cand]
        picked = []
        for _ in range(b):
            j = int(torch.argmax(cd))
            if cd[j] <= floor or (picked and float(cd[j]) < slack * slack * bound):  # cd, bound: squared
                break
            picked.append(int(cand[j]))
            d = ((cx - cx[j]) ** 2).sum(1)
            cd = torch.minimum(cd, d)
        if not picked:
            break
        idx = torch.tensor(picked, device=x.device)
        # min_j |x - c_j|^2 = |x|^2 + min_j (|c_j|^2 - 2 x.c_j): one (N, b) product-and-add, no
        # further (N, b) temporaries (they, not the product, bounded the pass on CPU)
        d = torch.addmm(sq[idx][None, :], x, x[idx].T, alpha=-2).min(1).values.add_(sq).clamp_(min=0)
        torch.minimum(min_d, d, out=min_d)
        chosen.extend(picked)


@dataclass
class Bank:
    """Coreset entries (M, C) and the index of the training image each came from (M,) int64."""

    entries: torch.Tensor
    source: torch.Tensor

    def to(self, device) -> "Bank":
        return Bank(self.entries.to(device), self.source.to(device))


def bank_size(patches: int, ratio: float = 0.01, min_size: int = 1000, max_size: int = 20000) -> int:
    """1 % of the patches (PatchCore's default), at least 1,000 so that tiny categories keep every
    normal appearance they have, at most 20,000 so nearest-neighbour search stays cheap."""
    return int(min(max(min_size, ratio * patches), max_size, patches))


def build_bank(feats: torch.Tensor, source: torch.Tensor | None = None, ratio: float = 0.01,
               seed: int = 0, size: int | None = None, plain: int | None = None, draws: int = 1) -> Bank:
    """Coreset bank of (N, C, h, w) normal patch features; `source` (N,) names each image
    (default 0..N-1); `size` overrides bank_size of all the patches.

    `draws`: the union of that many coresets, drawn with seeds seed, seed+1, ... (each its own
    start and projection). A coreset's nearest-neighbour distance bounds the full bank's from
    above, and the bound's error depends on the draw (magnetic_tile: image AUROC 0.980-0.986
    over five draws); the union's distance is the least of the draws' bounds, so it is tighter
    than every one of them and varies less (benchmarks/RESULTS.md, "Coreset draws"). An entry
    two draws share is kept once.

    `plain`: only the first `plain` feature maps are the images themselves, the rest their
    tolerated views. The images get the bank they would get alone (bank_size of their patches,
    or `size`); the views add entries, up to bank_size of all the patches, only where they lie
    beyond the images' covering radius (greedy_coreset's `first`)."""
    n, c, h, w = feats.shape
    flat = feats.float().permute(0, 2, 3, 1).reshape(-1, c)
    src = (torch.arange(n) if source is None else torch.as_tensor(source)).to(flat.device).long().repeat_interleave(h * w)
    if draws < 1:
        raise ValueError(f"draws must be at least 1, not {draws}")

    def draw(s: int) -> torch.Tensor:
        if plain is None or plain >= n:
            return greedy_coreset(flat, min(size, flat.shape[0]) if size else bank_size(flat.shape[0], ratio), seed=s)
        rows = plain * h * w
        picks = min(size, rows) if size else bank_size(rows, ratio)
        return greedy_coreset(flat, max(picks, bank_size(flat.shape[0], ratio)), seed=s, first=(rows, picks))

    idx = draw(seed) if draws == 1 else torch.unique(torch.cat([draw(seed + d) for d in range(draws)]))
    return Bank(flat[idx].contiguous(), src[idx].contiguous())


@float32_math
def nn_distance(patches: torch.Tensor, bank: torch.Tensor, chunk: int = 4096,
                bank_source: torch.Tensor | None = None, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(N, h, w) float32 Euclidean distance of each patch to its nearest bank entry.

    With `bank_source` (M,) and `exclude` (N,), image i ignores the entries whose source is
    exclude[i] (leave-one-out scoring of the bank's own training images); a patch with no entry
    left is at distance inf.

    The nearest entry is found with one matrix product; its distance is then recomputed directly,
    since |a|^2 - 2ab + |b|^2 cancels badly for near matches and its rounding depends on how the
    BLAS blocks the batch: a score must not depend on which images share its batch. All of it runs
    in fp32 with autocast off (numerics.float32_math): under fp16/bf16 autocast the product would
    pick the wrong neighbour outright.
    """
    n, c, h, w = patches.shape
    q = patches.permute(0, 2, 3, 1).reshape(-1, c).float()
    bank = bank.to(q.device, torch.float32)
    bank_sq = (bank * bank).sum(1)
    owner = None
    if exclude is not None:
        owner = torch.as_tensor(exclude, device=q.device).long().repeat_interleave(h * w)
        bank_source = bank_source.to(q.device).long()
    out = torch.empty(q.shape[0], device=q.device)
    for s in range(0, q.shape[0], chunk):
        part = q[s:s + chunk]
        d2 = torch.addmm(bank_sq[None], part, bank.T, alpha=-2)  # |b|^2 - 2ab: the nearest b, not its distance
        if owner is not None:
            d2 = d2.masked_fill(owner[s:s + chunk, None] == bank_source[None], float("inf"))
        best, nearest = d2.min(1)
        dist = (part - bank[nearest]).norm(dim=1)
        out[s:s + chunk] = dist if owner is None else dist.masked_fill(torch.isinf(best), float("inf"))
    return out.view(n, h, w)
