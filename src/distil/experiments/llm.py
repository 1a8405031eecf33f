"""`distil experiment llm`: token-level losses and on-policy distillation on `recipes/pylm.yaml`.

One teacher (the recipe's 4-layer transformer on the standard library's source) teaches the recipe's
2-layer student with each of: forward KL (`kd`, T=1), reverse KL (`rkl`, MiniLLM), generalized JSD with
beta 0.5 (`jsd`, GKD), each at weight 0.5 beside CE at 0.5 on the next bytes; JSD(0.5) on-policy
(half of the steps on the student's own continuations of 64-byte prompts, GKD's lambda 0.5); and CE alone on
the teacher's continuations of the same prompts, greedy or sampled at T=1 (sequence-level KD, Kim & Rush 2016).
The baseline
is the same student on the next bytes alone. Every student gets the recipe's optimiser and steps; the
teacher runs online (its full next-byte distribution), as in the recipe.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distil.build import build_terms, load_recipe
from distil.data import load_splits
from distil.distiller import BITS_PER_BYTE, ClassificationTask, Distiller
from distil.experiments.common import mean_std
from distil.lm import bits_per_byte
from distil.models import build_model, count_params
from distil.onpolicy import OnPolicyDistiller
from distil.seqkd import teacher_text
from distil.train import fit

RECIPE = Path(__file__).parent.parent / "recipes" / "pylm.yaml"
CE_HALF = {"kind": "ce", "weight": 0.5}
CE_ALL = [{"kind": "ce", "weight": 1.0}]
# name -> (terms, on-policy fraction, the teacher's text: None = the corpus, else the sampling temperature)
METHODS: dict[str, tuple[list[dict], float, float | None]] = {
    "forward KL (kd, T=1)": ([{"kind": "kd", "T": 1, "weight": 0.5}, CE_HALF], 0.0, None),
    "reverse KL (rkl, T=1)": ([{"kind": "rkl", "T": 1, "weight": 0.5}, CE_HALF], 0.0, None),
    "JSD(0.5) (jsd)": ([{"kind": "jsd", "beta": 0.5, "weight": 0.5}, CE_HALF], 0.0, None),
    "JSD(0.5), on-policy 50%": ([{"kind": "jsd", "beta": 0.5, "weight": 0.5}, CE_HALF], 0.5, None),
    "sequence-level KD, greedy text": (CE_ALL, 0.0, 0.0),
    "sequence-level KD, sampled text (T=1)": (CE_ALL, 0.0, 1.0),
}


def run_llm(seeds: int = 1, quick: bool = False, out: Path = Path("docs/llm.md"),
            log: Callable[[str], None] = print) -> Path:
    """Train the teacher, the baseline and one student per method for each seed; write the table to `out`."""
    start = time.perf_counter()
    recipe = load_recipe(RECIPE)
    args = {**recipe.data.args, **({"train_bytes": 200_000, "eval_bytes": 40_000} if quick else {})}
    runs = [_one_seed(recipe, args, seed, quick, log) for seed in range(seeds)]
    command = f"distil experiment llm --seeds {seeds}" + (" --quick" if quick else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_page(recipe, runs, command, (time.perf_counter() - start) / 60, quick))
    return out


def _one_seed(recipe, args: dict, seed: int, quick: bool, log: Callable[[str], None]) -> dict[str, tuple]:
    """(test bits per byte, seconds per epoch) of the teacher, the baseline and every method."""
    splits = load_splits(recipe.data.source, args, seed=seed, val_fraction=recipe.data.val_fraction,
                         test_fraction=recipe.data.test_fraction)
    teacher_section, student_section = recipe.teacher, recipe.student
    shrink = {"teacher": {"width": 32, "depth": 2}, "student": {"width": 16, "depth": 1}} if quick else {}
    epochs = 1 if quick else None

    def model(section, offset: int = 0):
        torch.manual_seed(seed + offset)
        role = "teacher" if section is teacher_section else "student"
        knobs = {**section.knobs(), **shrink.get(role, {})}
        return build_model(section.model, splits.input_shape, splits.num_classes, **knobs)

    def timed(task, data, section) -> float:
        cfg = section.train if epochs is None else section.train.model_copy(update={"epochs": epochs})
        result = fit(task, data, splits.val, cfg, seed=seed, device="cpu")
        return statistics.mean(r["seconds"] for r in result.history)

    rows = {}
    teacher = model(teacher_section)
    seconds = timed(ClassificationTask(teacher, scoring=BITS_PER_BYTE), splits.train, teacher_section)
    rows["teacher"] = (bits_per_byte(teacher, splits.test), seconds, count_params(teacher))
    student = model(student_section, 1)
    seconds = timed(ClassificationTask(student, scoring=BITS_PER_BYTE), splits.train, student_section)
    rows["baseline (CE only)"] = (bits_per_byte(student, splits.test), seconds, count_params(student))
    log(f"seed {seed}: teacher {rows['teacher'][0]:.3f}, baseline {rows['baseline (CE only)'][0]:.3f} bits/byte")
    prompt = splits.input_shape[0] // 2
    for name, (specs, fraction, temperature) in METHODS.items():  # the teacher online, as in the recipe
        student = model(student_section, 1)
        distiller = Distiller(student, teacher, build_terms(specs), scoring=BITS_PER_BYTE)
        task = OnPolicyDistiller(distiller, fraction, prompt, seed=seed) if fraction else distiller
        data = splits.train
        if temperature is not None:  # the teacher's continuations of every training block's prompt
            begin = time.perf_counter()
            data = teacher_text(teacher, splits.train, prompt, temperature, seed=seed)
            log(f"seed {seed}: the teacher wrote {len(data):,} continuations in {time.perf_counter() - begin:.0f} s")
        seconds = timed(task, data, student_section)
        rows[name] = (bits_per_byte(student, splits.test), seconds, count_params(student))
        log(f"seed {seed}: {name} {rows[name][0]:.3f} bits/byte")
    return rows


def _page(recipe, runs: list[dict], command: str, minutes: float, quick: bool) -> str:
    base = statistics.mean(r["baseline (CE only)"][0] for r in runs)
    kd_seconds = statistics.mean(r["forward KL (kd, T=1)"][1] for r in runs)
    threads = torch.get_num_threads()
    lines = [f"# Language-model distillation: `{command}`", "",
             f"Written by `{command}` ({minutes:.0f} min on {threads} CPU thread{'s' if threads > 1 else ''}), on "
             f"`recipes/pylm.yaml`{' shrunk (--quick: 200 kB of text, tiny models, 1 epoch)' if quick else ''}: "
             f"the teacher {recipe.teacher.model} {recipe.teacher.knobs()}, the student {recipe.student.model} "
             f"{recipe.student.knobs()}, byte-level blocks of {recipe.data.args.get('block', 128)} from the Python "
             f"standard library's source, split by file. Test bits per byte (lower is better), mean +- standard "
             f"deviation over {len(runs)} seed(s); every student has the same optimiser and steps; epoch time "
             "relative to forward KL.", "",
             "| model | test bits/byte | vs baseline | epoch time vs kd | parameters |", "|---|---|---|---|---|"]
    for name in runs[0]:
        mean, spread = mean_std([r[name][0] for r in runs])
        rel = statistics.mean(r[name][1] for r in runs) / kd_seconds
        lines.append(f"| {name} | {mean:.3f} +- {spread:.3f} | {mean - base:+.3f} | {rel:.1f}x | "
                     f"{runs[0][name][2]:,} |")
    lines += ["", "What each row is:", "",
              "- forward KL: `T^2 KL(p_teacher || p_student)` per token, mean over the real tokens (Hinton's KD per "
              "token; mode-covering);",
              "- reverse KL: `T^2 KL(p_student || p_teacher)` (MiniLLM; mode-seeking);",
              "- JSD(0.5): `0.5 KL(p_t || m) + 0.5 KL(p_s || m)`, `m` the average of the two (GKD);",
              "- on-policy: on half of the steps (drawn by the step's seed) the student continues each block's first "
              "64 bytes with its own samples, and the JSD is taken on those generated positions only, the teacher "
              "scoring them online; the other steps are the off-policy JSD row's;",
              "- sequence-level KD: the teacher continues each training block's first 64 bytes once, greedily or "
              "sampled at T=1, and the student learns the prompts (the corpus's next bytes) and those continuations "
              "with CE alone (`distill.sequence_kd: true`, `distill.sequence_temperature`); it never sees the "
              "corpus's own text after the prompts, while it is tested on the corpus.", ""]
    return "\n".join(lines)
