"""ONNX export (parity, dynamic batch, no connectors), int8 quantization (agreement), bench."""

import numpy as np
import pytest
import torch
from torch import nn

from distil import CE, KD, Batch, ClassificationTask, Distiller, FitNet, TrainConfig, fit
from distil.bench import bench_file
from distil.data import load_splits
from distil.errors import DistilError
from distil.export import export_onnx, quantize_onnx, run_onnx, session
from distil.modelfile import save_model_file
from distil.models import build_model


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", {}, seed=0)


@pytest.fixture(scope="module")
def trained_cnn(digits):
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, width=8, depth=2)
    fit(ClassificationTask(model), digits.train, None, TrainConfig(epochs=4, batch_size=64, lr=0.01))
    return model.eval()


@pytest.mark.parametrize("name,shape", [("cnn", (1, 8, 8)), ("cnn1d", (1, 40)), ("mlp", (7,)),
                                        ("resnet8", (3, 16, 16))])
def test_onnx_matches_pytorch_at_any_batch_size(tmp_path, name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 4).eval()
    diff = export_onnx(model, torch.randn(16, *shape), tmp_path / "m.onnx")
    assert diff <= 1e-4
    sess = session(tmp_path / "m.onnx")
    for batch in (1, 3, 37):
        x = torch.randn(batch, *shape)
        got = run_onnx(sess, x.numpy())
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)


def test_connectors_are_not_exported(tmp_path):
    student = build_model("cnn", (1, 8, 8), 10, width=4, depth=2)
    teacher = build_model("cnn", (1, 8, 8), 10, width=8, depth=2)
    distiller = Distiller(student, teacher, [KD(), CE(), FitNet(student="layer2", teacher="layer2")])
    distiller.prepare(Batch(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)))
    assert sum(p.numel() for p in distiller.terms.parameters()) > 0  # a real connector exists
    export_onnx(student.eval(), torch.randn(4, 1, 8, 8), tmp_path / "s.onnx")
    import onnx

    stored = sum(int(np.prod(t.dims)) for t in onnx.load(tmp_path / "s.onnx").graph.initializer)
    # BN folds into the convs, so the file holds at most the student's own parameters
    assert stored <= sum(p.numel() for p in student.parameters())


class Unexportable(nn.Module):
    def forward(self, x):
        return torch.special.zeta(x.flatten(1), 2.0 * torch.ones_like(x.flatten(1)))


def test_a_model_that_cannot_be_exported_names_the_operator(tmp_path):
    with pytest.raises(DistilError, match=r"cannot export Unexportable to ONNX: operator '.*zeta'"):
        export_onnx(Unexportable(), torch.randn(2, 3), tmp_path / "u.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing written half-way


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_agrees_with_fp32(tmp_path, digits, trained_cnn, mode):
    export_onnx(trained_cnn, digits.test.x[:64], tmp_path / "m.onnx")
    quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", mode, digits.train.x[:256].numpy())
    fp32 = run_onnx(session(tmp_path / "m.onnx"), digits.test.x.numpy()).argmax(1)
    int8 = run_onnx(session(tmp_path / "q.onnx"), digits.test.x.numpy()).argmax(1)
    assert (fp32 == int8).mean() >= 0.95
    import onnx

    weights = max(onnx.load(tmp_path / "q.onnx").graph.initializer, key=lambda t: int(np.prod(t.dims)))
    assert weights.data_type == onnx.TensorProto.INT8  # the conv weights are stored as int8


def test_empty_calibration_set_is_refused(tmp_path, trained_cnn):
    export_onnx(trained_cnn, torch.randn(8, 1, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(DistilError, match="calibration set for static quantization is empty"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", "static", np.zeros((0, 1, 8, 8), np.float32))
    assert not (tmp_path / "q.onnx").exists()


def test_bench_measures_both_runtimes_with_one_and_all_threads(tmp_path, trained_cnn):
    spec = {"model": "cnn", "knobs": {"width": 8, "depth": 2}, "input_shape": [1, 8, 8], "num_classes": 10}
    save_model_file(trained_cnn, tmp_path / "m.safetensors", spec)
    rows = bench_file(tmp_path / "m.safetensors", runs=50, batch=32)
    import os

    threads = sorted({1, os.cpu_count()})
    assert [(r["runtime"], r["threads"]) for r in rows] == [("pytorch", t) for t in threads] + [
        ("onnxruntime", t) for t in threads]
    assert all(r["latency_ms_b1"] > 0 and r["throughput"] > 0 for r in rows)
    export_onnx(trained_cnn, torch.randn(8, 1, 8, 8), tmp_path / "m.onnx")
    assert [r["runtime"] for r in bench_file(tmp_path / "m.onnx", batch=32)] == ["onnxruntime"] * len(threads)
    with pytest.raises(DistilError, match="file not found"):
        bench_file(tmp_path / "nope.onnx")
