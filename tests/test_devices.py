"""Every tensor is made where it is used: the fit, score and audit paths on a device other than the
CPU (tests/ondevice.py: meta tensors that carry data and refuse to meet CPU tensors, as CUDA does)
give what they give on the CPU, to the bit.

Before issue 37 three of these failed as a GPU run did: the coreset's random projection was made on
the CPU (test_coreset_and_bank_on_device), the Gaussian's identity too (test_gaussian_on_device),
and calibration indexed its CPU leave-one-out owners with device indices
(test_calibration_leave_one_out_on_device, test_fit_in_process_on_device).
"""
from dataclasses import asdict

import numpy as np
import pytest
import torch
from ondevice import DeviceMismatch, host, on_device

from promptad.data.synthesis import procedural_texture, synthesize_anomaly
from promptad.fit.calibrate import calibrate_category
from promptad.fit.pipeline import extract_all, fit_in_process
from promptad.learning.training import Shard, TrainConfig, make_ema, make_optimizer, train_epoch
from promptad.memory.bank import build_bank, greedy_coreset, nn_distance
from promptad.memory.gaussian import fit_gaussian, held_out_scores
from promptad.models import artifact
from promptad.models.model import ModelConfig, PromptAD
from promptad.predict import predict

SIZE = 64


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = procedural_texture(SIZE, rng)
    return np.stack([np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
                     for _ in range(n)])


def test_the_double_refuses_what_cuda_refuses():
    """The double is not a no-op: a CPU tensor meeting a device tensor raises, data still computes."""
    with on_device() as dev:
        x = torch.arange(6.0).view(2, 3).to(dev)
        assert x.device == dev and float(x.sum()) == 15.0 and int(x.argmax()) == 5
        assert float((x + torch.tensor(1.0)).sum()) == 21.0  # a 0-dim CPU scalar is fine, as on CUDA
        with pytest.raises(DeviceMismatch):
            x @ torch.ones(3, 1)
        with pytest.raises(DeviceMismatch):
            x + torch.eye(3)[:2]
        with pytest.raises(DeviceMismatch):
            torch.zeros(4)[torch.tensor([0, 1], device=dev)]
        assert torch.equal(host(torch.eye(2, device=dev) + 1), torch.eye(2) + 1)


def test_coreset_and_bank_on_device():
    """The random projection (made on the CPU from a CPU generator, so every device draws the same)
    meets the features on their device; indices and entries come back there."""
    torch.manual_seed(0)
    feats = torch.randn(6, 160, 9, 9)  # 486 patches, 160 channels: projected to 128
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 160)
    want = greedy_coreset(flat, 60, seed=3, first=(300, 40))
    bank = build_bank(feats, size=60, seed=3, draws=2, plain=4)
    with on_device() as dev:
        got = greedy_coreset(flat.to(dev), 60, seed=3, first=(300, 40))
        all_rows = greedy_coreset(flat[:50].to(dev), 60)
        on = build_bank(feats.to(dev), size=60, seed=3, draws=2, plain=4)
    assert torch.equal(host(got), want)
    assert torch.equal(host(all_rows), torch.arange(50))
    assert torch.equal(host(on.entries), bank.entries) and torch.equal(host(on.source), bank.source)


def test_nearest_neighbour_with_leave_one_out_on_device():
    torch.manual_seed(1)
    patches, bank, source = torch.randn(3, 8, 4, 5), torch.randn(40, 8), torch.arange(40) % 3
    exclude = torch.tensor([0, 2, 1])
    want = nn_distance(patches, bank, chunk=7, bank_source=source, exclude=exclude)
    with on_device() as dev:
        got = nn_distance(patches.to(dev), bank.to(dev), chunk=7, bank_source=source.to(dev),
                          exclude=exclude.to(dev))
        from_cpu = nn_distance(patches.to(dev), bank.to(dev), chunk=7, bank_source=source.to(dev), exclude=exclude)
    assert torch.equal(host(got), want) and torch.equal(host(from_cpu), want)


