"""Language models: the byte-level corpus, the GPT zoo model, bits per byte, generation and the pipeline."""

import json
import math

import pytest
import torch
from torch.nn import functional as F

from distil.checkpoint import load_weights, save_model
from distil.data import Split, load_splits
from distil.distiller import BITS_PER_BYTE, ClassificationTask, bits_score
from distil.errors import ConfigError, DataError, ModelError
from distil.models import build_model
from distil.models.gpt import generate
from distil.text import blocks, decode, encode, pycorpus, split_files, textfolder


def write_corpus(folder, files: int = 6, size: int = 3000):
    """Small text files of distinct, learnable content (each repeats its own phrase)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        phrase = f"def function_{i}(x):\n    return x * {i} + {i}\n"
        (folder / f"file{i}.txt").write_text(phrase * (size // len(phrase)))
    return folder


def test_blocks_are_inputs_and_the_next_bytes():
    data = torch.arange(10, dtype=torch.uint8).numpy()
    x, y = blocks(data, block=4)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # windows of 5 bytes, 4 apart: 0..4, 4..8
    assert y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert x.dtype == y.dtype == torch.long
    with pytest.raises(DataError, match="fewer than one block of 16"):
        blocks(data, block=16)


def test_files_go_to_one_split_each_and_budgets_hold(tmp_path):
    text = textfolder(str(write_corpus(tmp_path / "texts", files=10)), block=32, train_bytes=5000, eval_bytes=2000)
    corpus = split_files(text, seed=0, val_fraction=0.2, test_fraction=0.2)
    train, val, test = (set(corpus.files[s]) for s in ("train", "val", "test"))
    assert train and val and test and not (train & val or train & test or val & test)
    assert len(corpus.train) <= 5000 and len(corpus.val) <= 2000 and len(corpus.test) <= 2000
    again = split_files(text, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert again.files == corpus.files  # deterministic from the seed


def test_text_source_errors_name_the_field(tmp_path):
    with pytest.raises(DataError, match="data.args.path: '.*nowhere' is not a folder"):
        textfolder(str(tmp_path / "nowhere"))
    write_corpus(tmp_path / "two", files=2)
    with pytest.raises(DataError, match="found 2 non-empty file"):
        textfolder(str(tmp_path / "two"))
    with pytest.raises(DataError, match="data.args.block must be at least 2"):
        textfolder(str(write_corpus(tmp_path / "t")), block=1)


def test_pycorpus_reads_the_standard_library_without_its_tests():
    text = pycorpus()
    parts = {p for f in text.files for p in f.relative_to(text.root).parts[:-1]}
    assert len(text.files) > 100 and "test" not in parts and "site-packages" not in parts
    assert any(f.name == "functools.py" for f in text.files)


def test_load_splits_gives_language_model_blocks(tmp_path):
    splits = load_splits("textfolder", {"path": str(write_corpus(tmp_path / "t")), "block": 16})
    assert splits.task == "lm" and splits.num_classes == 256 and splits.input_shape == (16,)
    assert splits.train.x.shape[1:] == splits.train.y.shape[1:] == (16,)
    assert torch.equal(splits.train.x[:, 1:], splits.train.y[:, :-1])
    assert decode(encode("héllo")) == "héllo"


def test_gpt_is_causal_and_ties_its_output_to_the_embedding():
    torch.manual_seed(0)
    model = build_model("gpt", (12,), 256, width=32, depth=2, heads=4).eval()
    assert model.head.weight is model.embed.weight
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256  # change the future only
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 12, 256)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)  # positions before 8 cannot see tokens 8..
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    with pytest.raises(ModelError, match="longer than the model's context"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ModelError, match="gpt takes token sequences"):
        build_model("gpt", (3, 8, 8), 10)


def test_gpt_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = build_model("gpt", (8,), 256, width=16, depth=1, heads=2)
    save_model(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    other = load_weights(build_model("gpt", (8,), 256, width=16, depth=1, heads=2), tmp_path / "m.safetensors")
    tokens = torch.randint(0, 256, (1, 8))
    assert torch.equal(model(tokens), other(tokens)) and other.head.weight is other.embed.weight


def test_bits_score_against_hand_computation():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # (1, 2, 2): p(1) = 3/4, then uniform
    targets = torch.tensor([[1, -1]])  # the second position is padding
    bits, count = bits_score(logits, targets)
    assert count == 1 and math.isclose(float(bits), -math.log2(0.75), rel_tol=1e-6)
    targets = torch.tensor([[0, 1]])
    bits, count = bits_score(logits, targets)
    assert count == 2 and math.isclose(float(bits), -math.log2(0.25) + 1.0, rel_tol=1e-6)


def test_generate_extends_the_prompt_and_greedy_is_deterministic():
    torch.manual_seed(0)
    model = build_model("gpt", (6,), 256, width=16, depth=1, heads=2)
    prompt = encode("ab")[None]
    out = generate(model, prompt, 10, temperature=0)
    assert out.shape == (1, 12) and torch.equal(out[:, :2], prompt)  # context cropped to 6 as it grows
    assert torch.equal(out, generate(model, prompt, 10, temperature=0))
    assert model.training  # the mode is given back


def test_a_language_model_learns_its_corpus_in_bits_per_byte(tmp_path):
    """Fit on a repetitive corpus: validation bits per byte falls, far below the 8 of a uniform guess."""
    from distil import TrainConfig, fit

    splits = load_splits("textfolder", {"path": str(write_corpus(tmp_path / "t")), "block": 32})
    torch.manual_seed(0)
    model = build_model("gpt", (32,), 256, width=32, depth=1, heads=2)
    task = ClassificationTask(model, scoring=BITS_PER_BYTE)
    result = fit(task, splits.train, splits.val, TrainConfig(epochs=4, batch_size=16, lr=3e-3), device="cpu")
    assert task.metric == "bpb" and not task.higher_is_better
    curve = [record["val_bpb"] for record in result.history]
    assert curve[-1] < curve[0] and curve[-1] < 5.0, curve
    with torch.no_grad():
        expected = F.cross_entropy(model(splits.val.x[:4]).flatten(0, 1), splits.val.y[:4].flatten()) / math.log(2)
        bits, count = task.score(type("B", (), {"inputs": splits.val.x[:4], "targets": splits.val.y[:4]})())
    assert math.isclose(float(bits / count), float(expected), rel_tol=1e-5)


@pytest.mark.slow
def test_the_pipeline_runs_a_language_model_recipe(tmp_path):
    """teacher, baseline and student on a tiny text folder; the report has bits per byte and text samples."""
    from distil.build import load_recipe
    from distil.pipeline import run_pipeline

    corpus = write_corpus(tmp_path / "t", files=6, size=4000)
    small = {"train": {"epochs": 1, "batch_size": 16, "lr": 0.003}}
    recipe = load_recipe({
        "name": "tinylm", "data": {"source": "textfolder", "args": {"path": str(corpus), "block": 32},
                                   "val_fraction": 0.2, "test_fraction": 0.2},
        "teacher": {"model": "gpt", "width": 32, "depth": 2, "heads": 2, **small},
        "student": {"model": "gpt", "width": 16, "depth": 1, "heads": 2, **small},
        "distill": {"terms": [{"kind": "ce", "weight": 1.0}]}, "export": {"enabled": True}})
    run_pipeline(recipe, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    models = metrics["models"]
    assert metrics["task"] == "lm"
    assert set(models) == {"teacher", "baseline", "student", "student (onnx)", "student-int8"}
    assert all(0 < m["bpb"] < 8.5 and m["gen_tokens_per_s_b1"] > 0 for m in models.values())
    assert abs(models["student (onnx)"]["bpb"] - models["student"]["bpb"]) < 1e-3  # the same model, exported
    assert models["student-int8"]["bytes"] < models["student (onnx)"]["bytes"]
    assert models["student-int8"]["runtime"] == "onnxruntime"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "test bits/byte" in report and "## Samples" in report and report.count("```python") == 3
    assert "dynamic int8" in report


def test_a_model_that_is_not_a_language_model_is_refused_for_text(tmp_path, monkeypatch):
    from distil.build import load_recipe
    from distil.pipeline import run_pipeline

    recipe = load_recipe({
        "name": "wrong", "data": {"source": "textfolder", "args": {"path": str(write_corpus(tmp_path / "t")),
                                                                    "block": 16}},
        "teacher": {"model": "mlp"}, "student": {"model": "gpt", "width": 16, "depth": 1, "heads": 2}})
    with pytest.raises(ModelError, match=r"the teacher \(mlp\) fails on inputs of shape \[2, 16\].*use a language "):
        run_pipeline(recipe, tmp_path / "run")
    (tmp_path / "bagofbytes.py").write_text(
        "from torch import nn\n"
        "def bag(input_shape, num_classes):  # one prediction per sequence, not one per token\n"
        "    return nn.Sequential(nn.Embedding(num_classes, 4), nn.Flatten(), nn.Linear(4 * input_shape[0], "
        "num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    teacher = {"model": "bagofbytes:bag"}
    recipe = load_recipe({**recipe.model_dump(exclude_unset=True), "teacher": teacher})
    with pytest.raises(ModelError, match=r"must give \(batch, tokens, vocabulary\) = \[2, 16, 256\]"):
        run_pipeline(recipe, tmp_path / "run")


def test_per_token_teacher_logits_are_cached_as_top_k_and_unpacked_per_batch(tmp_path):
    """Full per-token logits stay online (too large); top-k is stored packed (N, T, 2k+1); with k = V the loss
    equals the online teacher's exactly."""
    from distil import CE, KD, Distiller
    from distil.batches import Batch
    from distil.cache import TeacherCache

    splits = load_splits("textfolder", {"path": str(write_corpus(tmp_path / "t")), "block": 8})
    torch.manual_seed(0)
    teacher = build_model("gpt", (8,), 256, width=16, depth=1, heads=2)
    student = build_model("gpt", (8,), 256, width=8, depth=1, heads=2)
    distiller = Distiller(student, teacher, [KD(T=2, weight=0.5), CE(weight=0.5)], scoring=BITS_PER_BYTE)
    train = splits.train
    assert distiller.with_teacher_logits(train) is train  # nothing precomputed
    assert distiller.cache_events["teacher"]["status"] == "online"
    assert "distill.top_k would store" in distiller.cache_events["teacher"]["reason"]
    packed = distiller.with_teacher_logits(train, cache=TeacherCache(tmp_path / "cache"), top_k=256)
    assert packed.teacher_logits["teacher"].shape == (len(train), 8, 2 * 256 + 1)
    index = torch.arange(4)
    online = distiller(Batch(train.x[:4], train.y[:4], index))
    cached = distiller(Batch(train.x[:4], train.y[:4], index,
                             teacher_logits={"teacher": packed.teacher_logits["teacher"][:4]}))
    assert torch.allclose(online.loss, cached.loss, atol=1e-5)
    small = distiller.with_teacher_logits(train, top_k=4)
    assert small.teacher_logits["teacher"].shape == (len(train), 8, 9)
    approximate = distiller(Batch(train.x[:4], train.y[:4], index,
                                  teacher_logits={"teacher": small.teacher_logits["teacher"][:4]}))
    assert approximate.loss.isfinite() and not torch.allclose(approximate.loss, online.loss)
    other = Distiller(student, teacher, [KD(T=2, weight=1.0)], scoring=BITS_PER_BYTE)  # did not pack them
    with pytest.raises(DataError, match="hold 9 values per position, the student's vocabulary 256: they are top-k"):
        other(Batch(train.x[:4], train.y[:4], index, teacher_logits={"teacher": small.teacher_logits["teacher"][:4]}))


