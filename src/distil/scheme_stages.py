"""The stages of the training schemes (recipe section `schemes`), each a function of a `Run`:

    teachers   : more teachers by name, trained like the teacher (or loaded)  -> teacher-<name>.safetensors
    takd       : teacher -> ta-1 -> ... -> student-takd, each link distilled  -> ta-<i>.safetensors, student-takd
    born_again : teacher -> born-again-1 -> ..., the teacher's architecture   -> born-again-<g>.safetensors
    mutual     : a fresh student and its peers learn together (DML)           -> student-dml, peer-<i>-dml
    ema        : a fresh student taught by an EMA of itself                   -> student-ema.safetensors
"""

from __future__ import annotations

from pathlib import Path

from distil.checkpoint import load_weights
from distil.recipe import Recipe
from distil.run import Run
from distil.schemes import EMASelfDistiller, MutualLearning


def stage_teachers(run: Run) -> None:
    for i, (name, section) in enumerate(run.recipe.schemes.teachers.items()):
        teacher = run.build(section, seed_offset=100 + i)
        if section.checkpoint:
            load_weights(teacher, Path(section.checkpoint))
        elif not section.pretrained:
            run.fit(run.task(teacher), run.splits.train, section.train, f"teacher-{name}")
        run.save(teacher, f"teacher-{name}", section)


def stage_takd(run: Run) -> None:
    """Teaching-assistant chain (Mirzadeh et al. 2020): each link distils the next with the recipe's terms."""
    previous = run.load("teacher")
    for i, section in enumerate(run.recipe.schemes.assistants, start=1):
        assistant = run.build(section, seed_offset=i)
        run.distill(assistant, previous, section.train, f"ta-{i}")
        run.save(assistant, f"ta-{i}", section)
        previous = assistant.cpu()
    student = run.model("student")
    run.distill(student, previous, run.recipe.student.train, "student-takd")
    run.save(student, "student-takd", "student")


def stage_born_again(run: Run) -> None:
    """Born-again networks (Furlanello et al. 2018): generation g, of the teacher's architecture, learns from g-1."""
    previous = run.load("teacher")
    for generation in range(1, run.recipe.schemes.born_again + 1):
        model = run.build(run.recipe.teacher, seed_offset=generation)
        run.distill(model, previous, run.recipe.teacher.train, f"born-again-{generation}")
        run.save(model, f"born-again-{generation}", "teacher")
        previous = model.cpu()


def stage_mutual(run: Run) -> None:
    """Deep mutual learning: a fresh student and the peers, from scratch, on the training split plus the transfer
    set when the recipe uses one (the peers' KL terms need no labels; CE reads the labelled samples only)."""
    s = run.recipe.schemes
    models = {"student": run.model("student")}
    models.update({f"peer-{i}": run.build(section, seed_offset=i) for i, section in enumerate(s.mutual, start=1)})
    task = MutualLearning(models, T=s.mutual_T, scoring=run.scoring)
    run.fit(task, run.distill_train(), run.recipe.student.train, "mutual")
    for i, section in enumerate(s.mutual, start=1):
        run.save(models[f"peer-{i}"], f"peer-{i}-dml", section)
    run.save(models["student"], "student-dml", "student")


def stage_ema(run: Run) -> None:
    """A fresh student taught online by an exponential moving average of its own weights (the mean teacher), on
    the same data as the distilled student: the soft term needs no labels."""
    student = run.model("student")
    task = EMASelfDistiller(student, decay=run.recipe.schemes.ema_decay, scoring=run.scoring)
    run.fit(task, run.distill_train(), run.recipe.student.train, "ema")
    run.save(student, "student-ema", "student")


def scheme_notes(r: Recipe) -> list[str]:
    """One line per scheme of the run, for the report."""
    s, notes = r.schemes, []
    data = "the labelled split plus the transfer set (KL on every sample, CE on the labelled ones)" \
        if r.distill.use_transfer else "the labelled split"
    for name, section in s.teachers.items():
        notes.append(f"teacher-{name}: a second teacher ({section.model} {section.knobs()}), read by name by the terms")
    if s.assistants:
        chain = " -> ".join(["teacher", *[f"ta-{i} ({m.model} {m.knobs()})" for i, m in
                                          enumerate(s.assistants, start=1)], "student-takd"])
        notes.append(f"teaching-assistant chain: {chain}, each link distilled with the recipe's terms")
    if s.born_again:
        notes.append(f"born-again-1..{s.born_again}: the teacher's architecture, each generation taught by the last")
    if s.mutual:
        notes.append(f"student-dml: a fresh student trained from scratch with {len(s.mutual)} peer(s) teaching each "
                     f"other (deep mutual learning, T={s.mutual_T}), on {data}")
    if s.ema:
        notes.append(f"student-ema: a fresh student taught by an EMA of its own weights (decay {s.ema_decay}), on "
                     f"{data}")
    return notes


def takd_models(r: Recipe) -> list[str]:
    """Written in this order; the last marks the stage done (as for every list below)."""
    return [f"ta-{i}" for i in range(1, len(r.schemes.assistants) + 1)] + ["student-takd"]


def born_again_models(r: Recipe) -> list[str]:
    return [f"born-again-{g}" for g in range(1, r.schemes.born_again + 1)]


def mutual_models(r: Recipe) -> list[str]:
    return [f"peer-{i}-dml" for i in range(1, len(r.schemes.mutual) + 1)] + ["student-dml"]


def scheme_models(r: Recipe) -> list[str]:
    """The models the schemes add to the report, in order."""
    s = r.schemes
    names = takd_models(r) if s.assistants else []
    names += born_again_models(r)
    names += mutual_models(r) if s.mutual else []
    return names + (["student-ema"] if s.ema else [])
