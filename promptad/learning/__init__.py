"""Training the trainable part on cached rows: the evidence head's rows (synthetic views seen
through the memory), the per-worker loop, its losses, and the feature-space anomalies of the
features head that old artifacts hold. No Ray here; fit/train.py runs it under Ray Train."""
