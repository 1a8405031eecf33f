"""Quantization-aware fine-tuning: fake int8 quantization of weights and layer inputs during a
distillation fine-tune, so that the weights settle where int8 rounding costs little.

The fake quantizers simulate what onnxruntime's static QDQ quantization does at inference
(per-tensor symmetric int8 weights, per-tensor affine uint8 inputs to every Conv/Linear). After
training they are removed, leaving a plain float model whose weights are then quantized by the
usual static export.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

QUANTIZED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def fake_quantize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, signed: bool) -> torch.Tensor:
    """Quantize-dequantize `x` to 8 bits over [low, high] with a straight-through gradient.

    Signed (weights): symmetric, scale = max(|low|, |high|) / 127, zero point 0, levels -127..127.
    Unsigned (activations): affine, scale = (high - low) / 255, zero point = round(-low / scale), 0..255.
    """
    if signed:
        scale = torch.clamp(torch.maximum(low.abs(), high.abs()) / 127.0, min=1e-8)
        zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero_point, -127, 127)
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)  # 0 must be exact
    scale = torch.clamp((high - low) / 255.0, min=1e-8)
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero_point, 0, 255)


class WeightFakeQuant(nn.Module):
    """A parametrization: the weight as int8 would store it (range = the weight's own min/max)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, weight.detach().min(), weight.detach().max(), signed=True)


class InputFakeQuant(nn.Module):
    """Fake-quantizes a layer's input to uint8 over a range tracked as an exponential moving average."""

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            low, high = x.detach().min(), x.detach().max()
            # the first batch sets the range, later ones move it; chosen on the device, without a host read
            self.low.copy_(torch.where(self.seen, self.low.lerp(low, self.momentum), low))
            self.high.copy_(torch.where(self.seen, self.high.lerp(high, self.momentum), high))
            self.seen.fill_(True)
        return fake_quantize(x, self.low, self.high, signed=False)


@contextmanager
def fake_quantized(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every Conv/Linear of `model` sees int8-rounded weights and uint8-rounded
    inputs; on exit the model is a plain float model again, holding the fine-tuned weights."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    handles = []
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant())
        layer.input_fake_quant = InputFakeQuant()
        handles.append(layer.register_forward_pre_hook(lambda mod, args: (mod.input_fake_quant(args[0]), *args[1:])))
    try:
        yield model
    finally:
        for layer, handle in zip(layers, handles):
            handle.remove()
            del layer.input_fake_quant
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
