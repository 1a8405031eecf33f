"""ONNX export with a parity check, onnxruntime sessions, and post-training int8 quantization.

Only the model given is exported: a student's connectors live in the Distiller, never in the
student, so they cannot leak into the ONNX file.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distil.checkpoint import atomic_write
from distil.errors import DistilError


def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path, atol: float = 1e-4) -> float:
    """Export `model` (input (B, ...) with a dynamic batch axis) to `path`; return the max |logit
    difference| between onnxruntime and PyTorch on `sample`, which must be at most `atol`. Token ids
    (an integer `sample` (B, T)) get a dynamic sequence axis too."""
    model.eval()
    path = Path(path)
    axes = {0: "batch", 1: "tokens"} if not sample.is_floating_point() else {0: "batch"}

    def write(tmp: Path) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (sample[:2],), str(tmp), input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": axes, "logits": axes}, opset_version=17,
                                  dynamo=False)
        except Exception as err:  # the exporter raises several types; all mean "cannot export"
            raise DistilError(f"cannot export {type(model).__name__} to ONNX: {_operator(err)}") from err

    atomic_write(path, write)
    with torch.inference_mode():
        expected = model(sample).numpy()
    got = run_onnx(session(path), sample.numpy())
    diff = float(np.abs(got - expected).max())
    if diff > atol:
        path.unlink()
        raise DistilError(f"ONNX parity check failed for {path.name}: max |logit difference| {diff:.2e} > {atol:g}")
    return diff


def _operator(err: Exception) -> str:
    text = str(err)
    found = re.search(r"operator '?([\w:.]+)'?", text)
    if found:
        return f"operator '{found.group(1)}' is not supported by the ONNX exporter ({text.splitlines()[0]})"
    return text.splitlines()[0] if text else type(err).__name__


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(sess, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits (N, K) (or (N, T, V) for token ids, which keep their integer type) from an onnxruntime session,
    in batches."""
    x = np.ascontiguousarray(x, dtype=x.dtype if np.issubdtype(x.dtype, np.integer) else np.float32)
    return np.concatenate([sess.run(None, {"input": x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an (N, ...) array, in batches of 32."""

    def __init__(self, x: np.ndarray) -> None:
        self.batches = iter([x[i:i + 32] for i in range(0, len(x), 32)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}


def quantize_onnx(fp32_path: Path, out_path: Path, mode: str, calibration: np.ndarray | None = None,
                  per_channel: bool = False) -> None:
    """Post-training int8: `dynamic` (weights int8, activations quantized at run time) or `static`
    (QDQ, int8 weights per tensor or per channel, uint8 activations calibrated on `calibration`)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode == "static" and (calibration is None or len(calibration) == 0):
        raise DistilError("the calibration set for static quantization is empty: set export.calibration_samples "
                          "to a positive number, and check the training split is not empty")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        target = Path(tmp) / "int8.onnx"
        if mode == "static":
            quantize_static(str(prepared), str(target), _Calibration(np.asarray(calibration, dtype=np.float32)),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        elif mode == "dynamic":
            quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
        else:
            raise DistilError(f"export.quantization must be 'static', 'dynamic' or 'auto', got {mode!r}")
        atomic_write(Path(out_path), lambda tmp_out: shutil.copyfile(target, tmp_out))


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())
