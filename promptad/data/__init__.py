"""Data layer: where images come from and what is done to them before a model sees them (datasets
and manifests, storage local or s3://, decoding, imaging shifts, synthetic data for the demo)."""
