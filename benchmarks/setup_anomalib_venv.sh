#!/usr/bin/env bash
# Create anomalib 2.7.0's own virtual environment for benchmarks/bench_patchcore.py.
#
# anomalib is NEVER a dependency of anomalib_study: it lives only in this venv, outside
# the repository (default /work/.venvs/anomalib-2.7.0, or $ANOMALIB_VENV / first argument).
# Idempotent: does nothing when the venv already imports anomalib 2.7.0's PatchCore.
# torch/torchvision are pinned to the versions already installed on this machine (pip's
# constraint file at /etc/xdg/pip makes pip take them from local disk; it is a CUDA build
# that runs on the CPU).
set -euo pipefail

VENV="${1:-${ANOMALIB_VENV:-/work/.venvs/anomalib-2.7.0}}"
PY="${PYTHON:-python3.11}"
CHECK='import anomalib, sys; from anomalib.models import Patchcore; from anomalib.models.image.patchcore.torch_model import PatchcoreModel; sys.exit(0 if anomalib.__version__ == "2.7.0" else 1)'

case "$VENV" in
  "$(cd "$(dirname "$0")/.." && pwd)"/*) echo "refusing to create the venv inside the repository: $VENV" >&2; exit 2;;
esac

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  echo "anomalib 2.7.0 already installed in $VENV"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip wheel
"$VENV/bin/python" -m pip install "torch==2.14.1" "torchvision==0.29.1" "anomalib==2.7.0"
# Its base requirements (lightning, timm, kornia, torchmetrics, FrEIA, opencv, ...) cover
# everything PatchCore imports: no extras are needed.
"$VENV/bin/python" -c "$CHECK"
echo "done: anomalib 2.7.0 in $VENV"
