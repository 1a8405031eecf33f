"""The `distil` command. People-facing output (progress, tables) lives here; the library only logs.

Errors caused by input print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from distil.errors import DistilError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="distil: knowledge distillation and model compression for PyTorch.")
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # `distil ... 2>err.txt` keeps them
DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "mnist1d.yaml"
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _fail(err: Exception) -> None:
    if _state["debug"]:
        raise err
    where = f" (process {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    errors.print(f"[bold red]error{where}:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _where(recipe: Path, overrides: list[str]) -> str:
    """How an error names the recipe: its file, and the command line's --set values when there are some."""
    return f"{recipe} with --set {' '.join(overrides)}" if overrides else str(recipe)


class _EpochProgress:
    """A rich progress bar per stage: epoch, loss terms, validation accuracy, samples/s."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.task = progress, None

    def stage(self, name: str, epochs: int) -> None:
        self.task = self.progress.add_task(name, total=epochs, info="")

    def epoch(self, record: dict) -> None:
        parts = " ".join(f"{k}={v:.3f}" for k, v in record["parts"].items())
        metric, value = next(((k, v) for k, v in record.items() if k.startswith("val_")), ("val", None))
        info = f"{parts}  {metric}={'-' if value is None else f'{value:.3f}'}  {record['samples_per_s']:,.0f} samples/s"
        self.progress.update(self.task, completed=record["epoch"], info=info)
        total = self.progress.tasks[self.task].total
        every = max(1, int(total) // 20)  # a log file gets a plain line per epoch, at most ~20 per stage
        if not self.progress.console.is_terminal and (record["epoch"] % every == 0 or record["epoch"] == total):
            self.progress.console.print(f"{record['stage']:>9} epoch {record['epoch']}/{total:g}  {info}",
                                        highlight=False)


RECIPE_ARG = typer.Argument(None, help="Recipe YAML; default: the run folder's recipe.yaml, else the MNIST-1D demo.")
RUN_DIR = typer.Option(None, "--run-dir", help="Run folder; default runs/<recipe name>.")
SET = typer.Option([], "--set", help="Override a recipe field, e.g. --set student.train.epochs=5 (repeatable).")


def _pipeline(recipe: Path | None, run_dir: Path | None, overrides: list[str], force: bool = False,
              only: str | None = None) -> None:
    from distil.build import load_recipe
    from distil.device import resolve_device
    from distil.pipeline import load_metrics, run_pipeline
    from distil.recipe import apply_overrides, read_recipe

    console.quiet = os.environ.get("RANK", "0") != "0"  # under several processes, rank 0 speaks for all
    try:
        saved = run_dir / "recipe.yaml" if run_dir else None
        source = recipe or (saved if saved and saved.exists() else DEFAULT_RECIPE)
        loaded = load_recipe(apply_overrides(read_recipe(source), overrides), where=_where(source, overrides))
        resolve_device(loaded.device)  # a device this machine lacks fails here, before anything is said or written
        target = run_dir or Path("runs") / loaded.name
        console.print(f"recipe {source} -> run folder {target}")
        columns = [TextColumn("{task.description:>22}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
            bar = _EpochProgress(progress)
            ran = run_pipeline(loaded, target, force=force, on_epoch=bar.epoch, on_stage=bar.stage, only=only)
        if not ran:
            console.print("every stage's output exists already; nothing to do (use --force to start over)")
        if (target / "metrics.json").exists():
            metrics = load_metrics(target)
            _print_table(metrics["models"], metrics.get("task", "classify"))
            for line in (metrics.get("verdict") or {}).get("text", []):
                console.print(f"[bold green]verdict:[/] {escape(line)}", highlight=False, soft_wrap=True)
            for warning in metrics.get("warnings", []):
                console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
            console.print(f"report: {target / 'report.md'} (and report.html)")
        console.print(f"wrote: {target}")
    except DistilError as err:
        _fail(err)


@app.command()
def run(recipe: Path = RECIPE_ARG, run_dir: Path = RUN_DIR,
        force: bool = typer.Option(False, "--force", help="Start over instead of resuming."),
        device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N | mps (the recipe's `device`)."),
        nproc: int = typer.Option(1, "--nproc", min=1, help="Train on N processes (DDP; gloo on CPUs, nccl on GPUs)."),
        overrides: list[str] = SET) -> None:
    """Run the whole pipeline into a run folder: teacher, baseline, distill, compress and export (when
    the recipe enables them), report.

    A rerun resumes at the first stage whose output is missing; after a recipe change, from the first it affects.
    """
    overrides = overrides + ([f"device={device}"] if device else [])
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch(nproc, recipe, run_dir, overrides, force)
        return
    _pipeline(recipe, run_dir, overrides, force)


def _launch(nproc: int, recipe: Path | None, run_dir: Path | None, overrides: list[str], force: bool) -> None:
    """Start `nproc` processes of this command with torchrun's launcher; the recipe is checked here first."""
    import subprocess

    from distil.build import load_recipe
    from distil.recipe import apply_overrides, read_recipe
    from distil.run import check_batch_sizes

    try:
        source = recipe or DEFAULT_RECIPE
        loaded = load_recipe(apply_overrides(read_recipe(source), list(overrides)), where=_where(source, overrides))
        check_batch_sizes(loaded, nproc, f"--nproc {nproc}")
    except DistilError as err:
        _fail(err)
    args = [str(recipe)] if recipe else []
    args += ["--run-dir", str(run_dir)] if run_dir else []
    args += ["--force"] if force else []
    args += [item for override in overrides for item in ("--set", override)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "distil", *(["--debug"] if _state["debug"] else []), "run", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # the processes print progress and errors themselves; the launcher's own failure report only with --debug
    done = subprocess.run(command, env=env, stderr=None if _state["debug"] else subprocess.PIPE, text=True)
    # the launcher itself always ends a failure with a traceback; a second one is a crash in a process: show it.
    # An input error is one line per process ("error (process N): ..."): show those lines, each once
    if done.returncode and done.stderr:
        if done.stderr.count("Traceback (most recent call last)") > 1:
            print(done.stderr[-6000:], file=sys.stderr)
        else:
            lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
            print("\n".join(dict.fromkeys(lines)), file=sys.stderr)
    if done.returncode:
        raise typer.Exit(2 if done.returncode != 130 else 130)


@app.command()
def sweep(recipe: Path = typer.Argument(..., help="Recipe YAML with a kd term: its T and alpha, and the weights of "
                                                   "the other terms, are searched."),
          trials: int = typer.Option(20, "--trials", min=1, help="Trials in all; a rerun runs the missing ones."),
          run_dir: Path = typer.Option(None, "--run-dir", help="Sweep folder; default runs/<recipe name>-sweep."),
          epochs: int = typer.Option(None, "--epochs", min=1, help="Student epochs per trial (default: the recipe's "
                                                                    "student.train.epochs)."),
          overrides: list[str] = SET) -> None:
    """Search the KD temperature T, alpha and the other terms' weights with Optuna (TPE, median pruning).

    The teacher trains once into the sweep folder, and its logits are shared by every trial.

    Writes sweep.db (rerun to resume), sweep.md (the trials; the best against the recipe), plots/, best.yaml.
    """
    from distil.build import load_recipe
    from distil.recipe import apply_overrides, read_recipe
    from distil.sweep import import_optuna, run_sweep

    overrides = overrides + ([f"student.train.epochs={epochs}"] if epochs else [])
    try:
        if not _state["debug"]:  # a line per trial says what Optuna's own log would
            import_optuna().logging.set_verbosity(import_optuna().logging.WARNING)
        loaded = load_recipe(apply_overrides(read_recipe(recipe), overrides), where=_where(recipe, overrides))
        target = run_dir or Path("runs") / f"{loaded.name}-sweep"
        console.print(f"recipe {recipe} -> sweep folder {target}")
        command = " ".join(["distil sweep", str(recipe), f"--trials {trials}", *([f"--epochs {epochs}"] if epochs
                                                                                   else []),
                            *(f"--set {item}" for item in overrides if item != f"student.train.epochs={epochs}")])
        say = lambda line: console.print(escape(line), highlight=False, soft_wrap=True)
        columns = [TextColumn("{task.description:>22}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
            bar = _EpochProgress(progress)
            summary = run_sweep(loaded, target, trials, say, on_epoch=bar.epoch, on_stage=bar.stage, command=command)
    except DistilError as err:
        _fail(err)
    best, ref = summary["best"], summary["reference"]
    val, test = f"val_{summary['metric']}", f"test_{summary['metric']}"
    console.print(f"best: trial {best['trial']}, val {best[val]:.3f}, test {best[test]:.3f}; the recipe's own "
                  f"settings: val {ref[val]:.3f}, test {ref[test]:.3f} ({summary['metric']})", highlight=False)
    console.print(f"wrote: {target / 'sweep.md'}, {target / 'best.yaml'} (distil run {target / 'best.yaml'})")


@app.command()
def compress(recipe: Path = RECIPE_ARG, run_dir: Path = RUN_DIR, overrides: list[str] = SET) -> None:
    """Run the compress stage alone (prune + fine-tune) on a run folder whose earlier stages are done."""
    _pipeline(recipe, run_dir, overrides, only="compress")


@app.command(name="export")
def export_(recipe: Path = RECIPE_ARG, run_dir: Path = RUN_DIR, overrides: list[str] = SET) -> None:
    """Run the export stage alone (ONNX + int8) on a run folder whose earlier stages are done."""
    _pipeline(recipe, run_dir, overrides, only="export")


@app.command()
def report(recipe: Path = RECIPE_ARG, run_dir: Path = RUN_DIR, overrides: list[str] = SET) -> None:
    """Evaluate every model of a run folder again and rewrite its report."""
    _pipeline(recipe, run_dir, overrides, only="report")


@app.command()
def bench(file: Path = typer.Argument(..., help="A distil .safetensors model file or an .onnx file."),
          runs: int = typer.Option(50, min=50, help="Batch-1 runs (median) after warm-up."),
          batch: int = typer.Option(256, min=1, help="Batch size for throughput.")) -> None:
    """Measure a model on PyTorch and onnxruntime, with 1 thread and with all cores."""
    from distil.bench import bench_file

    try:
        rows = bench_file(file, runs=runs, batch=batch)
    except DistilError as err:
        _fail(err)
    table = Table("runtime", "threads", "latency b1 (ms)", f"throughput b{batch} (samples/s)")
    for row in rows:
        table.add_row(row["runtime"], str(row["threads"]), f"{row['latency_ms_b1']:.3f}",
                      f"{row['throughput']:,.0f}")
    console.print(f"{file}: {rows[0]['params']:,} parameters" if rows[0].get("params") else str(file))
    console.print(table)


def _print_table(models: dict[str, dict], task: str = "classify") -> None:
    from distil.report import COLUMNS, table_rows

    if task == "lm":
        from distil.lm import COLUMNS as LM_COLUMNS
        from distil.lm import lm_table

        table = Table(*LM_COLUMNS)
        for row in lm_table(models):
            table.add_row(*row)
        console.print(table)
        return
    shown = [0, 1, 2, 5, 6, 7, 9, 10, 11, 12, 13]  # the console gets the key columns; report.md has all
    table = Table(*[COLUMNS[i] for i in shown])
    for row in table_rows(models):
        table.add_row(*[row[i] for i in shown])
    console.print(table)


@app.command()
def experiment(name: str = typer.Argument(..., help="methods | temperature | omitted-class | few-data | "
                                                   "soft-vs-smoothing | transfer-size | capacity-gap | llm"),
               seeds: int = typer.Option(3, min=1, help="Seeds to average over."),
               quick: bool = typer.Option(False, "--quick", help="Fewer epochs and a smaller transfer set: minutes."),
               out: Path = typer.Option(None, "--out", help="Markdown page to write (its plot goes beside it); "
                                        "default docs/methods.md, docs/llm.md, docs/experiments/<name>.md for the "
                                        "others.")) -> None:
    """Run a research experiment and write its page (a table, the command, the settings, a plot)."""
    from distil.errors import did_you_mean
    from distil.experiments import EXPERIMENTS

    if name not in EXPERIMENTS:
        _fail(DistilError(f"unknown experiment '{name}'." + did_you_mean(name, EXPERIMENTS)))
    where = {} if out is None else {"out": out}  # each experiment knows its own page
    try:
        path = EXPERIMENTS[name](seeds=seeds, quick=quick, log=lambda line: console.print(line, highlight=False),
                                 **where)
    except DistilError as err:
        _fail(err)
    console.print(f"wrote: {path}")


@app.command()
def cache(action: str = typer.Argument(..., help="info | clear"),
          folder: Path = typer.Option(None, "--dir", help="Cache folder; default $DISTIL_CACHE/teachers.")) -> None:
    """Show or empty the teacher-output cache (teacher logits reused across runs)."""
    from distil.cache import TeacherCache

    store = TeacherCache(folder)
    if action == "info":
        entries = store.index()
        total = sum(e["bytes"] for e in entries.values())
        noun = "entry" if len(entries) == 1 else "entries"
        console.print(f"{store.folder}: {len(entries)} {noun}, {total / 2**20:.1f} MiB")
        for key, e in entries.items():
            console.print(f"  {key}  {e['dtype']} {e['shape']}  {e['bytes'] / 2**20:.1f} MiB  {e['created']}",
                          highlight=False)
    elif action == "clear":
        console.print(f"{store.folder}: removed {store.clear()} entries")
    else:
        from distil.errors import did_you_mean

        _fail(DistilError(f"unknown cache action '{action}'." + did_you_mean(action, ["info", "clear"])))


@app.command(name="list")
def list_(what: str = typer.Argument(..., help="methods | models | datasets | augmentations")) -> None:
    """Print the loss methods, models, data sources or augmentations that exist, one per line."""
    from distil.augment import AUGMENTS
    from distil.data import SOURCES
    from distil.errors import did_you_mean
    from distil.losses import LOSSES
    from distil.models import MODELS

    registries = {"methods": LOSSES, "models": MODELS, "datasets": SOURCES, "augmentations": AUGMENTS}
    if what not in registries:
        _fail(DistilError(f"cannot list '{what}'." + did_you_mean(what, registries)))
    for name, obj in registries[what].items():
        summary = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())  # first paragraph, one line
        print(f"{name:<20} {summary}")


def entry() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    entry()
