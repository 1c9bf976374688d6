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


def test_image_normalized_removes_each_images_offsets_and_spread():
    """Per image: channel means 0 and mean channel SD 1; unchanged by a per-channel offset and a
    positive scale of the whole layer (exposure, material tone, texture strength), while the
    relative channel magnitudes stay (one scale per image and layer, not per channel)."""
    from promptad.models.features import image_normalized

    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 6, 7, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 5, 1, 1)
    out = image_normalized(t)
    assert torch.allclose(out.mean(dim=(2, 3)), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(out.flatten(2).std(dim=2, unbiased=False).mean(1), torch.ones(3), atol=1e-5)
    shifted = t * torch.tensor([0.5, 2.0, 7.0]).view(3, 1, 1, 1) + torch.randn(3, 5, 1, 1, generator=g) * 10
    assert torch.allclose(image_normalized(shifted), out, atol=1e-4)
    sd, sd_in = out.flatten(2).std(dim=2), t.flatten(2).std(dim=2)
    assert torch.allclose(sd / sd[:, :1], sd_in / sd_in[:, :1], rtol=1e-4), "channel SDs keep their ratios"
    # each image on its own: another image in the batch changes nothing
    assert torch.allclose(image_normalized(torch.cat([t[:1], 100 * t[1:]]))[0], out[0], atol=1e-5)
    flat = image_normalized(torch.full((1, 2, 4, 4), 3.0))
    assert torch.isfinite(flat).all() and (flat == 0).all(), "a featureless image is all zeros, not NaN"


def test_local_embedding_normalizes_each_layer_before_the_3x3_average():
    from promptad.models.features import image_normalized

    fine, coarse = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4) * 50 + 3
    want = local_embedding([image_normalized(fine), image_normalized(coarse)])
    assert torch.allclose(local_embedding([fine, coarse], normalize=True), want)
    assert not torch.allclose(local_embedding([fine, coarse]), want)
