"""Run a recipe with several seeds and print teacher, baseline and distilled accuracy as mean +- std.

    python benchmarks/seeds.py [RECIPE] [--seeds 0 1 2] [--runs runs/seeds]

Each seed writes runs/seeds/<name>-seed<k>/; existing complete runs are reused (the pipeline resumes).
The seed changes model initialisation, the validation split and batch order; MNIST-1D's data
itself is the published generator setting.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from distil.build import load_recipe
from distil.pipeline import load_metrics, run_pipeline
from distil.recipe import apply_overrides, read_recipe

DEFAULT = Path(__file__).parent.parent / "recipes" / "mnist1d.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(DEFAULT))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/seeds")
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        recipe = load_recipe(apply_overrides(read_recipe(args.recipe), [f"seed={seed}"]))
        run_dir = Path(args.runs) / f"{recipe.name}-seed{seed}"
        run_pipeline(recipe, run_dir)
        models = load_metrics(run_dir)["models"]
        line = "  ".join(f"{name} {m['accuracy']:.3f}" for name, m in models.items())
        print(f"seed {seed}: {line}", flush=True)
        for name, m in models.items():
            results.setdefault(name, []).append(m["accuracy"])
    print(f"test accuracy over seeds {args.seeds}:")
    for name, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {name:<22} {statistics.mean(values):.3f} +- {spread:.3f}")


if __name__ == "__main__":
    main()
