"""Hugging Face causal language models (`hf:/path`) as teacher and student: tiny random-weight GPT-2s built from a
config and written with `save_pretrained` (no download). Skipped when transformers is not installed."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from distil import CE, KD, Distiller, FitNet, TrainConfig, fit
from distil.checkpoint import load_weights, save_model
from distil.data import Split
from distil.distiller import BITS_PER_BYTE
from distil.errors import ModelError
from distil.models import build_model
from distil.models.gpt import generate
from distil.text import blocks, encode

transformers = pytest.importorskip("transformers")

BLOCK = 16


def tiny_gpt2(folder, vocab: int = 256, layers: int = 1, width: int = 16, seed: int = 0) -> str:
    """A random-weight GPT-2 saved to `folder`; returns its `hf:` model spec."""
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(folder))
    return f"hf:{folder}"


def byte_split(n_blocks: int = 32) -> Split:
    """`n_blocks` blocks of BLOCK bytes of a repetitive text, each target the next byte."""
    text = "def f(x):\n    return x + 1\n" * (n_blocks * BLOCK // 27 + 2)
    x, y = blocks(np.frombuffer(text.encode(), dtype=np.uint8), block=BLOCK)
    return Split(x[:n_blocks], y[:n_blocks])


def test_an_hf_model_maps_tokens_to_logits_and_keeps_its_module_names(tmp_path):
    model = build_model(tiny_gpt2(tmp_path / "m", layers=2), (BLOCK,), 256).eval()
    tokens = torch.randint(0, 256, (2, BLOCK))
    with torch.no_grad():
        logits = model(tokens)
        assert torch.allclose(logits, model.model(tokens).logits, atol=1e-6)  # the Hugging Face model's own
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, BLOCK, 256) and logits.dtype == torch.float32
    names = dict(model.named_modules())
    assert "model.transformer.h.0" in names and "model.transformer.h.1" in names
    assert model.block == 32
    out = generate(model, encode("ab")[None], 40, temperature=0)  # longer than the context: cropped as it grows
    assert out.shape == (1, 42)
    with pytest.raises(ModelError, match="longer than the model's context"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_a_gpt2_teacher_and_student_run_one_distill_epoch(tmp_path):
    teacher = build_model(tiny_gpt2(tmp_path / "t", layers=2, width=32, seed=1), (BLOCK,), 256)
    student = build_model(tiny_gpt2(tmp_path / "s", layers=1, width=32, seed=2), (BLOCK,), 256)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    terms = [KD(T=1, weight=0.5), CE(weight=0.5),
             FitNet(student="model.transformer.h.0", teacher="model.transformer.h.1", weight=0.1)]
    distiller = Distiller(student, teacher, terms, scoring=BITS_PER_BYTE)
    split = byte_split()
    result = fit(distiller, split, split, TrainConfig(epochs=1, batch_size=8, lr=1e-3), device="cpu")
    (record,) = result.history
    parts = record["parts"]
    assert set(parts) == {"kd", "ce", "fitnet:model.transformer.h.0->model.transformer.h.1"}, record
    assert all(math.isfinite(v) for v in [record["loss"], *parts.values()]), record
    assert 0 < record["val_bpb"] < 9  # about 8 bits (uniform over bytes) for an untrained model
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())


def test_a_vocabulary_mismatch_names_both_sizes(tmp_path):
    spec = tiny_gpt2(tmp_path / "m", vocab=300)
    with pytest.raises(ModelError, match=r"vocabulary of 300 tokens, but the data's is 256.*cross-tokenizer"):
        build_model(spec, (BLOCK,), 256)


def test_a_missing_folder_or_a_long_block_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ModelError, match=r"no config.json there\). Check the path"):
        build_model(f"hf:{tmp_path / 'nowhere'}", (BLOCK,), 256)
    spec = tiny_gpt2(tmp_path / "m")
    with pytest.raises(ModelError, match="takes at most 32 tokens, but the data's blocks have 64"):
        build_model(spec, (64,), 256)
    with pytest.raises(ModelError, match=r"takes token sequences, input shape \(T,\)"):
        build_model(spec, (3, 8, 8), 256)


def test_missing_transformers_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ModelError, match=r"pip install 'distil\[hf\]'"):
        build_model(f"hf:{tmp_path}", (BLOCK,), 256)


def test_an_hf_model_round_trips_through_safetensors(tmp_path):
    spec = tiny_gpt2(tmp_path / "m")
    model = build_model(spec, (BLOCK,), 256)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # no longer the weights in the folder
    save_model(model, tmp_path / "m.safetensors")
    other = load_weights(build_model(spec, (BLOCK,), 256), tmp_path / "m.safetensors")
    tokens = torch.randint(0, 256, (2, BLOCK))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), other.eval()(tokens))
    assert other.model.lm_head.weight is other.model.transformer.wte.weight  # still tied after a strict load


def test_an_hf_student_exports_to_onnx_with_a_dynamic_sequence_axis(tmp_path):
    from distil.export import export_onnx, run_onnx, session

    model = build_model(tiny_gpt2(tmp_path / "m"), (BLOCK,), 256).eval()
    assert export_onnx(model, torch.randint(0, 256, (2, BLOCK)), tmp_path / "m.onnx") <= 1e-4
    shorter = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        expected = model(shorter).numpy()
    assert np.abs(run_onnx(session(tmp_path / "m.onnx"), shorter.numpy()) - expected).max() < 1e-4


@pytest.mark.slow
def test_the_pipeline_distils_an_hf_teacher_into_an_hf_student(tmp_path):
    """teacher, baseline and student on a tiny text folder; the report stage rebuilds each from its hf: spec, and the
    student exports to ONNX (fp32 and dynamic int8)."""
    from distil.build import load_recipe
    from distil.pipeline import run_pipeline

    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.txt").write_text(f"def function_{i}(x):\n    return x * {i}\n" * 60)
    small = {"train": {"epochs": 1, "batch_size": 16, "lr": 0.003}}
    recipe = load_recipe({
        "name": "tinyhf", "data": {"source": "textfolder", "args": {"path": str(corpus), "block": BLOCK},
                                   "val_fraction": 0.2, "test_fraction": 0.2},
        "teacher": {"model": tiny_gpt2(tmp_path / "t", layers=2, width=32), **small},
        "student": {"model": tiny_gpt2(tmp_path / "s", layers=1, width=16), **small},
        "distill": {"terms": [{"kind": "kd", "T": 1.0, "weight": 0.5}, {"kind": "ce", "weight": 0.5}]},
        "export": {"enabled": True}})
    run_pipeline(recipe, tmp_path / "run")
    models = json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]
    assert set(models) == {"teacher", "baseline", "student", "student (onnx)", "student-int8"}
    assert all(0 < m["bpb"] < 9 for m in models.values())
    assert abs(models["student (onnx)"]["bpb"] - models["student"]["bpb"]) < 1e-3  # the same model, exported
    assert "## Samples" in (tmp_path / "run" / "report.md").read_text()


def test_a_pretrained_hf_teacher_is_used_as_loaded_not_trained(tmp_path):
    from distil.build import load_recipe
    from distil.modelfile import load_model_file
    from distil.pipeline import run_pipeline

    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.txt").write_text(f"x = {i}\n" * 80)
    spec = tiny_gpt2(tmp_path / "t", layers=1, width=16, seed=3)
    small = {"train": {"epochs": 1, "batch_size": 16, "lr": 0.01}}
    recipe = load_recipe({
        "name": "pretrained", "data": {"source": "textfolder", "args": {"path": str(corpus), "block": BLOCK},
                                       "val_fraction": 0.25, "test_fraction": 0.25},
        "teacher": {"model": spec, "pretrained": True, **small}, "student": {"model": "gpt", "width": 16, **small},
        "distill": {"terms": [{"kind": "kd", "T": 1.0, "weight": 0.5}, {"kind": "ce", "weight": 0.5}]}})
    run_pipeline(recipe, tmp_path / "run")
    saved, _ = load_model_file(tmp_path / "run" / "teacher.safetensors")
    loaded = build_model(spec, (BLOCK,), 256)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))  # the weights as loaded: no training step
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"stage": "teacher"' not in log  # no teacher epoch was logged


@pytest.mark.parametrize("section,message", [
    ({"teacher": {"model": "cnn1d", "pretrained": True}}, "teacher.pretrained: 'cnn1d' is a distil zoo model"),
    ({"student": {"model": "mlp", "pretrained": True}}, "student.pretrained: only a teacher can skip training"),
    ({"teacher": {"model": "pkg.mod:make", "pretrained": True, "checkpoint": "t.safetensors"}},
     "teacher: give pretrained: true or a checkpoint, not both"),
])
def test_pretrained_misuse_names_the_field(section, message):
    from distil.build import check_pretrained
    from distil.errors import RecipeError
    from distil.recipe import parse_recipe

    recipe = parse_recipe(section)
    where = next(iter(section))
    with pytest.raises(RecipeError, match=message):
        check_pretrained(getattr(recipe, where), where)
