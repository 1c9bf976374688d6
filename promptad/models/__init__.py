"""The model's pure torch part: frozen backbones, prompts, patch and pooled features, the
PromptAD module with its scores, fp32 numerics, and the artifact it is saved as."""
