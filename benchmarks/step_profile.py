"""Where a training step's time goes: torch.profiler over one epoch of the demo's student, in distil's `fit`.

On a GPU a 5k-parameter student's step is bound by the host: this prints what the host spends it on (kernel
launches, the optimiser's step, autograd) and how busy the GPU was, so that a change to the loop can be
judged by what it removes. The rows are those of `benchmarks/throughput.py`: `student` (the student alone on
labels) or `cached` (KD + CE from cached teacher logits).

    python benchmarks/step_profile.py [--device auto] [--row student|cached] [--rows 15]

It prints the time of one small operation issued from Python (`x * 0.5` on a (256, 1, 40) tensor, the mean
of 1,000), the profiler's table sorted by the host's own time, and a last line
`busy: device X ms of host Y ms per epoch (Z%), N launches per step`.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from distil import CE, KD, ClassificationTask, Distiller, TrainConfig, fit, load_splits
from distil.device import resolve_device
from distil.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--row", default="student", choices=["student", "cached"])
    parser.add_argument("--rows", type=int, default=15, help="rows of the profiler's table")
    args = parser.parse_args()
    device = resolve_device(args.device)
    splits = load_splits("mnist1d", {"num_samples": 5000, "transfer_size": 50000}, seed=0)
    train = splits.with_transfer()
    cfg = TrainConfig(epochs=1, batch_size=256, lr=3e-3)
    torch.manual_seed(0)
    teacher = build_model("cnn1d", (1, 40), 10, width=100, depth=3).to(device).eval().requires_grad_(False)

    def student():
        return build_model("mlp", (1, 40), 10, width=100, depth=1)

    def terms():
        return [KD(T=4, weight=0.9), CE(weight=0.1)]

    if args.row == "student":
        def epoch():
            return fit(ClassificationTask(student()), train, None, cfg, device=device)
    else:
        cached = Distiller(student(), teacher, terms()).to(device).with_teacher_logits(train)

        def epoch():
            return fit(Distiller(student(), teacher, terms()), cached, None, cfg, device=device)

    for _ in range(2):  # warm-up: allocator, kernels
        epoch()
    x = torch.randn(256, 1, 40, device=device)
    start = time.perf_counter()
    for _ in range(1000):
        x * 0.5
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"one small operation from Python: {(time.perf_counter() - start) * 1e3:.1f} us ({device})")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        epoch()
    steps = len(train) // cfg.batch_size
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
    host = sum(e.self_cpu_time_total for e in events) / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC"))
    if device.type == "cuda":
        # the kernels' own time (the operators that launched them carry it too: counted once, as the table does)
        busy = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e3
        print(f"busy: device {busy:.1f} ms of host {host:.1f} ms per epoch ({busy / host:.0%}), "
              f"{launches / steps:.0f} launches per step ({steps} steps)")
    else:
        print(f"busy: host {host:.1f} ms per epoch ({steps} steps; no device)")


if __name__ == "__main__":
    main()
