"""Evaluation: accuracy, calibration, agreement with the teacher, size, MACs, latency and throughput,
for PyTorch modules and for ONNX files on onnxruntime."""

from __future__ import annotations

import gzip
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from distil.data import Split
from distil.models import count_params


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """Where `model` lives: its first parameter's (or buffer's) device, else `default` (else the CPU)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return default or torch.device("cpu")


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs for `x`, in eval mode, in chunks of `batch_size` run on the model's device.

    Each chunk moves to the model (so a model that `fit` left on a GPU is evaluated there, on CPU data);
    the result comes back on `x`'s device.
    """
    model.eval()
    where = model_device(model, x.device)
    return torch.cat([model(x[i:i + batch_size].to(where, non_blocking=True)).to(x.device)
                      for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of `model` on `split` (eval mode, no gradients)."""
    return float((predict_logits(model, split.x).argmax(1) == split.y).float().mean())


@torch.inference_mode()
def split_score(model: nn.Module, split: Split, scoring, batch_size: int = 256) -> float:
    """The task's metric of `model` on `split` (a `Scoring`: top-1 accuracy, bits per byte...): the sum over
    batches of `scoring.fn`'s (value, count), divided, run on the model's device in eval mode."""
    model.eval()
    where = model_device(model, split.x.device)
    total = count = 0.0
    for i in range(0, len(split), batch_size):
        value, n = scoring.fn(model(split.x[i:i + batch_size].to(where)), split.y[i:i + batch_size].to(where))
        total, count = total + float(value), count + float(n)
    return total / max(count, 1.0)


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width bins of max-softmax confidence
    (Guo et al. 2017)."""
    confidence, predicted = F.softmax(logits, dim=1).max(dim=1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, teacher_pred: torch.Tensor | None) -> dict:
    """accuracy, top5, per_class accuracy, agreement with the teacher's top-1, and ECE. Logits (N, K)."""
    predicted = logits.argmax(1)
    num_classes = logits.shape[1]
    top5 = logits.topk(min(5, num_classes), dim=1).indices.eq(targets[:, None]).any(1).float().mean()
    per_class = [float((predicted[targets == c] == c).float().mean()) if (targets == c).any() else None
                 for c in range(num_classes)]
    return {"accuracy": float((predicted == targets).float().mean()), "top5": float(top5), "per_class": per_class,
            "agreement": None if teacher_pred is None else float((predicted == teacher_pred).float().mean()),
            "ece": expected_calibration_error(logits, targets)}


def count_macs(model: nn.Module, sample: torch.Tensor) -> int:
    """MACs of one forward pass on `sample` (1, ...), from torch's FLOP counter (FLOPs / 2)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(sample)
    return counter.get_total_flops() // 2


def _timed_runs(forward: Callable[[], object], most: int, least: int, budget: float,
                min_seconds: float = 0.0) -> list[float]:
    """Seconds of each call of `forward`: at least `least` calls and `min_seconds`, then up to `most`
    calls while under `budget` seconds in all."""
    times: list[float] = []
    begin = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - begin
        if len(times) >= least and elapsed >= min_seconds and (len(times) >= most or elapsed >= budget):
            return times
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)


def measure_speed(forward: Callable[[object], object], one, big, batch: int, runs: int = 50,
                  repeats: int = 10, min_seconds: float = 0.25, budget: float = 3.0) -> tuple[float, float]:
    """(median batch-1 latency in ms over `runs`, median samples/s of `big`), after warm-up.

    Throughput takes at least `repeats` runs and at least `min_seconds`, so that tiny models whose
    batch takes microseconds are not measured on timer noise. A large model (a ResNet whose batch
    of 256 takes seconds on a CPU) stops each measurement after `budget` seconds, with at least 5
    latency runs and 3 throughput runs.
    """
    _timed_runs(lambda: forward(one), 10, 2, budget / 3)  # warm-up
    latencies = _timed_runs(lambda: forward(one), runs, min(runs, 5), budget)
    forward(big)
    speeds = _timed_runs(lambda: forward(big), repeats, min(repeats, 3), budget, min_seconds)
    return statistics.median(latencies) * 1000, batch / statistics.median(speeds)


def torch_speed(model: nn.Module, sample: torch.Tensor, runs: int = 50, batch: int = 256) -> tuple[float, float]:
    model.eval()
    big = sample[:1].expand(batch, *sample.shape[1:]).contiguous()
    with torch.inference_mode():
        return measure_speed(model, sample[:1], big, batch, runs)


def ort_speed(session, sample: np.ndarray, runs: int = 50, batch: int = 256) -> tuple[float, float]:
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    big = np.ascontiguousarray(np.broadcast_to(sample[:1], (batch, *sample.shape[1:])))
    return measure_speed(lambda x: session.run(None, {"input": x}), sample[:1], big, batch, runs)


def file_sizes(path: Path) -> dict:
    """Bytes on disk, and gzip-compressed (where unstructured sparsity shows)."""
    data = Path(path).read_bytes()
    return {"bytes": len(data), "bytes_gzip": len(gzip.compress(data, compresslevel=6))}


def evaluate_model(model: nn.Module, test: Split, checkpoint: Path, teacher_pred: torch.Tensor | None = None,
                   latency_runs: int = 50, throughput_batch: int = 256, device: torch.device | None = None) -> dict:
    """Metrics of a PyTorch model: classification (its predictions on `device`, default where the model
    is), size, MACs, and PyTorch speed on the CPU (where an edge model runs). The model ends where it was."""
    where = model_device(model)
    logits = predict_logits(model.to(device) if device is not None else model, test.x)
    latency, throughput = torch_speed(model.cpu(), test.x, latency_runs, throughput_batch)
    model.to(where)
    return {**classification_metrics(logits, test.y, teacher_pred),
            "params": count_params(model), "macs": count_macs(model, test.x[:1]), **file_sizes(checkpoint),
            "latency_ms_b1": latency, "throughput_b256": throughput, "runtime": "pytorch",
            "threads": torch.get_num_threads()}


def evaluate_onnx(path: Path, test: Split, teacher_pred: torch.Tensor | None = None, latency_runs: int = 50,
                  throughput_batch: int = 256) -> dict:
    """Metrics of an ONNX file on onnxruntime (all cores): classification, file size and speed."""
    from distil.export import run_onnx, session

    sess = session(path, threads=torch.get_num_threads())  # the same threads as PyTorch's measurement
    logits = torch.from_numpy(run_onnx(sess, test.x.numpy()))
    latency, throughput = ort_speed(sess, test.x.numpy(), latency_runs, throughput_batch)
    return {**classification_metrics(logits, test.y, teacher_pred), **file_sizes(path),
            "ort_latency_ms_b1": latency, "ort_throughput_b256": throughput}
