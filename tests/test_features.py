"""The three views of an image (features.py), against hand-computed values."""
import torch

from promptad.models.features import flatten_patches, local_embedding, pooled_stats, regional_embedding, regional_kernel


def test_local_embedding_averages_3x3_with_zero_padding_and_upsamples():
    fine = torch.zeros(1, 1, 4, 4)
    fine[0, 0, 0, 0] = 9.0
    coarse = torch.ones(1, 2, 2, 2)
    out = local_embedding([fine, coarse])
    assert out.shape == (1, 3, 4, 4)
    # corner: (9 + 0 * 8) / 9 with the padding counted (PatchCore's unfold); its neighbour too
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, 1, 1] == 1.0 and out[0, 0, 2, 2] == 0.0
    # a constant coarse layer: interior 1, border cells average in the zero padding (6/9, 4/9)
    assert torch.allclose(local_embedding([coarse])[0, 0], torch.full((2, 2), 4 / 9))
    assert local_embedding([torch.randn(2, 40, 8, 8), torch.randn(2, 112, 4, 4)], max_dim=64).shape == (2, 64, 8, 8)


def test_regional_embedding_is_a_wide_window_at_the_coarsest_grid():
    assert regional_kernel(16) == 9 and regional_kernel(15) == 9 and regional_kernel(8) == 5
    coarse = torch.zeros(1, 1, 16, 16)
    coarse[0, 0, 8, 8] = 81.0
    out = regional_embedding([torch.zeros(1, 2, 32, 32), coarse])
    assert out.shape == (1, 3, 16, 16)
    # a 9x9 window: (4, 4) sees 81 over 81 cells; (12, 12) reaches past the border and averages
    # the 8 x 8 cells inside (81 / 64); (3, 3) is out of reach
    assert out[0, 2, 4, 4] == 1.0 and out[0, 2, 12, 12] == 81 / 64 and out[0, 2, 3, 3] == 0.0
    const = regional_embedding([torch.full((1, 1, 16, 16), 2.0)])
    assert torch.allclose(const, torch.full_like(const, 2.0)), "no zero padding at the border"


def test_pooled_stats_and_flatten():
    a = torch.arange(8.0).view(1, 2, 2, 2)
    assert pooled_stats([a])[0].tolist() == [[1.5, 5.5]]
    x = torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2)
    flat = flatten_patches(x)
    assert flat.shape == (8, 3) and flat[5].tolist() == x[1, :, 0, 1].tolist()
