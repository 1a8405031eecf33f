"""`distil experiment capacity-gap`: can too large a teacher teach worse than a middle-sized one?

Teachers: cnn1d of depth 3 and widths 4 to 128 (300 to 168,000 parameters), each trained on the labelled split.
One student, the MLP (5,000 parameters), learns from each with `0.9 * KD(T=4) + 0.1 * CE` on the labelled split
plus 10,000 generated unlabelled signals; the same student also learns through a teaching assistant in between
(Mirzadeh et al. 2020, TAKD): a cnn1d of width 8 distilled from the teacher with the same terms and data, then
teaching the student. The assistant is used only for teachers wider than itself.
"""

from __future__ import annotations

from pathlib import Path

from distil.distiller import hinton_terms
from distil.evaluate import accuracy
from distil.experiments.common import (
    QUICK_STUDENT_CFG,
    QUICK_TEACHER_CFG,
    STUDENT_CFG,
    TEACHER_CFG,
    Log,
    Page,
    cell,
    columns,
    figure,
    log_ticks,
    mean_std,
    mnist1d,
    one_thread,
    train_distilled,
    train_hard,
    train_teacher,
)
from distil.models import count_params

WIDTHS = [4, 8, 16, 32, 64, 128]
QUICK_WIDTHS = [4, 16]
ASSISTANT = {"model": "cnn1d", "width": 8, "depth": 3}


def run_seed(seed: int, quick: bool, log: Log) -> dict:
    splits = mnist1d(seed, quick, transfer_size=1500 if quick else 10000)
    train = splits.with_transfer()
    cfg = QUICK_STUDENT_CFG if quick else STUDENT_CFG
    assistant_cfg = QUICK_TEACHER_CFG if quick else TEACHER_CFG
    result = {"baseline": accuracy(train_hard(splits, train, seed, cfg), splits.test)}
    for width in QUICK_WIDTHS if quick else WIDTHS:
        teacher = train_teacher(splits, seed, quick, {"model": "cnn1d", "width": width, "depth": 3})
        student = train_distilled(splits, train, teacher, hinton_terms(4, 0.9), seed, cfg)
        row = {"params": count_params(teacher), "teacher": accuracy(teacher, splits.test),
               "direct": accuracy(student, splits.test)}
        if width > ASSISTANT["width"]:
            assistant = train_distilled(splits, train, teacher, hinton_terms(4, 0.9), seed, assistant_cfg, ASSISTANT)
            student = train_distilled(splits, train, assistant, hinton_terms(4, 0.9), seed, cfg)
            row |= {"assistant": accuracy(assistant, splits.test), "via assistant": accuracy(student, splits.test)}
        result[width] = row
        log(f"capacity-gap seed {seed}: teacher width {width} ({row['params']:,} parameters) {row['teacher']:.3f}, "
            f"student {row['direct']:.3f}" + (f", via assistant {row['via assistant']:.3f}" if "assistant" in row
                                             else ""))
    return result


def run_capacity_gap(seeds: int = 3, quick: bool = False, out: Path = Path("docs/experiments/capacity-gap.md"),
                     log: Log = print) -> Path:
    """Run over `seeds` seeds; write the page and its plot."""
    page = Page("capacity-gap", "Capacity gap: teachers of growing size, one student", seeds, quick)
    with one_thread():
        runs = [run_seed(seed, quick, log) for seed in range(seeds)]
    widths = QUICK_WIDTHS if quick else WIDTHS
    page.add(__doc__.split("\n\n", 1)[1].strip(), "",
             f"Student on hard labels alone (same data and steps): {cell([r['baseline'] for r in runs])}.", "",
             "## Test accuracy", "")
    values = lambda width, key: [r[width][key] for r in runs]  # noqa: E731
    rows = []
    for width in widths:
        helped = "assistant" in runs[0][width]
        rows.append([str(width), f"{runs[0][width]['params']:,}", cell(values(width, "teacher")),
                     cell(values(width, "direct")), cell(values(width, "assistant")) if helped else "",
                     cell(values(width, "via assistant")) if helped else ""])
    page.table(["teacher width", "teacher parameters", "teacher", "student (direct)", "assistant (width 8)",
                "student via assistant"], rows)
    page.add("Hinton et al. (2015) report no teacher-size sweep. Cho & Hariharan (2019, *On the efficacy of knowledge "
             "distillation*) and Mirzadeh et al. (2020) report that students of larger teachers can do worse on "
             "CIFAR and ImageNet, and that an assistant in between recovers part of it.", "", "## What it shows", "")
    page.add(*findings(runs, widths), "")
    return page.write(out, plot(runs, widths))


