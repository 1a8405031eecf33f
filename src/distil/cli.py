"""The `distil` command. People-facing output (progress, tables) lives here; the library only logs.

Errors caused by input print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from distil.errors import DistilError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="distil: knowledge distillation and model compression for PyTorch.")
console = Console(width=None if sys.stdout.isatty() else 160)
DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "mnist1d.yaml"
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _fail(err: Exception) -> None:
    if _state["debug"]:
        raise err
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


class _EpochProgress:
    """A rich progress bar per stage: epoch, loss terms, validation accuracy, samples/s."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.task = progress, None

    def stage(self, name: str, epochs: int) -> None:
        self.task = self.progress.add_task(name, total=epochs, info="")

    def epoch(self, record: dict) -> None:
        parts = " ".join(f"{k}={v:.3f}" for k, v in record["parts"].items())
        val = "-" if record["val_acc"] is None else f"{record['val_acc']:.3f}"
        info = f"{parts}  val_acc={val}  {record['samples_per_s']:,.0f} samples/s"
        self.progress.update(self.task, completed=record["epoch"], info=info)
        total = self.progress.tasks[self.task].total
        every = max(1, int(total) // 20)  # a log file gets a plain line per epoch, at most ~20 per stage
        if not self.progress.console.is_terminal and (record["epoch"] % every == 0 or record["epoch"] == total):
            self.progress.console.print(f"{record['stage']:>9} epoch {record['epoch']}/{total:g}  {info}",
                                        highlight=False)


@app.command()
def run(recipe: Path = typer.Argument(None, help="Recipe YAML; the embedded MNIST-1D default when omitted."),
        run_dir: Path = typer.Option(None, "--run-dir", help="Run folder; default runs/<recipe name>."),
        force: bool = typer.Option(False, "--force", help="Start over instead of resuming."),
        overrides: list[str] = typer.Option([], "--set", help="Override a recipe field: --set student.train.epochs=5")
        ) -> None:
    """Run the whole pipeline (teacher, baseline, distill, report) into a run folder."""
    from distil.pipeline import load_metrics, run_pipeline
    from distil.recipe import apply_overrides, load_recipe, read_recipe

    try:
        loaded = load_recipe(apply_overrides(read_recipe(recipe or DEFAULT_RECIPE), overrides))
        target = run_dir or Path("runs") / loaded.name
        console.print(f"recipe {recipe or DEFAULT_RECIPE} -> run folder {target}")
        columns = [TextColumn("{task.description:>9}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=console, transient=False) as progress:
            bar = _EpochProgress(progress)
            ran = run_pipeline(loaded, target, force=force, on_epoch=bar.epoch, on_stage=bar.stage)
        if not ran:
            console.print("every stage's output exists already; nothing to do (use --force to start over)")
        _print_table(load_metrics(target)["models"])
        console.print(f"report: {target / 'report.md'} (and report.html)")
    except DistilError as err:
        _fail(err)


def _print_table(models: dict[str, dict]) -> None:
    from distil.report import COLUMNS, table_rows

    table = Table(*COLUMNS)
    for row in table_rows(models):
        table.add_row(*row)
    console.print(table)


@app.command(name="list")
def list_(what: str = typer.Argument(..., help="methods | models | datasets")) -> None:
    """Print the loss methods, models or data sources that exist, one per line."""
    from distil.data import SOURCES
    from distil.errors import did_you_mean
    from distil.losses import LOSSES
    from distil.models import MODELS

    registries = {"methods": LOSSES, "models": MODELS, "datasets": SOURCES}
    if what not in registries:
        _fail(DistilError(f"cannot list '{what}'." + did_you_mean(what, registries)))
    for name, obj in registries[what].items():
        doc = (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""
        print(f"{name:<14} {doc}")


def entry() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    entry()
