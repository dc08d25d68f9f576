#!/usr/bin/env bash
# Install the ZeRO-Infinity peer (DeepSpeed 0.19.8 on torch 2.13.0) into its own venv, with fuyou
# installed editable beside it, and pre-build the two ops the benchmarks use (cpu_adam, async_io), so
# that the comparison benchmarks (bench/zero_infinity.py, bench/io_bench.py) do not spend their first
# minutes compiling. Idempotent: each step is skipped when already done. CI never runs this.
#   bash tools/setup_deepspeed_peer.sh            # venv at /tmp/dsvenv
#   DSVENV=/opt/dsvenv bash tools/setup_deepspeed_peer.sh
# Needs root (or sudo) for apt-get, network access to PyPI and Debian, about 8 minutes on 2 cores.
# Recipe and pitfalls: bench/PEERS_SETUP.md.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${DSVENV:-/tmp/dsvenv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
DS_VERSION=0.19.8

# 1. libaio headers and library (DeepSpeed's async_io op links -laio).
if ! dpkg -s libaio-dev >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libaio-dev
fi

# 2. The venv with torch first: deepspeed's setup.py imports torch, hence --no-build-isolation.
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  "$VPY" -m pip install --quiet "torch==$TORCH_VERSION"   # add --index-url .../whl/cpu on a GPU-less box if pip picks CUDA
fi
if ! "$VPY" -c "import deepspeed, sys; sys.exit(deepspeed.__version__ != '$DS_VERSION')" 2>/dev/null; then
  "$VPY" -m pip install --quiet numpy ninja packaging psutil py-cpuinfo pydantic hjson msgpack tqdm wheel
  "$VPY" -m pip install --quiet --no-build-isolation "deepspeed==$DS_VERSION"
fi

# 3. fuyou itself (editable) and the test runner, so the benchmarks and their smoke tests import both.
if ! "$VPY" -c "import fuyou, pytest, sys; sys.exit(not fuyou.__file__.startswith('$REPO/'))" 2>/dev/null; then
  "$VPY" -m pip install --quiet -e "$REPO[test]"
fi

# 4. Pre-build the ops into ~/.cache/torch_extensions (cpu_adam about 1 min, async_io about 5 min,
#    and on the CPU accelerator the shared-memory comm op init_distributed loads, about 1 min).
cd /tmp
"$VPY" - <<'PY'
import time
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder
builders = [CPUAdamBuilder(), AsyncIOBuilder()]
shm = get_accelerator().create_op_builder("ShareMemCommBuilder")  # init_distributed on the CPU accelerator
if shm is not None:
    builders.append(shm)
for builder in builders:
    if not builder.is_compatible(verbose=True):
        raise SystemExit(f"{builder.name} cannot be built here (see the messages above); is libaio-dev installed?")
    t = time.perf_counter()
    builder.load(verbose=False)
    print(f"{builder.name}: ready ({time.perf_counter() - t:.0f} s)")
PY
"$VPY" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
echo "ZeRO-Infinity peer ready: $VPY"
