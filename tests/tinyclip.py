"""A tiny open_clip config registered at run time: the CLIP code path without downloadable weights."""
from __future__ import annotations

import copy

import torch

NAME = "promptad-tiny-test"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register() -> str:
    from open_clip import factory

    factory._MODEL_CONFIGS[NAME] = copy.deepcopy(CONFIG)
    return NAME


def write_weights(path: str, seed: int = 0) -> str:
    """Random but fixed weights saved as a local checkpoint file (what an air-gapped cluster ships)."""
    import open_clip
    from safetensors.torch import save_file

    register()
    torch.manual_seed(seed)
    model = open_clip.create_model(NAME, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path
