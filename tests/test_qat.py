"""Quantization-aware fine-tuning: the fake quantizer against the int8 formula, and the export path."""

import json

import pytest
import torch
from torch import nn

from distil.compress.qat import fake_quantize, fake_quantized


def test_signed_fake_quantization_matches_symmetric_int8_by_hand():
    x = torch.tensor([-1.0, -0.26, 0.0, 0.3, 0.5, 2.0])
    got = fake_quantize(x, x.min(), x.max(), signed=True)
    scale = 2.0 / 127  # max(|-1|, |2|) / 127
    expected = torch.clamp(torch.round(x / scale), -127, 127) * scale
    assert torch.allclose(got, expected)


def test_unsigned_fake_quantization_keeps_zero_exact_and_clips_outside_the_range():
    x = torch.tensor([0.0, 0.1, 0.77, 1.0, 3.0])
    got = fake_quantize(x, torch.tensor(0.0), torch.tensor(1.0), signed=False)
    scale = 1.0 / 255
    assert got[0] == 0.0
    assert torch.allclose(got[:4], torch.round(x[:4] / scale) * scale)
    assert torch.isclose(got[4], torch.tensor(1.0))  # clipped to the top of the range


def test_fake_quantization_passes_gradients_straight_through():
    x = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    fake_quantize(x, torch.tensor(0.0), torch.tensor(1.0), signed=False).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_fake_quantized_block_leaves_a_plain_model_with_trained_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    keys, before = set(model.state_dict()), model[0].weight.detach().clone()
    x = torch.randn(32, 4)
    with fake_quantized(model) as q:
        q.train()
        out = q(x)
        torch.optim.SGD(q.parameters(), lr=0.1).zero_grad()
        out.pow(2).mean().backward()
        with torch.no_grad():
            q[0].parametrizations.weight.original -= 0.1 * q[0].parametrizations.weight.original.grad
    assert set(model.state_dict()) == keys  # no quantizer, no parametrization left
    assert not torch.equal(model[0].weight, before)  # the fine-tuned float weights stay
    assert not model[0]._forward_pre_hooks


@pytest.mark.slow
def test_export_fine_tunes_with_fake_quantization_when_int8_loses_accuracy(tmp_path, tiny_recipe, monkeypatch):
    import distil.stages as stages
    from distil.build import load_recipe
    from distil.pipeline import run_pipeline

    tiny_recipe["export"] = {"enabled": True, "quantize": ["student"], "qat_finetune": {"epochs": 1}}
    drops = iter([0.05, 0.0])  # int8 first loses 5 points of validation accuracy, after QAT none
    real = stages._val_accuracy
    monkeypatch.setattr(stages, "_val_accuracy", lambda run, f: real(run, f) - (next(drops) if "int8" in f else 0))
    run_pipeline(load_recipe(tiny_recipe), tmp_path)
    info = json.loads((tmp_path / "export.json").read_text())["student-int8"]
    assert info["val_accuracy_drop"] > 0.01 and info["qat"]["epochs"] == 1
    assert any(json.loads(line)["stage"] == "student-qat" for line in (tmp_path / "log.jsonl").read_text().splitlines())
    assert "fine-tuned with fake quantization" in (tmp_path / "report.md").read_text()
