"""Compression: pruning (structured and unstructured); quantization lives in `distil.export`."""

from distil.compress.prune import channel_prune, magnitude_prune

COMPRESSORS = {"channels": channel_prune, "magnitude": magnitude_prune}

__all__ = ["COMPRESSORS", "channel_prune", "magnitude_prune"]
