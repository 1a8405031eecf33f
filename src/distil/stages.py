"""The stages of a run, each a plain function of a `Run` that reads and writes the run folder.

    teacher  : fit(teacher, CE)             -> teacher.safetensors (or load recipe.teacher.checkpoint,
                                              or keep it as built: recipe.teacher.pretrained)
    baseline : fit(student copy, CE)        -> baseline.safetensors (same student, no teacher, same steps)
    distill  : fit(Distiller(...))          -> student.safetensors (+ student.connectors.safetensors)
    compress : prune a source, fine-tune it with the unpruned source as teacher (and, to compare,
               on labels alone)             -> <source>-pruned.safetensors, <source>-pruned-labels.safetensors
    export   : ONNX of every model (parity-checked) + int8 of the chosen ones -> *.onnx, export.json
    report   : evaluate every model on test -> metrics.json, report.md, report.html, plots/
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from distil.checkpoint import atomic_write, load_weights
from distil.compress.prune import channel_prune, magnitude_prune, make_permanent, sparsity_of
from distil.evaluate import evaluate_model, evaluate_onnx, predict_logits
from distil.export import export_onnx, has_convolutions, quantize_onnx, run_onnx, session
from distil.modelfile import load_model_file
from distil.recipe import Recipe
from distil.report import with_ratios, write_report
from distil.run import Run
from distil.scheme_stages import (
    born_again_models,
    mutual_models,
    scheme_models,
    scheme_notes,
    stage_born_again,
    stage_ema,
    stage_mutual,
    stage_takd,
    stage_teachers,
    takd_models,
)

# --- stages ----------------------------------------------------------------------------------


def stage_teacher(run: Run) -> None:
    section = run.recipe.teacher
    teacher = run.model("teacher")
    if section.checkpoint:
        load_weights(teacher, Path(section.checkpoint))
    elif not section.pretrained:  # pretrained: as the factory built it (an hf: model's own weights)
        run.fit(run.task(teacher), run.splits.train, section.train, "teacher")
    run.save(teacher, "teacher", "teacher")


def stage_baseline(run: Run) -> None:
    """The student trained on labels alone, with the student's settings and as many optimiser
    steps as the distillation stage takes (its training set may be larger)."""
    section = run.recipe.student.train
    steps = section.epochs * max(1, len(run.distill_train()) // section.batch_size)
    epochs = math.ceil(steps / max(1, len(run.splits.train) // section.batch_size))
    student = run.model("student")
    run.fit(run.task(student), run.splits.train, section, "baseline", epochs=epochs)
    run.save(student, "baseline", "student")


def stage_distill(run: Run) -> None:
    student = run.model("student")
    distiller = run.distill(student, run.teachers(), run.recipe.student.train, "distill")
    if run.group.main:
        distiller.cpu().save_connectors(run.path("student.connectors.safetensors"))
    run.save(student, "student", "student")  # last: its presence marks the stage done


def stage_compress(run: Run) -> None:
    """Prune the source, then fine-tune with the unpruned source as teacher (and a copy on labels)."""
    c = run.recipe.compress
    source_name = "student" if c.source == "student" else "teacher"
    source = run.load(source_name)
    # both copies are taken before anything freezes the source (a Distiller does); pruning is deterministic,
    # so the label-only copy is pruned the same way (a masked model cannot be deep-copied)
    copies = [copy.deepcopy(source).requires_grad_(True) for _ in range(2 if c.compare_labels_only else 1)]
    pruned, info = prune(run, copies[0], source)
    labels_only = prune(run, copies[1], source)[0] if c.compare_labels_only else None
    name = f"{c.source}-pruned"
    run.distill(pruned, source, c.finetune, name)
    run.save(make_permanent(pruned), name, source_name, pruned=c.method == "channels", pruning=info,
             finetune="distillation from the unpruned source")
    if labels_only is not None:
        run.fit(run.task(labels_only), run.splits.train, c.finetune, f"{name}-labels")
        run.save(make_permanent(labels_only), f"{name}-labels", source_name, pruned=c.method == "channels",
                 pruning=info, finetune="labels only")


def prune(run: Run, model: nn.Module, source: nn.Module) -> tuple[nn.Module, dict]:
    c = run.recipe.compress
    if c.method == "magnitude":
        return model, magnitude_prune(model, c.ratio, c.scope, tuple(c.exclude), permanent=False)
    batch = run.sample(256)  # for the dry run and Taylor importance
    x, y = batch.x, batch.y
    short = c.finetune.model_copy(update={"epochs": max(1, c.finetune.epochs // c.steps)})

    def between_steps(step: int) -> None:  # a short distillation fine-tune between pruning steps
        run.distill(model, source, short, f"prune-step-{step}", record=False)
        model.cpu()
        source.cpu()

    info = channel_prune(model, x[:1], c.ratio, c.importance, c.target, c.steps, tuple(c.exclude),
                         between_steps=between_steps, taylor_loss=lambda m: F.cross_entropy(m(x), y))
    return model, info


def stage_export(run: Run) -> None:
    """fp32 ONNX of every model (parity-checked against PyTorch), int8 of those in export.quantize.

    Every file is written atomically; export.json, which marks the stage done, comes last.
    """
    if run.splits.task == "lm":
        from distil.lm import export_lm

        export_lm(run, model_names(run))
        return
    e = run.recipe.export
    sample, test_x = run.test.x[:256], run.test.x.numpy()
    calibration = run.sample(e.calibration_samples).x.numpy()
    summary: dict[str, dict] = {}
    for name in model_names(run):
        model = run.load(name)
        diff = export_onnx(model, sample, run.path(f"{name}.onnx"), e.parity_atol)
        summary[name] = {"file": f"{name}.onnx", "max_abs_logit_diff": diff}
        if name not in e.quantize:
            continue
        mode = e.quantization if e.quantization != "auto" else ("static" if has_convolutions(model) else "dynamic")
        quantize_onnx(run.path(f"{name}.onnx"), run.path(f"{name}-int8.onnx"), mode, calibration, e.per_channel)
        info = {"file": f"{name}-int8.onnx", "quantization": mode, "per_channel": e.per_channel and mode == "static"}
        drop = _val_accuracy(run, f"{name}.onnx") - _val_accuracy(run, f"{name}-int8.onnx")
        info["val_accuracy_drop"] = drop
        if e.qat and drop > e.qat_threshold:
            info["qat"] = quantization_aware_finetune(run, name, mode, calibration, drop)
        fp32 = run_onnx(session(run.path(f"{name}.onnx")), test_x).argmax(1)
        int8 = run_onnx(session(run.path(f"{name}-int8.onnx")), test_x).argmax(1)
        summary[f"{name}-int8"] = {**info, "top1_agreement_with_fp32": float((fp32 == int8).mean())}
    payload = json.dumps(summary, indent=2)
    atomic_write(run.path("export.json"), lambda tmp: tmp.write_text(payload))


def _val_accuracy(run: Run, onnx_file: str) -> float:
    logits = run_onnx(session(run.path(onnx_file)), run.val.x.numpy())
    return float((logits.argmax(1) == run.val.y.numpy()).mean())


def quantization_aware_finetune(run: Run, name: str, mode: str, calibration, before: float) -> dict:
    """Fine-tune `name` with fake int8 quantization, distilling from its teacher (the run's teacher;
    the unpruned source for a pruned model), quantize the result, and keep it as `<name>-int8.onnx`
    if it loses less validation accuracy than the post-training file did (`before`)."""
    import tempfile

    from distil.compress.qat import fake_quantized

    e = run.recipe.export
    model = run.load(name)
    teacher = run.load(name.removesuffix("-pruned-labels").removesuffix("-pruned")
                       if name.endswith(("-pruned", "-pruned-labels")) else "teacher")
    with fake_quantized(model):
        run.distill(model, teacher, e.qat_finetune, f"{name}-qat")
        model.cpu()
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, run.test.x[:256], Path(tmp) / "qat.onnx", e.parity_atol)
        quantize_onnx(Path(tmp) / "qat.onnx", Path(tmp) / "qat-int8.onnx", mode, calibration, e.per_channel)
        logits = run_onnx(session(Path(tmp) / "qat-int8.onnx"), run.val.x.numpy())
        after = _val_accuracy(run, f"{name}.onnx") - float((logits.argmax(1) == run.val.y.numpy()).mean())
        kept = after < before  # keep whichever int8 file loses less
        if kept:
            atomic_write(run.path(f"{name}-int8.onnx"), lambda out: shutil.copyfile(Path(tmp) / "qat-int8.onnx", out))
    return {"epochs": e.qat_finetune.epochs, "val_accuracy_drop_after": after, "kept": kept}


def model_names(run: Run) -> list[str]:
    """The PyTorch models of this run, in report order."""
    names = ["teacher", *[f"teacher-{n}" for n in run.recipe.schemes.teachers], "baseline", "student",
             *scheme_models(run.recipe)]
    if run.recipe.compress.enabled:
        names.append(f"{run.recipe.compress.source}-pruned")
        if run.recipe.compress.compare_labels_only:
            names.append(f"{run.recipe.compress.source}-pruned-labels")
    return names


def stage_report(run: Run) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(run.recipe.report.threads or os.cpu_count() or 1)
    try:
        _report(run)
    finally:
        torch.set_num_threads(threads)


def _report(run: Run) -> None:
    if run.splits.task == "lm":
        from distil.lm import report_lm

        report_lm(run, model_names(run))
        return
    r = run.recipe.report
    test = run.test
    teacher_pred = predict_logits(run.load("teacher").to(run.device), test.x).argmax(1)
    models: dict[str, dict] = {}
    for name in model_names(run):
        file = run.path(f"{name}.safetensors")
        model, meta = load_model_file(file)
        models[name] = evaluate_model(model, test, file, teacher_pred, r.latency_runs, r.throughput_batch,
                                      run.device)
        if meta.get("pruning"):
            models[name]["pruning"] = meta["pruning"]
        if run.path(f"{name}.onnx").exists():
            ort = evaluate_onnx(run.path(f"{name}.onnx"), test, teacher_pred, r.latency_runs, r.throughput_batch)
            models[name].update({"onnx_bytes": ort["bytes"], "ort_latency_ms_b1": ort["ort_latency_ms_b1"],
                                 "ort_throughput_b256": ort["ort_throughput_b256"]})
        int8 = run.path(f"{name}-int8.onnx")
        if int8.exists():
            ort = evaluate_onnx(int8, test, teacher_pred, r.latency_runs, r.throughput_batch)
            exported = json.loads(run.path("export.json").read_text()).get(f"{name}-int8", {})
            models[f"{name}-int8"] = {**ort, "params": models[name]["params"], "macs": models[name]["macs"],
                                      "quantization": exported.get("quantization"),
                                      "fp32_agreement": exported.get("top1_agreement_with_fp32"),
                                      "onnx_bytes": ort["bytes"], "latency_ms_b1": ort["ort_latency_ms_b1"],
                                      "throughput_b256": ort["ort_throughput_b256"], "runtime": "onnxruntime"}
    write_report(run.run_dir, with_ratios(models), read_history(run.path("log.jsonl")), report_notes(run),
                 f"distil report: {run.recipe.name}", r.tolerance)


def report_notes(run: Run) -> list[str]:
    r, s = run.recipe, run.splits
    transfer = len(s.transfer) if s.transfer is not None and r.distill.use_transfer else 0
    terms = ", ".join(json.dumps(t) for t in r.distill.terms)
    notes = [f"data: {r.data.source}, {len(s.train)} train / {len(s.val)} val / {len(s.test)} test samples, "
             f"{transfer} unlabeled transfer samples for distillation",
             f"teacher: {r.teacher.model} {r.teacher.knobs()}; student: {r.student.model} {r.student.knobs()}",
             f"distillation terms: {terms}",
             "baseline: the student architecture trained on labels alone, with the same optimiser "
             "steps as the distilled student",
             f"accuracy: predictions on {run.device}; latency and throughput on the CPU (where an edge model runs): "
             f"median of {r.report.latency_runs} batch-1 runs after warm-up (fewer, at least 5, for a model slower "
             f"than 3 s in all); throughput at batch {r.report.throughput_batch}; {torch.get_num_threads()} "
             "thread(s) for PyTorch and onnxruntime alike"]
    notes += scheme_notes(r) + cache_notes(run.path("log.jsonl"))
    if r.compress.enabled:
        c = r.compress
        info = load_model_file(run.path(f"{c.source}-pruned.safetensors"))[1].get("pruning", {})
        if c.method == "channels":
            first, last = info["history"][0], info["history"][-1]
            what = (f"{c.ratio:.0%} of channels removed ({c.importance} importance, {c.steps} step(s)): MACs "
                    f"{first['macs']:,} -> {last['macs']:,} ({last['macs'] / first['macs']:.0%})")
        else:
            what = (f"{c.ratio:.0%} of Conv/Linear weights zeroed ({c.scope} magnitude; measured sparsity after "
                    f"fine-tuning {sparsity_of(run.load(f'{c.source}-pruned')):.1%})")
        notes.append(f"{c.source}-pruned: {what}, then {c.finetune.epochs} epochs of distillation from the unpruned "
                     f"{c.source}; {c.source}-pruned-labels: the same pruned model fine-tuned on labels alone")
        if c.method == "magnitude":
            notes.append("unstructured sparsity: dense kernels do not run faster on zeros, so latency does not drop; "
                         "the gain is in compressed size (gzip column)")
    if run.path("export.json").exists():
        for name, info in json.loads(run.path("export.json").read_text()).items():
            if "quantization" in info:
                qat = (f"; post-training int8 {_lost(info['val_accuracy_drop'])} of validation accuracy, so "
                       f"it was fine-tuned with fake quantization for {info['qat']['epochs']} epochs, after which it "
                       f"{_lost(info['qat']['val_accuracy_drop_after'])} ("
                       + ("kept" if info['qat']['kept'] else "not better: the post-training file is kept") + ")"
                       ) if "qat" in info else ""
                notes.append(f"{name}: {info['quantization']} int8, top-1 agreement with its fp32 ONNX "
                             f"{info['top1_agreement_with_fp32']:.3f}{qat}")
    if r.export.enabled:
        notes.append("int8: onnxruntime post-training quantization (" + r.export.quantization +
                     "; static = QDQ, calibrated on the training split). Speed-up and size "
                     "ratios are against the teacher in the same runtime (onnxruntime)")
    return notes


def cache_notes(path: Path) -> list[str]:
    """What the teacher cache did for each distillation of the run (its latest event per stage and teacher)."""
    if not path.exists():
        return []
    events = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("event") == "teacher_cache":
            events[(record["stage"], record["teacher"])] = record
    notes = []
    for (stage, teacher), e in events.items():
        if e["status"] == "online":
            notes.append(f"{stage}: teacher '{teacher}' ran at every step: {e['reason']}")
            continue
        verb = "read from" if e["status"] == "reused" else f"{e['status']} into"
        where = f" (entry {e['key']} in {e['folder']})" if e.get("folder") else " (in memory, for this run)"
        what = "logits" + (f" and features of {', '.join(e['features'])}" if e.get("features") else "")
        note = f"{stage}: teacher '{teacher}' {what} {verb} the teacher cache{where}"
        if e.get("top_k"):
            note += f"; only the top {e['top_k']} logits per sample kept, the other classes sharing the rest"
        notes.append(note)
    return notes


def read_history(path: Path) -> list[dict]:
    """Epoch records of log.jsonl; a stage that resumed keeps only its latest record per epoch."""
    if not path.exists():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "epoch" in record:  # events (a reused teacher cache, ...) are not epochs
                records[(record["stage"], record["epoch"])] = record
    order = list(dict.fromkeys(r["stage"] for r in records.values()))
    return sorted(records.values(), key=lambda r: (order.index(r["stage"]), r["epoch"]))


@dataclass(frozen=True)
class Stage:
    """One stage, in one place: what runs, the files it writes (the last one marks it done), the recipe
    sections whose change redoes it (and every later stage), and its `fit` names (checkpoint prefixes)."""

    name: str
    run: Callable[[Run], None]
    outputs: Callable[[Recipe], list[str]]
    depends: tuple[str, ...] = ()  # recipe sections or dotted fields ("schemes.ema")
    fit_names: Callable[[Recipe], list[str]] = lambda recipe: []
    enabled: Callable[[Recipe], bool] = lambda recipe: True


def _files(names: list[str]) -> list[str]:
    return [f"{name}.safetensors" for name in names]


def _pruned(r: Recipe) -> list[str]:
    names = [f"{r.compress.source}-pruned"]
    return names + [f"{names[0]}-labels"] if r.compress.compare_labels_only else names


STAGES: dict[str, Stage] = {stage.name: stage for stage in [
    Stage("teacher", stage_teacher, lambda r: ["log.jsonl", "teacher.safetensors"],
          ("seed", "data", "teacher", "precision"), lambda r: ["teacher"]),
    Stage("teachers", stage_teachers, lambda r: [f"teacher-{n}.safetensors" for n in r.schemes.teachers],
          ("schemes.teachers",), lambda r: [f"teacher-{n}" for n in r.schemes.teachers],
          lambda r: bool(r.schemes.teachers)),
    Stage("baseline", stage_baseline, lambda r: ["baseline.safetensors"], ("student", "distill"),
          lambda r: ["baseline"]),
    Stage("distill", stage_distill, lambda r: ["student.connectors.safetensors", "student.safetensors"], (),
          lambda r: ["distill"]),
    Stage("takd", stage_takd, lambda r: _files(takd_models(r)), ("schemes.assistants",), takd_models,
          lambda r: bool(r.schemes.assistants)),
    Stage("born_again", stage_born_again, lambda r: _files(born_again_models(r)), ("schemes.born_again",),
          born_again_models, lambda r: r.schemes.born_again > 0),
    Stage("mutual", stage_mutual, lambda r: _files(mutual_models(r)), ("schemes.mutual", "schemes.mutual_T"),
          lambda r: ["mutual"], lambda r: bool(r.schemes.mutual)),
    Stage("ema", stage_ema, lambda r: ["student-ema.safetensors"], ("schemes.ema", "schemes.ema_decay"),
          lambda r: ["ema"], lambda r: r.schemes.ema),
    Stage("compress", stage_compress, lambda r: [f"{n}.safetensors" for n in _pruned(r)], ("compress",),
          _pruned, lambda r: r.compress.enabled),
    Stage("export", stage_export, lambda r: ["*.onnx", "export.json"], ("export",),
          lambda r: [f"{name}-qat" for name in r.export.quantize], lambda r: r.export.enabled),
    Stage("report", stage_report, lambda r: ["plots/", "report.md", "report.html", "metrics.json"], ("report",)),
]}


def _lost(drop: float) -> str:
    """An accuracy drop (a fraction; negative: a gain) in words: 'lost 1.2 points', 'gained 0.3 points'."""
    points = round(drop * 100, 1)
    return f"lost {points:.1f} points" if points > 0 else f"gained {-points:.1f} points" if points < 0 else \
        "lost nothing"
