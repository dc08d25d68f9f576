#!/usr/bin/env bash
# Install fuyou (editable) with the given extras, into the active Python environment.
#   bash tools/bootstrap.sh          # the package
#   bash tools/bootstrap.sh test     # the package and the test extras
# When torch is not importable yet, the small CPU build of torch 2.13.0 is installed first, from
# PyTorch's CPU index; PyPI's torch (pinned or not) is a CUDA build of several GB. On a GPU machine install your CUDA build of
# torch (>= 2.4) before running this; it is then left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # From PyTorch's CPU index: PyPI's torch 2.13.0 for Linux x86-64 is the CUDA build, with several GB of
  # NVIDIA packages (a new-user pass found this script pulling it). Where that index cannot be reached,
  # PyPI's, said so first.
  if ! "$PY" -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"; then
    echo "bootstrap: PyTorch's CPU index (download.pytorch.org) could not be used; installing torch 2.13.0" \
         "from PyPI (on Linux x86-64 that is the CUDA build, several GB)" >&2
    "$PY" -m pip install --quiet "torch==2.13.0"
  fi
fi
extras=${1:-}
"$PY" -m pip install --quiet -e ".${extras:+[$extras]}"
