"""The model's pure torch part: frozen backbones, prompts, patch and pooled features, the
PromptAD module with its scores and its trainable part, and the artifact it is saved as (its
fp32 islands are promptad/numerics.py, shared with memory/)."""
