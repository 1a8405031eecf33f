"""The report: one comparison table, training curves and trade-off plots, as markdown and self-contained HTML."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distil.checkpoint import atomic_write  # noqa: E402

COLUMNS = ["model", "accuracy", "vs teacher", "agreement", "ECE", "params", "MACs", "size", "latency b1",
           "throughput b256", "speed-up", "compression"]


def with_ratios(models: dict[str, dict]) -> dict[str, dict]:
    """Add speed-up (teacher latency / model latency) and compression (teacher params / params)."""
    teacher = models.get("teacher")
    for metrics in models.values():
        if teacher:
            metrics["speedup"] = teacher["latency_ms_b1"] / metrics["latency_ms_b1"]
            metrics["compression"] = teacher["params"] / max(1, metrics["params"])
            metrics["accuracy_delta"] = metrics["accuracy"] - teacher["accuracy"]
    return models


def table_rows(models: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, m in models.items():
        agreement = "-" if m.get("agreement") is None else f"{m['agreement']:.3f}"
        delta = m.get("accuracy_delta")
        rows.append([name, f"{m['accuracy']:.3f}", "-" if delta is None else f"{delta * 100:+.1f} pt", agreement,
                     f"{m['ece']:.3f}", f"{m['params']:,}", _si(m["macs"]), _bytes(m["bytes"]),
                     f"{m['latency_ms_b1']:.3f} ms", f"{m['throughput_b256']:,.0f}/s",
                     f"{m.get('speedup', 1.0):.1f}x", f"{m.get('compression', 1.0):.1f}x"])
    return rows


def markdown_table(models: dict[str, dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(models)]
    return "\n".join(lines)


def write_report(run_dir: Path, models: dict[str, dict], history: list[dict], notes: list[str],
                 title: str) -> Path:
    """Write metrics.json, plots/*.png, report.md and report.html into `run_dir`; return report.md's path."""
    run_dir = Path(run_dir)
    plots = {"training": plot_training(history, run_dir / "plots" / "training.png"),
             "tradeoff": plot_tradeoff(models, run_dir / "plots" / "tradeoff.png")}
    payload = json.dumps({"models": models, "notes": notes}, indent=2)
    atomic_write(run_dir / "metrics.json", lambda tmp: tmp.write_text(payload))
    md = _markdown(models, notes, title, plots)
    atomic_write(run_dir / "report.md", lambda tmp: tmp.write_text(md))
    page = _html(models, notes, title, plots)
    atomic_write(run_dir / "report.html", lambda tmp: tmp.write_text(page))
    return run_dir / "report.md"


def _markdown(models: dict, notes: list[str], title: str, plots: dict[str, Path]) -> str:
    parts = [f"# {title}", "", markdown_table(models), ""]
    parts += [f"- {note}" for note in notes] + [""]
    parts += ["## Training curves", "", "![training curves](plots/training.png)", "",
              "## Accuracy against latency and size", "", "![trade-off](plots/tradeoff.png)", ""]
    return "\n".join(parts)


def _html(models: dict, notes: list[str], title: str, plots: dict[str, Path]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in table_rows(models))
    images = "".join(
        f'<h2>{html.escape(label)}</h2><img alt="{key}" src="data:image/png;base64,'
        f'{base64.b64encode(plots[key].read_bytes()).decode()}">'
        for key, label in (("training", "Training curves"), ("tradeoff", "Accuracy against latency and size")))
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<table><tr>{head}</tr>{body}</table><ul>{items}</ul>{images}</body></html>")


def plot_training(history: list[dict], path: Path) -> Path:
    """Per stage: each loss term (top) and validation accuracy (bottom) against epoch."""
    stages = list(dict.fromkeys(r["stage"] for r in history)) or ["(none)"]
    fig, axes = plt.subplots(2, len(stages), figsize=(4.2 * len(stages), 6), squeeze=False)
    for col, stage in enumerate(stages):
        records = [r for r in history if r["stage"] == stage]
        epochs = [r["epoch"] for r in records]
        for term in dict.fromkeys(k for r in records for k in r["parts"]):
            axes[0][col].plot(epochs, [r["parts"].get(term) for r in records], label=term)
        axes[0][col].set_title(f"{stage}: loss terms (weighted)")
        axes[0][col].set_yscale("log")
        if records:
            axes[0][col].legend(fontsize=7)
        axes[1][col].plot(epochs, [r["val_acc"] for r in records], color="black")
        axes[1][col].set_title(f"{stage}: validation accuracy")
        axes[1][col].set_xlabel("epoch")
    fig.tight_layout()
    return _save(fig, path)


def plot_tradeoff(models: dict[str, dict], path: Path) -> Path:
    """Accuracy against batch-1 latency and against bytes on disk, one labelled point per model."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "latency_ms_b1", "latency at batch 1 (ms)"),
                           (axes[1], "bytes", "size on disk (bytes)")):
        for name, m in models.items():
            ax.scatter(m[key], m["accuracy"], s=40)
            ax.annotate(name, (m[key], m["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.2f} MiB"
