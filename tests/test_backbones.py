import time

import pytest
import tinyclip
import torch

from promptad.errors import UserError
from promptad.models.backbones import create_backbone, parse_spec


@pytest.mark.parametrize("name,size,channels", [("effnet-lite0", 256, [40, 112]), ("effnet-lite2", 288, [48, 120])])
def test_effnet_features_are_dense_multilayer(name, size, channels):
    bb = create_backbone(name)
    assert bb.input_size == size and bb.channels == channels and not bb.has_text
    assert len(bb.weight_sha256) == 64
    feats = bb(torch.rand(2, 3, size, size))
    assert [tuple(t.shape) for t in feats.layers] == [(2, channels[0], size // 8, size // 8),
                                                      (2, channels[1], size // 16, size // 16)]
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training, "a frozen backbone stays in eval mode"


def test_effnet_pretrained_weights_respond_to_content():
    """ImageNet weights (not random): a textured image and a flat one give very different features."""
    bb = create_backbone("effnet-lite0")
    flat = torch.full((1, 3, 256, 256), 0.5)
    stripes = flat.clone()
    stripes[..., ::8, :] = 1.0
    f_flat, f_str = bb(flat).layers[1], bb(stripes).layers[1]
    assert (f_str - f_flat).abs().mean() > 0.1 * f_flat.abs().mean()


def test_effnet_checks_expected_sha():
    with pytest.raises(UserError, match="sha256"):
        create_backbone("effnet-lite0", expected_sha256="0" * 64)


def test_spec_parsing_and_bad_specs():
    assert parse_spec("clip:ViT-B-32:openai") == ("clip", "ViT-B-32", "openai")
    assert parse_spec("clip:ViT-B-32:s3://b/k/w.bin") == ("clip", "ViT-B-32", "s3://b/k/w.bin")
    assert parse_spec("effnet-lite2") == ("effnet-lite2", None, None)
    for bad in ["resnet50", "clip:", "clip::openai"]:
        with pytest.raises(UserError):
            parse_spec(bad)


def test_clip_dense_tokens_text_space_and_vision_prompts():
    tinyclip.register()
    bb = create_backbone(f"clip:{tinyclip.NAME}:")
    assert bb.has_text and bb.embed_dim == 32 and bb.input_size == 64
    assert max(bb.layers) == 1, "memory layers end before the last of the 3 blocks"
    x = torch.rand(2, 3, 64, 64)
    f = bb(x)
    assert len(f.layers) == len(bb.layers) and all(t.shape == (2, 64, 8, 8) for t in f.layers)
    assert f.tokens.shape == (2, 65, 64), "the last block's input: class token + 8x8 patches"
    patch, image = bb.joint(f.tokens)
    assert patch.shape == (2, 32, 8, 8) and image.shape == (2, 32)
    prompts = torch.zeros(4, 64, requires_grad=True)
    g_patch, _ = bb.joint(f.tokens, prompts)
    assert g_patch.shape == (2, 32, 8, 8), "prompt tokens are removed from the patch grid"
    g_patch.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0, "vision prompts get gradients"
    assert not (g_patch - patch).abs().max() == 0
    again = bb(x)
    assert all(torch.equal(a, b) for a, b in zip(f.layers, again.layers)), "memory features never see prompts"
    t = bb.encode_texts(["a photo of a tile.", "a photo of a damaged tile."])
    assert t.shape == (2, 32)


def test_clip_vv_patch_tokens_are_local():
    """v-v attention: patch tokens depend mostly on their own patch, unlike plain q-k attention."""
    tinyclip.register()
    bb = create_backbone(f"clip:{tinyclip.NAME}:")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    y = x.clone()
    y[..., :8, :8] = 1 - y[..., :8, :8]  # change one patch
    a, b = bb.joint(bb(x).tokens)[0][0], bb.joint(bb(y).tokens)[0][0]
    change = (a - b).norm(dim=0)
    assert change[0, 0] == change.max()


def test_clip_local_weight_file_and_sha(tmp_path):
    path = tinyclip.write_weights(str(tmp_path / "tiny.safetensors"))
    a = create_backbone(f"clip:{tinyclip.NAME}:{path}")
    b = create_backbone(f"clip:{tinyclip.NAME}:{path}")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(a.joint(a(x).tokens)[0], b.joint(b(x).tokens)[0]), "same file, same features"
    assert a.weight_sha256 and a.weight_sha256 == b.weight_sha256
    with pytest.raises(UserError, match="sha256"):
        create_backbone(f"clip:{tinyclip.NAME}:{path}", expected_sha256="f" * 64)


def test_clip_weight_file_from_s3(tmp_path, s3_bucket):
    from promptad.data import storage

    path = tinyclip.write_weights(str(tmp_path / "tiny.safetensors"))
    uri = f"{s3_bucket}/models/tiny.safetensors"
    storage.write_bytes(uri, open(path, "rb").read())
    bb = create_backbone(f"clip:{tinyclip.NAME}:{uri}")
    assert bb.weight_sha256 == storage.sha256_file(path)


def test_unreachable_hub_and_missing_file_are_one_line_errors_within_60s(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        create_backbone("clip:ViT-B-32:openai")
    assert time.monotonic() - start < 60
    msg = str(e.value)
    assert "\n" not in msg and "effnet-lite0" in msg and "local" in msg
    with pytest.raises(UserError) as e:
        create_backbone(f"clip:ViT-B-32:{tmp_path / 'nope.bin'}")
    assert "not found" in str(e.value) and "effnet-lite0" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="unknown open_clip model"):
        create_backbone("clip:NoSuchModel:openai")
