#!/usr/bin/env bash
# The README's GPU figures, in one go, on a machine with one CUDA GPU (from the repository root):
#
#     OUT=/tmp/gpu bash benchmarks/gpu.sh [PART...]     (default: every part, in this order)
#
# Needs distil's dependencies importable by $PY (default python3); torchdistill too for the peers row.
# EPOCHS=N (default 1) has the throughput parts time runs of N epochs, per epoch (one-time costs shared out).
# Each part has its own time limit and writes under $OUT, so one that fails or overruns leaves the rest:
#   gpu.txt         the GPU, driver and torch build
#   tests.txt       the whole test suite (tests.log in full): the CUDA-marked tests on the GPU, the rest on the CPU
#   cuda.txt        the CUDA-marked tests alone (quick)
#   throughput.txt  benchmarks/throughput.py on the GPU (the demo pair, 4 rows)
#   compile.txt     the same with distil's rows compiled (`--compile`: one graph per training step)
#   graphs.txt      the same compiled with `--compile reduce-overhead`: each step replayed as CUDA graphs
#   profile.txt     benchmarks/step_profile.py on the GPU: where the host's time per step goes (student, cached)
#   fold.txt        benchmarks/fold.py on the GPU (teachers with their BatchNorm folded in, against unfolded)
#   demo.txt        the demo recipe end to end on the GPU (`distil run recipes/mnist1d.yaml --device cuda`)
#   cifar.txt       recipes/cifar100.yaml for 1 epoch per stage on a generated CIFAR-100 of the real size
#                   (50,000 + 10,000 random 32x32 images in the official binary format): epoch times, kd then dkd
#   peers.txt       benchmarks/peers/kd_epoch.py on the GPU (distil against torchdistill)
set -u
OUT=${OUT:-/tmp/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export DISTIL_CACHE=${DISTIL_CACHE:-/tmp/distil-cache}
PARTS=${*:-tests throughput compile graphs profile fold demo cifar peers}
EPOCHS=${EPOCHS:-1}
part() { echo "== $1 ($(date +%T))"; [[ " $PARTS " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$OUT/gpu.txt"

if part tests; then
timeout 240 $PY -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -rfE tests > "$OUT/tests.log" 2>&1
tail -25 "$OUT/tests.log" | tee "$OUT/tests.txt"
fi

if part cuda; then
timeout 120 $PY -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -rfEs -m cuda tests 2>&1 \
  | tail -15 | tee "$OUT/cuda.txt"
fi

if part throughput; then
timeout 150 $PY benchmarks/throughput.py --device cuda --rounds 3 --epochs $EPOCHS 2>&1 | tee "$OUT/throughput.txt"
fi

if part compile; then
timeout 200 $PY benchmarks/throughput.py --device cuda --rounds 3 --epochs $EPOCHS --compile 2>&1 \
  | tee "$OUT/compile.txt"
fi

if part graphs; then
timeout 200 $PY benchmarks/throughput.py --device cuda --rounds 3 --epochs $EPOCHS --compile reduce-overhead 2>&1 \
  | tee "$OUT/graphs.txt"
fi

if part profile; then
for row in student cached; do
  timeout 70 $PY benchmarks/step_profile.py --device cuda --row $row --rows 12 2>&1 | grep -vi warn
done | tee "$OUT/profile.txt"
fi

if part fold; then
timeout 90 $PY benchmarks/fold.py --device cuda 2>&1 | tee "$OUT/fold.txt"
fi

if part demo; then
{ time timeout 240 $PY -m distil run recipes/mnist1d.yaml --device cuda --run-dir /tmp/gpu-demo --force; } \
  > "$OUT/demo.log" 2>&1
grep -v "━" "$OUT/demo.log" | tail -30 > "$OUT/demo.txt"; cat "$OUT/demo.txt"
fi

if part cifar; then
$PY - <<'EOF'
import numpy as np
from distil.cifar import write_cifar
rng = np.random.default_rng(0)
y, y_test = rng.integers(0, 100, 50000), rng.integers(0, 100, 10000)
images = lambda n: rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
print(write_cifar("/tmp/cifar-gen", images(50000), y, images(10000), y_test, num_classes=100))
EOF
one_epoch=(--device cuda --run-dir /tmp/gpu-cifar --set data.args.path=/tmp/cifar-gen
           --set teacher.train.epochs=1 --set student.train.epochs=1)
{ time timeout 200 $PY -m distil run recipes/cifar100.yaml "${one_epoch[@]}" --force; } > "$OUT/cifar.log" 2>&1
# dkd as in mdistiller's CIFAR-100 config (CE weight 1, alpha 1, beta 8, T 4); the teacher and baseline are reused
{ time timeout 120 $PY -m distil run recipes/cifar100.yaml "${one_epoch[@]}" \
    --set 'distill.terms=[{kind: ce, weight: 1.0}, {kind: dkd, alpha: 1.0, beta: 8.0, T: 4.0, warmup: 20}]'; } \
  >> "$OUT/cifar.log" 2>&1
grep -E "epoch 1/1|real|Error|error" "$OUT/cifar.log" | grep -v "━" | tee "$OUT/cifar.txt"
fi

if part peers; then
timeout 150 $PY benchmarks/peers/kd_epoch.py --device cuda --rounds 3 2>&1 | tail -25 | tee "$OUT/peers.txt"
fi
echo "== done ($(date +%T))"
