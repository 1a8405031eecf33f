#!/usr/bin/env bash
# Builds the venv that benchmarks/peers/kd_epoch.py runs in: torch and torchvision that import together,
# torchdistill, and distil from this checkout (editable), so that both libraries are timed in one process
# on one torch build. It lives outside the repository (default: ../peers-venv) and never touches .venv.
#
#   bash benchmarks/peers/setup.sh [VENV_DIR]
#
# torch 2.14.1 from PyPI is a CUDA build (about 6 GB installed with its nvidia-* wheels); it runs on a CPU
# too. The CPU wheel of torch cannot be used: PyPI's torchvision does not import beside it ("operator
# torchvision::nms does not exist").
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$repo/../peers-venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install torch==2.14.1 torchvision==0.29.1
"$venv/bin/pip" install torchdistill==1.1.5
"$venv/bin/pip" install -e "$repo"   # distil asks torch>=2.2,<3: the venv's torch stays
"$venv/bin/python" -c "import torch, torchvision, torchdistill, distil; print('ok: torch', torch.__version__, \
'torchvision', torchvision.__version__, 'torchdistill', torchdistill.__version__, 'distil', distil.__version__)"
echo "run: $venv/bin/python $repo/benchmarks/peers/kd_epoch.py"