def test_gaussian_on_device():
    """Fit (Ledoit-Wolf and the ridge's identity), distances, nearest normals with views and
    the held-out k-fold scores, all on the features' device."""
    torch.manual_seed(2)
    pooled = [torch.randn(7, 5), torch.randn(7, 3)]
    extra = [torch.randn(7, 2, 5), torch.randn(7, 2, 3)]
    queries = [torch.randn(4, 5), torch.randn(4, 3)]
    g = fit_gaussian(pooled, extra)
    want = (g.precisions, g.score(queries), g.nearest(pooled, 3, 7, views=2, exclude_self=True),
            held_out_scores(pooled, folds=3, extra=extra))
    with on_device() as dev:
        gd = fit_gaussian([p.to(dev) for p in pooled], [e.to(dev) for e in extra])
        got = (gd.precisions, gd.score([q.to(dev) for q in queries]),
               gd.nearest([p.to(dev) for p in pooled], 3, 7, views=2, exclude_self=True),
               held_out_scores([p.to(dev) for p in pooled], folds=3, extra=[e.to(dev) for e in extra]))
    got = host(got)
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
    assert all(torch.equal(a, b) for a, b in zip(got[1:], want[1:]))


@pytest.fixture(scope="module")
def fitted() -> PromptAD:
    """An untrained effnet-lite0 model of 20 images (1280 patches: the coreset draws 1000)."""
    return fit_in_process({"tile": _images(20, 0)}, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                          TrainConfig(epochs=0), log=None)


def test_calibration_leave_one_out_on_device(fitted):
    """The model on the device, the cached features on the CPU (as the fit's calibration task gets
    them): each image scored without its own entries gives the CPU's calibration."""
    feats = extract_all(fitted, _images(20, 0))
    want = asdict(calibrate_category(fitted, "tile", feats, trained=False))
    with on_device() as dev:
        fitted.to(dev)
        try:
            got = asdict(calibrate_category(fitted, "tile", feats, trained=False))
        finally:
            fitted.to("cpu")
    assert got == want


def test_fit_memory_task_on_device(fitted):
    """The fit's Ray memory task body (stages.category_memory) moves the cached features to its
    device and builds the banks and the Gaussian there: the CPU's memory."""
    from ray.data.block import BlockAccessor

    from promptad.fit import stages

    cfg, threads = fitted.cfg.to_dict(), torch.get_num_threads()
    batch = {"idx": np.arange(20), "image": _images(20, 0), "error": np.asarray([""] * 20, dtype=object),
             "decode_s": np.zeros(20)}
    table = BlockAccessor.batch_to_block(stages.FeatureExtractor(cfg, "cpu", threads)(batch))
    picks = [(0, r) for r in range(20)]
    want, _ = stages.category_memory(cfg, 0, "cpu", threads, picks, table)
    with on_device() as dev:
        got, _ = stages.category_memory(cfg, 0, dev.type, threads, picks, table)
    want, got = artifact.memory_tensors(want), artifact.memory_tensors(got)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_predict_on_device(fitted):
    images = _images(4, 0)
    images[1] = synthesize_anomaly(images[1], np.random.default_rng(0))[0]
    want = predict(fitted, images, ["tile"] * 4)
    with on_device() as dev:
        fitted.to(dev)
        try:
            got = predict(fitted, images, ["tile"] * 4)
        finally:
            fitted.to("cpu")
    assert np.array_equal(got.scores, want.scores) and np.array_equal(got.maps, want.maps)


