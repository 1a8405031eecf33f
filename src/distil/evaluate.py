"""Evaluation: accuracy, calibration, agreement with the teacher, size, MACs, latency and throughput."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from distil.data import Split
from distil.models import count_params


@dataclass(frozen=True)
class ModelMetrics:
    accuracy: float  # top-1 on the test split, 0..1
    top5: float
    per_class: list[float]  # accuracy of each class
    agreement: float | None  # fraction of test samples where the top-1 equals the teacher's
    ece: float  # expected calibration error, 15 equal-width confidence bins
    params: int
    macs: int  # multiply-accumulates for one sample (torch.utils.flop_counter FLOPs / 2)
    bytes: int  # checkpoint size on disk
    latency_ms_b1: float  # median over `runs` single-sample forwards, after warm-up
    throughput_b256: float  # samples/s at batch 256, median of repeats
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of `model` on `split` (eval mode, no gradients)."""
    return float((predict_logits(model, split.x).argmax(1) == split.y).float().mean())


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width bins of max-softmax confidence (Guo et al. 2017)."""
    confidence, predicted = F.softmax(logits, dim=1).max(dim=1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


def count_macs(model: nn.Module, sample: torch.Tensor) -> int:
    """MACs of one forward pass on `sample` (1, ...), from torch's FLOP counter (FLOPs / 2)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(sample)
    return counter.get_total_flops() // 2


@torch.inference_mode()
def measure_speed(model: nn.Module, sample: torch.Tensor, runs: int = 50, batch: int = 256,
                  repeats: int = 10) -> tuple[float, float]:
    """(median batch-1 latency in ms, median samples/s at `batch`), each after warm-up."""
    model.eval()
    one = sample[:1]
    big = sample[:1].expand(batch, *sample.shape[1:]).contiguous()
    for _ in range(10):
        model(one)
    latencies = []
    for _ in range(runs):
        start = time.perf_counter()
        model(one)
        latencies.append((time.perf_counter() - start) * 1000)
    model(big)
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(big)
        speeds.append(batch / (time.perf_counter() - start))
    return statistics.median(latencies), statistics.median(speeds)


def evaluate_model(model: nn.Module, test: Split, checkpoint: Path, teacher_pred: torch.Tensor | None = None,
                   latency_runs: int = 50, throughput_batch: int = 256) -> ModelMetrics:
    logits = predict_logits(model, test.x)
    predicted = logits.argmax(1)
    num_classes = logits.shape[1]
    top5 = logits.topk(min(5, num_classes), dim=1).indices.eq(test.y[:, None]).any(1).float().mean()
    per_class = [float((predicted[test.y == c] == c).float().mean()) if (test.y == c).any() else float("nan")
                 for c in range(num_classes)]
    agreement = float((predicted == teacher_pred).float().mean()) if teacher_pred is not None else None
    latency, throughput = measure_speed(model, test.x, latency_runs, throughput_batch)
    return ModelMetrics(
        accuracy=float((predicted == test.y).float().mean()), top5=float(top5), per_class=per_class,
        agreement=agreement, ece=expected_calibration_error(logits, test.y), params=count_params(model),
        macs=count_macs(model, test.x[:1]), bytes=Path(checkpoint).stat().st_size,
        latency_ms_b1=latency, throughput_b256=throughput, threads=torch.get_num_threads())
