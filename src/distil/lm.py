"""Language models: evaluation (bits per byte, tokens per second), text samples, and their report.

Bits per byte: the next-token cross-entropy in bits, averaged over every byte of the test split (byte-level
tokens: one token is one byte). Speed: scoring, tokens/s of a forward pass over a batch of 32 full blocks;
generation, new tokens/s at batch 1, feeding each sampled token back (with our gpt's key-value cache).
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import torch
from torch import nn

from distil.checkpoint import atomic_write
from distil.data import Split
from distil.distiller import bits_score
from distil.evaluate import file_sizes
from distil.modelfile import load_model_file
from distil.models import count_params
from distil.models.gpt import generate
from distil.report import plot_training
from distil.text import decode, encode

PROMPT = "def "  # the samples' prompt: Python source starts many lines with it


@torch.inference_mode()
def bits_per_byte(model: nn.Module, split: Split, batch_size: int = 64) -> float:
    """Mean bits per byte (token) of `model`'s next-token predictions over `split` (N, T)."""
    model.eval()
    bits, count = torch.zeros(()), torch.zeros((), dtype=torch.long)
    for start in range(0, len(split), batch_size):
        b, n = bits_score(model(split.x[start:start + batch_size]), split.y[start:start + batch_size])
        bits, count = bits + b, count + n
    return float(bits / count.clamp(min=1))


