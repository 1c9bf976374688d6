"""fp32 where a score is made, whatever autocast is on; non-finite outputs become per-row errors.

bf16 autocast on CPU stands in for the GPU's fp16: it rounds matmuls and convolutions the same
way (with a shorter mantissa still), and runs on the test machine.
"""
import numpy as np
import pytest
import torch

from promptad.fit.pipeline import build_memory
from promptad.memory.bank import Bank, nn_distance
from promptad.models.model import ModelConfig, PromptAD, gaussian_blur
from promptad.numerics import as_float32, no_autocast
from promptad.predict import Prediction, output_problem, predict, predict_rows

SIZE = 64


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _near_duplicates(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A bank of patches far from the origin and close to each other, and queries close to them:
    the |a|^2 - 2ab + |b|^2 cancellation that decides the nearest neighbour."""
    g = torch.Generator().manual_seed(seed)
    bank = 20 + 0.5 * torch.randn(200, 32, generator=g)
    pick = torch.randint(200, (2 * 6 * 7,), generator=g)
    queries = bank[pick] + 0.05 * torch.randn(len(pick), 32, generator=g)
    return queries.view(2, 6, 7, 32).permute(0, 3, 1, 2).contiguous(), bank


def test_nn_distance_is_fp32_inside_autocast():
    patches, bank = _near_duplicates()
    ref = nn_distance(patches, bank)
    exact = torch.cdist(patches.permute(0, 2, 3, 1).reshape(-1, 32).double(), bank.double()).min(1).values
    torch.testing.assert_close(ref.double().view(-1), exact, rtol=1e-5, atol=1e-6)
    with bf16_autocast():
        got = nn_distance(patches, bank)
        assert torch.is_autocast_enabled("cpu")  # switched off inside only
        q = patches.permute(0, 2, 3, 1).reshape(-1, 32)
        assert (q @ bank.T).dtype == torch.bfloat16  # what the matmul would have been
        naive = (((q * q).sum(1, keepdim=True) - 2 * q @ bank.T + (bank * bank).sum(1)).clamp(min=0)
                 .sqrt().min(1).values.float())
        unguarded = nn_distance.__wrapped__(patches, bank)  # the same code without float32_math
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    # the test can fail: in bf16 the product picks other neighbours and the expansion cancels
    assert not torch.allclose(naive.view_as(ref), ref, rtol=1e-2)
    assert not torch.allclose(unguarded, ref, rtol=1e-2)
    assert (unguarded >= ref - 1e-5).all()  # a wrong neighbour is only ever farther


def test_nn_distance_takes_a_bf16_bank_and_patches():
    patches, bank = _near_duplicates(1)
    got = nn_distance(patches.bfloat16(), bank.bfloat16())
    ref = nn_distance(patches.bfloat16().float(), bank.bfloat16().float())
    assert got.dtype == torch.float32 and torch.equal(got, ref)


@pytest.fixture(scope="module")
def untrained() -> PromptAD:
    """effnet-lite0 at 64 px with two categories; banks from its own features of random
    images (fusion and distances need no training)."""
    model = PromptAD(ModelConfig(backbone="effnet-lite0", categories=["tile", "wood"], input_size=SIZE)).eval()
    rng = np.random.default_rng(0)
    for i, cat in enumerate(model.categories):
        x = torch.from_numpy(rng.random((3, 3, SIZE, SIZE), np.float32) * (0.5 + 0.5 * i))
        with torch.no_grad():
            model.memory[cat] = build_memory(model, model.backbone(x))
    return model


def _scores_maps(fused):
    return fused.scores, fused.maps


def _components(n: int = 4, grid: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"memory": 3 + torch.rand(n, grid, grid, generator=g),
            "regional": 3 + torch.rand(n, grid // 2, grid // 2, generator=g),
            "global": 10 * torch.rand(n, generator=g),
            "head": torch.rand(n, grid, grid, generator=g),
            "text": torch.rand(n, grid, grid, generator=g),
            "image_text": torch.rand(n, generator=g)}


def test_fuse_and_blur_are_fp32_inside_autocast(untrained, monkeypatch):
    comps, cats = _components(), ["tile", "wood", "wood", "tile"]
    fusion = {"wood": {"memory": 1.0, "head": 1.0, "text": 0.5}}
    ref_s, ref_m = _scores_maps(untrained.fuse(comps, cats, fusion))
    with bf16_autocast():
        s, m = _scores_maps(untrained.fuse(comps, cats, fusion))
        blurred = gaussian_blur(ref_m, 4.0)
        naive_blur = gaussian_blur.__wrapped__(ref_m, 4.0)  # the same code without float32_math
        monkeypatch.setattr("promptad.models.model.gaussian_blur", gaussian_blur.__wrapped__)
        naive_s, naive_m = _scores_maps(PromptAD.fuse.__wrapped__(untrained, comps, cats, fusion))
    assert s.dtype == m.dtype == blurred.dtype == torch.float32
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=0)
    torch.testing.assert_close(m, ref_m, rtol=1e-5, atol=0)
    torch.testing.assert_close(blurred, gaussian_blur(ref_m, 4.0), rtol=1e-5, atol=0)
    # the test can fail: the same code under bf16 autocast convolves in bf16
    assert naive_m.dtype == torch.bfloat16 and naive_blur.dtype == torch.bfloat16
    assert not torch.allclose(naive_m.float(), ref_m, rtol=1e-3)
    assert not torch.allclose(naive_s.float(), ref_s, rtol=1e-4)


def test_half_precision_components_are_fused_in_fp32(untrained):
    comps, cats = _components(seed=1), ["tile"] * 4
    half = {k: v.half() for k, v in comps.items()}
    s, m = _scores_maps(untrained.fuse(half, cats))
    ref_s, ref_m = _scores_maps(untrained.fuse({k: v.float() for k, v in half.items()}, cats))
    assert s.dtype == m.dtype == torch.float32
    assert torch.equal(s, ref_s) and torch.equal(m, ref_m)


def test_as_float32_and_no_autocast_leave_everything_else_alone():
    x64 = torch.ones(2, dtype=torch.float64)
    out = as_float32({"a": torch.ones(2, dtype=torch.bfloat16), "b": [torch.ones(1).half(), "s"], "c": x64,
                      "d": 3, "e": ["x", "y"]})
    assert out["a"].dtype == torch.float32 and out["b"][0].dtype == torch.float32 and out["b"][1] == "s"
    assert out["c"] is x64 and out["d"] == 3 and out["e"] == ["x", "y"]
    with no_autocast():
        assert not torch.is_autocast_enabled("cpu")
    with bf16_autocast():
        with no_autocast():
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# --------------------------------------------------------------------------- non-finite outputs
def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _with_nan_bank(model: PromptAD, category: str) -> PromptAD:
    """A copy of `model` whose `category` bank has one NaN entry: every patch of that category's
    images is then NaN (the nearest-entry search propagates it), other categories are untouched."""
    import copy

    broken = copy.copy(model)
    broken.memory = dict(model.memory)
    mem = copy.copy(model.memory[category])
    entries = mem.local.entries.clone()
    entries[0, 0] = float("nan")
    mem.local = Bank(entries, mem.local.source)
    broken.memory[category] = mem
    return broken


def test_predict_rows_names_non_finite_rows_and_scores_the_rest(untrained):
    images = _images(4, 1)
    cats = np.array(["tile", "wood", "tile", "tile"], object)
    broken = _with_nan_bank(untrained, "wood")
    got = predict_rows(broken, images, cats, ["", "", "decode: truncated image data", ""])
    assert got.errors == ["", "non-finite image score (nan)", "", ""]
    ref = predict(untrained, images[[0, 3]], ["tile", "tile"])
    np.testing.assert_array_equal(got.scores[[0, 3]], ref.scores)
    np.testing.assert_array_equal(got.maps[[0, 3]], ref.maps)
    assert np.isnan(got.scores[2]) and not got.maps[2].any()  # the row that came in with an error
    fine = predict_rows(untrained, images, cats, [""] * 4)
    assert fine.errors == [""] * 4 and np.isfinite(fine.scores).all()


def test_output_problem_checks_score_and_every_map_value():
    amap = np.ones((4, 4), np.float32)
    assert output_problem(np.float32(0.3), amap) == ""
    assert output_problem(np.float32("inf"), amap) == "non-finite image score (inf)"
    amap[1, 2], amap[3, 3] = np.nan, -np.inf
    assert output_problem(np.float32(0.3), amap) == "anomaly map has non-finite values (2 of 16)"


def test_audit_scorer_uses_the_errors_predict_rows_names(monkeypatch, untrained):
    """audit's model stage reads Prediction.errors: a reason predict_rows gives becomes the
    row's `predict: ...` error entry even where audit's own check would find nothing."""
    from promptad.audit.stages import _Scorer

    n = 3

    def fake_predict_rows(model, images, categories, errors, precision="auto"):
        return Prediction(scores=np.full(n, 0.5, np.float32), maps=np.ones((n, 8, 8), np.float32),
                          errors=["", "named by predict_rows", ""])

    batch = {"image_id": np.array(["a", "b", "c"], object), "category": np.array(["tile"] * n, object),
             "error": np.array(["", "", ""], object), "height": np.full(n, 4, np.int32),
             "width": np.full(n, 6, np.int32), "input": np.zeros((n, 8, 8, 3), np.uint8)}
    scorer = _Scorer.__new__(_Scorer)
    with monkeypatch.context() as mp:
        mp.setattr("promptad.audit.stages.predict_rows", fake_predict_rows)
        scorer.model = None
        out = scorer(dict(batch))
    assert list(out["error"]) == ["", "predict: named by predict_rows", ""]
    assert out["map"][1] == b"" and len(out["map"][0]) == 4 * 4 * 6

    # and with the real predict_rows, a NaN bank makes exactly its category's row an error entry
    scorer.model = _with_nan_bank(untrained, "wood")
    real = dict(batch, category=np.array(["tile", "wood", "tile"], object),
                input=_images(n, 2))
    out = scorer(real)
    assert list(out["error"]) == ["", "predict: non-finite image score (nan)", ""]
    assert np.isfinite(out["score"][[0, 2]]).all() and len(out["map"][2]) == 4 * 4 * 6