@pytest.mark.parametrize("head_input", ["evidence", "features"])
def test_head_training_step_on_device(head_input):
    """Two steps of the head on CPU-cached rows moved to the device per batch: evidence rows, and
    the features head's feature-space anomalies (drawn on the CPU, then moved)."""
    def run(device) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = PromptAD(ModelConfig(backbone="effnet-lite0", categories=["a"], input_size=SIZE,
                                     head_input=head_input)).to(device)
        gen = torch.Generator().manual_seed(1)
        if head_input == "evidence":
            masks = (torch.rand(8, 8, 8, generator=gen) > 0.8).float()
            shard = Shard(torch.rand(8, 2, 8, 8, generator=gen), None, ["a"] * 8, masks=masks, pos_weight=3.0)
        else:
            shard = Shard(torch.randn(8, model.local_dim, 8, 8, generator=gen), None, ["a"] * 8)
        cfg = TrainConfig(batch_size=4, precision="fp32")
        opt, sched = make_optimizer(model.trainable, cfg, 2)
        ema = make_ema(model.trainable, cfg)
        stats = train_epoch(model.trainable, shard, opt, sched, None, ema, cfg, 0, 0, 2, model.handcrafted,
                            torch.device(device))
        return {"loss": torch.tensor(stats["loss"]), **{k: v.detach() for k, v in ema.state.items()}}

    want = run("cpu")
    with on_device() as dev:
        got = run(dev)
        got = {k: v if k == "loss" else host(v) for k, v in got.items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_fit_in_process_on_device():
    """A whole in-process fit with training (memory, evidence rows, the head, calibration) on the
    device writes the CPU's artifact (fit_in_process(device="cuda") failed in calibration)."""
    images = {"tile": _images(20, 0)}
    cfg = TrainConfig(epochs=1, batch_size=8, views=8, precision="fp32")  # auto: bf16 on some CPUs only
    want = fit_in_process(images, ModelConfig(backbone="effnet-lite0", input_size=SIZE), cfg, log=None)
    with on_device() as dev:
        model = fit_in_process(images, ModelConfig(backbone="effnet-lite0", input_size=SIZE), cfg,
                               device=dev.type, log=None)
        assert model.memory["tile"].local.source.device == dev
        probe = predict(model, _images(3, 7), ["tile"] * 3)
        mem = artifact.memory_tensors(model.memory["tile"])  # copies to the CPU
        state = host(dict(model.trainable.state_dict()))
    assert all(torch.equal(v, artifact.memory_tensors(want.memory["tile"])[k]) for k, v in mem.items())
    assert all(torch.equal(v, want.trainable.state_dict()[k]) for k, v in state.items())
    assert asdict(model.calibration["tile"]) == asdict(want.calibration["tile"])
    expected = predict(want, _images(3, 7), ["tile"] * 3)  # with the trained head
    assert np.array_equal(probe.scores, expected.scores) and np.array_equal(probe.maps, expected.maps)


def test_score_audit_and_fit_actors_are_one_definition():
    """score's predictors, audit's scorers and the fit's feature actors are built from one
    ModelActors: the same flags give the same device, threads, precision, resources and restarts."""
    from promptad.actors import ModelActors
    from promptad.audit import stages as audit_stages
    from promptad.cli import build_parser

    flags = ["--actors", "3", "--cpus-per-actor", "2.5", "--gpus-per-actor", "0.5"]
    s = build_parser().parse_args(["score", "--model", "m", "--input", "i", "--output", "o", *flags])
    a = build_parser().parse_args(["audit", "--model", "m", "--data", "d", "--report", "r", *flags])
    pool = audit_stages.model_actors(a)
    assert pool == ModelActors(s.actors, s.cpus_per_actor, s.gpus_per_actor)
    assert pool.constructor_args() == {"device": "cuda", "threads": 2, "precision": "auto"}
    args = pool.pool_args()
    assert (args["num_cpus"], args["num_gpus"], args["max_restarts"], args["max_task_retries"]) == (2.5, 0.5, -1, -1)
    assert (args["compute"].min_size, args["compute"].max_size) == (3, 3)
    cpu = audit_stages.model_actors(build_parser().parse_args(["audit", "--model", "m", "--data", "d", "--report", "r"]))
    assert cpu.constructor_args() == {"device": "cpu", "threads": 1, "precision": "auto"}


def test_score_audit_and_fit_actors_on_device(fitted, tmp_path):
    """The three actor classes, built with ModelActors' arguments and a device: the CPU's output."""
    from promptad.actors import ModelActors
    from promptad.audit.stages import _Scorer
    from promptad.fit.stages import FeatureExtractor
    from promptad.score.command import Predictor

    uri = str(tmp_path / "model")
    artifact.save_artifact(fitted, uri)
    n, images = 3, _images(3, 4)
    common = {"category": np.asarray(["tile"] * n, object), "error": np.asarray([""] * n, object)}
    scored = dict(common, image=images)
    audited = dict(common, image_id=np.asarray(list("abc"), object), input=images,
                   height=np.full(n, 32, np.int32), width=np.full(n, 48, np.int32))
    extracted = {"idx": np.arange(n), "image": images, "error": common["error"], "decode_s": np.zeros(n)}
    cpu = ModelActors(1, torch.get_num_threads(), 0).constructor_args()

    def run(args: dict) -> list[np.ndarray]:
        p, s = Predictor(uri, **args)(dict(scored)), _Scorer(uri, **args)(dict(audited))
        f = FeatureExtractor(fitted.cfg.to_dict(), **args)(dict(extracted))
        return [p["score"], p["map"], s["score"], np.stack([np.frombuffer(m, np.float32) for m in s["map"]]),
                f["layer_0"], f["layer_1"]]

    want = run(cpu)
    with on_device() as dev:
        got = run({**cpu, "device": dev.type})
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