@torch.inference_mode()
def token_speed(model: nn.Module, split: Split, batch: int = 32, new_tokens: int = 64,
                repeats: int = 3) -> dict[str, float]:
    """Scoring tokens/s (forward over `batch` blocks) and generation tokens/s (batch 1), medians of `repeats`."""
    model.eval()
    blocks = split.x[:batch]
    model(blocks)  # warm-up
    score = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(blocks)
        score.append(blocks.numel() / (time.perf_counter() - start))
    prompt = encode(PROMPT)[None]
    generate(model, prompt, 4)  # warm-up
    gen = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, prompt, new_tokens, generator=torch.Generator().manual_seed(0))
        gen.append(new_tokens / (time.perf_counter() - start))
    return {"score_tokens_per_s_b32": sorted(score)[len(score) // 2],
            "gen_tokens_per_s_b1": sorted(gen)[len(gen) // 2]}


def sample_text(model: nn.Module, prompt: str = PROMPT, new_tokens: int = 160, seed: int = 0,
                temperature: float = 0.8) -> str:
    """One continuation of `prompt`, sampled with a fixed seed (top-k 40)."""
    tokens = generate(model, encode(prompt)[None], new_tokens, temperature=temperature, top_k=40,
                      generator=torch.Generator().manual_seed(seed))
    return decode(tokens[0])


def lm_metrics(model: nn.Module, test: Split, checkpoint: Path, speed_batch: int = 32) -> dict:
    """Bits per byte on `test`, parameters, bytes on disk and tokens/s of one language model."""
    return {"bpb": bits_per_byte(model, test), "params": count_params(model), **file_sizes(checkpoint),
            **token_speed(model, test, speed_batch), "threads": torch.get_num_threads(), "runtime": "pytorch"}


COLUMNS = ["model", "runtime", "test bits/byte", "vs teacher", "params", "file", "score tok/s (b32)",
           "generate tok/s (b1)"]


def lm_table(models: dict[str, dict]) -> list[list[str]]:
    """Rows of the report's table; `vs teacher` is the bits-per-byte gap (lower is better)."""
    teacher = models.get("teacher", {}).get("bpb")
    rows = []
    for name, m in models.items():
        gap = f"{m['bpb'] - teacher:+.3f}" if teacher is not None and name != "teacher" else ""
        rows.append([name, m["runtime"], f"{m['bpb']:.3f}", gap, f"{m['params']:,}", f"{m['bytes'] / 1024:.0f} KiB",
                     f"{m['score_tokens_per_s_b32']:,.0f}", f"{m['gen_tokens_per_s_b1']:,.0f}"])
    return rows


def lm_warnings(models: dict[str, dict]) -> list[str]:
    """Plain-words warnings: a distilled student no better than the baseline trained on the same data alone."""
    base, student = models.get("baseline"), models.get("student")
    if base and student and student["bpb"] >= base["bpb"]:
        return [f"the distilled student ({student['bpb']:.3f} bits/byte) is not better than the baseline trained "
                f"without a teacher ({base['bpb']:.3f}): distillation did not help this run."]
    return []


def write_lm_report(run_dir: Path, models: dict[str, dict], history: list[dict], notes: list[str],
                    samples: dict[str, str], title: str) -> Path:
    """metrics.json, plots/training.png, report.md and report.html of a language-model run."""
    run_dir = Path(run_dir)
    plot = plot_training(history, run_dir / "plots" / "training.png")
    warnings = lm_warnings(models)
    payload = json.dumps({"task": "lm", "models": models, "samples": samples, "notes": notes,
                          "warnings": warnings}, indent=2)
    atomic_write(run_dir / "metrics.json", lambda tmp: tmp.write_text(payload))
    rows = lm_table(models)
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + ["| " + " | ".join(r) + " |"
                                                                              for r in rows]
    md = [f"# {title}", ""] + [f"> **Warning:** {w}\n" for w in warnings] + table + [""]
    md += [f"- {n}" for n in notes] + ["", "## Samples", "",
                                       f"Each model continues the prompt `{PROMPT}` (temperature 0.8, top-k 40, "
                                       "seed 0):", ""]
    for name, text in samples.items():
        md += [f"**{name}**", "", "```python", text, "```", ""]
    md += ["## Training curves", "", "![training curves](plots/training.png)", ""]
    atomic_write(run_dir / "report.md", lambda tmp: tmp.write_text("\n".join(md)))
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)  # noqa: E731
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            "<body style='font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto'>"
            f"<h1>{html.escape(title)}</h1>"
            + "".join(f"<p style='color:#a00'><b>Warning:</b> {html.escape(w)}</p>" for w in warnings)
            + f"<table border=1 cellpadding=4><tr>{cells(COLUMNS, 'th')}</tr>"
            + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</table><ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul><h2>Samples</h2>"
            + "".join(f"<h3>{html.escape(k)}</h3><pre>{html.escape(v)}</pre>" for k, v in samples.items())
            + '<h2>Training curves</h2><img style="max-width:100%" src="data:image/png;base64,'
            + base64.b64encode(plot.read_bytes()).decode() + '"></body></html>')
    atomic_write(run_dir / "report.html", lambda tmp: tmp.write_text(page))
    return run_dir / "report.md"


def report_lm(run, names: list[str]) -> Path:
    """The report stage of a language-model run (`run`: a `distil.run.Run`): every model in `names` on the test
    split, a text sample of each, the notes and the curves."""
    models, samples = {}, {}
    for name in names:
        file = run.path(f"{name}.safetensors")
        model, _ = load_model_file(file)
        models[name] = lm_metrics(model, run.test, file)
        samples[name] = sample_text(model)
        quantized = name in run.recipe.export.quantize  # these get onnxruntime rows, fp32 and int8
        for suffix in (".onnx", "-int8.onnx") if quantized else ():
            exported = run.path(f"{name}{suffix}")
            if exported.exists():
                label = f"{name}-int8" if suffix == "-int8.onnx" else f"{name} (onnx)"
                models[label] = {**onnx_metrics(exported, run.test), "params": models[name]["params"]}
    r, s = run.recipe, run.splits
    block = s.input_shape[0]
    notes = [f"data: {r.data.source}, byte-level tokens in blocks of {block}: {len(s.train):,} train / "
             f"{len(s.val):,} val / {len(s.test):,} test blocks ({len(s.test) * block:,} test bytes), split by file",
             f"teacher: {r.teacher.model} {r.teacher.knobs()}; student: {r.student.model} {r.student.knobs()}",
             "distillation terms: " + ", ".join(json.dumps(t) for t in r.distill.terms),
             *(["sequence-level KD: the student learns from the teacher's continuations ("
                + (f"sampled at temperature {r.distill.sequence_temperature:g}" if r.distill.sequence_temperature
                   else "greedy") + f") of the first {r.distill.prompt_tokens} tokens of each training block, not "
                "from the corpus's text (Kim & Rush 2016); validation and test are on the corpus"]
               if r.distill.sequence_kd else []),
             *([f"on-policy: on {r.distill.on_policy:.0%} of the steps the student continues the first "
                f"{r.distill.prompt_tokens} tokens of each block with its own samples, and the terms compare it "
                "with the teacher on those tokens (GKD)"] if r.distill.on_policy else []),
             "baseline: the student architecture trained on the next bytes alone (CE), with the same optimiser "
             "steps as the distilled student",
             f"speed: PyTorch, {torch.get_num_threads()} thread(s); scoring = one forward pass over 32 blocks of "
             f"{block}; generation = new tokens at batch 1, with a key-value cache in PyTorch (our gpt), without "
             "one on onnxruntime (the whole sequence each token, greedy, the same thread count)"]
    if run.path("export.json").exists():
        for name, info in json.loads(run.path("export.json").read_text()).items():
            if "quantization" in info:
                notes.append(f"{name}: onnxruntime dynamic int8 (weights int8, activations quantized at run time); "
                             f"validation bits/byte {info['fp32_val_bpb']:.3f} in fp32 ONNX -> "
                             f"{info['val_bpb']:.3f} in int8")
    from distil.stages import cache_notes, read_history  # the report stage's own readers of log.jsonl

    notes += cache_notes(run.path("log.jsonl"))

    return write_lm_report(run.run_dir, models, read_history(run.path("log.jsonl")), notes, samples,
                           f"distil report: {r.name}")


# --- ONNX: export, int8, and the same metrics on onnxruntime ----------------------------------------


def export_lm(run, names: list[str]) -> None:
    """The export stage of a language-model run: fp32 ONNX of every model in `names` (dynamic batch and
    sequence length, parity-checked against PyTorch), onnxruntime's dynamic int8 of those in export.quantize
    (weights int8, activations quantized at run time: the usual choice for transformers). export.json last."""
    from distil.export import export_onnx, quantize_onnx

    e = run.recipe.export
    sample = run.test.x[:8]
    summary: dict[str, dict] = {}
    for name in names:
        diff = export_onnx(run.load(name), sample, run.path(f"{name}.onnx"), e.parity_atol)
        summary[name] = {"file": f"{name}.onnx", "max_abs_logit_diff": diff}
        if name in e.quantize:
            quantize_onnx(run.path(f"{name}.onnx"), run.path(f"{name}-int8.onnx"), "dynamic")
            summary[f"{name}-int8"] = {"file": f"{name}-int8.onnx", "quantization": "dynamic",
                                       "val_bpb": onnx_bits_per_byte(run.path(f"{name}-int8.onnx"), run.val),
                                       "fp32_val_bpb": onnx_bits_per_byte(run.path(f"{name}.onnx"), run.val)}
    payload = json.dumps(summary, indent=2)
    atomic_write(run.path("export.json"), lambda tmp: tmp.write_text(payload))


def onnx_bits_per_byte(path: Path, split: Split, batch_size: int = 64) -> float:
    """`bits_per_byte` of an ONNX language model on onnxruntime."""
    from distil.export import session

    sess = session(path, threads=torch.get_num_threads())
    bits, count = 0.0, 0
    for start in range(0, len(split), batch_size):
        logits = sess.run(None, {"input": split.x[start:start + batch_size].numpy()})[0]
        b, n = bits_score(torch.from_numpy(logits), split.y[start:start + batch_size])
        bits, count = bits + float(b), count + int(n)
    return bits / max(count, 1)


def onnx_metrics(path: Path, test: Split, speed_batch: int = 32, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Bits per byte, bytes and tokens/s (scoring at `speed_batch`, generation at batch 1) on onnxruntime."""
    from distil.export import session

    sess = session(path, threads=torch.get_num_threads())
    forward = lambda tokens: torch.from_numpy(sess.run(None, {"input": tokens.numpy()})[0])  # noqa: E731
    blocks = test.x[:speed_batch]
    forward(blocks)
    score = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(blocks)
        score.append(blocks.numel() / (time.perf_counter() - start))
    block = test.x.shape[1]
    gen = []
    for _ in range(repeats):
        tokens, start = encode(PROMPT)[None], time.perf_counter()
        for _ in range(new_tokens):
            following = forward(tokens[:, -block:])[:, -1].argmax(-1, keepdim=True)  # greedy: (1, 1)
            tokens = torch.cat([tokens, following], dim=1)
        gen.append(new_tokens / (time.perf_counter() - start))
    return {"bpb": onnx_bits_per_byte(path, test), **file_sizes(path),
            "score_tokens_per_s_b32": sorted(score)[len(score) // 2],
            "gen_tokens_per_s_b1": sorted(gen)[len(gen) // 2], "runtime": "onnxruntime",
            "threads": torch.get_num_threads()}
