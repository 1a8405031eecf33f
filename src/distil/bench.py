"""`distil bench FILE`: latency and throughput of a model file on PyTorch and onnxruntime,
with one thread and with all cores."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from distil.errors import DistilError
from distil.evaluate import ort_speed, torch_speed
from distil.export import export_onnx, session
from distil.modelfile import load_model_file
from distil.models import count_params


def bench_file(path: Path, runs: int = 50, batch: int = 256) -> list[dict]:
    """Rows {runtime, threads, latency_ms_b1, throughput, params}: a `.safetensors` model file is measured
    on PyTorch and (exported to a temporary ONNX file) on onnxruntime; an `.onnx` file on onnxruntime."""
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"file not found: {path}")
    all_cores = os.cpu_count() or 1
    rows: list[dict] = []
    if path.suffix == ".onnx":
        return _bench_onnx(path, _onnx_sample(path), runs, batch, all_cores, params=None)
    if path.suffix != ".safetensors":
        raise DistilError(f"{path}: give a distil model file (.safetensors) or an ONNX file (.onnx)")
    model, meta = load_model_file(path)
    sample = torch.randn(batch, *meta["input_shape"])
    params = count_params(model)
    previous = torch.get_num_threads()
    try:
        for threads in sorted({1, all_cores}):
            torch.set_num_threads(threads)
            latency, throughput = torch_speed(model, sample, runs, batch)
            rows.append({"runtime": "pytorch", "threads": threads, "latency_ms_b1": latency,
                         "throughput": throughput, "params": params})
    finally:
        torch.set_num_threads(previous)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, sample[:64], onnx_path)
        rows += _bench_onnx(onnx_path, sample.numpy(), runs, batch, all_cores, params)
    return rows


def _bench_onnx(path: Path, sample: np.ndarray, runs: int, batch: int, all_cores: int, params) -> list[dict]:
    rows = []
    for threads in sorted({1, all_cores}):
        latency, throughput = ort_speed(session(path, threads), sample, runs, batch)
        rows.append({"runtime": "onnxruntime", "threads": threads, "latency_ms_b1": latency,
                     "throughput": throughput, "params": params})
    return rows


def _onnx_sample(path: Path) -> np.ndarray:
    """A random input shaped like the file's input, batch 1 (dynamic dims other than batch are an error)."""
    shape = session(path).get_inputs()[0].shape[1:]
    if not all(isinstance(d, int) for d in shape):
        raise DistilError(f"{path}: input shape {shape} has dynamic dimensions besides the batch; cannot benchmark")
    return np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
