"""fp32 against dynamic and static int8 on onnxruntime, for one model of a run folder.

    python benchmarks/quantization.py [RUN_DIR] [MODEL] [--threads 1]

Defaults: runs/mnist1d, teacher-pruned (run `make demo` first). Prints file size, test accuracy
and batch-256 throughput of each form, and each int8 form's throughput as a ratio of fp32,
measured in this one run. Dynamic quantization of convolutions quantizes activations at run time
(ConvInteger), which on CPU is often slower than fp32; static (QDQ) is what distil uses for conv nets.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from distil.build import load_recipe
from distil.data import load_splits
from distil.evaluate import ort_speed
from distil.export import quantize_onnx, run_onnx, session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/mnist1d")
    parser.add_argument("model", nargs="?", default="teacher-pruned")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    fp32 = run_dir / f"{args.model}.onnx"
    if not fp32.exists():
        raise SystemExit(f"{fp32} not found: run `make demo` (or `distil run`) with export enabled first")
    recipe = load_recipe(run_dir / "recipe.yaml")
    splits = load_splits(recipe.data.source, recipe.data.args, recipe.seed, recipe.data.val_fraction,
                         recipe.data.test_fraction)
    test_x, test_y = splits.test.x.numpy(), splits.test.y.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": fp32, "dynamic int8": Path(tmp) / "dynamic.onnx", "static int8": Path(tmp) / "static.onnx"}
        quantize_onnx(fp32, files["dynamic int8"], "dynamic")
        quantize_onnx(fp32, files["static int8"], "static", splits.train.x[:512].numpy())
        sessions = {name: session(path, args.threads) for name, path in files.items()}
        speeds: dict[str, list[float]] = {name: [] for name in files}
        for _ in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every form
            for name, sess in sessions.items():
                speeds[name].append(ort_speed(sess, test_x, runs=50, batch=256)[1])
        rows = {name: (path.stat().st_size, float((run_onnx(sessions[name], test_x).argmax(1) == test_y).mean()),
                       statistics.median(speeds[name])) for name, path in files.items()}
    print(f"{args.model} from {run_dir}, onnxruntime, {args.threads} thread(s), batch 256, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'form':<14}{'bytes':>10}{'accuracy':>10}{'samples/s':>12}{'vs fp32':>9}")
    for name, (size, accuracy, throughput) in rows.items():
        print(f"{name:<14}{size:>10,}{accuracy:>10.3f}{throughput:>12,.0f}{throughput / rows['fp32'][2]:>8.2f}x")
    print(f"static int8 file / fp32 file: {rows['static int8'][0] / rows['fp32'][0]:.3f}")


if __name__ == "__main__":
    main()
