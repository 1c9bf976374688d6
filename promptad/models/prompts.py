"""Text prompts for CLIP backbones: hand-written ensembles and the learnable prompt learner.

Normal prompts are `[ctx_1 .. ctx_n] <category>.`; anomaly prompts are built by semantic
concatenation of the same learned context and category with anomaly words
(`[ctx] <category> with <defect word>.`) or with learned anomaly tokens (`[ctx] <category> [a_1 .. a_m].`),
so normal and anomalous prompts differ only in the anomaly part (PromptAD).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

TEMPLATES = [
    "a photo of a {}.", "a cropped photo of the {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of the {} for inspection.",
    "an industrial photo of a {}.", "a low resolution photo of the {}.",
]
NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                 "{} without defect", "{} without damage"]
ANOMALY_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
# Defect words: generic ones, plus words for the categories users have told us about.
ANOMALY_WORDS = ["a defect", "a crack", "a scratch", "a hole", "contamination", "damage"]
CATEGORY_WORDS = {
    "magnetic tile": ["a blowhole", "a break", "a fray", "an uneven surface"],
    "cookie": ["a crack", "a broken edge"],
}


def category_phrase(category: str) -> str:
    """'magnetic_tile' -> 'magnetic tile': the words CLIP has seen."""
    return category.replace("_", " ").replace("-", " ").strip()


def anomaly_words(category: str) -> list[str]:
    return ANOMALY_WORDS + CATEGORY_WORDS.get(category_phrase(category), [])


@torch.no_grad()
def handcrafted_text_features(backbone, category: str) -> torch.Tensor:
    """(2, D) normalized mean embeddings of the normal and anomalous prompt ensembles."""
    name = category_phrase(category)
    out = []
    for states in (NORMAL_STATES, ANOMALY_STATES + [f"{{}} with {w}" for w in anomaly_words(category)]):
        texts = [t.format(s.format(name)) for t in TEMPLATES for s in states]
        emb = F.normalize(backbone.encode_texts(texts), dim=-1).mean(0)
        out.append(F.normalize(emb, dim=-1))
    return torch.stack(out)


class TextPromptLearner(nn.Module):
    """Learned context vectors (shared by all categories) and learned anomaly tokens.

    Sharing the context across categories keeps the number of parameters independent of how many
    categories one artifact holds; the category word in each prompt makes the features specific.
    """

    PLACEHOLDER = "X"

    def __init__(self, backbone, categories: list[str], n_ctx: int = 8, n_anomaly_ctx: int = 4):
        super().__init__()
        width = backbone.text_width
        self.n_ctx, self.n_anomaly_ctx = n_ctx, n_anomaly_ctx
        self.ctx = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        self.anomaly_ctx = nn.Parameter(torch.randn(n_anomaly_ctx, width) * 0.02)
        self._backbone = [backbone]  # not a submodule: frozen, never saved, never DDP-synchronized
        self.categories = list(categories)
        ph = self.PLACEHOLDER
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for cat in self.categories:
            name = category_phrase(cat)
            ctx = " ".join([ph] * n_ctx)
            normal = [f"{ctx} {name}."]
            anomalous = [f"{ctx} {name} with {w}." for w in anomaly_words(cat)]
            anomalous.append(f"{ctx} {name} " + " ".join([ph] * n_anomaly_ctx) + ".")
            self._tokens[cat] = (backbone.tokenize(normal), backbone.tokenize(anomalous))
        self._ph_id = int(backbone.tokenize([ph])[0, 1])

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        backbone = self._backbone[0]
        emb = backbone.token_embeddings(tokens).to(self.ctx.dtype)
        tokens = tokens.to(emb.device)
        is_ph = tokens == self._ph_id
        # The first n_ctx placeholders of each prompt are the context, the rest the anomaly tokens.
        order = is_ph.cumsum(dim=1) - 1
        learned = torch.cat([self.ctx, self.anomaly_ctx], dim=0)
        idx = order.clamp(min=0, max=learned.shape[0] - 1)
        emb = torch.where(is_ph.unsqueeze(-1), learned[idx], emb)
        return F.normalize(backbone.encode_text_embeddings(emb, tokens), dim=-1)

    def forward(self, category: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(normal prompts (1, D), anomaly prompts (K, D)) for one category, L2-normalized."""
        normal, anomalous = self._tokens[category]
        return self._encode(normal), self._encode(anomalous)
