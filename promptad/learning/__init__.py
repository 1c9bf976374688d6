"""Training the trainable part on cached backbone features: the per-worker loop, its losses and the
feature-space synthetic anomalies it learns from. No Ray here; fit/train.py runs it under Ray Train."""
