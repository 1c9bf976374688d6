"""Metrics of detection quality: exact image-level ones (image.py), streamed pixel-level ones
(pixel.py). Plain numpy."""