def test_on_policy_steps_train_on_the_students_own_text_with_the_prompt_masked(tmp_path):
    from distil import TrainConfig, fit
    from distil.batches import Batch, Progress
    from distil.distiller import Distiller
    from distil.losses import JSD
    from distil.losses.token import jsd_loss
    from distil.onpolicy import OnPolicyDistiller

    splits = load_splits("textfolder", {"path": str(write_corpus(tmp_path / "t")), "block": 12})
    torch.manual_seed(0)
    teacher = build_model("gpt", (12,), 256, width=16, depth=1, heads=2)
    student = build_model("gpt", (12,), 256, width=8, depth=1, heads=2)
    task = OnPolicyDistiller(Distiller(student, teacher, [JSD(beta=0.5)], scoring=BITS_PER_BYTE),
                             fraction=0.5, prompt=4, seed=3)
    batch = Batch(splits.train.x[:3], splits.train.y[:3], torch.arange(3))
    rolled = task.rollout(batch, step=7)
    assert torch.equal(rolled.inputs[:, :4], batch.inputs[:, :4])  # the prompt is the corpus's
    assert (rolled.targets == -1).all()  # no ground truth for generated text
    assert rolled.mask[0].tolist() == [False] * 3 + [True] * 9  # positions 3.. predict the generated tokens
    assert torch.equal(rolled.inputs, task.rollout(batch, step=7).inputs)  # seeded by the step: resumable
    steps = [task.on_policy(s) for s in range(200)]
    assert 70 < sum(steps) < 130 and steps == [task.on_policy(s) for s in range(200)]
    # the loss of an on-policy step is the divergence on the generated positions only
    out = task.distiller(rolled, Progress())
    with torch.no_grad():
        expected = jsd_loss(student(rolled.inputs), teacher(rolled.inputs), rolled.mask, 1.0, 0.5)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    before = [p.clone() for p in student.parameters()]
    result = fit(task, splits.train, splits.val, TrainConfig(epochs=1, batch_size=8, lr=3e-3), device="cpu")
    assert math.isfinite(result.history[-1]["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(Exception, match="longer than the prompt"):
        OnPolicyDistiller(task.distiller, prompt=12).prepare(batch)


@pytest.mark.parametrize("field,value,who", [("on_policy", 0.5, "student"), ("sequence_kd", True, "teacher")])
def test_text_written_in_training_needs_a_language_model_and_a_prompt_shorter_than_the_blocks(
        tmp_path, tiny_recipe, field, value, who):
    from distil.build import load_recipe
    from distil.errors import RecipeError
    from distil.pipeline import run_pipeline

    with pytest.raises(RecipeError, match=f"distill.{field} makes the {who} write text, which needs a language model"):
        run_pipeline(load_recipe({**tiny_recipe, "distill": {field: value}}), tmp_path / "a")
    recipe = load_recipe({
        "name": "lm", "data": {"source": "textfolder", "args": {"path": str(write_corpus(tmp_path / "t")),
                                                                 "block": 16}},
        "teacher": {"model": "gpt", "width": 16, "depth": 1, "heads": 2},
        "student": {"model": "gpt", "width": 16, "depth": 1, "heads": 2},
        "distill": {field: value, "prompt_tokens": 16}})
    with pytest.raises(RecipeError, match=rf"distill.prompt_tokens \(16\) must be shorter than the blocks \(16 "
                                          rf"tokens\) for distill.{field}"):
        run_pipeline(recipe, tmp_path / "b")


def test_the_teacher_writes_each_block_after_its_prompt_greedily_and_the_targets_follow():
    from distil.seqkd import teacher_text

    torch.manual_seed(0)
    teacher = build_model("gpt", (12,), 256, width=16, depth=1, heads=2).eval()
    x = torch.randint(0, 256, (5, 12))
    text = teacher_text(teacher, Split(x, torch.zeros_like(x)), prompt=4, temperature=0, batch_size=2)
    assert torch.equal(text.x[:, :4], x[:, :4])  # the prompt is the corpus's
    by_hand = x[:, :4]
    with torch.no_grad():
        while by_hand.shape[1] < 13:  # the whole sequence fed back each step, the likeliest next token appended
            by_hand = torch.cat([by_hand, teacher(by_hand)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(text.x, by_hand[:, :12]) and torch.equal(text.y, by_hand[:, 1:])  # the prompt's own targets
    assert torch.equal(text.y[:, :3], x[:, 1:4])  # too: the corpus's next tokens, then the teacher's
    with pytest.raises(ConfigError, match=r"distill.prompt_tokens \(12\) must be between 1 and the block length"):
        teacher_text(teacher, Split(x, x), prompt=12)
    sampled = [teacher_text(teacher, Split(x, x), prompt=4, seed=seed).x for seed in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])  # seeded: every process
    assert torch.equal(sampled[2][:, :4], x[:, :4]) and not torch.equal(sampled[0], text.x)  # the same text


def test_the_teachers_text_is_kept_in_the_cache_and_read_back_for_the_same_teacher_and_settings(tmp_path):
    from distil.cache import TeacherCache
    from distil.seqkd import teacher_text

    torch.manual_seed(0)
    teacher = build_model("gpt", (12,), 256, width=16, depth=1, heads=2).eval()
    x = torch.randint(0, 256, (5, 12))
    cache = TeacherCache(tmp_path)
    events, texts = [], []
    other = x.clone()
    other[0, 5] += 1  # one token changed (after the prompt: the teacher's text would be the same)
    for temperature, seed, prompt, tokens, batch in [(1.0, 0, 4, x, 256), (1.0, 0, 4, x, 256), (0.0, 0, 4, x, 256),
                                                     (1.0, 1, 4, x, 256), (1.0, 0, 5, x, 256), (1.0, 0, 4, other, 256),
                                                     (1.0, 0, 4, x, 2), (1.0, 0, 4, x, 256)]:
        texts.append(teacher_text(teacher, Split(tokens, tokens), prompt=prompt, temperature=temperature, seed=seed,
                                  batch_size=batch, cache=cache))
        events.append(cache.last_event)
    assert events == ["built", "reused"] + ["built"] * 5 + ["reused"]  # each setting its own entry
    fresh = teacher_text(teacher, Split(x, x), prompt=4, seed=0)  # no cache: generated here
    for text in (texts[1], texts[-1]):
        assert torch.equal(text.x, fresh.x) and torch.equal(text.y, fresh.y) and text.x.dtype == torch.long
    more_heads = build_model("gpt", (12,), 256, width=16, depth=1, heads=4).eval()
    more_heads.load_state_dict(teacher.state_dict())  # the same weights, another model: never the first one's text
    teacher_text(more_heads, Split(x, x), prompt=4, cache=cache)
    assert cache.last_event == "built"
    with torch.no_grad():
        teacher.head.weight.mul_(2)  # other weights: likewise
    doubled = teacher_text(teacher, Split(x, x), prompt=4, cache=cache)
    assert cache.last_event == "built"
    reader = TeacherCache(tmp_path, read_only=True)  # the other processes: read what is there, write nothing
    assert torch.equal(teacher_text(teacher, Split(x, x), prompt=4, cache=reader).x, doubled.x)
    assert reader.last_event == "reused"
    entries = len(list(tmp_path.glob("*.npy")))
    teacher_text(teacher, Split(x, x), prompt=4, seed=7, cache=reader)
    assert reader.last_event == "computed" and len(list(tmp_path.glob("*.npy"))) == entries


def test_a_recipe_with_sequence_kd_distils_on_the_teachers_text_and_says_so(tmp_path):
    from distil.build import load_recipe
    from distil.pipeline import run_pipeline

    small = {"train": {"epochs": 1, "batch_size": 16, "lr": 0.003}}
    recipe = load_recipe({
        "name": "seqkd", "data": {"source": "textfolder", "args": {"path": str(write_corpus(tmp_path / "t")),
                                                                    "block": 16}},
        "teacher": {"model": "gpt", "width": 16, "depth": 1, "heads": 2, **small},
        "student": {"model": "gpt", "width": 8, "depth": 1, "heads": 2, **small},
        "distill": {"terms": [{"kind": "ce", "weight": 1.0}], "sequence_kd": True, "prompt_tokens": 6}})
    run_pipeline(recipe, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    written = [r for r in log if r.get("event") == "sequence_kd"]
    assert len(written) == 1 and written[0]["stage"] == "distill" and written[0]["prompt_tokens"] == 6
    assert written[0]["cache"] == "built"
    run_pipeline(recipe, tmp_path / "again")  # the same teacher (seeded) on the same blocks: its text is read back
    log = [json.loads(line) for line in (tmp_path / "again" / "log.jsonl").read_text().splitlines()]
    assert [r["cache"] for r in log if r.get("event") == "sequence_kd"] == ["reused"]
    assert 0 < json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]["student"]["bpb"] < 8.5
    assert "the teacher's continuations (sampled at temperature 1)" in (tmp_path / "run" / "report.md").read_text()


def test_generation_with_the_key_value_cache_equals_feeding_the_whole_sequence():
    torch.manual_seed(0)
    model = build_model("gpt", (16,), 256, width=16, depth=2, heads=2).eval()
    prompt = torch.randint(0, 256, (3, 5))
    cached = generate(model, prompt, 12, temperature=0)  # 5 + 12 - 1 = 16 positions: fits, uses the cache
    tokens = prompt
    with torch.no_grad():
        for _ in range(12):  # the plain way: the whole sequence each time
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, tokens)
    logits, cache = model.step(prompt)
    assert torch.allclose(logits, model(prompt)[:, -1], atol=1e-5) and cache[0][0].shape == (3, 2, 5, 8)


@pytest.mark.slow
def test_the_llm_experiment_writes_its_table(tmp_path):
    from distil.experiments import EXPERIMENTS

    page = EXPERIMENTS["llm"](seeds=1, quick=True, out=tmp_path / "llm.md", log=lambda line: None).read_text()
    assert "`distil experiment llm --seeds 1 --quick`" in page
    rows = [line for line in page.splitlines() if line.startswith("| ") and "bits/byte |" not in line]
    names = [row.split(" | ")[0].strip("| ") for row in rows]
    assert names == ["teacher", "baseline (CE only)", "forward KL (kd, T=1)", "reverse KL (rkl, T=1)",
                     "JSD(0.5) (jsd)", "JSD(0.5), on-policy 50%", "sequence-level KD, greedy text",
                     "sequence-level KD, sampled text (T=1)"]
    assert all(0 < float(row.split(" | ")[1].split(" +- ")[0]) < 8.5 for row in rows)


def test_fitnet_between_gpt_blocks_of_different_widths_maps_channels_per_token():
    from distil import Batch, Distiller, FitNet
    from distil.losses import KD

    torch.manual_seed(0)
    teacher = build_model("gpt", (16,), 256, width=64, depth=2).eval()
    student = build_model("gpt", (16,), 256, width=32, depth=1)
    term = FitNet(student="blocks.0", teacher="blocks.1", weight=1.0)
    distiller = Distiller(student, teacher, [KD(T=1.0, weight=1.0), term], scoring=BITS_PER_BYTE)
    tokens = torch.randint(0, 256, (4, 17))
    batch = Batch(tokens[:, :-1], tokens[:, 1:])
    distiller.prepare(batch)
    assert term.per_token and isinstance(term.connector, torch.nn.Linear)
    assert (term.connector.in_features, term.connector.out_features) == (32, 64)  # hidden sizes, not positions
    out = distiller(batch)
    feats = {}
    hooks = [student.blocks[0].register_forward_hook(lambda m, i, o: feats.__setitem__("s", o)),
             teacher.blocks[1].register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))]
    student(batch.inputs), teacher(batch.inputs)
    for hook in hooks:
        hook.remove()
    hand = F.mse_loss(term.connector(feats["s"]), feats["t"])
    assert out.parts["fitnet:blocks.0->blocks.1"].item() == pytest.approx(hand.item(), rel=1e-5)
    out.loss.backward()
    assert term.connector.weight.grad is not None and term.connector.weight.grad.abs().sum() > 0