def findings(runs: list[dict], widths: list[int]) -> list[str]:
    mean = lambda width, key: mean_std([r[width][key] for r in runs])[0]  # noqa: E731
    best, largest = max(widths, key=lambda w: mean(w, "direct")), widths[-1]
    lines = ["- Student (direct) by teacher width: " + ", ".join(f"{w}: {mean(w, 'direct'):.3f}" for w in widths)
             + ".",
             f"- The best teacher for this student is the width-{best} one ({mean(best, 'direct'):.3f}, teacher "
             f"{mean(best, 'teacher'):.3f})" + (": the largest." if best == largest else
                                               f"; the largest, width {largest}, gives {mean(largest, 'direct'):.3f} "
                                               f"(teacher {mean(largest, 'teacher'):.3f}).")]
    helped = [w for w in widths if "assistant" in runs[0][w]]
    if not helped:
        return lines
    lines.append("- Through the assistant: " + "; ".join(
        f"width {w} {mean(w, 'via assistant'):.3f} ({(mean(w, 'via assistant') - mean(w, 'direct')) * 100:+.1f} "
        "points against direct)" for w in helped) + ".")
    noise = max(mean_std([r[w][k] for r in runs])[1] for w in helped for k in ("direct", "via assistant"))
    direct = [mean(w, "direct") for w in helped]
    gap = max(direct) - mean(largest, "direct")
    assistant_effect = max(abs(mean(w, "via assistant") - mean(w, "direct")) for w in helped)
    verdict = ("No capacity gap shows at this scale: the largest teacher teaches as well as any." if gap <= noise
               else f"The largest teacher teaches {gap * 100:.1f} points worse than the best.")
    if assistant_effect <= noise:
        verdict += " The assistant's effect stays within the noise."
    lines.append(f"- Across the teachers wider than the assistant, the student's accuracy spans "
                 f"{(max(direct) - min(direct)) * 100:.1f} points, and the seeds' standard deviations reach "
                 f"{noise * 100:.1f}. {verdict}")
    return lines


def plot(runs: list[dict], widths: list[int]):
    fig, (by_size, by_accuracy) = figure(2)
    params = [runs[0][w]["params"] for w in widths]
    teacher = [mean_std([r[w]["teacher"] for r in runs])[0] for w in widths]
    for key, label, color in (("direct", "student, direct", "#1f77b4"),
                              ("via assistant", "student via assistant (width 8)", "#ff7f0e")):
        shown = [i for i, w in enumerate(widths) if key in runs[0][w]]
        means, stds = columns([[r[widths[i]][key] for i in shown] for r in runs])
        for ax, x in ((by_size, params), (by_accuracy, teacher)):
            ax.errorbar([x[i] for i in shown], means, yerr=stds, marker="o", capsize=3, label=label,
                        color=color)
    by_size.set(xscale="log", xlabel="teacher parameters (cnn1d width)", ylabel="student test accuracy",
                title="Student against teacher size")
    by_size.set_xticks(params, [f"{p}\n(w {w})" for p, w in zip(log_ticks(params), widths)], fontsize=7)
    by_size.minorticks_off()
    by_accuracy.set(xlabel="teacher test accuracy", ylabel="student test accuracy",
                    title="Student against teacher accuracy")
    for ax in (by_size, by_accuracy):
        ax.axhline(mean_std([r["baseline"] for r in runs])[0], color="grey", ls="--", label="hard labels alone")
        ax.legend(fontsize=7)
    return fig
