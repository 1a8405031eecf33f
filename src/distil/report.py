"""The report: one comparison table, training curves and trade-off plots with the Pareto front,
as markdown and as a self-contained HTML page."""

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

COLUMNS = ["model", "accuracy", "vs teacher", "agreement", "ECE", "params", "MACs", "file", "gzip",
           "PyTorch b1", "ORT b1", "ORT b256", "ORT speed-up", "size ratio"]


def with_ratios(models: dict[str, dict]) -> dict[str, dict]:
    """Add ratios against the teacher, each within one runtime:
    `speedup` (PyTorch batch-1 latency), `ort_speedup_b256` (onnxruntime throughput at batch 256),
    `size_ratio` (deployable file bytes: ONNX where exported), `compression` (parameters)."""
    teacher = models.get("teacher")
    if not teacher:
        return models
    for m in models.values():
        m["accuracy_delta"] = m["accuracy"] - teacher["accuracy"]
        m["compression"] = teacher["params"] / max(1, m["params"])
        if m.get("runtime") == "pytorch":
            m["speedup"] = teacher["latency_ms_b1"] / m["latency_ms_b1"]
        if "ort_throughput_b256" in m and "ort_throughput_b256" in teacher:
            m["ort_speedup_b256"] = m["ort_throughput_b256"] / teacher["ort_throughput_b256"]
        key = "onnx_bytes" if "onnx_bytes" in m and "onnx_bytes" in teacher else "bytes"
        m["size_ratio"] = m[key] / teacher[key]
    return models


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table_rows(models: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, m in models.items():
        delta = m.get("accuracy_delta")
        rows.append([
            name, f"{m['accuracy']:.3f}", "-" if delta is None else f"{delta * 100:+.1f} pt",
            _fmt(m.get("agreement"), ".3f"), f"{m['ece']:.3f}", f"{m['params']:,}", _si(m["macs"]),
            _bytes(m.get("onnx_bytes", m["bytes"])), _bytes(m["bytes_gzip"]) if "bytes_gzip" in m else "-",
            _fmt(m["latency_ms_b1"] if m.get("runtime") == "pytorch" else None, ".3f", " ms"),
            _fmt(m.get("ort_latency_ms_b1"), ".3f", " ms"), _fmt(m.get("ort_throughput_b256"), ",.0f", "/s"),
            _fmt(m.get("ort_speedup_b256"), ".1f", "x"), _fmt(m.get("size_ratio"), ".2f")])
    return rows


def markdown_table(models: dict[str, dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(models)]
    return "\n".join(lines)


def report_warnings(models: dict[str, dict], tolerance: float = 0.01) -> list[str]:
    """What a reader must not miss: distillation that did not pay, int8 files that lost accuracy or grew, pruned
    models that lost more than `tolerance` (a fraction of accuracy: 0.01 is one point)."""
    found = []
    student, baseline = models.get("student"), models.get("baseline")
    if student and baseline and student["accuracy"] < baseline["accuracy"]:
        found.append(f"the distilled student ({student['accuracy']:.3f}) is less accurate than the same student "
                     f"trained on labels alone ({baseline['accuracy']:.3f}): distillation did not pay here. Try "
                     "another temperature or alpha (`distil sweep`), a transfer set, a better teacher, or ship the "
                     "baseline.")
    allowed = f"more than the report's tolerance of {_points(tolerance)}"
    for name, row in models.items():
        source = models.get(name.removesuffix("-int8")) if name.endswith("-int8") else None
        if source and source["accuracy"] - row["accuracy"] > tolerance + EPS:
            found.append(f"{name} ({row['accuracy']:.3f}) lost {_points(source['accuracy'] - row['accuracy'])} of "
                         f"accuracy against its fp32 form {name.removesuffix('-int8')} ({source['accuracy']:.3f}), "
                         f"{allowed}: ship the fp32 file, or let quantization-aware fine-tuning run (export.qat, "
                         "export.qat_threshold).")
        fp32 = source.get("onnx_bytes") if source else None
        if fp32 and row.get("bytes", 0) > fp32:
            found.append(f"{name} ({row['bytes']:,} bytes) is larger than its fp32 ONNX file ({fp32:,} bytes): "
                         "on a model this small the quantize/dequantize nodes and scales outweigh the 4x smaller "
                         "weights. Ship the fp32 file.")
        unpruned = name.split("-pruned")[0] if "-pruned" in name and not name.endswith("-int8") else None
        if unpruned in models and models[unpruned]["accuracy"] - row["accuracy"] > tolerance + EPS:
            drop = models[unpruned]["accuracy"] - row["accuracy"]
            found.append(f"{name} ({row['accuracy']:.3f}) lost {_points(drop)} of accuracy against the unpruned "
                         f"{unpruned} ({models[unpruned]['accuracy']:.3f}), {allowed}: prune less (compress.ratio), "
                         "in steps (compress.steps), or fine-tune longer (compress.finetune.epochs).")
    return found


EPS = 1e-9  # accuracies are float32 fractions of the test set: 0.974 must count as within 0.984 - 0.01


def _points(fraction: float) -> str:
    return f"{fraction * 100:.1f} point" + ("" if round(fraction * 100, 1) == 1 else "s")


def verdict(models: dict[str, dict], tolerance: float = 0.01) -> dict | None:
    """Which model to ship: the smallest (deployable file bytes) and the fastest (throughput at the report's large
    batch) of the models whose accuracy is within `tolerance` of the teacher's (the teacher itself included), each
    with its size, throughput and batch-1 latency against the teacher's.

    Speeds compare within one runtime: onnxruntime when every model was exported (int8 files run there only), else
    PyTorch. `models` are rows of `metrics.json`; None without a teacher row.
    """
    teacher = models.get("teacher")
    if teacher is None:
        return None
    ort = all("ort_throughput_b256" in m and "ort_latency_ms_b1" in m for m in models.values())
    speed, latency = ("ort_throughput_b256", "ort_latency_ms_b1") if ort else ("throughput_b256", "latency_ms_b1")
    size = "onnx_bytes" if all("onnx_bytes" in m for m in models.values()) else "bytes"
    within = {n: m for n, m in models.items() if m["accuracy"] >= teacher["accuracy"] - tolerance - EPS}

    def pick(name: str) -> dict:
        m = within[name]
        return {"model": name, "accuracy": m["accuracy"], "bytes": m[size], "throughput": m[speed],
                "latency_ms_b1": m[latency], "size_ratio": m[size] / teacher[size],
                "throughput_ratio": m[speed] / teacher[speed], "latency_ratio": m[latency] / teacher[latency]}

    smallest = pick(min(within, key=lambda n: (within[n][size], -within[n][speed])))
    fastest = pick(max(within, key=lambda n: (within[n][speed], -within[n][size])))
    result = {"tolerance": tolerance, "teacher_accuracy": teacher["accuracy"], "within": list(within),
              "runtime": "onnxruntime" if ort else "pytorch", "smallest": smallest, "fastest": fastest}
    return {**result, "text": verdict_text(result)}


def verdict_text(v: dict) -> list[str]:
    """The verdict in plain words, one sentence per line."""
    tol, t_acc, runtime = _points(v["tolerance"]), v["teacher_accuracy"], v["runtime"]
    if v["within"] == ["teacher"]:
        return [f"Ship the teacher: no other model of this run is within {tol} of its accuracy ({t_acc:.3f})."]

    def describe(p: dict) -> str:
        if p["model"] == "teacher":
            return "the teacher itself"
        delta = (p["accuracy"] - t_acc) * 100
        return (f"accuracy {p['accuracy']:.3f} ({delta:+.1f} pt against the teacher's {t_acc:.3f}); its file is "
                f"{_bytes(p['bytes'])}, {p['size_ratio']:.2f}x the teacher's ({1 / p['size_ratio']:.1f}x smaller); "
                f"throughput {p['throughput_ratio']:.1f}x the teacher's and batch-1 latency "
                f"{p['latency_ratio']:.2f}x the teacher's ({runtime})")

    small, fast = v["smallest"], v["fastest"]
    if small["model"] == fast["model"]:
        return [f"Ship {small['model']}, the smallest and the fastest model within {tol} of the teacher's accuracy: "
                f"{describe(small)}."]
    return [f"Smallest within {tol} of the teacher's accuracy: {small['model']}: {describe(small)}.",
            f"Fastest within {tol}: {fast['model']}: {describe(fast)}."]


def write_report(run_dir: Path, models: dict[str, dict], history: list[dict], notes: list[str],
                 title: str, tolerance: float = 0.01) -> Path:
    """Write metrics.json, plots/*.png, report.md and report.html into `run_dir`; return report.md's path.
    Both reports open with the verdict (`verdict`, for an accuracy `tolerance`), then the warnings."""
    run_dir = Path(run_dir)
    plots = {"training": plot_training(history, run_dir / "plots" / "training.png"),
             "tradeoff": plot_tradeoff(models, run_dir / "plots" / "tradeoff.png")}
    warnings = report_warnings(models, tolerance)
    chosen = verdict(models, tolerance)
    payload = json.dumps({"verdict": chosen, "models": models, "notes": notes, "warnings": warnings}, indent=2)
    atomic_write(run_dir / "metrics.json", lambda tmp: tmp.write_text(payload))
    lines = chosen["text"] if chosen else []
    md = _markdown(models, notes, title, warnings, lines)
    atomic_write(run_dir / "report.md", lambda tmp: tmp.write_text(md))
    page = _html(models, notes, title, plots, warnings, lines)
    atomic_write(run_dir / "report.html", lambda tmp: tmp.write_text(page))
    return run_dir / "report.md"


LEGEND = ("file: the deployable file (ONNX where exported, else safetensors); gzip: that file compressed; "
          "PyTorch b1 / ORT b1: median batch-1 latency; ORT b256: onnxruntime samples/s at batch 256; "
          "ORT speed-up: ORT b256 throughput against the teacher's; size ratio: file bytes against the teacher's.")


def _markdown(models: dict, notes: list[str], title: str, warnings: list[str], verdict_lines: list[str]) -> str:
    parts = [f"# {title}", ""] + ([f"**Verdict.** {' '.join(verdict_lines)}", ""] if verdict_lines else [])
    parts += [f"> **Warning:** {w}\n" for w in warnings] + [markdown_table(models), "", LEGEND, ""]
    parts += [f"- {note}" for note in notes] + [""]
    parts += ["## Accuracy against latency and size", "",
              "Filled markers joined by the line are the Pareto front: no other model is both more accurate "
              "and faster (or smaller).", "", "![trade-off](plots/tradeoff.png)", "",
              "## Training curves", "", "![training curves](plots/training.png)", ""]
    return "\n".join(parts)


def _html(models: dict, notes: list[str], title: str, plots: dict[str, Path], warnings: list[str],
          verdict_lines: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in table_rows(models))
    images = "".join(
        f'<h2>{html.escape(label)}</h2><img alt="{key}" src="data:image/png;base64,'
        f'{base64.b64encode(plots[key].read_bytes()).decode()}">'
        for key, label in (("tradeoff", "Accuracy against latency and size (Pareto front marked)"),
                           ("training", "Training curves")))
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + (f"<p><b>Verdict.</b> {html.escape(' '.join(verdict_lines))}</p>" if verdict_lines else "")
            + "".join(f"<p style='color:#a00'><b>Warning:</b> {html.escape(w)}</p>" for w in warnings) +
            f"<table><tr>{head}</tr>{body}</table><p>{html.escape(LEGEND)}</p><ul>{items}</ul>{images}"
            "</body></html>")


def plot_training(history: list[dict], path: Path) -> Path:
    """Per stage: each loss term (top) and validation accuracy (bottom) against epoch."""
    stages = list(dict.fromkeys(r["stage"] for r in history)) or ["(none)"]
    fig, axes = plt.subplots(2, len(stages), figsize=(3.8 * len(stages), 6), squeeze=False)
    for col, stage in enumerate(stages):
        records = [r for r in history if r["stage"] == stage]
        epochs = [r["epoch"] for r in records]
        for term in dict.fromkeys(k for r in records for k in r["parts"]):
            axes[0][col].plot(epochs, [r["parts"].get(term) for r in records], label=term)
        axes[0][col].set_title(f"{stage}: loss terms (weighted)", fontsize=9)
        axes[0][col].set_yscale("log")
        if records:
            axes[0][col].legend(fontsize=7)
        metric = next((k for r in records for k in r if k.startswith("val_")), "val_acc")  # the task's metric
        axes[1][col].plot(epochs, [r.get(metric) for r in records], color="black")
        title = "validation accuracy" if metric == "val_acc" else f"validation {metric.removeprefix('val_')}"
        axes[1][col].set_title(f"{stage}: {title}", fontsize=9)
        axes[1][col].set_xlabel("epoch")
    fig.tight_layout()
    return _save(fig, path)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points (cost, accuracy) that no other point beats on both: lower cost and higher accuracy."""
    front = []
    for name, (cost, acc) in points.items():
        dominated = any(c <= cost and a >= acc and (c < cost or a > acc) for other, (c, a) in points.items()
                        if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def plot_tradeoff(models: dict[str, dict], path: Path) -> Path:
    """Accuracy against batch-1 latency and against file size, one labelled point per model, front marked."""
    use_ort = all("ort_latency_ms_b1" in m for m in models.values())
    latency_key = "ort_latency_ms_b1" if use_ort else "latency_ms_b1"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    runtime = "onnxruntime" if use_ort else "PyTorch"
    panels = ((axes[0], lambda m: m[latency_key], f"latency at batch 1 (ms, {runtime})"),
              (axes[1], lambda m: m.get("onnx_bytes", m["bytes"]) / 1024, "file size (KiB)"))
    for ax, cost, label in panels:
        points = {name: (cost(m), m["accuracy"]) for name, m in models.items()}
        front = pareto_front(points)
        ax.plot([points[n][0] for n in front], [points[n][1] for n in front], "-", color="tab:red", alpha=0.5,
                drawstyle="steps-post", label="Pareto front")
        for name, (x, y) in points.items():
            on_front = name in front
            ax.scatter(x, y, s=50, color="tab:red" if on_front else "white", edgecolor="tab:red" if on_front
                       else "gray", zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        _label_points(ax, points)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _label_points(ax, points: dict[str, tuple[float, float]]) -> None:
    """Name every point, moving a label down (in steps of one text line) while it would overlap one already placed."""
    ax.figure.canvas.draw()  # settle the limits so that data -> pixel transforms are final
    placed: list[tuple[float, float, float, float]] = []
    for name, (x, y) in sorted(points.items(), key=lambda item: -item[1][1]):
        px, py = ax.transData.transform((x, y))
        width, height = 6.2 * len(name), 11
        for step in range(8):
            box = (px + 6, py + 4 - step * height, px + 6 + width, py + 4 - step * height + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6 * 72 / ax.figure.dpi,
                    (4 - step * height) * 72 / ax.figure.dpi), fontsize=8)


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
