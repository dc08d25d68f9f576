#!/usr/bin/env bash
# Install fuyou (editable) with the given extras, into the active Python environment.
#   bash tools/bootstrap.sh          # the package
#   bash tools/bootstrap.sh test     # the package and the test extras
# When torch is not importable yet, the small CPU build of torch 2.13.0 is installed first; an
# unpinned torch would pull a CUDA build of several GB. On a GPU machine install your CUDA build of
# torch (>= 2.4) before running this; it is then left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extras=${1:-}
"$PY" -m pip install --quiet -e ".${extras:+[$extras]}"
