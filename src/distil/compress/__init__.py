"""Compression: pruning (structured and unstructured); quantization lives in `distil.export`."""

from distil.compress.prune import channel_prune, magnitude_prune

__all__ = ["channel_prune", "magnitude_prune"]
